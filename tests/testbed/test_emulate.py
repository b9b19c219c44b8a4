"""The emulated slice, for real: namespaces, veth links, tbf shaping, the service across them."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imgclass.testbed.emulate import netem_available, topology_from_rspec
from imgclass.testbed.rspec import DEFAULT_SERVERS, request_rspec
from imgclass.testbed.topology import star

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = f"icprobe{os.getpid() % 10000}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "'ip netns add' is not permitted here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _can_netns()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulation skipped: {REASON}")

CLIENT = """
import json, sys, time, urllib.request
data = open(sys.argv[1], "rb").read()
boundary = "emuboundary"
body = (f'--{boundary}\\r\\nContent-Disposition: form-data; name="image"; filename="p.jpg"\\r\\n'
        'Content-Type: image/jpeg\\r\\n\\r\\n').encode() + data + f'\\r\\n--{boundary}--\\r\\n'.encode()
times, top = [], None
for _ in range(3):
    req = urllib.request.Request(sys.argv[2] + "/submit", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = json.loads(r.read())
    times.append(time.perf_counter() - t)
    top = doc["predictions"][0]["index"]
print(json.dumps({"best_s": min(times), "top1": top}))
"""


def _photo(images_dir: Path, path: Path) -> int:
    """A 2000 px photo of about 230 KB, as the issue's shaping check names."""
    buf = io.BytesIO()
    Image.open(images_dir / "cat_720p.jpg").convert("RGB").resize((2000, 2000)).save(buf, "JPEG", quality=72)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def _leftovers(run_id: str) -> list[str]:
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [line for line in spaces.splitlines() if line.startswith(run_id)]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"{run_id}-" in cmdline and "pytest" not in cmdline:
                found.append(f"process {pid}: {cmdline.replace(chr(0), ' ')[:80]}")
    return found


def _run_slice(tmp_path: Path, model_dir: Path, run_id: str, rate: str, delay: str, photo: Path) -> dict:
    rspec = tmp_path / "two.rspec"
    rspec.write_text(request_rspec(star(2)))
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    url = "http://10.10.3.2:5000"
    proc = subprocess.run(
        [sys.executable, "-m", "imgclass", "testbed", "emulate", "--rspec", str(rspec), "--id", run_id,
         "--rate", rate, "--delay", delay, "--run", f"{sys.executable} {client} {photo} {url}"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "IMGCLASS_MODEL_DIR": str(model_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _leftovers(run_id) == []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_topology_from_rspec_matches_the_generator() -> None:
    assert topology_from_rspec((ROOT / "image_class.rspec").read_text()) == star(DEFAULT_SERVERS)


@needs_netns
def test_slice_classifies_and_shaping_is_real(tmp_path: Path, model_dir: Path, images_dir: Path) -> None:
    photo = tmp_path / "big.jpg"
    size = _photo(images_dir, photo)
    assert 150_000 < size < 330_000
    base = f"ict{os.getpid() % 10000}"
    unshaped = _run_slice(tmp_path, model_dir, base + "u", "none", "none", photo)
    shaped = _run_slice(tmp_path, model_dir, base + "s", "10mbit", "none", photo)
    assert unshaped["top1"] in {281, 282, 283, 284, 285, 287} and shaped["top1"] == unshaped["top1"]
    # ~230 KB crosses two 10 Mbit hops (client->balancer, balancer->server): ~2 x 180 ms
    assert shaped["best_s"] - unshaped["best_s"] >= 0.150, (shaped, unshaped)


@needs_netns
def test_netem_delay_where_the_kernel_has_it(tmp_path: Path, model_dir: Path, images_dir: Path) -> None:
    if not netem_available():
        pytest.skip("this kernel has no netem qdisc: delay and loss cannot be emulated here (tbf shaping is tested)")
    photo = tmp_path / "small.jpg"
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((224, 224)).save(photo, "JPEG")
    base = f"icd{os.getpid() % 10000}"
    plain = _run_slice(tmp_path, model_dir, base + "a", "none", "none", photo)
    delayed = _run_slice(tmp_path, model_dir, base + "b", "none", "25ms", photo)
    # one request crosses 2 links each way: 4 x 25 ms more at least
    assert delayed["best_s"] - plain["best_s"] >= 0.09
