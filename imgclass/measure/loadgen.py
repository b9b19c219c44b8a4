"""Open-loop Poisson load generator: requests leave at their scheduled times, latency counts from then."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .clients import CLIENTS, ERRORS, GeneratorClient, LeanClient, classify_error
from .schedule import Schedule
from .stats import DROPPED, Records, RunSummary, summarize


def poisson_offsets(
    rate: float,
    *,
    duration: float | None = None,
    requests: int | None = None,
    seed: int | None = 0,
    warmup: float = 0.0,
) -> np.ndarray:
    """Send times (s) of a Poisson process of `rate`/s, from exponential gaps drawn by a seeded RNG.

    Bounded by duration T: exactly round(rate*T) arrivals, placed by rescaling N+1 exponential
    gaps to fill T. That is the Poisson process conditioned on its count, so the gaps are still
    exponential and the offered rate is exact instead of off by a random 1/sqrt(N). The warm-up
    [0, warmup) and the measured window [warmup, T) are conditioned separately, so the window the
    statistics see holds exactly round(rate * (T - warmup)) arrivals.
    Bounded by requests alone: plain cumulative exponential gaps.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if duration is None and requests is None:
        raise ValueError("bound the run with duration and/or requests")
    rng = random.Random(seed)
    if duration is not None and (requests is None or requests >= round(rate * duration)):
        edges = [0.0, warmup, duration] if 0 < warmup < duration else [0.0, duration]
        parts = []
        for lo, hi in itertools.pairwise(edges):
            count = round(rate * (hi - lo))
            gaps = np.array([rng.expovariate(rate) for _ in range(count + 1)])
            parts.append(lo + np.cumsum(gaps)[:-1] * ((hi - lo) / gaps.sum()))
        return np.concatenate(parts)
    assert requests is not None
    return np.cumsum([rng.expovariate(rate) for _ in range(requests)])


@dataclass(frozen=True)
class Target:
    """What every request sends."""

    url: str
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    # When set, each request goes to one of these, uniformly at random (client-side balancing).
    spread: tuple[str, ...] = ()

    def picker(self, seed: int | None) -> Callable[[], str]:
        if not self.spread:
            return lambda: self.url
        rng = random.Random(None if seed is None else seed + 1)
        urls = self.spread
        return lambda: urls[rng.randrange(len(urls))]


@dataclass(frozen=True)
class LoadSpec:
    rate: float  # requests/s offered (with a schedule: its mean, for the summary)
    duration: float | None = None  # seconds of schedule, warm-up included
    requests: int | None = None
    warmup: float = 0.0  # seconds at the start left out of the statistics
    max_in_flight: int = 1000
    client: str = "lean"  # a key of clients.CLIENTS
    schedule: Schedule | None = None  # a rate that changes over time (then `rate` is only its mean)
    seed: int | None = 0
    timeout: float = 60.0


class Progress:
    """A tqdm bar on stderr when it is a terminal, else a line every few seconds."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._bar = None
        self._last = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(extra, refresh=True)
        elif time.monotonic() - self._last > 5 or done == self.total:
            self._last = time.monotonic()
            print(f"{self.label}: {done}/{self.total} {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass(frozen=True)
class Outcome:
    status: int  # 0 when no HTTP response came back
    backend: str
    error: str  # "" on success
    station_ms: float = math.nan
    upstream_ms: float = math.nan
    service_ms: float = math.nan


async def send(
    client: GeneratorClient, url: str, body: bytes, headers: dict[str, str], station: bool = False
) -> Outcome:
    """One POST; every failure becomes an error type in the outcome, never an exception."""
    try:
        reply = await client.post(url, body, headers)
    except ERRORS as exc:
        return Outcome(0, "", classify_error(exc))
    status, backend, payload = reply.status, reply.backend, reply.body
    if status != 200:
        return Outcome(status, backend, f"http_{status}")
    if not station:
        return Outcome(status, backend, "")
    return Outcome(status, backend, "", *_timings(payload))


def _headers(target: Target) -> dict[str, str]:
    return {"Content-Type": target.content_type, **target.headers}


def _timings(payload: bytes) -> tuple[float, float, float]:
    """(station, upstream, service) ms from the answer's timing_ms.

    station: time queued at the balancer waiting for a slot, plus the model server's queueing
    station (queue + decode + inference). upstream: the balancer's call to the server, i.e. how
    long the request held its slot there. service: the service time the sleep backend drew.
    NaN where the answer does not say.
    """
    try:
        timing = json.loads(payload)["timing_ms"]
        # queued: at the balancer (push) or in the job queue (pull); queue: in the model server's own
        station = float(timing.get("queued", 0.0)) + float(timing.get("queue", 0.0)) + float(timing["decode"])
        station += float(timing["infer"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return math.nan, math.nan, math.nan
    return station, _number(timing, "upstream"), _number(timing, "service")


def _number(timing: dict[str, object], key: str) -> float:
    try:
        return float(timing[key])  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        return math.nan


async def open_loop(
    target: Target, spec: LoadSpec, progress: bool = False, label: str = "load", station: bool = False
) -> Records:
    """Send each request at its scheduled time; never wait for earlier ones (no coordinated omission).

    A timer thread sleeps with nanosleep precision and hands each due request to the event loop.
    asyncio's own timers wake up to a millisecond late (epoll rounds timeouts up), which would
    show up as latency, since latency counts from the scheduled time.
    """
    if spec.schedule is not None:
        offsets = np.asarray(spec.schedule.offsets(spec.seed))
    else:
        offsets = poisson_offsets(
            spec.rate, duration=spec.duration, requests=spec.requests, seed=spec.seed, warmup=spec.warmup
        )
    records = Records()
    headers = _headers(target)
    loop = asyncio.get_running_loop()
    in_flight = 0
    completed = 0
    pending: set[asyncio.Task[None]] = set()
    scheduled = asyncio.Event()
    stop = threading.Event()
    bar = Progress(len(offsets), label, progress)
    pick = target.picker(spec.seed)
    clock = time.monotonic

    async with CLIENTS[spec.client](spec.max_in_flight, spec.timeout) as client:
        start = clock() + 0.05

        async def one(intended: float) -> None:
            nonlocal in_flight, completed
            sent = clock() - start
            try:
                out = await send(client, pick(), target.body, headers, station)
            finally:
                in_flight -= 1
                completed += 1
            records.add(
                intended,
                sent,
                clock() - start,
                out.status,
                out.backend,
                out.error,
                out.station_ms,
                out.upstream_ms,
                out.service_ms,
            )

        def launch(due: list[float]) -> None:
            nonlocal in_flight
            for intended in due:
                if in_flight >= spec.max_in_flight:
                    records.add(intended, math.nan, math.nan, 0, "", DROPPED)
                    continue
                in_flight += 1
                task = loop.create_task(one(intended))
                pending.add(task)
                task.add_done_callback(pending.discard)

        def timer() -> None:
            i, n = 0, len(offsets)
            times = offsets.tolist()
            while i < n and not stop.is_set():
                wait = start + times[i] - clock()
                if wait > 0:
                    time.sleep(wait)
                now = clock() - start + 50e-6
                j = i + 1
                while j < n and times[j] <= now:  # everything already due goes in one hand-off
                    j += 1
                loop.call_soon_threadsafe(launch, times[i:j])
                i = j
            loop.call_soon_threadsafe(scheduled.set)

        previous = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # the timer thread must not wait 5 ms for the GIL
        thread = threading.Thread(target=timer, name="loadgen-timer", daemon=True)
        thread.start()
        try:
            while not scheduled.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(scheduled.wait(), 0.5)
                bar.update(completed, f"in flight {in_flight}")
            while pending:
                await asyncio.wait(pending, timeout=0.5)
                bar.update(completed, f"in flight {in_flight}")
        finally:
            stop.set()
            thread.join(5)
            sys.setswitchinterval(previous)
    bar.close()
    return records


async def closed_loop(
    target: Target, concurrency: int, duration: float, timeout: float = 60.0
) -> tuple[Records, float]:
    """`concurrency` clients each send their next request as soon as the last answers; for saturation."""
    records = Records()
    headers = _headers(target)
    loop = asyncio.get_running_loop()
    async with LeanClient(concurrency, timeout) as client:
        start = loop.time()
        stop_at = start + duration

        async def worker() -> None:
            while loop.time() < stop_at:
                sent = loop.time() - start
                out = await send(client, target.url, target.body, headers)
                if out.status == 0:
                    await asyncio.sleep(0.01)  # no hot loop against a server that is down
                records.add(sent, sent, loop.time() - start, out.status, out.backend, out.error)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - start
    return records, elapsed


def run(
    target: Target, spec: LoadSpec, progress: bool = False, label: str = "load", station: bool = False
) -> tuple[Records, RunSummary]:
    """One open-loop run; `station` also records the server's own queue+service time per request."""
    records = asyncio.run(open_loop(target, spec, progress, label, station))
    end = spec.duration if spec.duration is not None else (max(records.intended) if len(records) else 0.0)
    if spec.duration is None:
        end = math.nextafter(end, math.inf)
    return records, summarize(records, spec.rate, spec.warmup, end)
