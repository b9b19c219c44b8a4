"""What bench/peers.py needs around the servers: their venvs, their process trees, perf_analyzer."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".peer-venvs"
MODEL = "mobilenet_v2"
EXPECTED = 285  # Egyptian cat: the top-1 of cat_720p.jpg (../shared/README.md)
TICKS = os.sysconf("SC_CLK_TCK")

# Pinned peers; (package whose version is printed, what pip installs). The engine, decoder and
# numpy are pinned to imgclass's own, so that only the server differs.
PINS: dict[str, tuple[str, list[str]]] = {
    "kserve": ("kserve", ["kserve==0.21.0"]),
    # mlserver 1.7.1's workers call asyncio.get_event_loop() before they set a loop: uvloop 0.22 refuses it
    "mlserver": ("mlserver", ["mlserver==1.7.1", "uvloop<0.22"]),
    "rayserve": ("ray", ["ray[serve]==2.60.0"]),
    "litserve": ("litserve", ["litserve==0.2.19"]),
    # the last wheel whose perf_analyzer runs on this glibc (2.36); it links libcudart (no GPU needed)
    "perf": ("tritonclient", ["tritonclient[all]==2.51.0", "nvidia-cuda-runtime-cu12==12.9.79"]),
}
SAME_AS_OURS = ("ai-edge-litert", "pillow", "numpy")


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_venv(name: str) -> str:
    """The peer's venv, created (or repaired) with the pinned versions; its version, printed."""
    package, pins = PINS[name]
    python = venv_python(name)
    ours = [f"{p}=={metadata.version(p)}" for p in SAME_AS_OURS] if name != "perf" else []
    wanted = {pin.split("==")[0].split("[")[0]: pin.split("==")[1] for pin in pins + ours if "==" in pin}

    def installed() -> dict[str, str]:
        probe = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
        out = subprocess.run([str(python), "-c", probe, *wanted], capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    if not python.exists() or installed() != wanted:
        print(f"# creating {python.parent.parent} with {' '.join(pins + ours)} (a few minutes)", flush=True)
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(VENVS / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins, *ours],
                       check=True)  # fmt: skip
    return installed().get(package, "?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> set[int]:
    """The process and every process below it (Ray's raylet and workers, LitServe's workers, ...)."""
    out, stack = {pid}, [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in out:
                    out.add(kid)
                    stack.append(kid)
    return out


def cpu_of(pids: set[int]) -> dict[int, float]:
    """utime + stime of each process still there, every thread included, in seconds."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def memory_mb(pids: set[int]) -> float:
    """Proportional set size of these processes, in MB: pages shared between them counted once."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        total += int(text.split("\nPss:", 1)[1].split()[0])
    return total / 1024


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server, then whatever it started that is still there (LitServe's workers outlive it)."""
    pids = tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if left:
            time.sleep(3)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as imgclass.measure.stats."""
    return float(np.percentile(values, q, method="inverted_cdf")) if values else float("nan")


def wait_ready(url: str, body: bytes, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    """Until a real request answers 200 with the expected class."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                if answer.status == 200:
                    reply = answer.read()
                    if f":{EXPECTED}:".encode() not in reply:
                        raise RuntimeError(f"wrong answer: {reply[:200]!r}")
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("not ready in time")


def perf_analyzer(url: str, rate: float, seconds: float, data_file: Path, out: Path) -> tuple[float, float, str]:
    """(p50, p99 ms, note) from perf_analyzer at `rate`, Poisson; note says why when it could not run."""
    binary = VENVS / "perf" / "bin" / "perf_analyzer"
    cudart = next((VENVS / "perf").glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"), None)
    if not binary.exists() or cudart is None:
        return float("nan"), float("nan"), "perf_analyzer not installed"
    count = max(50, int(rate * seconds / 2))
    command = [str(binary), "-m", MODEL, "-u", url.removeprefix("http://"), "-i", "http", "--input-data", str(data_file),
               "--request-rate-range", f"{rate:.1f}", "--request-distribution", "poisson",
               "--measurement-mode", "count_windows", "--measurement-request-count", str(count),
               "--max-trials", "3", "--stability-percentage", "1000", "-f", str(out)]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(cudart)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 or not out.exists():
        why = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "rror" in line or "ailed" in line]
        return float("nan"), float("nan"), (why[0] if why else f"exit {done.returncode}")[:90]
    row = next(csv.DictReader(out.read_text().splitlines()))
    return float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000, ""
