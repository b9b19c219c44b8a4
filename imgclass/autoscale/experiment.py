"""The autoscaling experiment (test_autoscale.py): one load trace against each policy and fixed pools.

For each policy, and for fixed pools at --min and at --max, a fresh local deployment of `sleep`
workers (queue mode: Redis, workers, the front; push mode: a balancer and servers added through
its admin API) takes the same seeded trace, while the controller runs in this process. Each run
records every request, and every evaluation (offered rate, desired and running workers, queue
depth). The figures per run: the share of requests over the SLO (also outside the first
scale-up), p50 and p99, worker-seconds (the cost), the time to scale up after the step and down
after it, and the direction changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import secrets
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .. import log
from ..config import parse_service_time
from ..local import AUTOSCALED_MAX_CONN
from ..measure import loadgen
from ..measure.experiment import (
    announce,
    default_images_dir,
    duration_text,
    finished,
    jpeg_of,
    multipart,
    out_dir,
    progress,
    run_info,
    write_json,
)
from ..measure.schedule import Schedule, parse_schedule
from ..measure.stats import percentile, write_rows_csv
from ..process import Child, stop_all, terminate_as_interrupt
from ..queue.broker import Broker, client
from ..queue.redis_server import RedisServer
from .actuators import Actuator, LocalServers, LocalWorkers
from .controller import Controller
from .figures import timeline_figure
from .policies import POLICIES, Observation
from .service import AutoscaleSettings, make_policy
from .signals import PushSignals, QueueSignals, Signals

PROG = "test_autoscale.py"
ENV = {"IMGCLASS_LOG_LEVEL": "WARNING"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The same load trace against each scaling policy and "
                                "against fixed pools, on sleep workers; a table and a timeline plot.")  # fmt: skip
    p.add_argument("--schedule", default="step:4@30s,32@90s,4@120s",
                   help="the rate over time (step:, ramp: or csv:) [default step:4@30s,32@90s,4@120s: the peak "
                   "keeps 6.4 workers of 200 ms busy, and needs about 8]")  # fmt: skip
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated [default all]")
    p.add_argument("--dispatch", choices=("queue", "push", "both"), default="queue")
    p.add_argument("--min", type=int, default=1, dest="scale_min")
    p.add_argument("--max", type=int, default=12, dest="scale_max")
    p.add_argument("--service-time", default="exp:200ms",
                   help="sleep workers' service time: long, so that 16 workers fit on two cores [default exp:200ms]")  # fmt: skip
    p.add_argument(
        "--slo-ms", type=float, default=2000.0, help="the latency objective: ten mean service times [default 2000]"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between evaluations")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed pools at --min and --max")
    p.add_argument("--give-up", type=float, default=60.0,
                   help="seconds after which a request counts as an error (a fixed pool at --min falls behind "
                   "for good) [default 60]")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="output folder [default runs/test_autoscale-<timestamp>/]")
    p.add_argument("--images", default=str(default_images_dir()))
    return p


class Deployment:
    """One local deployment for one run: queue (Redis, front, workers) or push (balancer, servers)."""

    def __init__(self, mode: str, args: argparse.Namespace, tmp: Path, logger: log.EventLogger) -> None:
        self.mode = mode
        self.children: list[Child] = []
        self.redis: RedisServer | None = None
        model = ["--backend", "sleep", "--service-time", args.service_time, "--log-level", "WARNING"]
        if mode == "queue":
            self.redis = RedisServer(tmp / f"redis-{time.monotonic_ns()}")
            redis_url = self.redis.start()
            front = Child(["balance", "--dispatch", "queue", "--port", "0", "--redis", redis_url, "--queue-size",
                           "1000000", "--timeout", "600"], env=ENV)  # fmt: skip
            self.children.append(front)
            self.url = front.wait_url()
            self.signals: Signals = QueueSignals(Broker(client(redis_url, timeout=1.0)), 10.0)
            self.actuator: Actuator = LocalWorkers(["worker", "--port", "0", "--redis", redis_url, "--heartbeat-ttl",
                                                    "3", *model], logger, env=ENV)  # fmt: skip
        else:
            token = secrets.token_hex(16)
            # --max-conn 2: the backlog waits in the balancer, where a server added later takes from it,
            # not behind the servers it was sent to (as imgclass up --autoscale runs it)
            front = Child(["balance", "--port", "0", "--policy", "least_outstanding", "--queue-size", "1000000",
                           "--timeout", "600", "--health-interval", "0.5", "--max-conn", str(AUTOSCALED_MAX_CONN)],
                          env={**ENV, "IMGCLASS_ADMIN_TOKEN": token})  # fmt: skip
            self.children.append(front)
            self.url = front.wait_url()
            self.signals = PushSignals(self.url, 10.0)
            self.actuator = LocalServers(["serve", "--port", "0", "--threads", "1", "--max-queue", "100000",
                                          "--max-wait-ms", "0", *model], self.url, token, logger, env=ENV)  # fmt: skip

    async def close(self) -> None:
        await self.actuator.close()
        await self.signals.close()
        stop_all(self.children)
        if self.redis is not None:
            self.redis.stop()


async def one_run(mode: str, policy: str, schedule: Schedule, args: argparse.Namespace, tmp: Path,
                  body: bytes, ctype: str, logger: log.EventLogger) -> dict[str, Any]:  # fmt: skip
    """One trace against one policy ("fixed-N" for a fixed pool of N): requests and timeline."""
    deployment = Deployment(mode, args, tmp, logger)
    timeline: list[dict[str, Any]] = []
    window = None  # the policy's stabilization window, against which flapping is counted
    try:
        fixed = int(policy.split("-", 1)[1]) if policy.startswith("fixed-") else None
        controller = None
        if fixed is None:
            settings = AutoscaleSettings.make(autoscale_policy=policy, scale_min=args.scale_min,
                                              scale_max=args.scale_max, slo_ms=args.slo_ms,
                                              scale_interval=args.interval)  # fmt: skip
            window = settings.slo_downscale_window if policy == "slo" else settings.downscale_window
            controller = Controller(make_policy(settings), deployment.signals, deployment.actuator, args.interval,
                                    logger)  # fmt: skip
            await controller.start()
        else:
            await deployment.actuator.scale_to(fixed)
        stop = asyncio.Event()
        started = time.monotonic()

        async def sample() -> None:
            """A point a second for the timeline; the controller acts every --interval."""
            next_step = started + args.interval
            while not stop.is_set():
                now = time.monotonic()
                if controller is not None and now >= next_step:
                    await controller.step()
                    next_step += args.interval
                obs: Observation | None = await deployment.signals.observe(deployment.actuator.ready)
                timeline.append({
                    "t": round(now - started, 2), "offered": schedule.rate(now - started),
                    "desired": controller.desired if controller is not None else fixed,
                    "running": deployment.actuator.ready, "depth": obs.depth if obs else None,
                })  # fmt: skip
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

        sampler = asyncio.create_task(sample())
        spec = loadgen.LoadSpec(rate=schedule.mean_rate, duration=schedule.duration, seed=args.seed,
                                max_in_flight=100_000, timeout=args.give_up, schedule=schedule)  # fmt: skip
        records = await loadgen.open_loop(loadgen.Target(deployment.url + "/submit", body, ctype), spec)
        stop.set()
        await sampler
    finally:
        await deployment.close()
    return {"policy": policy, "mode": mode, "records": records, "timeline": timeline, "window": window}


def figures(run: dict[str, Any], schedule: Schedule, slo_ms: float, interval: float,
            service_mean: float) -> dict[str, Any]:  # fmt: skip
    """The table row of one run."""
    records, timeline = run["records"], run["timeline"]
    latency = [(i, (d - i) * 1000) for i, d, s in zip(records.intended, records.done, records.status, strict=True)
               if s == 200]  # fmt: skip
    errors = sum(1 for s in records.status if s != 200)
    kinds = Counter(e or f"http_{s}" for s, e in zip(records.status, records.error, strict=True) if s != 200)
    steps = [s.start for s in schedule.segments]
    step_up = steps[1] if len(steps) > 1 else 0.0
    step_down = steps[2] if len(steps) > 2 else schedule.duration
    # scaled up: the pool's capacity first covers the peak's offered rate (ceil(rate x mean service))
    needed = math.ceil(max(schedule.rate(t) for t in (step_up, (step_up + step_down) / 2)) * service_mean - 1e-9)
    reached = next((p["t"] for p in timeline if p["t"] >= step_up and (p["running"] or 0) >= needed), None)
    scale_up_s = round(reached - step_up, 1) if reached is not None else None
    after = [p for p in timeline if p["t"] >= step_down]
    final = after[-1]["running"] or 0 if after else 0
    settled = None
    if after and final < (after[0]["running"] or 0):  # None: the pool did not shrink within the trace
        settled = next(p["t"] for p in after if (p["running"] or 0) <= final)
    scale_down_s = round(settled - step_down, 1) if settled is not None else None
    first_up_end = (reached if reached is not None else step_down) + interval
    outside = [ms for t, ms in latency if not step_up <= t < first_up_end]
    worker_seconds = sum((b["t"] - a["t"]) * (a["running"] or 0) for a, b in itertools.pairwise(timeline))
    points = [p for p in timeline if p["desired"] is not None]
    changes = [(b["t"], b["desired"] - a["desired"]) for a, b in itertools.pairwise(points) if b["desired"] != a["desired"]]
    turns = [t for (_, a), (t, b) in itertools.pairwise(changes) if (a > 0) != (b > 0)]
    reversals = len(turns)
    # flapping: the most reversals within any one stabilization window (counted over the whole trace,
    # transients included, which is stricter than "under steady load")
    window = run.get("window") or 0.0
    most_per_window = max((sum(1 for u in turns if t <= u < t + window) for t in turns), default=0) if window else 0
    values = [ms for _, ms in latency]
    return {
        "mode": run["mode"], "policy": run["policy"], "requests": len(records), "errors": errors,
        "error_kinds": " ".join(f"{k}:{n}" for k, n in kinds.most_common()),
        "over_slo": round(sum(ms > slo_ms for ms in values) / max(1, len(values)), 4),
        "over_slo_outside_first_scale_up": round(sum(ms > slo_ms for ms in outside) / max(1, len(outside)), 4),
        "p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1),
        "worker_seconds": round(worker_seconds, 1), "peak_workers": max((p["running"] or 0) for p in timeline),
        "scale_up_s": scale_up_s, "scale_down_s": scale_down_s, "direction_changes": reversals,
        "stabilization_window_s": window, "most_reversals_per_window": most_per_window,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()  # SIGTERM stops the run's processes in order, as Ctrl-C does
    try:
        schedule = parse_schedule(args.schedule)
    except ValueError as exc:
        raise SystemExit(f"{PROG}: --schedule: {exc}") from None
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"{PROG}: unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if not args.no_fixed:
        policies += [f"fixed-{args.scale_min}", f"fixed-{args.scale_max}"]
    modes = ["queue", "push"] if args.dispatch == "both" else [args.dispatch]
    out = out_dir(args, PROG)
    runs = [(m, p) for m in modes for p in policies]
    announce(PROG, out, len(runs) * (schedule.duration + 15),
             f"{len(runs)} runs of the {duration_text(schedule.duration)} trace {schedule.text}")  # fmt: skip
    body, ctype = multipart(jpeg_of(Path(args.images) / "parrot.jpg", 64))
    info = run_info(PROG, argv, args)
    logger = log.get_logger("test_autoscale", "autoscale", os.environ.get("IMGCLASS_LOG_LEVEL", "WARNING"))
    tmp = Path(tempfile.mkdtemp(prefix="imgclass-autoscale-"))
    rows, timelines = [], {}
    for k, (mode, policy) in enumerate(runs, 1):
        progress(k, len(runs), f"{mode} {policy}", (len(runs) - k + 1) * (schedule.duration + 15))
        run = asyncio.run(one_run(mode, policy, schedule, args, tmp, body, ctype, logger))
        row = figures(run, schedule, args.slo_ms, args.interval, parse_service_time(args.service_time).mean)
        rows.append(row)
        timelines[f"{mode} {policy}"] = {"timeline": run["timeline"], "latency": [
            [round(i, 3), round((d - i) * 1000, 2)] for i, d, s in zip(run["records"].intended, run["records"].done,
                                                                        run["records"].status, strict=True) if s == 200
        ]}  # fmt: skip
        print("  ".join(f"{k_}={v}" for k_, v in row.items()), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_rows_csv(out / "autoscale.csv", rows)
        # after every run: a stopped experiment keeps what it measured, and its plot can be drawn
        write_json(out / "autoscale.json", {**info, "schedule": schedule.text, "slo_ms": args.slo_ms,
                                            "service_time": args.service_time, "rows": rows, "runs": timelines})  # fmt: skip
    for path in timeline_figure(out):
        print(f"wrote {path}")
    finished(out)
    return 0
