"""Each scaling policy's formula against hand-computed cases: tolerance, delays, stabilization, clamping, Erlang C."""

from __future__ import annotations

import itertools
import math

import pytest

from imgclass.autoscale.policies import (
    POLICIES,
    Bounds,
    Observation,
    QueueDepth,
    SloSizing,
    TargetTracking,
    mmc_time_quantile,
)


def obs(t: float, current: int, depth: float, arrival: float | None = None, mu: float | None = None) -> Observation:
    return Observation(t, current, depth, arrival, mu)


def test_the_table_names_three_policies() -> None:
    assert sorted(POLICIES) == ["queue_depth", "slo", "target"]


# queue_depth: ceil(depth / per_worker), clamped, with the HPA's scale-down window (as KEDA runs it)


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(0, 1), (1, 1), (5, 1), (5.5, 2), (23, 5), (100, 20), (101, 20), (1000, 20)],
)
def test_queue_depth_is_the_original_rule_clamped_to_1_and_20(depth: float, expected: int) -> None:
    policy = QueueDepth(Bounds(1, 20), per_worker=5, down_window=0)
    assert policy.decide(obs(0, 1, depth)).desired == expected


def test_queue_depth_reports_the_raw_value_before_clamping() -> None:
    decision = QueueDepth(Bounds(1, 20), per_worker=5, down_window=0).decide(obs(0, 1, 1000))
    assert (decision.raw, decision.desired) == (200, 20)
    assert "1000" in decision.reason and "5" in decision.reason


def test_queue_depth_scales_down_only_after_its_window() -> None:
    policy = QueueDepth(Bounds(1, 20), per_worker=5, down_window=60)
    assert policy.decide(obs(0, 1, 40)).desired == 8  # up at once
    assert policy.decide(obs(10, 8, 0)).desired == 8  # the queue drained: held by the window
    assert policy.decide(obs(59, 8, 0)).desired == 8
    assert policy.decide(obs(61, 8, 0)).desired == 1  # the 8 of t=0 has left the window


def test_queue_depth_without_a_window_follows_every_dip() -> None:
    policy = QueueDepth(Bounds(1, 20), per_worker=5, down_window=0)
    assert [policy.decide(obs(t, 1, d)).desired for t, d in enumerate([40, 0, 40, 0])] == [8, 1, 8, 1]


# target: ceil(current x metric / target), tolerance, upscale delay, scale-down window


def target(**kw: float) -> TargetTracking:
    args: dict[str, float] = {"target": 2.0, "tolerance": 0.1, "up_delay": 0.0, "down_window": 0.0, **kw}
    return TargetTracking(Bounds(1, 20), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (8.0, 4),  # 2 per worker: on target
        (8.7, 4),  # ratio 1.09: inside the 10% tolerance
        (7.3, 4),  # ratio 0.91: inside too
        (9.2, 5),  # ratio 1.15: ceil(4 x 1.15) = ceil(4.6) = 5
        (7.0, 4),  # ratio 0.875: ceil(3.5) = 4
        (6.0, 3),  # ratio 0.75: ceil(3) = 3
        (24.0, 12),  # ratio 3: ceil(12)
        (0.0, 1),  # idle: ceil(0) clamped to the minimum
    ],
)
def test_target_is_the_hpa_formula_with_its_tolerance(depth: float, expected: int) -> None:
    assert target().decide(obs(0, 4, depth)).desired == expected


def test_target_clamps_to_its_bounds() -> None:
    policy = TargetTracking(Bounds(2, 6), target=2.0, tolerance=0.1, up_delay=0, down_window=0)
    assert policy.decide(obs(0, 4, 80)).desired == 6  # wants 40
    assert policy.decide(obs(1, 6, 0)).desired == 2


def test_target_with_no_worker_running_sizes_from_one() -> None:
    # every worker crashed: current 0 must not make the formula 0 x anything
    assert target().decide(obs(0, 0, 10)).desired == 5


def test_target_waits_its_upscale_delay_of_steady_demand() -> None:
    policy = target(up_delay=30)
    assert policy.decide(obs(0, 4, 16)).desired == 4  # wants 8, holds
    assert policy.decide(obs(29, 4, 16)).desired == 4
    assert policy.decide(obs(30, 4, 16)).desired == 8


def test_target_upscale_delay_restarts_when_demand_stops() -> None:
    policy = target(up_delay=30)
    policy.decide(obs(0, 4, 16))
    policy.decide(obs(20, 4, 8))  # back on target: the wait is reset
    assert policy.decide(obs(40, 4, 16)).desired == 4
    assert policy.decide(obs(70, 4, 16)).desired == 8


def test_target_scale_down_takes_the_highest_recommendation_of_the_window() -> None:
    policy = target(down_window=300)
    assert policy.decide(obs(0, 4, 16)).desired == 8
    assert policy.decide(obs(100, 8, 4)).desired == 8  # wants 2; 8 is in the window
    assert policy.decide(obs(200, 8, 8)).desired == 8  # wants 4
    assert policy.decide(obs(301, 8, 4)).desired == 4  # t=0 left; highest of (2, 4, 2) is 4
    assert policy.decide(obs(501, 4, 2)).desired == 2  # t=200 left too


def test_target_steady_noise_never_changes_direction_within_the_window() -> None:
    policy = target(down_window=300)
    current, desired = 4, [4]
    for t, depth in enumerate([16, 4, 16, 4, 16, 4] * 10):
        current = policy.decide(obs(t, current, depth)).desired
        desired.append(current)
    changes = [b - a for a, b in itertools.pairwise(desired) if a != b]
    assert changes == [4]  # one step up to 8, never down inside the window


# slo: M/M/c sizing


def test_erlang_c_quantile_by_hand_for_mm2() -> None:
    # M/M/2, lambda = mu = 1: a = 1, C(2, 1) = (1/2 x 2) / (1 + 1 + 1) = 1/3.
    # P(W > t) = C e^(-(2 - 1) t), so W's p95 is ln((1/3) / 0.05) = ln(20/3); the service time's p95
    # is ln 20. Their sum: ln(400/3).
    assert mmc_time_quantile(1.0, 1.0, 2, 0.95) == pytest.approx(math.log(400 / 3), rel=1e-9)


def test_erlang_c_quantile_without_waiting_is_the_service_quantile() -> None:
    # C(c, a) below 1 - q: the q-quantile of the wait is 0
    assert mmc_time_quantile(0.01, 1.0, 8, 0.95) == pytest.approx(math.log(20), rel=1e-9)


def test_erlang_c_quantile_of_an_unstable_pool_is_infinite() -> None:
    assert mmc_time_quantile(10.0, 1.0, 10, 0.95) == math.inf


def test_slo_by_the_mean_matches_mm1_and_mm2_by_hand() -> None:
    # lambda 8/s, mu 10/s. M/M/1: T = 1 / (10 - 8) = 0.5 s. M/M/2: a = 0.8, rho = 0.4,
    # C = (0.32 / 0.6) / (1 + 0.8 + 0.32 / 0.6) = 0.228571; T = 0.1 + C / (20 - 8) = 0.119 s.
    exact = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.0, quantile=None)
    assert exact.size(8.0, 10.0) == 1  # 0.5 s fits a 0.5 s budget exactly
    tighter = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=None)  # budget 0.4 s
    assert tighter.size(8.0, 10.0) == 2
    assert SloSizing(Bounds(1, 20), slo_s=0.11905, headroom=1.0, quantile=None).size(8.0, 10.0) == 2
    assert SloSizing(Bounds(1, 20), slo_s=0.11904, headroom=1.0, quantile=None).size(8.0, 10.0) == 3


def erlang_c_by_hand(c: int, a: float) -> float:
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def test_slo_p95_sizing_is_the_smallest_c_that_meets_the_budget() -> None:
    # lambda 64/s, mu 10/s, SLO 500 ms / 1.25 = 400 ms; the service time alone has p95 = ln 20 / 10 = 300 ms,
    # so the wait's p95 must stay under 100 ms.
    def p95(c: int) -> float:
        waits = erlang_c_by_hand(c, 6.4)
        wait = 0.0 if waits <= 0.05 else math.log(waits / 0.05) / (10 * c - 64)
        return wait + math.log(20) / 10

    smallest = next(c for c in range(7, 30) if p95(c) <= 0.4)
    assert p95(smallest - 1) > 0.4
    assert SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=0.95).size(64, 10) == smallest == 9


def test_slo_decides_from_measured_rates_and_clamps() -> None:
    policy = SloSizing(Bounds(1, 6), slo_s=0.5, headroom=1.25, quantile=0.95, down_window=0)
    decision = policy.decide(obs(0, 2, 0, arrival=64, mu=10))
    assert (decision.raw, decision.desired) == (9, 6)
    assert "M/M/c" in decision.reason


def test_slo_drains_a_backlog_the_steady_state_model_cannot_see() -> None:
    # 100 jobs waiting x 0.1 s each within a 0.4 s budget: ceil(25) workers, clamped to 20
    policy = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=0.95, down_window=0)
    assert policy.decide(obs(0, 2, 100, arrival=1, mu=10)).desired == 20
    assert policy.decide(obs(1, 20, 8, arrival=1, mu=10)).desired == 2  # ceil(8 x 0.1 / 0.4) = 2


def test_slo_holds_without_rates_but_never_leaves_jobs_without_a_worker() -> None:
    policy = SloSizing(Bounds(0, 8), slo_s=0.5)
    assert policy.decide(obs(0, 3, 50)).desired == 3  # nothing measured yet: hold
    assert policy.decide(obs(1, 0, 5)).desired == 1  # jobs and no worker
    assert policy.decide(obs(2, 0, 0)).desired == 0


def test_slo_with_a_job_longer_than_the_budget_removes_the_wait_not_more() -> None:
    # mu 2/s: the service time's p95 alone is ln 20 / 2 = 1.5 s, over the 400 ms budget, and no pool
    # can shorten it. The smallest c in which at most 5% wait: a = 0.5, C(1) = 0.5,
    # C(2) = (0.125 x 2 / 1.5) / (1.5 + 0.1667) = 0.1, C(3) = (0.02083 x 3 / 2.5) / (1.625 + 0.025) = 0.0152.
    policy = SloSizing(Bounds(1, 8), slo_s=0.5, headroom=1.25)
    assert not policy.feasible(2.0) and policy.feasible(10.0)
    assert policy.size(1.0, 2.0) == 3
    assert "alone misses" in policy.decide(obs(0, 1, 0, arrival=1.0, mu=2.0)).reason


def test_slo_scale_down_waits_its_window() -> None:
    policy = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=0.95, down_window=30)
    assert policy.decide(obs(0, 1, 0, arrival=64, mu=10)).desired == 9
    assert policy.decide(obs(20, 9, 0, arrival=8, mu=10)).desired == 9
    assert policy.decide(obs(31, 9, 0, arrival=8, mu=10)).desired < 9


def test_slo_scales_down_only_to_a_pool_that_fits_a_rate_a_tolerance_higher() -> None:
    # mu 10/s, p95 budget 400 ms: 50/s needs 7 workers (p95 with 7 fits), but 55/s needs 8, so a pool of 8
    # at a measured 50/s stays at 8; at 44/s (48.4/s with 10% more) 7 fits both, and the pool shrinks.
    policy = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=0.95, down_window=0, tolerance=0.1)
    assert policy.size(50, 10) == 7 and policy.size(55, 10) == 8 and policy.size(48.4, 10) == 7
    held = policy.decide(obs(0, 8, 0, arrival=50, mu=10))
    assert (held.raw, held.desired) == (7, 8) and "10% higher needs 8" in held.reason
    assert policy.decide(obs(1, 8, 0, arrival=44, mu=10)).desired == 7
    assert policy.decide(obs(2, 7, 0, arrival=55, mu=10)).desired == 8  # up needs no margin: at once
    bare = SloSizing(Bounds(1, 20), slo_s=0.5, headroom=1.25, quantile=0.95, down_window=0, tolerance=0)
    assert bare.decide(obs(0, 8, 0, arrival=50, mu=10)).desired == 7
