"""Figures drawn from saved results, without sockets: tick labels, subtitles, skipped figures, the plots entry."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.axis import Axis

from imgclass.measure import plot_style as ps
from imgclass.measure import plots
from imgclass.measure.rtt_figures import rtt_parameters
from imgclass.measure.scaling_figures import parameters
from imgclass.measure.stats import read_rows_csv, write_rows_csv

from ..test_layout import PACKAGE, imports

MEASURE = PACKAGE / "measure"


def scaling_row(n: int, policy: str, rho: float, **extra: object) -> dict[str, object]:
    rate = rho * n / 0.02  # exp:20ms
    mean = 20 / (1 - rho)
    return {
        "servers": n, "policy": policy, "mean_interval_s": 1 / rate, "utilisation": rho, "offered_rate": rate,
        "achieved_rate": rate, "throughput": rate, "duration_s": 55.0, "sent": round(rate * 55), "ok": round(rate * 55),
        "dropped": 0, "errors": 0, "mean_ms": mean * 1.02, "mean_ci_low_ms": mean * 0.9, "mean_ci_high_ms": mean * 1.1,
        "p50_ms": mean * 0.7, "p99_ms": mean * 4.6, "theory_mean_ms": mean if policy == "random" else None, **extra,
    }  # fmt: skip


def write_scaling(folder: Path, rows: list[dict[str, object]], doc: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_rows_csv(folder / "scaling.csv", rows)
    (folder / "scaling.json").write_text(json.dumps({**doc, "rows": rows}))
    return folder


NEW_RUN = {
    "script": "test_scaling.py",
    "command": "python test_scaling.py --local --servers 1,2,4 --loads 0.5,0.8 --duration 60 --warmup 5",
    "argv": ["--local", "--servers", "1,2,4", "--loads", "0.5,0.8", "--duration", "60", "--warmup", "5"],
    "args": {
        "local": True,
        "backend": "sleep",
        "service_time": "exp:20ms",
        "warmup": 5.0,
        "max_conn": "0",
        "min_per_server": 0,
        "out": "runs/test_scaling-20261129-1405",
    },
    "started": "2026-11-29 14:05:00",
}
# results written before the options were recorded: only the arguments as typed
OLD_RUN = {"started": "2026-11-21 16:51:10", "argv": ["--local", "--servers", "1,2", "--loads", "0.8",
           "--max-conn", "least_outstanding=1", "--duration", "60", "--warmup", "5", "--out", "results/done_short"]}  # fmt: skip


def labels(axis: Axis) -> list[str]:
    """The tick labels a reader sees, once drawn."""
    axis.axes.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def test_log_axes_read_as_plain_numbers() -> None:
    fig, ax = plt.subplots()
    ax.plot([1, 2, 4, 8, 16], [12, 30, 60, 150, 400])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ps.value_ticks(ax.xaxis, [1, 2, 4, 8, 16])
    ps.plain_log_ticks(ax.yaxis)
    assert labels(ax.xaxis) == ["1", "2", "4", "8", "16"]
    y = labels(ax.yaxis)
    assert {"10", "20", "30", "100", "200", "300"} <= set(y) and y[-1] == "500"
    assert all(label.replace(".", "").isdigit() for label in y), y  # no 2x10^1, no mathtext
    assert ax.get_ylim()[0] == 10  # data from 12: the axis starts at the labelled 10, just below
    plt.close(fig)


def test_narrow_log_range_still_has_several_labels() -> None:
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3380, 4760])
    ax.set_yscale("log")
    ps.plain_log_ticks(ax.yaxis)
    assert len(labels(ax.yaxis)) >= 3 and all("^" not in t and "$" not in t for t in labels(ax.yaxis))
    plt.close(fig)


def test_subtitle_names_parameters_command_and_data_file(tmp_path: Path) -> None:
    rows = [scaling_row(n, "random", rho) for n in (1, 2, 4) for rho in (0.5, 0.8)]
    folder = write_scaling(tmp_path / "test_scaling-20261129-1405", rows, NEW_RUN)
    info = ps.RunInfo.load(folder / "scaling.json", "test_scaling.py")
    text = "\n".join(ps.subtitle(parameters(read_rows_csv(folder / "scaling.csv"), info), info, 8.0))
    text = text.replace("\u00a0", " ").replace("\n    ", " ")
    for part in ("n = 1, 2, 4", "policy random", "ρ = 0.5, 0.8 (25–160 req/s)", "requests per run",
                 "55 s measured per run after 5.0 s warm-up", "service exp:20ms", NEW_RUN["command"],
                 "data: test_scaling-20261129-1405/scaling.json, run started 2026-11-29 14:05:00"):  # fmt: skip
        assert part in text, (part, text)


def test_subtitle_of_older_results_falls_back_on_their_argv(tmp_path: Path) -> None:
    rows = [scaling_row(n, p, 0.8) for n in (1, 2) for p in ("random", "least_outstanding")]
    folder = write_scaling(tmp_path / "done_short", rows, OLD_RUN)
    info = ps.RunInfo.load(folder / "scaling.json", "test_scaling.py")
    assert info.command == "python test_scaling.py " + " ".join(OLD_RUN["argv"])  # type: ignore[arg-type]
    params = " · ".join(parameters(read_rows_csv(folder / "scaling.csv"), info))
    # no recorded options: the mean service time comes from rho = lambda s / n
    assert "mean service 20 ms" in params and "max-conn least_outstanding=1" in params
    assert "after 5 s warm-up" in params


def test_rtt_subtitle(tmp_path: Path) -> None:
    info = ps.RunInfo("test_rtt.py", "rtt/rtt.json", argv=["--local", "1"], args={"warmup_requests": 5, "local": 1,
                      "backend": "litert"}, extra={"image": "/x/cat_720p.jpg"})  # fmt: skip
    rows = [{"size_px": str(s), "offered_rate": "4.0", "sent": "100", "dropped": "0"} for s in (16, 224, 2000)]
    assert rtt_parameters(rows, info) == [
        "sizes 16, 224, 2000 px", "100 requests per size at 4 req/s after 5 warm-up", "square JPEG q90 of cat_720p.jpg",
        "local cluster of 1 server, litert backend",
    ]  # fmt: skip


def test_nothing_to_compare_is_not_drawn_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_scaling(tmp_path / "one", [scaling_row(16, "least_outstanding", 0.8)], NEW_RUN)
    (folder / "scaling_policies.png").write_bytes(b"an older figure")  # a stale copy must not survive
    written = plots.plot_folder(folder)
    assert [p.name for p in written] == ["scaling_latency.png"]
    err = capsys.readouterr().err.splitlines()
    assert f"{folder}/scaling_throughput.png not drawn: one value of n (16), nothing to compare across n" in err
    assert any(line.startswith(f"{folder}/scaling_policies.png not drawn: one policy (least_outstanding)")
               and line.endswith("(removed the older file)") for line in err)  # fmt: skip
    assert any(line.startswith(f"{folder}/scaling_vs_original.png not drawn: this run has none") for line in err)
    assert len(err) == 3 and not (folder / "scaling_policies.png").exists()


def test_every_figure_drawn_when_there_is_something_to_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [scaling_row(n, p, rho) for n in (1, 4) for p in ("random", "p2c") for rho in (0.2, 0.4)]  # 0.2 at n=1: 10/s
    folder = write_scaling(tmp_path / "all", rows, NEW_RUN)
    assert plots.main([str(folder)]) == 0
    out, err = capsys.readouterr()
    names = ["scaling_latency.png", "scaling_throughput.png", "scaling_policies.png", "scaling_vs_original.png"]
    assert out.splitlines() == [f"wrote {folder / name}" for name in names]
    assert err == ""
    assert all((folder / name).stat().st_size > 5000 for name in names)


def test_rtt_figures_and_missing_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"size_px": s, "offered_rate": 4.0, "sent": 100, "dropped": 0, "mean_ms": 13 + s / 200, "mean_ci_low_ms": 12,
             "mean_ci_high_ms": 14 + s / 200, "p50_ms": 12.5, "p99_ms": 22} for s in (16, 224, 2000)]  # fmt: skip
    write_rows_csv(tmp_path / "rtt.csv", rows)
    (tmp_path / "rtt.json").write_text(json.dumps({"argv": ["--local", "1"], "rtt": rows}))
    assert [p.name for p in plots.plot_folder(tmp_path)] == ["rtt_vs_size.png"]
    assert "accuracy_vs_size.png not drawn: no accuracy.csv" in capsys.readouterr().err
    write_rows_csv(tmp_path / "accuracy.csv", [{"size_px": s, "photos": 8, "top1": 1, "top5": 1, "agreement": 1}
                                               for s in (16, 224)])  # fmt: skip
    assert [p.name for p in plots.plot_folder(tmp_path)] == ["rtt_vs_size.png", "accuracy_vs_size.png"]


def test_a_folder_without_results_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plots.main([str(tmp_path)]) == 1
    assert "no scaling.csv or rtt.csv, nothing to plot" in capsys.readouterr().err


def third_party(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


HTTP = {"aiohttp", "asyncio", "http", "urllib", "socket", "uvicorn", "httptools", "uvloop"}


def test_plots_read_files_only_and_stats_draws_nothing() -> None:
    figure_modules = ["plots", "plot_style", "scaling_figures", "rtt_figures"]
    allowed = {f"imgclass.measure.{m}" for m in [*figure_modules, "stats"]}
    for name in figure_modules:
        path = MEASURE / f"{name}.py"
        assert imports(path) <= allowed, (name, imports(path) - allowed)
        assert not third_party(path) & HTTP, name
    assert imports(MEASURE / "stats.py") == set()
    assert not third_party(MEASURE / "stats.py") & (HTTP | {"matplotlib"})
