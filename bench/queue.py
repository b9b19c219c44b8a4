#!/usr/bin/env python3
"""Queue mode against push mode, from one run: added latency, CPU per request, saturation, batch sizes.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/queue.py [--rounds 8] [--skip-keras]

1. Light load (open-loop Poisson, --rate, rounds interleaved) through /submit on the same `sleep`
   workers or servers (const:10ms, 2 of each): the latency queue mode adds over push mode, p50 and
   p99 (targets: <= 2 ms, <= 5 ms), and the CPU per request of the front and of Redis beside the
   balancer's.
2. Saturation (a closed loop of 16 clients) with 2 litert workers against 2 litert servers (one
   inference thread each): queue mode's throughput over push mode's (target >= 0.95).
3. keras at saturation: the mean batch a worker runs against --max-batch 8 (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds  # noqa: E402

from imgclass.measure import loadgen  # noqa: E402
from imgclass.measure.experiment import jpeg_of, multipart  # noqa: E402
from imgclass.process import Child, stop_all  # noqa: E402
from imgclass.queue.redis_server import RedisServer  # noqa: E402

ENV = {"IMGCLASS_LOG_LEVEL": "WARNING"}


class Deployment:
    """Push (servers + balancer) or queue (Redis + workers + front), started and stopped as one."""

    def __init__(self, mode: str, workers: int, model: list[str], tmp: Path) -> None:
        self.mode = mode
        self.children: list[Child] = []
        self.redis: RedisServer | None = None
        if mode == "push":
            self.children = [Child(["serve", "--port", "0", "--threads", "1", "--max-queue", "1024",
                                    "--max-wait-ms", "0", *model], env=ENV) for _ in range(workers)]  # fmt: skip
            urls = [c.wait_url() for c in self.children]
            self.front = Child(["balance", "--port", "0", "--backends", ",".join(urls)], env=ENV)
        else:
            self.redis = RedisServer(tmp / f"redis-{time.monotonic_ns()}")
            url = self.redis.start()
            self.children = [Child(["worker", "--port", "0", "--redis", url, *model], env=ENV)
                             for _ in range(workers)]  # fmt: skip
            for c in self.children:
                c.wait_url()
            self.front = Child(["balance", "--dispatch", "queue", "--port", "0", "--redis", url], env=ENV)
        self.url = self.front.wait_url()
        self.children.append(self.front)

    def pids(self) -> dict[str, list[int]]:
        out = {"front": [self.front.pid]}
        if self.redis is not None:
            out["redis"] = [self.redis.pid]
        return out

    def stop(self) -> None:
        stop_all(self.children)
        if self.redis is not None:
            self.redis.stop()


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        return sum(float(line.rsplit(" ", 1)[1]) for line in response.read().decode().splitlines()
                   if line.split(" ")[0] == name)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="light load, requests/s")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-seconds", type=float, default=5.0)
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--skip-keras", action="store_true")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    args = parser.parse_args()
    body, ctype = multipart(jpeg_of(Path(args.images) / "parrot.jpg", 224), "p.jpg")
    tmp = Path(tempfile.mkdtemp(prefix="imgclass-bench-queue-"))
    print(f"# bench/queue.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  upload {len(body)} bytes",
          flush=True)  # fmt: skip

    # 1. light load on sleep workers
    sleep = ["--backend", "sleep", "--service-time", "const:10ms"]
    modes = {m: Deployment(m, 2, sleep, tmp) for m in ("push", "queue")}
    lat: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            for mode, dep in (modes.items() if r % 2 == 0 else reversed(modes.items())):
                pids = dep.pids()
                c0 = {k: cpu_seconds(v) for k, v in pids.items()}
                spec = loadgen.LoadSpec(rate=args.rate, duration=args.round_seconds, warmup=0.5, seed=10 + r)
                records, summary = loadgen.run(loadgen.Target(dep.url + "/submit", body, ctype), spec)
                if summary.errors:
                    print(f"# warning: {mode}: errors {summary.errors}")
                lat[mode].append((summary.latency.p50, summary.latency.p99))
                for k, v in pids.items():
                    cpu.setdefault(f"{mode} {k}", []).append((cpu_seconds(v) - c0[k]) / len(records) * 1000)
            print(f"# round {r + 1}/{args.rounds}: " + "  ".join(f"{m} p50 {v[-1][0]:.2f} p99 {v[-1][1]:.2f}"
                                                                 for m, v in lat.items()), flush=True)  # fmt: skip
    finally:
        for dep in modes.values():
            dep.stop()
    added_p50 = statistics.median(q[0] - p[0] for q, p in zip(lat["queue"], lat["push"], strict=True))
    added_p99 = statistics.median(q[1] - p[1] for q, p in zip(lat["queue"], lat["push"], strict=True))

    # 2. saturation with litert
    sat: dict[str, float] = {}
    for mode in ("push", "queue"):
        dep = Deployment(mode, 2, [], tmp)
        try:
            target = loadgen.Target(dep.url + "/submit", body, ctype)
            asyncio.run(loadgen.closed_loop(target, 16, 3.0))  # warm
            records, elapsed = asyncio.run(loadgen.closed_loop(target, 16, args.saturation_seconds))
            sat[mode] = sum(1 for s in records.status if s == 200) / elapsed
        finally:
            dep.stop()
        print(f"# saturation {mode}: {sat[mode]:.1f} images/s", flush=True)

    # 3. keras batches
    batch = None
    if not args.skip_keras:
        dep = Deployment("queue", 1, ["--backend", "keras", "--weights", "random", "--max-batch", "8",
                                      "--batch-timeout-ms", "20"], tmp)  # fmt: skip
        try:
            target = loadgen.Target(dep.url + "/submit", body, ctype)
            asyncio.run(loadgen.closed_loop(target, 32, args.saturation_seconds))
            worker_url = dep.children[0].url or ""
            batch = metric_sum(worker_url, "imgclass_worker_batch_size_sum") / max(
                1.0, metric_sum(worker_url, "imgclass_worker_batch_size_count"))
        finally:
            dep.stop()

    print(f"\nlight load ({args.rate:g} req/s, {args.rounds} interleaved rounds of {args.round_seconds:g} s, "
          "2 sleep workers/servers const:10ms):")  # fmt: skip
    for mode, values in lat.items():
        print(f"  {mode:6} p50 {statistics.median(v[0] for v in values):7.2f} ms   "
              f"p99 {statistics.median(v[1] for v in values):7.2f} ms")  # fmt: skip
    print(f"  queue mode adds: p50 {added_p50:+.2f} ms (target <= 2: {'PASS' if added_p50 <= 2 else 'FAIL'})   "
          f"p99 {added_p99:+.2f} ms (target <= 5: {'PASS' if added_p99 <= 5 else 'FAIL'})")
    print("  CPU ms per request: " + "   ".join(f"{k} {statistics.median(v):.3f}" for k, v in cpu.items()))
    ratio = sat["queue"] / sat["push"]
    print(f"saturation, 2 litert workers vs 2 servers: queue {sat['queue']:.1f} / push {sat['push']:.1f} images/s "
          f"= {ratio:.2f} (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")
    if batch is not None:
        print(f"keras at saturation: mean batch {batch:.2f} of --max-batch 8 = {batch / 8:.2f} "
              f"(target >= 0.8: {'PASS' if batch / 8 >= 0.8 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
