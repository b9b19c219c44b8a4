#!/usr/bin/env python3
"""Our balancer, its HAProxy engine mode, nginx (`random; keepalive 64`) and a bare ASGI forwarder, on the same sleep backends.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/balancer.py [--seconds 10]

Prints CPU ms per forwarded request for each proxy (from /proc), their ratio, throughput at
saturation (wrk if installed, else our closed-loop client), and the p50/p99 latency each proxy
adds at half load compared with calling the backends directly (open-loop Poisson; "direct" picks
a backend at random per request on the client, so every backend carries the same load as behind
a proxy; saturation "direct" is one backend). It also reads, per forwarded request, each proxy's
run-queue wait (runnable, waiting for a core) and preemptions (involuntary context switches),
which show how much of the added latency is sharing cores rather than the proxy's own path.
The added p50 is the median over rounds of (proxy p50 - direct p50); beside it, an exact 95% CI
for that median from order statistics, so that a PASS or FAIL within the host's noise says so.

The third proxy, "bare-asgi" (bench/asgi_proxy.py), is uvicorn and aiohttp with nothing else: the
floor of the stack the balancer stands on, so the balancer's CPU beyond it is what its features cost.
The fourth, "haproxy", is `imgclass balance --engine haproxy`: HAProxy forwards (one thread, as
nginx has one worker) and the balancer's process is its control plane; its CPU is HAProxy's master
and worker plus the control plane's, together.

By default every process shares every core, which is how the targets are checked. --pin (two
cores or more) gives the proxy under test the last core to itself and puts the backends, the load
generator and wrk on the others, as on the testbed, where the balancer has a node of its own. Both
proxies are pinned alike. It separates the proxy's own path from waiting for a shared core, but
saturation is then that of the other cores, so "half load" is a lower rate.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import Nginx, cpu_seconds, find_nginx, pin, preemptions, run_queue_seconds  # noqa: E402

from imgclass.measure import loadgen  # noqa: E402
from imgclass.measure.experiment import jpeg_of, multipart  # noqa: E402
from imgclass.measure.stats import median_ci  # noqa: E402
from imgclass.process import Child, stop_all  # noqa: E402

CPU_TARGET = 5.0  # issue 15: CPU per forwarded request at most 5 x nginx's, on uvicorn and aiohttp
ENGINE_TARGET = 1.2  # issue 20: engine mode (HAProxy and its control plane) at most 1.2 x nginx's
RATIOS = {"imgclass": "ours/nginx", "haproxy": "engine/nginx", "bare-asgi": "bare/nginx"}

NGINX_HTTP = """
    client_body_buffer_size 128k;
    client_max_body_size 25m;
    upstream imgclass {{
        random;
{servers}
        keepalive 64;
    }}"""
NGINX_SERVER = """
        location = /submit {
            proxy_pass http://imgclass/predict;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""


def find_haproxy() -> str | None:
    return shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"]))


def family(pid: int) -> list[int]:
    """A process and every process below it, from /proc: the control plane, HAProxy's master and worker."""
    found, stack = [pid], [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            found += kids
            stack += kids
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"bench/asgi_proxy.py exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise RuntimeError("bench/asgi_proxy.py did not listen")


def upload(images: Path) -> tuple[bytes, str]:
    """A ~40 KB JPEG in a multipart body, the size the issue's nginx note is about."""
    return multipart(jpeg_of(images / "parrot.jpg", 224, quality=97), "p.jpg")


def saturate(url: str, body: bytes, ctype: str, seconds: float, tmp: Path) -> tuple[float, int]:
    """Requests/s at saturation and how many were sent; wrk when present (it costs least CPU)."""
    wrk = shutil.which("wrk")
    if wrk:
        (tmp / "body.bin").write_bytes(body)
        script = tmp / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{ctype}"\n'
            f'local f = io.open("{tmp}/body.bin", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
        )
        out = subprocess.run([wrk, "-t1", "-c32", f"-d{seconds:.0f}s", "-s", str(script), url],
                             capture_output=True, text=True, timeout=seconds + 60).stdout  # fmt: skip
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            print(f"# warning: {non2xx.group(1)} non-2xx responses from {url}")
        return rate, total
    records, elapsed = asyncio.run(loadgen.closed_loop(loadgen.Target(url, body, ctype), 32, seconds))
    ok = sum(1 for s in records.status if s == 200)
    return ok / elapsed, len(records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved half-load rounds per target")
    parser.add_argument("--round-seconds", type=float, default=3.0, help="length of one half-load run")
    parser.add_argument("--service-time", default="const:2ms")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    parser.add_argument("--pin", action="store_true",
                        help="give the proxy a core of its own (needs 2 cores); see above")  # fmt: skip
    args = parser.parse_args()
    env = {"IMGCLASS_LOG_LEVEL": "WARNING"}
    body, ctype = upload(Path(args.images))
    cpus = sorted(os.sched_getaffinity(0))
    pinned = args.pin and len(cpus) >= 2
    if pinned:
        # before any child or thread starts, so backends, wrk and the generator's timer inherit it
        os.sched_setaffinity(0, set(cpus[:-1]))
    placement = (f"proxy pinned to CPU {cpus[-1]}, everything else on CPU {','.join(map(str, cpus[:-1]))}"
                 if pinned else "no pinning: all processes share every core")  # fmt: skip
    print(f"# bench/balancer.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  "
          f"{args.backends} sleep backends ({args.service_time}, 16 threads each), upload {len(body)} bytes; "
          f"{placement}")  # fmt: skip
    nginx_bin = find_nginx(install=True)
    children: list[Child] = []
    nginx: Nginx | None = None
    bare: subprocess.Popen[bytes] | None = None
    try:
        children = [Child(["serve", "--port", "0", "--backend", "sleep", "--service-time", args.service_time,
                           "--threads", "16", "--max-queue", "4096"], env=env) for _ in range(args.backends)]  # fmt: skip
        backends = [c.wait_url() for c in children]
        ours = Child(["balance", "--port", "0", "--backends", ",".join(backends), "--seed", "1"], env=env)
        children.append(ours)
        ours_url = ours.wait_url() + "/submit"
        if pinned:
            pin(ours.pid, {cpus[-1]})
        targets: dict[str, tuple[str, list[int]]] = {"direct": (backends[0] + "/predict", [])}
        # direct = the client picks a backend at random itself: same load per backend, one hop fewer
        spread = tuple(b + "/predict" for b in backends)
        targets["imgclass"] = (ours_url, [ours.pid])
        if find_haproxy():
            engine = Child(["balance", "--engine", "haproxy", "--port", "0", "--backends", ",".join(backends)], env=env)
            children.append(engine)
            engine_url = engine.wait_url() + "/submit"
            engine_pids = family(engine.pid)
            print(f"# engine mode: control plane pid {engine.pid}, HAProxy master and worker {engine_pids[1:]}, "
                  "nbthread 1")  # fmt: skip
            for pid in engine_pids if pinned else []:
                pin(pid, {cpus[-1]})
            targets["haproxy"] = (engine_url, engine_pids)
        else:
            print("# SKIP haproxy: not installed (./install_script.sh --dev installs it); engine mode is not measured")
        bare_port = free_port()
        bare = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "asgi_proxy:app", "--port", str(bare_port), "--http", "httptools",
             "--loop", "uvloop", "--log-level", "warning", "--no-access-log", "--no-proxy-headers"],
            cwd=Path(__file__).parent, env={**os.environ, "BACKENDS": ",".join(backends)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_listening(bare_port, bare)
        if pinned:
            pin(bare.pid, {cpus[-1]})
        targets["bare-asgi"] = (f"http://127.0.0.1:{bare_port}/submit", [bare.pid])
        tmp = Path(tempfile.mkdtemp(prefix="imgclass-bench-"))
        if nginx_bin:
            servers = "\n".join(f"        server {urlsplit(b).netloc};" for b in backends)
            nginx = Nginx(nginx_bin, NGINX_HTTP.format(servers=servers), NGINX_SERVER)
            targets["nginx"] = (nginx.url + "/submit", nginx.pids())
            for pid in nginx.pids() if pinned else []:
                pin(pid, {cpus[-1]})
        else:
            print("# SKIP nginx: not installed and could not be installed; only our balancer is measured")

        sat: dict[str, tuple[float, float]] = {}
        for name, (url, pids) in targets.items():
            saturate(url, body, ctype, 2, tmp)  # warm the connection pools
            c0 = cpu_seconds(pids) if pids else 0.0
            rate, total = saturate(url, body, ctype, args.seconds, tmp)
            cpu_ms = (cpu_seconds(pids) - c0) / total * 1000 if pids else float("nan")
            sat[name] = (rate, cpu_ms)
        half = sat["imgclass"][0] / 2
        # Interleave the targets over several rounds and take medians: the machine drifts.
        # Many short rounds, each target once per round in a shuffled order: the host drifts
        # (other tenants, frequency), and pairing each proxy with the direct run of its own round
        # cancels most of that drift.
        rounds: dict[str, list[tuple[float, float, float, float, float]]] = {name: [] for name in targets}
        order = random.Random(7)
        for r in range(args.rounds):
            names = list(targets)
            order.shuffle(names)
            for name in names:
                url, pids = targets[name]
                c0, w0, p0 = (cpu_seconds(pids), run_queue_seconds(pids), preemptions(pids)) if pids else (0, 0, 0)
                spec = loadgen.LoadSpec(rate=half, duration=args.round_seconds, warmup=0.5, seed=3 + r)
                target = loadgen.Target(url, body, ctype, spread=spread if name == "direct" else ())
                records, summary = loadgen.run(target, spec)
                n = max(len(records), 1)
                cpu_ms = (cpu_seconds(pids) - c0) / n * 1000 if pids else float("nan")
                wait_ms = (run_queue_seconds(pids) - w0) / n * 1000 if pids else float("nan")
                preempted = (preemptions(pids) - p0) / n if pids else float("nan")
                if summary.errors or summary.dropped:
                    print(f"# warning: {name}: errors {summary.errors} dropped {summary.dropped}")
                rounds[name].append((summary.latency.p50, summary.latency.p99, cpu_ms, wait_ms, preempted))
            print(f"# round {r + 1}/{args.rounds}: " + "  ".join(
                f"{n} p50 {v[-1][0]:.2f} p99 {v[-1][1]:.2f}" for n, v in rounds.items()), flush=True)  # fmt: skip
        lat = {name: tuple(statistics.median(x[i] for x in v) for i in range(5)) for name, v in rounds.items()}
        spread_p50 = {
            k: statistics.quantiles([a[0] - d[0] for a, d in zip(rounds[k], rounds["direct"], strict=True)], n=4)
            for k in rounds
            if k != "direct" and len(rounds[k]) >= 2
        }
        added_ci = {
            k: median_ci([a[0] - d[0] for a, d in zip(rounds[k], rounds["direct"], strict=True)])
            for k in rounds
            if k != "direct"
        }
        added = {
            k: (
                statistics.median(a[0] - d[0] for a, d in zip(rounds[k], rounds["direct"], strict=True)),
                statistics.median(a[1] - d[1] for a, d in zip(rounds[k], rounds["direct"], strict=True)),
            )
            for k in rounds
            if k != "direct"
        }
    finally:
        if nginx is not None:
            nginx.stop()
        if bare is not None:
            bare.terminate()
            bare.wait(10)
        stop_all(children)

    proxies = [k for k in ("imgclass", "haproxy", "bare-asgi", "nginx") if k in targets]
    print(f"\n{'':44}{'direct':>10}" + "".join(f"{k:>11}" for k in proxies) + "".join(f"{v:>13}" for v in RATIOS.values()))

    def row(label: str, values: dict[str, float], fmt: str, ratio: bool = True) -> None:
        cells = "".join(
            f"{values[k]:>{10 if k == 'direct' else 11}{fmt}}" if k in values else f"{'-':>{10 if k == 'direct' else 11}}"
            for k in ("direct", *proxies)
        )

        def r(k: str) -> float:
            return values[k] / values["nginx"] if ratio and values.get("nginx") and k in values else float("nan")

        print(f"{label:44}{cells}" + "".join(f"{r(k):>13.2f}" for k in RATIOS))

    row("CPU ms/request at half load", {k: v[2] for k, v in lat.items() if k != "direct"}, ".3f")
    row("run-queue wait ms/request at half load", {k: v[3] for k, v in lat.items() if k != "direct"}, ".3f")
    row("preemptions/request at half load", {k: v[4] for k, v in lat.items() if k != "direct"}, ".3f")
    row("CPU ms/request at saturation", {k: v[1] for k, v in sat.items() if k != "direct"}, ".3f")
    row("throughput at saturation (req/s)", {k: v[0] for k, v in sat.items()}, ".0f")
    row(f"p50 ms at half load ({half:.0f} req/s), median", {k: v[0] for k, v in lat.items()}, ".3f")
    row("p99 ms at half load, median", {k: v[1] for k, v in lat.items()}, ".3f")
    row("added p50 ms vs direct, median of rounds", {k: v[0] for k, v in added.items()}, ".3f", ratio=False)
    row("added p99 ms vs direct, median of rounds", {k: v[1] for k, v in added.items()}, ".3f", ratio=False)
    for k, (q1, _, q3) in spread_p50.items():
        print(f"# {k}: added p50 over the {args.rounds} rounds, interquartile range {q1:.3f} to {q3:.3f} ms")
    for k, (lo, hi) in added_ci.items():
        print(f"# {k}: added p50, 95% CI for the median over rounds (order statistics) {lo:.3f} to {hi:.3f} ms")
    if "nginx" in lat:
        cpu_ratio = lat["imgclass"][2] / lat["nginx"][2]
        print(f"\ntarget: our CPU/request <= {CPU_TARGET:g} x nginx's at half load: {cpu_ratio:.2f} x -> "
              f"{'PASS' if cpu_ratio <= CPU_TARGET else 'FAIL'}")  # fmt: skip
    if "nginx" in lat and "haproxy" in lat:
        engine_ratio = lat["haproxy"][2] / lat["nginx"][2]
        print(f"target: engine mode's CPU/request (HAProxy + control plane) <= {ENGINE_TARGET:g} x nginx's at half "
              f"load: {engine_ratio:.2f} x -> {'PASS' if engine_ratio <= ENGINE_TARGET else 'FAIL'}")  # fmt: skip
    point, (lo, hi) = added["imgclass"][0], added_ci["imgclass"]
    margin = "" if math.isnan(lo) else f" (95% CI {lo:.2f} to {hi:.2f} ms)"
    print(f"our added p50 at half load: {point:.3f} ms{margin}; nginx's {added['nginx'][0] if 'nginx' in added else float('nan'):.3f} ms")
    if "haproxy" in added:
        (lo, hi), (p50, p99) = added_ci["haproxy"], added["haproxy"]
        print(f"engine mode's added p50 at half load: {p50:.3f} ms (95% CI {lo:.2f} to {hi:.2f} ms), p99 {p99:.3f} ms; "
              f"throughput at saturation {sat['haproxy'][0]:.0f} req/s")  # fmt: skip
    print(f"saturation load: {'wrk -t1 -c32' if shutil.which('wrk') else 'imgclass closed loop, 32 clients'}, "
          f"{args.seconds:.0f} s; half load: open-loop Poisson from imgclass.loadgen, {args.rounds} rounds of "
          f"{args.round_seconds:g} s, targets shuffled in each; {placement}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
