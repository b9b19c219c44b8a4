#!/usr/bin/env python3
"""The balancer under a 2x overload, on real litert servers: shedding, no ejection, fast 503s, bounded memory.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/overload.py [--servers 3] [--seconds 20] [--photo big]

Phases, in one run, against `imgclass up`'s layout (N litert servers with one inference thread
each, and a balancer, all on defaults):
1. unloaded: open-loop Poisson at a light rate: the unloaded p50;
2. saturation: a closed loop of 16 clients: the throughput of 200s;
3. overload: open-loop Poisson at 2x that throughput for --seconds;
4. light load again.
Printed: the share of 200 / 503 / other, the time to a 503 (p50, p99), p50 and p99 of the accepted
requests against the unloaded p50, the throughput of 200s against saturation, ejections and the
seconds with no backend in service (sampled every 0.1 s), and the RSS of every process before, at
its peak and after. Targets (issue 18): no ejection, 200s >= 0.95 x saturation, 503s within 50 ms,
accepted p99 <= 10 x the unloaded p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgclass.measure import loadgen  # noqa: E402
from imgclass.measure.experiment import jpeg_of, multipart  # noqa: E402
from imgclass.measure.stats import percentile  # noqa: E402
from imgclass.process import Child, stop_all  # noqa: E402


def rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return math.nan


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class Watcher:
    """Samples the balancer's backends in service and every process's RSS, every 0.1 s, in a thread."""

    def __init__(self, url: str, pids: dict[str, int]) -> None:
        self.url = url
        self.pids = pids
        self.peak = {name: 0.0 for name in pids}
        self.no_backend_samples = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            try:
                with urllib.request.urlopen(self.url + "/backends", timeout=2) as response:
                    in_service = sum(b["available"] for b in json.loads(response.read()))
            except OSError:
                continue
            self.samples += 1
            self.no_backend_samples += in_service == 0

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def latency_ms(records: loadgen.Records) -> list[float]:
    """Each request's latency, from its scheduled send time to its answer."""
    return [(done - intended) * 1000 for intended, done in zip(records.intended, records.done, strict=True)]


def open_loop(target: loadgen.Target, rate: float, seconds: float, seed: int) -> loadgen.Records:
    spec = loadgen.LoadSpec(rate=rate, duration=seconds, warmup=0.0, seed=seed, max_in_flight=5000, timeout=60)
    records, _ = loadgen.run(target, spec)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the overload")
    parser.add_argument("--photo", choices=("small", "big"), default="small",
                        help="small: a 224 px JPEG (13 KB); big: cat_720p.jpg (104 KB)")  # fmt: skip
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    parser.add_argument("--balancer-args", default="", help="extra flags for the balancer, e.g. '--max-conn 2'")
    args = parser.parse_args()
    images = Path(args.images)
    photo = jpeg_of(images / "parrot.jpg", 224) if args.photo == "small" else (images / "cat_720p.jpg").read_bytes()
    body, ctype = multipart(photo, "p.jpg")
    env = {"IMGCLASS_LOG_LEVEL": "WARNING"}
    print(f"# bench/overload.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  {args.servers} litert "
          f"servers (1 thread each) behind the balancer, defaults{' + ' + args.balancer_args if args.balancer_args else ''}; "
          f"upload {len(body)} bytes", flush=True)  # fmt: skip
    children: list[Child] = []
    try:
        children = [Child(["serve", "--port", "0", "--threads", "1", "--name", f"server{i + 1}"], env=env)
                    for i in range(args.servers)]  # fmt: skip
        urls = [c.wait_url() for c in children]
        front = Child(["balance", "--port", "0", "--backends", ",".join(urls), *args.balancer_args.split()], env=env)
        children.append(front)
        url = front.wait_url()
        target = loadgen.Target(url + "/submit", body, ctype)
        pids = {"balancer": front.pid, **{f"server{i + 1}": c.pid for i, c in enumerate(children[:-1])}}
        before = {name: rss_mb(pid) for name, pid in pids.items()}

        open_loop(target, 20, 3, seed=1)  # warm-up
        unloaded = open_loop(target, 20, 10, seed=2)
        unloaded_p50 = percentile([ms for ms, s in zip(latency_ms(unloaded), unloaded.status, strict=True)
                                   if s == 200], 50)  # fmt: skip
        print(f"# unloaded p50 {unloaded_p50:.2f} ms", flush=True)
        sat_records, elapsed = asyncio.run(loadgen.closed_loop(target, 16, 10.0))
        saturation = sum(1 for s in sat_records.status if s == 200) / elapsed
        print(f"# saturation {saturation:.1f} req/s (closed loop, 16 clients)", flush=True)
        ejections0 = metric(url, "imgclass_balancer_ejections_total")
        with Watcher(url, pids) as watcher:
            over = open_loop(target, 2 * saturation, args.seconds, seed=3)
        ejections = metric(url, "imgclass_balancer_ejections_total") - ejections0
        retries = {r: metric(url, f'imgclass_balancer_retries_total{{reason="{r}"}}')
                   for r in ("overloaded", "no_response", "try_timeout")}  # fmt: skip
        refused = metric(url, 'imgclass_balancer_retries_refused_total{reason="overloaded"}')
        light = open_loop(target, 20, 10, seed=4)
        time.sleep(2)
        after = {name: rss_mb(pid) for name, pid in pids.items()}
    finally:
        stop_all(children)

    latency = latency_ms(over)
    ok = sorted(ms for ms, s in zip(latency, over.status, strict=True) if s == 200)
    shed = sorted(ms for ms, s in zip(latency, over.status, strict=True) if s == 503)
    other = len(over) - len(ok) - len(shed)
    errors = {e: over.error.count(e) for e in set(over.error) if e}
    light_ok = sorted(ms for ms, s in zip(latency_ms(light), light.status, strict=True) if s == 200)
    throughput = len(ok) / args.seconds
    no_backend_s = watcher.no_backend_samples * 0.1
    n = len(over)
    print(f"\noverload: {2 * saturation:.0f} req/s offered (2 x saturation) for {args.seconds:g} s, {n} requests")
    print(f"  answers: 200 {len(ok) / n:.1%}   503 {len(shed) / n:.1%}   other {other / n:.1%}   {errors}")
    print(f"  time to a 503: p50 {percentile(shed, 50):.1f} ms   p99 {percentile(shed, 99):.1f} ms")
    print(f"  accepted: p50 {percentile(ok, 50):.1f} ms ({percentile(ok, 50) / unloaded_p50:.1f} x unloaded p50)   "
          f"p99 {percentile(ok, 99):.1f} ms ({percentile(ok, 99) / unloaded_p50:.1f} x unloaded p50 {unloaded_p50:.1f} ms)")
    print(f"  throughput of 200s: {throughput:.1f} req/s = {throughput / saturation:.2f} x saturation ({saturation:.1f})")
    print(f"  ejections: {ejections:.0f}   seconds with no backend in service: {no_backend_s:.1f} "
          f"(of {watcher.samples} samples)   retries: {retries}, refused by the budget: {refused:.0f}")
    print(f"light load after: p50 {percentile(light_ok, 50):.1f} ms, {len(light_ok)}/{len(light)} answered 200")
    print(f"\n{'RSS MB':12}{'before':>10}{'peak':>10}{'after':>10}")
    for name in before:
        print(f"{name:12}{before[name]:>10.1f}{watcher.peak[name]:>10.1f}{after[name]:>10.1f}")
    verdicts = [
        ("no backend ejected", ejections == 0),
        ("200s >= 0.95 x saturation", throughput >= 0.95 * saturation),
        ("503s within 50 ms (p99)", bool(shed) and percentile(shed, 99) <= 50),
        ("accepted p99 <= 10 x unloaded p50", percentile(ok, 99) <= 10 * unloaded_p50),
        ("no second with no backend in service", no_backend_s == 0),
    ]
    print()
    for label, passed in verdicts:
        print(f"target: {label}: {'PASS' if passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
