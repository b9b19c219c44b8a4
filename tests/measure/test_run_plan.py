"""Experiment bookkeeping without sockets: the default run folder, the saved command, the duration estimates."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from imgclass.measure import experiment, rtt, scaling
from imgclass.measure.experiment import default_out_dir, duration_text, out_dir, run_info

WHEN = time.strptime("2026-11-29 14:05:31", "%Y-%m-%d %H:%M:%S")


def test_default_out_is_a_fresh_folder_per_run(tmp_path: Path) -> None:
    first = default_out_dir("test_scaling.py", WHEN, root=tmp_path)
    assert first == tmp_path / "test_scaling-20261129-1405" and not first.exists()  # created on demand, not here
    first.mkdir()
    # the same minute again: a new folder, never the earlier run's
    assert default_out_dir("test_scaling.py", WHEN, root=tmp_path) == tmp_path / "test_scaling-20261129-1405-2"
    assert default_out_dir("test_rtt", WHEN, root=tmp_path) == tmp_path / "test_rtt-20261129-1405"


def test_out_dir_keeps_a_given_out_and_records_the_default() -> None:
    args = scaling.build_parser().parse_args(["--out", "results/scaling"])
    assert out_dir(args, "test_scaling.py") == Path("results/scaling") and args.out == "results/scaling"
    args = rtt.build_parser().parse_args([])
    out = out_dir(args, "test_rtt.py")
    assert out.parent == Path("runs") and out.name.startswith("test_rtt-") and args.out == str(out)


def test_runs_folder_is_git_ignored() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert "/runs/" in ignored


def test_run_info_records_a_command_to_copy() -> None:
    argv = ["--local", "--servers", "1,2", "--service-time", "exp:20ms"]
    args = scaling.build_parser().parse_args(argv)
    info = run_info("test_scaling.py", argv, args, image="cat.jpg")
    assert info["command"] == "python test_scaling.py --local --servers 1,2 --service-time exp:20ms"
    assert info["args"]["backend"] == "sleep" and info["args"]["duration"] == 20.0  # defaults included
    assert info["argv"] == argv and info["image"] == "cat.jpg" and info["script"] == "test_scaling.py"


def test_scaling_duration_estimate() -> None:
    args = scaling.build_parser().parse_args(
        ["--local", "--servers", "1,2", "--policies", "random,p2c", "--loads", "0.5,0.8", "--duration", "10"]
    )
    runs = scaling.plan(args, [1, 2], ["random", "p2c"], 0.02)
    assert len(runs) == 8 and {r.duration for r in runs} == {10.0}
    assert [(r.n, r.policy, r.rate) for r in runs[:3]] == [(1, "random", 25.0), (1, "random", 40.0), (1, "p2c", 25.0)]
    startup = experiment.cluster_start_s(2)
    per_run = 10.0 + experiment.RUN_OVERHEAD_S
    assert scaling.expected_seconds(runs, args) == pytest.approx(startup + 8 * per_run + experiment.PLOTS_S)
    # what is left from the last run on: no start-up any more
    assert scaling.expected_seconds(runs[-1:], args, start=False) == pytest.approx(per_run + experiment.PLOTS_S)


def test_scaling_runs_lengthen_for_min_per_server() -> None:
    args = scaling.build_parser().parse_args(["--local", "--loads", "0.5", "--min-per-server", "400", "--warmup", "3"])
    runs = scaling.plan(args, [1, 4], ["random"], 0.02)
    # n=1 at 25/s: 3 + 400/25 = 19 s < the 20 s default; n=4 at 100/s: 3 + 1600/100 = 19 s too
    assert [r.duration for r in runs] == [20.0, 20.0]
    runs = scaling.plan(args, [16], ["random"], 0.05)  # 160/s: 3 + 6400/160 = 43 s
    assert runs[0].duration == pytest.approx(43.0)


def test_loads_without_a_service_time_fail_before_anything_runs() -> None:
    args = scaling.build_parser().parse_args(["--loads", "0.5"])
    with pytest.raises(SystemExit, match="--loads needs the mean service time"):
        scaling.plan(args, [1], ["random"], None)


def test_rtt_duration_estimate() -> None:
    args = rtt.build_parser().parse_args(["--local", "1"])  # defaults: 5 + 100 requests per size at 4/s
    per_size = 105 / 4 + experiment.RUN_OVERHEAD_S
    expected = experiment.cluster_start_s(1) + 7 * per_size + 8 * 8 * rtt.ACCURACY_REQUEST_S + experiment.PLOTS_S
    assert rtt.expected_seconds(args, 7, 8) == pytest.approx(expected)
    remote = rtt.build_parser().parse_args(["--requests", "20", "--rate", "10", "--warmup-requests", "0"])
    assert rtt.expected_seconds(remote, 2, 0) == pytest.approx(2 * (2 + experiment.RUN_OVERHEAD_S) + experiment.PLOTS_S)


@pytest.mark.parametrize(
    ("seconds", "text"), [(45.2, "45 s"), (200, "3 min 20 s"), (1490, "25 min"), (3900, "1 h 05 min")]
)
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_announce_and_progress_lines(capsys: pytest.CaptureFixture[str]) -> None:
    experiment.announce("test_scaling.py", Path("runs/x"), 200, "12 runs of 20 s")
    experiment.progress(3, 12, "n=2 random 50.0/s, 20 s", 150)
    experiment.finished(Path("runs/x"))
    assert capsys.readouterr().err.splitlines() == [
        "# test_scaling.py: 12 runs of 20 s; expected about 3 min 20 s",
        "# writing to runs/x/",
        "# run 3 of 12: n=2 random 50.0/s, 20 s (about 2 min 30 s left)",
        "# all files are in runs/x/",
    ]


def test_namespace_of_both_parsers_is_json_ready() -> None:
    for parser in (scaling.build_parser(), rtt.build_parser()):
        values = vars(parser.parse_args([]))
        assert all(isinstance(v, str | int | float | bool | type(None)) for v in values.values())
        assert isinstance(parser, argparse.ArgumentParser) and values["out"] is None
