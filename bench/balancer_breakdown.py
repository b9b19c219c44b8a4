#!/usr/bin/env python3
"""Where the balancer's added latency comes from: added p50 at fixed rates, and CPU per request split by process.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/balancer_breakdown.py [--rates 100,300,600]

The same setup as bench/balancer.py (four const:2ms sleep backends, our balancer, nginx with
`random; keepalive 64`, a 39 KB multipart upload). For each rate, over --rounds shuffled rounds:
the median added p50 of each proxy against calling the backends directly, and per forwarded
request the user and kernel CPU ms of the proxy, of the four model servers, and of the load
generator (this process). Low rates show the proxy's own path; high rates add waiting for a core.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from balancer import NGINX_HTTP, NGINX_SERVER, upload
from common import ROOT, Nginx, cpu_split, find_nginx

from imgclass.measure import loadgen
from imgclass.process import Child, stop_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="100,300,600")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=3.0)
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    args = parser.parse_args()
    nginx_bin = find_nginx(install=True)
    if nginx_bin is None:
        print("SKIP: nginx is not installed and could not be installed; it is the baseline here")
        return 0
    body, ctype = upload(Path(args.images))
    env = {"IMGCLASS_LOG_LEVEL": "WARNING"}
    print(f"# bench/balancer_breakdown.py  {time.strftime('%Y-%m-%d %H:%M')}  rounds={args.rounds} x "
          f"{args.round_seconds:g} s per rate and target")  # fmt: skip
    children: list[Child] = []
    nginx: Nginx | None = None
    try:
        children = [Child(["serve", "--port", "0", "--backend", "sleep", "--service-time", "const:2ms",
                           "--threads", "16", "--max-queue", "4096"], env=env) for _ in range(4)]  # fmt: skip
        backends = [c.wait_url() for c in children]
        servers = [c.pid for c in children]
        ours = Child(["balance", "--port", "0", "--backends", ",".join(backends), "--seed", "1"], env=env)
        children.append(ours)
        netlocs = "\n".join(f"        server {urlsplit(b).netloc};" for b in backends)
        nginx = Nginx(nginx_bin, NGINX_HTTP.format(servers=netlocs), NGINX_SERVER)
        spread = tuple(b + "/predict" for b in backends)
        targets = {
            "direct": (loadgen.Target(backends[0] + "/predict", body, ctype, spread=spread), []),
            "imgclass": (loadgen.Target(ours.wait_url() + "/submit", body, ctype), [ours.pid]),
            "nginx": (loadgen.Target(nginx.url + "/submit", body, ctype), nginx.pids()),
        }
        print(f"{'rate/s':>7} {'target':>9} {'p50 ms':>8} {'added p50':>10} {'proxy user':>11} {'proxy sys':>10} "
              f"{'servers user':>13} {'servers sys':>12} {'generator':>10}   (CPU in ms per request)")  # fmt: skip
        for rate in (float(r) for r in args.rates.split(",")):
            p50: dict[str, list[float]] = {k: [] for k in targets}
            cpu: dict[str, list[tuple[float, ...]]] = {k: [] for k in targets}
            for r in range(args.rounds):
                names = list(targets)
                random.Random(r).shuffle(names)
                for name in names:
                    target, pids = targets[name]
                    p0, s0, g0 = cpu_split(pids), cpu_split(servers), time.process_time()
                    spec = loadgen.LoadSpec(rate=rate, duration=args.round_seconds, warmup=0.5, seed=3 + r)
                    records, summary = loadgen.run(target, spec)
                    n = max(len(records), 1) / 1000
                    p1, s1, g1 = cpu_split(pids), cpu_split(servers), time.process_time()
                    p50[name].append(summary.latency.p50)
                    cpu[name].append(((p1[0] - p0[0]) / n, (p1[1] - p0[1]) / n, (s1[0] - s0[0]) / n,
                                      (s1[1] - s0[1]) / n, (g1 - g0) / n))  # fmt: skip
            for name in targets:
                added = (
                    ""
                    if name == "direct"
                    else "{:.3f}".format(
                        statistics.median(a - d for a, d in zip(p50[name], p50["direct"], strict=True))
                    )
                )
                c = [statistics.median(x[i] for x in cpu[name]) for i in range(5)]
                proxy = ("-", "-") if name == "direct" else (f"{c[0]:.3f}", f"{c[1]:.3f}")
                print(f"{rate:>7.0f} {name:>9} {statistics.median(p50[name]):>8.3f} {added:>10} {proxy[0]:>11} "
                      f"{proxy[1]:>10} {c[2]:>13.3f} {c[3]:>12.3f} {c[4]:>10.3f}", flush=True)  # fmt: skip
    finally:
        if nginx is not None:
            nginx.stop()
        stop_all(children)
    return 0


if __name__ == "__main__":
    sys.exit(main())
