"""The scaling experiment: latency and throughput against offered load, servers n and policy."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..balancing.policies import POLICIES
from ..config import parse_service_time
from ..process import terminate_as_interrupt
from . import loadgen, plots
from .clients import LeanClient
from .experiment import (
    PLOTS_S,
    RUN_OVERHEAD_S,
    add_target_arguments,
    announce,
    cluster_start_s,
    default_images_dir,
    duration_text,
    finished,
    jpeg_of,
    local_cluster,
    multipart,
    out_dir,
    progress,
    run_info,
    target_service,
    write_json,
)
from .queueing import PULL, simulate_jsq_mean_response, theory_mean_response
from .stats import LatencySummary, RunSummary, write_rows_csv

PROG = "test_scaling.py"
# Utilisations at which the theory overlay is held to 10% (the target holds for rho <= 0.8).
THEORY_MAX_RHO = 0.8
STRESS_S = 5.0  # --stress: the burst and its answers
EXTRA_BALANCER_S = 0.5  # a second balancer over the same servers (--max-conn per policy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Open-loop Poisson load against the balancer for each (servers n, offered rate, policy).",
    )
    add_target_arguments(p)
    p.add_argument("--servers", default="1,2,4", help="values of n, comma-separated [default 1,2,4]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rates", help="offered rates in requests/s, comma-separated")
    g.add_argument("--intervals", help="mean inter-arrival times in s (the original table: 0.5,0.2,0.1,0.01)")
    g.add_argument(
        "--loads", help="utilisations rho = lambda / (n mu), e.g. 0.2,0.4,0.6,0.8 (needs the mean service time)"
    )
    p.add_argument("--policies", default="random",
                   help="comma-separated: " + ",".join([*POLICIES, PULL]) + f" ({PULL}: pull dispatch, n workers "
                        "taking jobs from Redis; with --local, started beside the push cluster)")  # fmt: skip
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run, warm-up included [default 20]")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds at the start of each run left out [default 2]")
    p.add_argument("--min-per-server", type=int, default=0, metavar="K",
                   help="lengthen a run until each server gets about K requests (queueing means converge slowly)")  # fmt: skip
    p.add_argument("--local", action="store_true", help="start a local cluster (sleep backend) with max(n) servers")
    p.add_argument("--backend", default="sleep", help="--local: model backend [default sleep]")
    p.add_argument("--service-time", default="exp:20ms", help="--local sleep backend: service times [default exp:20ms]")
    p.add_argument("--queue-url", default=os.environ.get("IMGCLASS_QUEUE_URL"),
                   help="without --local: the front of a queue-mode deployment, for --policies queue "
                        "(its workers are the n of the run: start as many) [env IMGCLASS_QUEUE_URL]")  # fmt: skip
    p.add_argument("--max-conn", default="0", metavar="K|POLICY=K,...",
                   help="--local: balancer --max-conn, for all policies or per policy (e.g. least_outstanding=1; "
                        "the others get 0); 1 queues centrally at the balancer, which makes the theory M/M/c "
                        "[default 0: each server queues its own]")  # fmt: skip
    p.add_argument("--service-ms", type=float, help="mean service time (ms) for --loads and theory without --local")
    p.add_argument("--image-size", type=int, default=64, help="side of the square JPEG sent [default 64]")
    p.add_argument("--image", help="source photo [default ../shared/images/cat_720p.jpg]")
    p.add_argument("--stress", type=int, metavar="N", help="also send N requests at once to find the limits")
    p.add_argument("--raw", action="store_true", help="also save every request's record (CSV per run)")
    return p


def _rates(args: argparse.Namespace, n: int, mean_service: float | None) -> list[tuple[float, float | None]]:
    """(offered rate, utilisation or None) for n servers."""
    if args.rates:
        values = [float(x) for x in args.rates.split(",")]
    elif args.intervals:
        values = [1.0 / float(x) for x in args.intervals.split(",")]
    else:
        if mean_service is None:
            raise SystemExit("--loads needs the mean service time: use --local or --service-ms")
        loads = [float(x) for x in (args.loads or "0.2,0.4,0.6,0.8").split(",")]
        return [(rho * n / mean_service, rho) for rho in loads]
    return [(rate, rate * mean_service / n if mean_service else None) for rate in values]


@dataclass(frozen=True)
class Run:
    """One cell of the experiment: n servers, a policy, an offered rate, for `duration` seconds."""

    n: int
    policy: str
    rate: float
    rho: float | None
    duration: float  # warm-up included


def plan(
    args: argparse.Namespace, servers: Sequence[int], policies: Sequence[str], mean_service: float | None
) -> list[Run]:
    """Every run, in the order they are made: n, then policy, then load."""
    return [
        Run(n, policy, rate, rho, max(args.duration, args.warmup + args.min_per_server * n / rate))
        for n in servers
        for policy in policies
        for rate, rho in _rates(args, n, mean_service)
    ]


def expected_seconds(runs: Sequence[Run], args: argparse.Namespace, balancers: int = 1, start: bool = True) -> float:
    """How long the experiment should take: cluster start-up (unless `start` is False), the runs, --stress, plots."""
    startup = cluster_start_s(max(r.n for r in runs)) + EXTRA_BALANCER_S * (balancers - 1)
    return ((startup if args.local and start else 0.0) + sum(r.duration + RUN_OVERHEAD_S for r in runs)
            + (STRESS_S if args.stress else 0.0) + PLOTS_S)  # fmt: skip


def overlay_columns(
    policy: str, n: int, rate: float, mean_service: float | None, exponential: bool, summary: RunSummary,
    central: bool, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The theory columns of one run; the models apply to exponential service times of known mean.

    The model is evaluated at the run's measured arrival rate and mean drawn service time: a finite
    run realises a load a few percent off the nominal one, and at rho=0.8 the mean response moves
    five times as much as the load does. The nominal figure (offered rate, configured mean) is kept
    beside it. Both add the measured path overhead (client latency minus the servers' queue+service:
    network, HTTP, balancer), which the queueing model does not cover.
    """
    measured_service = summary.service_mean_ms / 1000 if math.isfinite(summary.service_mean_ms) else mean_service
    overhead = summary.path_overhead_ms if math.isfinite(summary.path_overhead_ms) else 0.0
    # central queue: a slot is held for the service plus the measured dispatch round trip
    hold = summary.upstream_mean_ms / 1000 if central else None
    nominal_hold = hold - measured_service + mean_service if hold and measured_service and mean_service else hold

    def model_ms(arrival: float, service: float | None, held: float | None) -> float | None:
        applies = exponential and mean_service and service
        seconds = theory_mean_response(policy, arrival, service, n, held) if applies else None
        return seconds * 1000 if seconds is not None and math.isfinite(seconds) else None

    def error(theory_ms: float | None) -> float | None:
        return round(summary.latency.mean / theory_ms - 1, 4) if theory_ms else None

    queue_ms = model_ms(summary.achieved_rate, measured_service, hold)
    nominal_queue_ms = model_ms(rate, mean_service, nominal_hold)
    theory_ms = queue_ms + overhead if queue_ms is not None else None
    nominal_ms = nominal_queue_ms + overhead if nominal_queue_ms is not None else None
    return {
        "theory_queue_ms": round(queue_ms, 3) if queue_ms else None,
        "theory_mean_ms": round(theory_ms, 3) if theory_ms else None,
        "theory_error": error(theory_ms),
        "measured_utilisation": round(summary.achieved_rate * measured_service / n, 4) if measured_service else None,
        "theory_nominal_ms": round(nominal_ms, 3) if nominal_ms else None,
        "nominal_error": error(nominal_ms),
        # join-the-shortest-queue by simulation, plus the same measured path overhead
        "jsq_sim_ms": round(simulate_jsq_mean_response(rate, 1 / mean_service, n, seed=seed) * 1000 + overhead, 3)
        if policy == "least_outstanding" and mean_service and queue_ms and not central
        else None,
    }


def parse_max_conn(text: str, policies: list[str]) -> dict[str, int]:
    """--max-conn as K for every policy, or POLICY=K pairs (policies not named get 0)."""
    fix = "--max-conn takes K or POLICY=K,... with K a whole number >= 0 (0 = no limit; 1 = the M/M/c central queue)"
    text = text.strip()
    try:
        if "=" not in text:
            value = int(text)
            if value < 0:
                raise ValueError(text)
            return dict.fromkeys(policies, value)
        out = dict.fromkeys(policies, 0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, k = part.partition("=")
            name = name.strip()
            if name not in POLICIES:
                raise SystemExit(f"--max-conn: unknown policy {name!r}; choose from {', '.join(POLICIES)}")
            if name not in out:
                raise SystemExit(f"--max-conn names {name!r}, which is not in --policies")
            out[name] = int(k)
            if out[name] < 0:
                raise ValueError(k)
        return out
    except ValueError:
        raise SystemExit(f"{fix}; got {text!r}") from None


def stress(url: str, body: bytes, ctype: str, clients: int, timeout: float = 60.0) -> dict[str, Any]:
    """N requests at once, each on its own connection: where does the service start refusing?"""

    async def burst() -> tuple[loadgen.Records, float]:
        records = loadgen.Records()
        loop = asyncio.get_running_loop()
        async with LeanClient(clients, timeout) as client:
            start = loop.time()

            async def one() -> None:
                out = await loadgen.send(client, url, body, {"Content-Type": ctype})
                records.add(0.0, 0.0, loop.time() - start, out.status, out.backend, out.error)

            await asyncio.gather(*(one() for _ in range(clients)))
            return records, loop.time() - start

    records, elapsed = asyncio.run(burst())
    ok = [d * 1000 for d, s in zip(records.done, records.status, strict=True) if s == 200]
    lat = LatencySummary.of(ok)
    return {
        "clients": clients,
        "ok": len(ok),
        "errors": dict(Counter(e for e in records.error if e)),
        "elapsed_s": round(elapsed, 3),
        "p50_ms": lat.p50,
        "p99_ms": lat.p99,
        "max_ms": lat.max,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()
    servers = [int(x) for x in args.servers.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in POLICIES and policy != PULL:
            raise SystemExit(f"unknown policy {policy!r}; choose from {', '.join([*POLICIES, PULL])}")
    if PULL in policies and not args.local and not args.queue_url:
        raise SystemExit(f"--policies {PULL} needs --local, or --queue-url of a front in queue mode")
    push = [p for p in policies if p != PULL]
    max_conn = parse_max_conn(args.max_conn, push)
    mean_service = None
    if args.service_ms:
        mean_service = args.service_ms / 1000
    elif args.local and args.backend == "sleep":
        mean_service = parse_service_time(args.service_time).mean
    exponential = args.local and args.backend == "sleep" and args.service_time.startswith("exp:")
    runs = plan(args, servers, policies, mean_service)  # before anything starts: bad --loads fail here
    if not runs:
        raise SystemExit("nothing to run: --servers and --policies name no run")
    out = out_dir(args, PROG)
    balancers = len(set(max_conn.values())) + (PULL in policies) if args.local else 1
    announce(PROG, out, expected_seconds(runs, args, balancers),
             f"{len(runs)} runs of {duration_text(min(r.duration for r in runs))}"
             + (f" to {duration_text(max(r.duration for r in runs))}" if len({r.duration for r in runs}) > 1 else "")
             + (f", after starting {max(servers)} local servers" if args.local else ""))  # fmt: skip
    source = Path(args.image) if args.image else default_images_dir() / "cat_720p.jpg"
    body, ctype = multipart(jpeg_of(source, args.image_size))

    rows: list[dict[str, Any]] = []
    info = run_info(PROG, argv, args, image=str(source))
    with ExitStack() as stack:
        urls: dict[int, str] = {}  # balancer base URL by --max-conn
        if args.local and push:
            # One balancer per --max-conn value in use, all over the same servers.
            first = max_conn[push[0]]
            cluster, urls[first] = stack.enter_context(local_cluster(
                servers=max(servers), backend=args.backend, service_time=args.service_time, seed=args.seed,
                max_conn=first))  # fmt: skip
            for k in sorted(set(max_conn.values()) - {first}):
                urls[k] = cluster.another_balancer(k)
        if args.local:
            queue_url = ""
            if PULL in policies:
                pull, queue_url = stack.enter_context(local_cluster(
                    dispatch="queue", workers=1, backend=args.backend, service_time=args.service_time,
                    seed=args.seed))  # fmt: skip
        else:
            urls = dict.fromkeys(max_conn.values(), stack.enter_context(target_service(args, False)))
            queue_url = args.queue_url
        for k, run in enumerate(runs, 1):
            n, policy, rate, rho = run.n, run.policy, run.rate, run.rho
            label = f"n={n} {policy} {rate:.1f}/s"
            progress(k, len(runs), f"{label}, {duration_text(run.duration)}",
                     expected_seconds(runs[k - 1 :], args, start=False))  # fmt: skip
            if policy == PULL:
                if args.local:
                    pull.set_workers(n)  # workers join and leave without reconfiguring anything
                url = f"{queue_url}/submit"
            else:
                url = f"{urls[max_conn[policy]]}/submit?number_backend_servers={n}&policy={policy}"
            spec = loadgen.LoadSpec(rate=rate, duration=run.duration, warmup=args.warmup,
                                    max_in_flight=args.max_in_flight, seed=args.seed)  # fmt: skip
            records, summary = loadgen.run(loadgen.Target(url, body, ctype), spec, not args.quiet, label, station=True)
            out.mkdir(parents=True, exist_ok=True)  # on demand: a run that never got this far leaves no folder
            # With one slot per server the balancer's queue is the M/M/c queue; its
            # slots are held for the service plus the dispatch round trip, as measured.
            central = args.local and max_conn.get(policy) == 1 and math.isfinite(summary.upstream_mean_ms)
            overlay = overlay_columns(policy, n, rate, mean_service, exponential, summary, central, args.seed)
            row: dict[str, Any] = {
                "servers": n,
                "policy": policy,
                "mean_interval_s": round(1 / rate, 6),
                "utilisation": round(rho, 4) if rho is not None else None,
                **summary.flat(),
                **overlay,
                "max_conn": max_conn[policy] if args.local and policy != PULL else None,
                "backends_used": len(summary.backends),
            }
            rows.append(row)
            if args.raw:
                records.save_csv(out / f"scaling_raw_n{n}_{policy}_{rate:.2f}.csv")
            theory = (
                f" theory {row['theory_mean_ms']:.1f} ms (error {row['theory_error']:+.1%}; at nominal load "
                f"{row['theory_nominal_ms']:.1f} ms, {row['nominal_error']:+.1%})"
                if row["theory_mean_ms"] and row["theory_nominal_ms"]
                else ""
            )
            print(f"n={n:<3} {policy:<17} offered {rate:8.2f}/s achieved {summary.achieved_rate:8.2f}/s "
                  f"mean {summary.latency.mean:8.2f} p50 {summary.latency.p50:8.2f} p99 {summary.latency.p99:8.2f} ms "
                  f"errors {sum(summary.errors.values())} dropped {summary.dropped}{theory}", flush=True)  # fmt: skip
            write_rows_csv(out / "scaling.csv", rows)  # after every run: a long run keeps its partial results
            time.sleep(0.5)  # let the queues drain between runs
        stress_result = None
        if args.stress:
            where = (f"{urls[max_conn[push[0]]]}/submit?number_backend_servers={max(servers)}" if push
                     else f"{queue_url}/submit")  # fmt: skip
            stress_result = stress(where, body, ctype, args.stress)
            print(f"stress: {args.stress} requests at once -> {stress_result}", flush=True)
            write_json(out / "stress.json", stress_result)
    write_json(out / "scaling.json", {**info, "rows": rows, "stress": stress_result})
    for path in plots.scaling_figures(out):
        print(f"wrote {path}")
    checked = [r for r in rows if r["theory_error"] is not None and (r["utilisation"] or 0) <= THEORY_MAX_RHO + 1e-9]
    if checked:
        worst = max(checked, key=lambda r: abs(r["theory_error"]))
        print(f"theory: worst |error| at utilisation <= {THEORY_MAX_RHO}: {worst['theory_error']:+.1%} "
              f"(n={worst['servers']} {worst['policy']} rho={worst['utilisation']}); target 10%")  # fmt: skip
        nominal = max(checked, key=lambda r: abs(r["nominal_error"] or 0))
        print(f"theory at the nominal load: worst |error| {nominal['nominal_error']:+.1%} "
              f"(n={nominal['servers']} {nominal['policy']} rho={nominal['utilisation']})")  # fmt: skip
    finished(out)
    return 0
