#!/usr/bin/env python3
"""Model server vs the raw LiteRT engine: CPU ms per image, images/s, and latency, from one run.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/server.py [--seconds 15] [-- serve options]

CPU time comes from /proc (utime+stime of the server process, every thread), the fair figure on a
shared 2-core machine where the load generator competes for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_seconds  # noqa: E402

from imgclass.measure import loadgen  # noqa: E402
from imgclass.measure.experiment import jpeg_of, multipart  # noqa: E402
from imgclass.process import Child  # noqa: E402
from imgclass.serving.backends import BackendOptions, load_backend  # noqa: E402
from imgclass.serving.images import decode  # noqa: E402


def engine_figures(model_dir: str, jpeg: bytes, threads: int, n: int) -> dict[str, float]:
    backend = load_backend("litert", BackendOptions(model_dir))
    arr = decode(jpeg, 50_000_000)[None]
    engine = backend.engine(0)
    for _ in range(20):
        engine(arr, 0.0)
    walls = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        engine(arr, 0.0)
        walls.append(time.perf_counter() - t)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    d0 = time.process_time()
    for _ in range(n):
        decode(jpeg, 50_000_000)
    decode_cpu_ms = (time.process_time() - d0) / n * 1000
    # all cores: one engine per thread, as the server runs them
    engines = [backend.engine(i) for i in range(threads)]
    per = n // threads

    def loop(e) -> None:
        for _ in range(per):
            e(arr, 0.0)

    workers = [threading.Thread(target=loop, args=(e,)) for e in engines]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    parallel_ips = per * threads / (time.perf_counter() - t0)
    return {
        "cpu_ms": (cpu1 - cpu0) / n * 1000,
        "single_ms_p50": statistics.median(walls) * 1000,
        "ips_1thread": n / (wall1 - wall0),
        "ips_all": parallel_ips,
        "decode_cpu_ms": decode_cpu_ms,
    }


def light_load(url: str, body: bytes, ctype: str, n: int) -> tuple[float, float]:
    """Sequential requests with idle gaps: the server-side total and the client RTT, p50 in ms."""
    server_ms, rtt_ms = [], []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc = json.loads(resp.read())
        rtt_ms.append((time.perf_counter() - t) * 1000)
        server_ms.append(doc["timing_ms"]["total"])
        time.sleep(0.02)
    return statistics.median(server_ms), statistics.median(rtt_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the saturation and half-load runs")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients at saturation")
    parser.add_argument("--image", default=str(ROOT.parent / "shared" / "images" / "cat_720p.jpg"))
    parser.add_argument("serve_args", nargs="*", help="extra 'imgclass serve' options, after --")
    args = parser.parse_args()
    model_dir = os.environ.get("IMGCLASS_MODEL_DIR", str(ROOT / "models"))
    jpeg = jpeg_of(Path(args.image), 224, quality=90)
    body, ctype = multipart(jpeg, "x.jpg")
    threads = os.cpu_count() or 1

    print(f"# bench/server.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={threads}  224px JPEG of {len(jpeg)} bytes")
    eng = engine_figures(model_dir, jpeg, threads, 400)
    child = Child(
        ["serve", "--port", "0", *args.serve_args],
        env={"IMGCLASS_MODEL_DIR": model_dir, "IMGCLASS_LOG_LEVEL": "WARNING"},
    )
    try:
        url = child.wait_url() + "/predict"
        target = loadgen.Target(url, body, ctype)
        asyncio.run(loadgen.closed_loop(target, args.concurrency, 2.0))  # warm up
        cpu0 = cpu_seconds([child.pid])
        records, elapsed = asyncio.run(loadgen.closed_loop(target, args.concurrency, args.seconds))
        cpu1 = cpu_seconds([child.pid])
        ok = sum(1 for s in records.status if s == 200)
        server_cpu_ms = (cpu1 - cpu0) / max(ok, 1) * 1000
        sat_ips = ok / elapsed
        half = sat_ips / 2
        _, summary = loadgen.run(target, loadgen.LoadSpec(rate=half, duration=args.seconds, warmup=1.0, seed=1))
        light_server_p50, light_rtt_p50 = light_load(url, body, ctype, 200)
    finally:
        child.stop()

    ratio = eng["cpu_ms"] / server_cpu_ms
    print(f"{'':34}{'engine (no HTTP)':>18}{'server (HTTP)':>16}{'ratio':>8}")
    print(
        f"{'CPU ms per image':34}{eng['cpu_ms']:>18.3f}{server_cpu_ms:>16.3f}{ratio:>8.2f}   target >= 0.80: {'PASS' if ratio >= 0.8 else 'FAIL'}"
    )
    print(
        f"{'  engine + JPEG decode':34}{eng['cpu_ms'] + eng['decode_cpu_ms']:>18.3f}{'':>16}{(eng['cpu_ms'] + eng['decode_cpu_ms']) / server_cpu_ms:>8.2f}"
    )
    print(f"{'images/s, 1 thread':34}{eng['ips_1thread']:>18.1f}")
    print(
        f"{f'images/s, {threads} threads / saturation':34}{eng['ips_all']:>18.1f}{sat_ips:>16.1f}{sat_ips / eng['ips_all']:>8.2f}"
    )
    print(
        f"{'single image ms (p50)':34}{eng['single_ms_p50']:>18.3f}{light_server_p50:>16.3f}{light_server_p50 / eng['single_ms_p50']:>8.2f}"
        f"   server-side p50 at light load <= 2x engine: {'PASS' if light_server_p50 <= 2 * eng['single_ms_p50'] else 'FAIL'}"
    )
    print(f"client RTT p50 at light load: {light_rtt_p50:.3f} ms")
    lat = summary.latency
    print(
        f"half load ({half:.0f} req/s offered, {summary.achieved_rate:.0f} achieved, open loop, Poisson): "
        f"p50 {lat.p50:.2f} ms  p99 {lat.p99:.2f} ms  errors {sum(summary.errors.values())}  dropped {summary.dropped}"
    )
    print(
        f"saturation: closed loop, {args.concurrency} clients, {args.seconds:.0f} s, {ok} images, "
        f"{sum(1 for s in records.status if s != 200)} non-200"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
