"""What the controller measures: the backlog, the arrival rate and one worker's service rate.

Queue mode reads Redis: the consumer group's lag plus its pending entries (KEDA's redis-streams
scaler uses the same two), the enqueued and finished counters, and the service time each worker
reports in its heartbeat. Push mode reads the balancer's /metrics (requests in flight and queued,
requests answered) and each model server's own service time.
Rates are smoothed with an exponentially weighted moving average whose time constant is --window.
A source that cannot be read gives no observation: the controller then holds the pool as it is.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections import deque

import aiohttp
from redis.exceptions import RedisError

from ..queue.broker import Broker
from .policies import Observation


class Rate:
    """Events per second from a monotonically growing counter, smoothed over `window` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.last: tuple[float, float] | None = None
        self.value: float | None = None

    def update(self, now: float, count: float) -> float | None:
        if self.last is not None and now > self.last[0]:
            instant = max(0.0, count - self.last[1]) / (now - self.last[0])
            weight = 1 - math.exp(-(now - self.last[0]) / self.window)
            self.value = instant if self.value is None else self.value + weight * (instant - self.value)
        self.last = (now, count)
        return self.value


class ArrivalRate:
    """The arrival rate as a sizing policy should see it: quick to rise, slow to fall.

    The larger of two smoothed rates, over `window` and over a fifth of it (Knative's stable and
    panic windows): a step up shows within a few seconds, while a dip must last a whole window
    before the estimate, and so the pool, follows it down.
    """

    def __init__(self, window: float) -> None:
        self.stable = Rate(window)
        self.panic = Rate(window / 5)

    def update(self, now: float, count: float) -> float | None:
        values = [v for v in (self.stable.update(now, count), self.panic.update(now, count)) if v is not None]
        return max(values) if values else None


class ServiceTime:
    """Seconds of service per job, as the mean over the jobs of the last `window` seconds.

    Each worker (or server) reports two growing totals, busy seconds and jobs served; their
    differences between two readings, summed over the workers seen in both, are the window's
    samples. A mean over jobs, not an average of workers' own averages: a worker that served two
    jobs weighs two jobs, so a few long exponential service times at start-up do not make the
    pool look slow. A worker that restarted (its totals went down) gives no sample that time.
    """

    def __init__(self, window: float, min_jobs: int = 10) -> None:
        self.window = window
        self.min_jobs = min_jobs  # fewer jobs than this in the first window: no estimate yet
        self.last: dict[str, tuple[float, float]] = {}
        self.samples: deque[tuple[float, float, float]] = deque()  # (time, busy seconds, jobs)
        self.value: float | None = None

    def update(self, now: float, totals: dict[str, tuple[float, float]]) -> float | None:
        busy = jobs = 0.0
        for name, (seconds, count) in totals.items():
            if name in self.last:
                before_s, before_n = self.last[name]
                if count >= before_n and seconds >= before_s:
                    busy, jobs = busy + seconds - before_s, jobs + count - before_n
        self.last = dict(totals)
        if jobs:
            self.samples.append((now, busy, jobs))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        total_jobs = sum(j for _, _, j in self.samples)
        if total_jobs >= self.min_jobs or (total_jobs and self.value is not None):
            self.value = sum(b for _, b, _ in self.samples) / total_jobs
        return self.value  # the last estimate holds while the pool is idle

    @property
    def rate(self) -> float | None:
        return 1 / self.value if self.value else None


class Signals(ABC):
    @abstractmethod
    async def observe(self, current: int) -> Observation | None:
        """One observation, or None if the source cannot be read now."""

    async def close(self) -> None:
        return None


class QueueSignals(Signals):
    """From Redis: lag + pending, the arrival rate (enqueued), and mu from the workers' heartbeats."""

    def __init__(self, broker: Broker, window: float) -> None:
        self.broker = broker
        self.arrivals = ArrivalRate(window)
        self.completions = Rate(window)
        self.service = ServiceTime(window)

    async def observe(self, current: int) -> Observation | None:
        now = time.monotonic()
        try:
            depth = await self.broker.depth()
            stats = await self.broker.stats()
            workers = await self.broker.workers()
        except RedisError:
            return None
        arrival = self.arrivals.update(now, stats.get("enqueued", 0))
        self.completions.update(now, stats.get("finished", 0))
        self.service.update(now, {w["name"]: (w.get("busy_s", 0.0), w.get("served", 0)) for w in workers
                                  if "name" in w})  # fmt: skip
        return Observation(now, current, float(depth["lag"] + depth["pending"]), arrival, self.service.rate)

    async def close(self) -> None:
        await self.broker.redis.aclose()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: every sample summed by metric name (labels dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


class PushSignals(Signals):
    """From the balancer's /metrics and /backends, and each model server's service time."""

    def __init__(self, balancer_url: str, window: float) -> None:
        self.balancer_url = balancer_url.rstrip("/")
        self.arrivals = ArrivalRate(window)
        self.service = ServiceTime(window)
        self.session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(total=2.0)

    async def observe(self, current: int) -> Observation | None:
        now = time.monotonic()
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self.session.get(self.balancer_url + "/metrics") as response:
                metrics = parse_metrics(await response.text())
            async with self.session.get(self.balancer_url + "/backends") as response:
                backends = json.loads(await response.read())
            totals = {}
            for backend in backends:
                async with self.session.get(backend["url"] + "/metrics") as response:
                    server = parse_metrics(await response.text())
                totals[backend["url"]] = (server.get("imgclass_server_service_seconds_sum", 0.0),
                                          server.get("imgclass_server_service_seconds_count", 0.0))  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            return None
        depth = metrics.get("imgclass_balancer_in_flight", 0.0) + metrics.get("imgclass_balancer_queued", 0.0)
        arrival = self.arrivals.update(now, metrics.get("imgclass_balancer_requests_total", 0.0))
        self.service.update(now, totals)
        return Observation(now, current, depth, arrival, self.service.rate)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
