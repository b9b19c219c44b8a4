"""Scaling policies behind one interface: how many workers the load needs, from one observation.

- queue_depth: the original design's rule, desired = ceil(depth / per_worker), run as KEDA runs
  it (through the HPA): a scale-down takes the highest recommendation of the last window. With a
  window of 0 it is the bare rule, which follows every dip of the queue and flaps.
- target: the Kubernetes HPA's and Ray Serve's rule, desired = ceil(current x metric / target),
  with a tolerance, a delay before scaling up, and a stabilization window for scaling down (the
  highest recommendation over the window wins, so a dip does not remove workers at once).
- slo: queueing theory. The smallest c whose M/M/c model, at the measured arrival rate and service
  rate, keeps the mean time in system (or its p95, from Erlang C's waiting-time distribution) under
  the SLO divided by a headroom factor.
All clamp to [min, max]; each decision says why, for the log.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from ..measure.queueing import erlang_c, mmc_mean_response


@dataclass(frozen=True)
class Observation:
    """What the controller saw at one evaluation."""

    time: float  # seconds, monotonic
    current: int  # workers (or servers) running and ready
    depth: float  # jobs waiting or in work: the group's lag plus pending (queue); in flight plus queued (push)
    arrival_rate: float | None = None  # jobs/s, smoothed (None: not measured yet)
    service_rate: float | None = None  # jobs/s one worker completes when busy, smoothed


@dataclass(frozen=True)
class Decision:
    desired: int  # clamped to [min, max]
    raw: int  # before clamping and smoothing
    reason: str


@dataclass(frozen=True)
class Bounds:
    minimum: int
    maximum: int

    def clamp(self, value: int) -> int:
        return max(self.minimum, min(self.maximum, value))


class ScalingPolicy(ABC):
    name = ""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds

    @abstractmethod
    def decide(self, obs: Observation) -> Decision: ...


@dataclass
class _Stabilizer:
    """The HPA's behaviour: a scale-up waits `up_delay` of consistent demand; a scale-down takes the
    highest recommendation of the last `down_window` seconds."""

    up_delay: float
    down_window: float
    history: deque[tuple[float, int]] = field(default_factory=deque)
    wanting_up_since: float | None = None

    def apply(self, now: float, current: int, recommended: int) -> tuple[int, str]:
        self.history.append((now, recommended))
        while self.history and self.history[0][0] < now - self.down_window:
            self.history.popleft()
        if recommended > current:
            if self.wanting_up_since is None:
                self.wanting_up_since = now
            if now - self.wanting_up_since >= self.up_delay:
                return recommended, "up"
            return current, f"up held {now - self.wanting_up_since:.0f}/{self.up_delay:g} s"
        self.wanting_up_since = None
        highest = max(r for _, r in self.history)
        if highest < current:
            return highest, f"down to the highest of the last {self.down_window:g} s"
        return current, "hold"


class QueueDepth(ScalingPolicy):
    """desired = ceil(depth / per_worker): one worker per `per_worker` jobs in the queue (the original rule)."""

    name = "queue_depth"

    def __init__(self, bounds: Bounds, per_worker: float = 5.0, down_window: float = 300.0) -> None:
        super().__init__(bounds)
        self.per_worker = per_worker
        self.stabilizer = _Stabilizer(0.0, down_window)

    def decide(self, obs: Observation) -> Decision:
        raw = math.ceil(obs.depth / self.per_worker)
        desired, why = self.stabilizer.apply(obs.time, obs.current, self.bounds.clamp(raw))
        return Decision(self.bounds.clamp(desired), raw,
                        f"depth {obs.depth:g} / {self.per_worker:g} per worker = {raw}; {why}")  # fmt: skip


class TargetTracking(ScalingPolicy):
    """desired = ceil(current x metric / target), metric = depth per worker (Ray Serve's ongoing requests)."""

    name = "target"

    def __init__(self, bounds: Bounds, target: float = 2.0, tolerance: float = 0.1, up_delay: float = 0.0,
                 down_window: float = 300.0) -> None:  # fmt: skip
        super().__init__(bounds)
        self.target = target
        self.tolerance = tolerance
        self.stabilizer = _Stabilizer(up_delay, down_window)

    def decide(self, obs: Observation) -> Decision:
        current = max(1, obs.current)
        metric = obs.depth / current
        ratio = metric / self.target
        # within the tolerance (the HPA's 10%), no change
        raw = obs.current if abs(ratio - 1) <= self.tolerance else math.ceil(current * ratio)
        desired, why = self.stabilizer.apply(obs.time, obs.current, self.bounds.clamp(raw))
        return Decision(self.bounds.clamp(desired), raw,
                        f"{metric:.2f} per worker vs target {self.target:g} (ratio {ratio:.2f}); {why}")  # fmt: skip


def mmc_time_quantile(arrival: float, service_rate: float, c: int, q: float) -> float:
    """An upper estimate of the q-quantile of the time in system of M/M/c (s).

    Exact for the waiting time, which is 0 with probability 1 - C and exponential with rate
    c mu - lambda otherwise (Erlang C); the service time's own q-quantile is added to it. The sum
    of the two quantiles bounds the quantile of the sum from above, so sizing by it errs towards
    one worker more.
    """
    rho = arrival / (c * service_rate)
    if rho >= 1:
        return math.inf
    waits = erlang_c(c, arrival / service_rate)
    wait_q = 0.0 if waits <= 1 - q else math.log(waits / (1 - q)) / (c * service_rate - arrival)
    return wait_q - math.log(1 - q) / service_rate


class SloSizing(ScalingPolicy):
    """The smallest c whose M/M/c prediction keeps the mean (or p95) time in system under slo / headroom."""

    name = "slo"

    def __init__(self, bounds: Bounds, slo_s: float, headroom: float = 1.25, quantile: float | None = 0.95,
                 down_window: float = 60.0, tolerance: float = 0.1) -> None:  # fmt: skip
        super().__init__(bounds)
        self.slo_s = slo_s
        self.headroom = headroom
        self.quantile = quantile  # None: size by the mean
        self.tolerance = tolerance  # scale down only if the smaller pool also fits (1 + tolerance) x the rate
        self.stabilizer = _Stabilizer(0.0, down_window)

    def feasible(self, service_rate: float) -> bool:
        """Whether any pool can meet the budget: the service time alone (mean or quantile) must fit."""
        alone = 1 / service_rate if self.quantile is None else -math.log(1 - self.quantile) / service_rate
        return alone <= self.slo_s / self.headroom

    def size(self, arrival: float, service_rate: float) -> int:
        budget = self.slo_s / self.headroom
        c = max(1, math.ceil(arrival / service_rate))
        if not self.feasible(service_rate):
            # More workers cannot shorten a job: the most they can do is remove the wait. The
            # smallest pool in which at most 5% of jobs wait at all (Erlang C), not the maximum.
            while erlang_c(c, arrival / service_rate) > 0.05 and c < self.bounds.maximum * 4:
                c += 1
            return c
        while c < self.bounds.maximum * 4:
            if self.quantile is None:
                time_in_system = mmc_mean_response(arrival, service_rate, c)
            else:
                time_in_system = mmc_time_quantile(arrival, service_rate, c, self.quantile)
            if time_in_system <= budget:
                return c
            c += 1
        return c

    def decide(self, obs: Observation) -> Decision:
        if not obs.arrival_rate or not obs.service_rate:
            # No rates measured yet: hold, unless jobs are waiting and nobody works on them.
            raw = obs.current if obs.current or not obs.depth else 1
            return Decision(self.bounds.clamp(raw), raw, "no rates measured yet")
        # a backlog the model does not see (it is a steady-state model): drain it within the budget
        backlog = math.ceil(obs.depth * (1 / obs.service_rate) / (self.slo_s / self.headroom)) if obs.depth else 0
        backlog = min(backlog, self.bounds.maximum)
        raw = max(self.size(obs.arrival_rate, obs.service_rate), backlog)
        recommended = raw
        if raw < obs.current:
            # Hysteresis: a measured rate moves by a few percent from one evaluation to the next, and at
            # the edge between c and c + 1 that alone would take a worker away and bring it back. Down
            # only to a size that also fits a rate (1 + tolerance) higher.
            kept = max(self.size(obs.arrival_rate * (1 + self.tolerance), obs.service_rate), backlog)
            recommended = min(obs.current, kept)
        desired, why = self.stabilizer.apply(obs.time, obs.current, self.bounds.clamp(recommended))
        if recommended != raw:
            why += f" (a rate {self.tolerance:.0%} higher needs {recommended})"
        what = f"p{self.quantile * 100:g}" if self.quantile else "mean"
        goal = (f"M/M/c {what} under {self.slo_s * 1000:.0f}/{self.headroom:g} ms" if self.feasible(obs.service_rate)
                else f"the service time alone misses {self.slo_s * 1000:.0f}/{self.headroom:g} ms; at most 5% waiting")  # fmt: skip
        return Decision(self.bounds.clamp(desired), raw,
                        f"lambda {obs.arrival_rate:.1f}/s mu {obs.service_rate:.2f}/s: {goal} needs {raw}; {why}")  # fmt: skip


POLICIES: dict[str, type[ScalingPolicy]] = {p.name: p for p in (QueueDepth, TargetTracking, SloSizing)}
