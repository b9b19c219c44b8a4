"""Unit: the autoscaling experiment's table row, computed from a hand-made run (no sockets)."""

from __future__ import annotations

from imgclass.autoscale.experiment import figures
from imgclass.measure.schedule import parse_schedule
from imgclass.measure.stats import Records

SCHEDULE = parse_schedule("step:4@30s,32@90s,4@120s")  # steps at 30 s and 120 s


def run_with(desired: list[tuple[float, int]], window: float | None, latencies: list[tuple[float, float]]) -> dict:
    records = Records()
    for intended, ms in latencies:
        records.add(intended, intended, intended + ms / 1000, 200 if ms < 60_000 else 0, "", "" if ms < 60_000 else
                    "timeout")  # fmt: skip
    timeline = [{"t": t, "offered": SCHEDULE.rate(t), "desired": d, "running": d, "depth": 0} for t, d in desired]
    return {"mode": "queue", "policy": "slo", "records": records, "timeline": timeline, "window": window}


def test_reversals_and_the_most_within_one_window() -> None:
    # up to 9, down at 65, up at 72 (two turns 7 s apart), down at 150 (78 s later)
    desired = [(0, 1), (34, 5), (36, 9), (65, 8), (70, 7), (72, 8), (150, 4), (160, 2), (240, 2)]
    row = figures(run_with(desired, 30.0, [(1.0, 100.0)]), SCHEDULE, 2000, 2.0, 0.2)
    assert row["direction_changes"] == 3
    assert row["most_reversals_per_window"] == 2
    assert figures(run_with(desired, 5.0, [(1.0, 100.0)]), SCHEDULE, 2000, 2.0, 0.2)["most_reversals_per_window"] == 1
    fixed = figures(run_with([(0, 12), (240, 12)], None, [(1.0, 100.0)]), SCHEDULE, 2000, 2.0, 0.2)
    assert (fixed["direction_changes"], fixed["most_reversals_per_window"]) == (0, 0)


def test_slo_share_scale_times_cost_and_errors() -> None:
    # peak 32/s x 0.2 s = 6.4: scaled up once 7 run; 36 s after the step at 30 s is 6 s
    desired = [(0, 1), (33, 5), (36, 9), (121, 9), (150, 2), (240, 2)]
    latencies = [(10.0, 100.0), (31.0, 3000.0), (50.0, 2500.0), (60.0, 100.0), (70.0, 70_000.0)]
    row = figures(run_with(desired, 30.0, latencies), SCHEDULE, 2000, 2.0, 0.2)
    assert row["scale_up_s"] == 6.0 and row["scale_down_s"] == 30.0  # the step down is at 120 s
    assert row["errors"] == 1 and row["error_kinds"] == "timeout:1"
    assert row["over_slo"] == 0.5  # 2 of the 4 answered
    # the first scale-up interval (30 s to 36 s + one 2 s evaluation) holds the 3000 ms one
    assert row["over_slo_outside_first_scale_up"] == round(1 / 3, 4)
    # worker-seconds: 1 x 33 + 5 x 3 + 9 x 85 + 9 x 29 + 2 x 90
    assert row["worker_seconds"] == 33 + 15 + 765 + 261 + 180
    assert row["peak_workers"] == 9
