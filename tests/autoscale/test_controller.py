"""The control loop with a scripted source and a recording pool: holds on unreadable signals, clamps, exports."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import generate_latest

from imgclass import log
from imgclass.autoscale.actuators import Actuator
from imgclass.autoscale.controller import Controller
from imgclass.autoscale.policies import Bounds, Observation, QueueDepth
from imgclass.autoscale.signals import ArrivalRate, Rate, ServiceTime, Signals, parse_metrics


class Script(Signals):
    """Depths in order; None stands for a source that could not be read."""

    def __init__(self, depths: list[float | None]) -> None:
        self.depths = depths
        self.t = 0.0

    async def observe(self, current: int) -> Observation | None:
        depth = self.depths.pop(0)
        self.t += 1
        return None if depth is None else Observation(self.t, current, depth)


class Pool(Actuator):
    def __init__(self) -> None:
        self.size = 0
        self.calls: list[int] = []

    @property
    def ready(self) -> int:
        return self.size

    async def scale_to(self, count: int) -> None:
        self.calls.append(count)
        self.size = count


def controller(depths: list[float | None]) -> tuple[Controller, Pool]:
    pool = Pool()
    policy = QueueDepth(Bounds(2, 10), per_worker=5, down_window=0)
    return Controller(policy, Script(depths), pool, 1.0, log.get_logger("t", "autoscale", "WARNING")), pool


async def steps(c: Controller, n: int) -> None:
    await c.start()
    for _ in range(n):
        await c.step()


def test_starts_at_the_minimum_and_follows_the_policy() -> None:
    c, pool = controller([20, 60, 0])
    asyncio.run(steps(c, 3))
    assert pool.calls == [2, 4, 10, 2]


class Adopting(Pool):
    """A pool that finds `found` already serving (testbed nodes a deploy started)."""

    def __init__(self, found: int) -> None:
        super().__init__()
        self.found = found

    async def adopt(self) -> None:
        self.size = self.found


@pytest.mark.parametrize(("found", "first"), [(5, 5), (0, 2), (14, 10)])
def test_the_first_size_is_what_was_adopted_clamped(found: int, first: int) -> None:
    pool = Adopting(found)
    c = Controller(QueueDepth(Bounds(2, 10), per_worker=5, down_window=0), Script([]), pool, 1.0,
                   log.get_logger("t", "autoscale", "WARNING"))  # fmt: skip
    asyncio.run(c.start())
    assert c.desired == first and pool.calls == [first]


def test_an_unreadable_source_holds_the_pool_instead_of_scaling_to_the_minimum() -> None:
    c, pool = controller([40, None, None, None, 40])
    asyncio.run(steps(c, 5))
    assert pool.calls == [2, 8]  # started at 2, up to 8, then held through three failed reads
    assert c.desired == 8 and pool.size == 8
    assert c.decisions.values[("hold_unreadable",)] == 3


def test_metrics_export_desired_current_and_decisions() -> None:
    c, _ = controller([40, None])
    asyncio.run(steps(c, 2))
    text = generate_latest(c.registry).decode()
    metrics = parse_metrics(text)
    assert metrics["imgclass_autoscale_desired"] == 8
    assert metrics["imgclass_autoscale_current"] == 8
    assert 'action="up"' in text and 'action="hold_unreadable"' in text


def test_rate_is_an_ewma_of_the_counter() -> None:
    rate = Rate(window=10.0)
    assert rate.update(0.0, 0) is None
    assert rate.update(1.0, 10) == 10.0  # the first interval is taken as it is
    # then each interval moves the estimate by 1 - e^(-dt / window) of the way
    value = rate.update(2.0, 10)
    assert value is not None and abs(value - 10 * (1 - (1 - 2.718281828459045**-0.1))) < 1e-9
    assert rate.update(2.0, 10) == value  # no time passed: unchanged


def test_service_time_is_the_mean_over_the_window_s_jobs_across_workers() -> None:
    est = ServiceTime(window=10.0, min_jobs=1)
    assert est.update(0.0, {"a": (0.0, 0), "b": (0.0, 0)}) is None  # totals only: no difference yet
    # a served 2 jobs in 1.0 s, b 8 jobs in 0.6 s: 1.6 s over 10 jobs, not the mean of 0.5 and 0.075
    assert est.update(1.0, {"a": (1.0, 2), "b": (0.6, 8)}) == pytest.approx(0.16)
    assert est.rate == pytest.approx(6.25)
    # b restarted (its totals fell): no sample from it this time; c is new: no sample yet either
    assert est.update(2.0, {"a": (1.2, 4), "b": (0.05, 1), "c": (0.3, 3)}) == pytest.approx(1.8 / 12)
    # idle: the estimate holds
    assert est.update(3.0, {"a": (1.2, 4), "b": (0.05, 1), "c": (0.3, 3)}) == pytest.approx(1.8 / 12)
    # the first two samples leave the window; only a's last 0.1 s over 1 job counts
    assert est.update(12.5, {"a": (1.3, 5), "b": (0.05, 1), "c": (0.3, 3)}) == pytest.approx(0.1)


def test_service_time_waits_for_enough_jobs_before_its_first_estimate() -> None:
    est = ServiceTime(window=10.0, min_jobs=10)
    est.update(0.0, {"a": (0.0, 0)})
    assert est.update(1.0, {"a": (2.0, 3)}) is None  # three long jobs: not yet an estimate
    assert est.update(2.0, {"a": (2.7, 10)}) == pytest.approx(0.27)  # ten jobs in the window
    assert est.update(3.0, {"a": (2.9, 11)}) == pytest.approx(2.9 / 11)  # from then on, every job counts


def test_arrival_rate_rises_with_the_short_window_and_falls_with_the_long_one() -> None:
    rate = ArrivalRate(window=10.0)
    rate.update(0.0, 0)
    assert rate.update(1.0, 10) == 10.0
    count = 10.0
    for t in range(2, 6):  # the load steps up to 100/s
        count += 100
        value = rate.update(float(t), count)
    # the 2 s window has moved 1 - e^(-4/2) = 86% of the way; the 10 s one only 33%
    assert value == pytest.approx(100 - 90 * math.exp(-2.0))
    for t in range(6, 10):  # and back down to 10/s: the 10 s window holds it up
        count += 10
        value = rate.update(float(t), count)
    slow = 10 + 90 * (1 - math.exp(-0.4)) * math.exp(-0.4)  # up for 4 s, down for 4 s, over 10 s
    assert value == pytest.approx(slow)
