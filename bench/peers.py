#!/usr/bin/env python3
"""imgclass's model server beside the servers a user would pick instead, on the same LiteRT model and cores.

    IMGCLASS_MODEL_DIR=../shared/models .venv/bin/python bench/peers.py [--seconds 10] [--only kserve,litserve]

Each peer serves bench/peers/peer_model.py: imgclass's .tflite file, its preprocessing
(imgclass.serving.images.decode), one LiteRT thread per inference worker and two workers, and the
top-5 as 'score:index:label' strings; each is written as its own documentation shows
(bench/peers/*_server.py, bench/peers/mlserver/). Each lives in its own venv under .peer-venvs/
(their dependencies conflict), created here with the versions pinned below.

Per server, from one run: CPU ms per image (/proc, its whole process tree) and images/s at
saturation (closed loop, --concurrency clients), then p50 and p99 at half of imgclass's saturation
(open-loop Poisson, the same schedule for every server), all driven by imgclass.measure.loadgen;
and, where the server lets it, Triton's perf_analyzer at the same rate as a second driver.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from common import ROOT

from imgclass.measure import loadgen
from imgclass.measure.experiment import jpeg_of

PEERS_DIR = ROOT / "bench" / "peers"
IDLE_S = 3.0  # seconds of no load, before the warm-up, to see what the server burns by itself
sys.path.insert(0, str(PEERS_DIR))  # harness.py: venvs, process trees, perf_analyzer

from harness import (  # noqa: E402
    MODEL,
    SAME_AS_OURS,
    VENVS,
    cpu_of,
    ensure_venv,
    free_port,
    machine_busy,
    memory_mb,
    percentile,
    perf_analyzer,
    stop,
    tree,
    venv_python,
    wait_ready,
)


@dataclass
class Server:
    """One server under test: how to start it and what to send it."""

    key: str
    label: str
    protocol: str  # "OIP v2" (JSON, base64 BYTES) or "native" ({"image": base64} to /predict)
    path: str
    oip: bool  # perf_analyzer may try it
    version: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT


def servers(model_dir: str, tmp: Path) -> list[Server]:
    ours = Server("imgclass", "imgclass serve", "OIP v2", f"/v2/models/{MODEL}/infer", True,
                  metadata.version("imgclass"),
                  [sys.executable, "-m", "imgclass", "serve", "--port", "{port}", "--log-level", "warning",
                   # no shedding, as none of the peers sheds: every server queues what it is sent
                   "--max-wait-ms", "0", "--max-queue", "256"],
                  {"IMGCLASS_MODEL_DIR": model_dir})  # fmt: skip
    kserve = Server("kserve", "KServe (kserve)", "OIP v2", f"/v2/models/{MODEL}/infer", True, command=[
        str(venv_python("kserve")), "kserve_server.py", "--port", "{port}", "--model-dir", model_dir,
        "--workers", "2"], cwd=PEERS_DIR)  # fmt: skip
    mls_dir = tmp / "mlserver"
    mlserver = Server("mlserver", "MLServer (Seldon)", "OIP v2", f"/v2/models/{MODEL}/infer", True,
                      command=[str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(mls_dir)],
                      cwd=mls_dir, env={"PYTHONPATH": str(PEERS_DIR)})  # fmt: skip
    ray = Server("rayserve", "Ray Serve", "native", "/predict", False, command=[
        str(venv_python("rayserve")), "ray_server.py", "--port", "{port}", "--model-dir", model_dir],
        cwd=PEERS_DIR, env={"RAY_USAGE_STATS_ENABLED": "0"})  # fmt: skip
    lit = Server("litserve", "LitServe", "native", "/predict", False, command=[
        str(venv_python("litserve")), "litserve_server.py", "--port", "{port}", "--model-dir", model_dir],
        cwd=PEERS_DIR, env={"LITSERVE_DISABLE_TELEMETRY": "1"})  # fmt: skip
    return [ours, kserve, mlserver, ray, lit]


def mlserver_settings(folder: Path, port: int, model_dir: str) -> None:
    """MLServer's two JSON files: the server's (2 parallel workers) and the model's."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS_DIR / "mlserver" / "runtime.py", folder / "runtime.py")
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": 2}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings))
    model = {"name": MODEL, "implementation": "runtime.MobileNet", "parameters": {"uri": model_dir}}
    (folder / "model-settings.json").write_text(json.dumps(model))


@dataclass
class Figures:
    cpu_ms: float = float("nan")
    sat_ips: float = float("nan")
    non_200: int = 0
    p50: float = float("nan")
    p99: float = float("nan")
    p50_sent: float = float("nan")  # from the actual send time, as perf_analyzer counts
    p99_sent: float = float("nan")
    half_errors: int = 0
    pa_p50: float = float("nan")
    pa_p99: float = float("nan")
    pa_note: str = ""
    others: float = float("nan")  # cores busy with anything but this server and this script (the neighbours)
    idle_pct: float = float("nan")  # CPU the server burns with no request, in percent of one core
    memory_mb: float = float("nan")  # its processes' proportional set size after the saturation run


def measure(url: str, body: bytes, pids: set[int], seconds: float, concurrency: int, rate: float | None) -> Figures:
    figures = Figures()
    target = loadgen.Target(url, body, "application/json")
    pids = set().union(*(tree(p) for p in pids))
    idle0 = cpu_of(pids)
    time.sleep(IDLE_S)
    idle1 = cpu_of(pids)
    figures.idle_pct = sum(idle1[p] - idle0[p] for p in idle1 if p in idle0) / IDLE_S * 100
    asyncio.run(loadgen.closed_loop(target, concurrency, 2.0))  # warm-up
    pids = set().union(*(tree(p) for p in pids))
    me = {os.getpid()}
    cpu0, mine0, busy0 = cpu_of(pids), cpu_of(me), machine_busy()
    records, elapsed = asyncio.run(loadgen.closed_loop(target, concurrency, seconds))
    cpu1, mine1, busy1 = cpu_of(pids), cpu_of(me), machine_busy()
    ok = sum(1 for s in records.status if s == 200)
    server_cpu = sum(cpu1[p] - cpu0[p] for p in cpu1 if p in cpu0)
    figures.cpu_ms = server_cpu / max(ok, 1) * 1000
    figures.memory_mb = memory_mb(pids)
    figures.others = max(0.0, busy1 - busy0 - server_cpu - sum(mine1.values()) + sum(mine0.values())) / elapsed
    figures.sat_ips = ok / elapsed
    figures.non_200 = len(records.status) - ok
    half = rate if rate is not None else figures.sat_ips / 2
    spec = loadgen.LoadSpec(rate=half, duration=seconds, warmup=1.0, seed=1)
    records, summary = loadgen.run(target, spec)
    figures.p50, figures.p99 = summary.latency.p50, summary.latency.p99
    since_sent = [(d - s) * 1000 for i, s, d, st in zip(records.intended, records.sent, records.done, records.status,
                                                         strict=True) if st == 200 and i >= 1.0]  # fmt: skip
    figures.p50_sent, figures.p99_sent = percentile(since_sent, 50), percentile(since_sent, 99)
    figures.half_errors = sum(summary.errors.values()) + summary.dropped
    return figures


def run_one(server: Server, model_dir: str, tmp: Path, body: bytes, args: argparse.Namespace, rate: float | None,
            data_file: Path) -> Figures:  # fmt: skip
    """Start the server, measure it, stop it (and everything it started)."""
    port = free_port()
    if server.key == "mlserver":
        mlserver_settings(tmp / "mlserver", port, model_dir)
    command = [part.replace("{port}", str(port)) for part in server.command]
    print(f"   {' '.join(command)}", flush=True)
    log = (tmp / f"{server.key}.log").open("wb")
    proc = subprocess.Popen(command, cwd=server.cwd, env={**os.environ, **server.env}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + server.path, body, proc)
        figures = measure(url + server.path, body, {proc.pid}, args.seconds, args.concurrency, rate)
        if server.oip and not args.no_perf_analyzer:
            at = rate if rate is not None else figures.sat_ips / 2
            figures.pa_p50, figures.pa_p99, figures.pa_note = perf_analyzer(
                url, at, args.seconds, data_file, tmp / f"{server.key}.csv"
            )
        elif not server.oip:
            figures.pa_note = "no Open Inference Protocol"
    except (RuntimeError, OSError) as exc:
        print(f"   failed: {exc}; log in {tmp / (server.key + '.log')}", flush=True)
        figures = Figures(pa_note=str(exc)[:90])
    finally:
        stop(proc)
        log.close()
    print(f"   CPU {figures.cpu_ms:.2f} ms/img, {figures.sat_ips:.1f} img/s, p50 {figures.p50:.1f} ms, "
          f"p99 {figures.p99:.1f} ms, idle {figures.idle_pct:.1f}%, {figures.memory_mb:.0f} MB, others {figures.others:.2f} cores, "
          f"perf_analyzer p50 {figures.pa_p50:.1f} p99 {figures.pa_p99:.1f} "
          f"{figures.pa_note}", flush=True)  # fmt: skip
    return figures


FIGURES = (
    "cpu_ms",
    "sat_ips",
    "p50",
    "p99",
    "p50_sent",
    "p99_sent",
    "pa_p50",
    "pa_p99",
    "others",
    "idle_pct",
    "memory_mb",
)


def combine(runs: list[Figures], how: str) -> Figures:
    """Each figure over the rounds: its median, or its best. Sharing the machine only ever makes a
    figure worse (less throughput, more CPU and latency), so the best round is the one nearest to
    the machine alone; every server gets the same treatment."""
    out = Figures(pa_note=runs[-1].pa_note)
    for name in FIGURES:
        values = [getattr(f, name) for f in runs if getattr(f, name) == getattr(f, name)]
        if not values:
            continue
        best = max(values) if name == "sat_ips" else min(values)
        setattr(out, name, float(np.median(values)) if how == "median" else best)
    out.non_200 = sum(f.non_200 for f in runs)
    out.half_errors = sum(f.half_errors for f in runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the saturation and half-load runs")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients at saturation")
    parser.add_argument("--only", default="", help="comma-separated peers to run besides imgclass")
    parser.add_argument("--rounds", type=int, default=3, help="every server once per round; medians are reported")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--image", default=str(ROOT.parent / "shared" / "images" / "cat_720p.jpg"))
    args = parser.parse_args()
    model_dir = os.path.abspath(os.environ.get("IMGCLASS_MODEL_DIR", str(ROOT / "models")))
    jpeg = jpeg_of(Path(args.image), 224, quality=90)
    b64 = base64.b64encode(jpeg).decode()
    bodies = {
        "OIP v2": json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [b64],
                                          "parameters": {"content_type": "base64"}}],
                              "outputs": [{"name": "probs", "parameters": {"classification": 5}}]}).encode(),
        "native": json.dumps({"image": b64}).encode(),
    }  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="imgclass-peers-"))
    data_file = tmp / "perf_input.json"  # a BYTES element as Triton serializes it: 4-byte length, then the file
    data_file.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(
        len(jpeg).to_bytes(4, "little") + jpeg).decode()}}]}))  # fmt: skip
    chosen = [s for s in servers(model_dir, tmp) if s.key == "imgclass" or not args.only or s.key in args.only]
    perf = "" if args.no_perf_analyzer else ensure_venv("perf")
    for server in chosen[1:]:
        server.version = ensure_venv(server.key)
    print(f"# bench/peers.py  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  224px JPEG of {len(jpeg)} "
          f"bytes  {args.seconds:g} s runs, {args.concurrency} clients at saturation, best and median of {args.rounds} rounds",
          flush=True)  # fmt: skip
    print(f"# engine in every venv: {', '.join(f'{p} {metadata.version(p)}' for p in SAME_AS_OURS)}; "
          f"perf_analyzer from tritonclient {perf or '(skipped)'}", flush=True)  # fmt: skip
    runs: dict[str, list[Figures]] = {server.key: [] for server in chosen}
    rates: list[float] = []
    for round_no in range(1, args.rounds + 1):
        rate = None  # every server gets half of imgclass's saturation in the same round
        peers = chosen[1:]
        shift = (round_no - 1) % max(1, len(peers))  # the peers take turns right after imgclass
        for server in [chosen[0], *peers[shift:], *peers[:shift]]:
            print(f"## round {round_no} of {args.rounds}: {server.label} {server.version}", flush=True)
            figures = run_one(server, model_dir, tmp, bodies[server.protocol], args, rate, data_file)
            if rate is None:
                rate = figures.sat_ips / 2
                rates.append(rate)
            runs[server.key].append(figures)
    for how in ("best", "median"):
        report(chosen, {key: combine(figures, how) for key, figures in runs.items()}, rates, how, args.rounds)
    return 0


def report(chosen: list[Server], results: dict[str, Figures], rates: list[float], how: str, rounds: int) -> None:
    ours = results["imgclass"]
    print(f"\n### {how} of {rounds} rounds; x ours = the server's figure / imgclass's")
    print(f"{'server':20}{'version':>9}{'driven by':>11}{'CPU ms/img':>12}{'x ours':>8}{'img/s sat':>11}{'x ours':>8}"
          f"{'p50 ms':>9}{'x ours':>8}{'p99 ms':>9}{'x ours':>8}{'idle %':>8}{'MB':>6}{'others':>8}")  # fmt: skip
    for server in chosen:
        f = results[server.key]
        print(f"{server.label:20}{server.version:>9}{server.protocol:>11}{f.cpu_ms:>12.2f}{f.cpu_ms / ours.cpu_ms:>8.2f}"
              f"{f.sat_ips:>11.1f}{f.sat_ips / ours.sat_ips:>8.2f}{f.p50:>9.1f}{f.p50 / ours.p50:>8.2f}"
              f"{f.p99:>9.1f}{f.p99 / ours.p99:>8.2f}{f.idle_pct:>8.1f}{f.memory_mb:>6.0f}{f.others:>8.2f}")  # fmt: skip
    shown = ", ".join(f"{r:.1f}" for r in rates)
    print(f"\nlatency at half of imgclass's saturation in each round ({shown} req/s), open-loop Poisson; ms")
    print(f"{'server':20}{'ours: p50':>11}{'p99':>8}{'from send: p50':>16}{'p99':>8}{'perf_analyzer p50':>19}{'p99':>8}"
          "  errors")  # fmt: skip
    for server in chosen:
        f = results[server.key]
        print(f"{server.label:20}{f.p50:>11.1f}{f.p99:>8.1f}{f.p50_sent:>16.1f}{f.p99_sent:>8.1f}{f.pa_p50:>19.1f}"
              f"{f.pa_p99:>8.1f}  {f.half_errors} {f.pa_note}")  # fmt: skip
    peers = [results[s.key] for s in chosen[1:] if results[s.key].sat_ips == results[s.key].sat_ips]
    checks = [
        ("CPU per image <= every peer's", all(ours.cpu_ms <= p.cpu_ms for p in peers)),
        ("throughput at saturation >= every peer's", all(ours.sat_ips >= p.sat_ips for p in peers)),
        ("p50 at half load <= every peer's", all(ours.p50 <= p.p50 for p in peers)),
    ]
    print()
    for what, ok in checks:
        print(f"target: imgclass {what}: {'PASS' if ok else 'FAIL'}")
    non200 = {s.label: results[s.key].non_200 for s in chosen if results[s.key].non_200}
    if non200:
        print(f"non-200 answers at saturation: {non200}")


if __name__ == "__main__":
    sys.exit(main())
