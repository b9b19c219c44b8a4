"""What both experiment scripts share: the target service, test images, and output files."""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from ..local import LocalCluster, cluster_options
from ..testbed.inventory import balancer_url_from_cluster

DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "images"  # ../shared beside the checkout
RUNS = Path("runs")  # default output: git-ignored, one fresh folder per run, so no run overwrites another
# Seconds to start a local cluster: measured on the 2-core development machine, 1.0 s for 2 sleep
# servers and 4.1 s for 16 (they start in parallel), plus about 0.5 s to stop it.
CLUSTER_START_S, CLUSTER_PER_SERVER_S = 1.0, 0.25
RUN_OVERHEAD_S = 1.0  # per run: the in-flight tail, the summary, the pause between runs
PLOTS_S = 3.0  # drawing the figures


def default_images_dir() -> Path:
    env = os.environ.get("IMGCLASS_IMAGES_DIR")
    for candidate in (Path(env) if env else None, Path("../shared/images"), DEFAULT_IMAGES):
        if candidate is not None and candidate.is_dir():
            return candidate
    return Path("../shared/images")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("IMGCLASS_URL", "http://127.0.0.1:5000"),
                        help="balancer base URL [env IMGCLASS_URL; default http://127.0.0.1:5000]")  # fmt: skip
    parser.add_argument("--cluster-file", default=os.environ.get("IMGCLASS_CLUSTER"),
                        help="cluster.json from 'imgclass testbed hosts': use its balancer [env IMGCLASS_CLUSTER]")  # fmt: skip
    parser.add_argument(
        "--out", help="folder for CSV, JSON and PNG files [default: a new runs/<script>-<date>-<time>/]"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival process [default 1]")
    parser.add_argument("--max-in-flight", type=int, default=1000, help="requests in flight before dropping")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


@contextmanager
def local_cluster(**cluster: object) -> Iterator[tuple[LocalCluster, str]]:
    """A local cluster (`imgclass up` options from the defaults table), started and always stopped.

    Its servers queue instead of shedding (no --max-wait-ms, a long --max-queue): an experiment
    measures the queue, and a 503 for a burst of its own arrivals would be an artefact of the bound.
    """
    ns = cluster_options(log_level="WARNING", **{"max_queue": 1024, "max_wait_ms": 0.0, **cluster})
    if ns.dispatch == "queue" and not ns.redis:
        ns.redis_dir = tempfile.mkdtemp(prefix="imgclass-redis-")  # a queue of its own, not var/redis
    running = LocalCluster(ns, echo=False)
    what = f"Redis and {ns.workers} {ns.backend} worker(s)" if ns.dispatch == "queue" else f"{ns.servers} {ns.backend} server(s)"
    print(f"# starting a local cluster: {what}", file=sys.stderr, flush=True)
    url = running.start()
    try:
        yield running, url
    finally:
        running.stop()


@contextmanager
def target_service(args: argparse.Namespace, local: bool, **cluster: object) -> Iterator[str]:
    """The balancer base URL: a local cluster started (and stopped) here, or the given one."""
    if not local:
        yield balancer_url_from_cluster(args.cluster_file) if args.cluster_file else args.url.rstrip("/")
        return
    with local_cluster(**cluster) as (_, url):
        yield url


def jpeg_of(path: Path, size: int, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def multipart(data: bytes, filename: str = "image.jpg", ctype: str = "image/jpeg") -> tuple[bytes, str]:
    boundary = "imgclass-experiment-7d93c1"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str))


def default_out_dir(script: str, when: time.struct_time | None = None, root: Path = RUNS) -> Path:
    """runs/<script>-<YYYYmmdd-HHMM>, with -2, -3... when that minute's folder already exists."""
    base = f"{Path(script).stem}-{time.strftime('%Y%m%d-%H%M', when or time.localtime())}"
    path, k = root / base, 2
    while path.exists():
        path, k = root / f"{base}-{k}", k + 1
    return path


def out_dir(args: argparse.Namespace, script: str) -> Path:
    """--out, or a fresh folder under runs/; args.out is set to it, so the saved options name it."""
    out = Path(args.out) if args.out else default_out_dir(script)
    args.out = str(out)
    return out


def run_info(script: str, argv: Sequence[str] | None, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What the results JSON records about the run, so its plots can say how it was made."""
    typed = list(sys.argv[1:] if argv is None else argv)
    return {
        "script": script,
        "command": f"python {script} {shlex.join(typed)}".rstrip(),  # as typed: copy it to run again
        "argv": typed,
        "args": vars(args),  # every option, defaults included
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def cluster_start_s(servers: int) -> float:
    return CLUSTER_START_S + CLUSTER_PER_SERVER_S * servers


def duration_text(seconds: float) -> str:
    """45 s, 3 min 20 s, 1 h 05 min: how long a reader should expect to wait."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {round(s % 3600 / 60):02d} min"


def announce(script: str, out: Path, expected_s: float, plan: str) -> None:
    """Before anything runs: where the files will go, and how long it should take."""
    print(f"# {script}: {plan}; expected about {duration_text(expected_s)}", file=sys.stderr, flush=True)
    print(f"# writing to {out}/", file=sys.stderr, flush=True)


def progress(k: int, total: int, what: str, left_s: float) -> None:
    """One line per run, also under --quiet: 'run 3 of 20: ...'."""
    print(f"# run {k} of {total}: {what} (about {duration_text(left_s)} left)", file=sys.stderr, flush=True)


def finished(out: Path) -> None:
    """After the last file: where they all are."""
    print(f"# all files are in {out}/", file=sys.stderr, flush=True)
