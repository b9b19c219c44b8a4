#!/usr/bin/env python3
"""The open-loop load generator against a fast endpoint: achieved rate, send lag and its CPU cost.

    .venv/bin/python bench/loadgen.py [--rates 500,1000,1500,2000] [--seconds 10]

The endpoint is nginx answering `return 200`, started here with one worker, so the generator is
what is measured; without nginx the script says so and stops. Each rate runs with both of the
generator's clients, the lean one (its default) and aiohttp's (the maintained one the balancer
uses), so the reason the lean one stays is measured in the same run. Figures per rate and client:
offered, achieved and their ratio (target: within 1% up to at least 1000/s), p99 lateness of
sends against the schedule (send lag: latency from the scheduled time includes it), and the
generator's CPU ms per request (this process).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import Nginx, find_nginx  # noqa: E402

from imgclass.measure import loadgen  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="500,1000,1500,2000")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    binary = find_nginx()
    if binary is None:
        print("SKIP: nginx is not installed (apt-get install nginx); it is the fast endpoint this bench needs")
        return 0
    nginx = Nginx(binary, "    keepalive_requests 1000000;", '        location / { return 200 "ok"; }')
    print(f"# bench/loadgen.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  endpoint: nginx return 200")
    print(f"{'client':>8}{'offered/s':>10}{'achieved/s':>12}{'ratio':>8}{'send lag p99 ms':>17}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'dropped':>9}{'CPU ms/req':>12}")  # fmt: skip
    try:
        target = loadgen.Target(nginx.url + "/", b"x" * 64, "application/octet-stream")
        for rate in (float(r) for r in args.rates.split(",")):
            for client in ("lean", "aiohttp"):
                spec = loadgen.LoadSpec(rate=rate, duration=args.seconds, warmup=1.0, max_in_flight=2000, seed=7,
                                        client=client)  # fmt: skip
                c0 = time.process_time()
                records, s = loadgen.run(target, spec)
                cpu = (time.process_time() - c0) / max(len(records), 1) * 1000
                print(f"{client:>8}{rate:>10.0f}{s.achieved_rate:>12.1f}{s.achieved_rate / rate:>8.3f}"
                      f"{s.send_lag_p99_ms:>17.3f}{s.latency.p50:>9.3f}{s.latency.p99:>9.3f}"
                      f"{sum(s.errors.values()):>8}{s.dropped:>9}{cpu:>12.3f}", flush=True)  # fmt: skip
    finally:
        nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
