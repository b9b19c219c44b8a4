"""The autoscaling experiment's timeline: per run, the pool against the load, and latency against the SLO."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from ..measure.plot_style import RunInfo, figure, legend_outside, plain_log_ticks, save, skip

NAME = "autoscale_timeline.png"
SCRIPT = "test_autoscale.py"
WINDOW_S = 2.0  # latency percentiles over this many seconds of scheduled send times


def rolling(latency: list[list[float]], window: float, end: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window centres, p50 and p99 (ms) of the requests scheduled in each window; NaN where none were."""
    if not latency:
        return np.array([]), np.array([]), np.array([])
    data = np.asarray(latency, np.float64)
    edges = np.arange(0.0, end + window, window)
    centres, p50, p99 = [], [], []
    for lo, hi in itertools.pairwise(edges):
        ms = data[(data[:, 0] >= lo) & (data[:, 0] < hi), 1]
        centres.append((lo + hi) / 2)
        p50.append(float(np.percentile(ms, 50)) if ms.size else math.nan)
        p99.append(float(np.percentile(ms, 99)) if ms.size else math.nan)
    return np.asarray(centres), np.asarray(p50), np.asarray(p99)


def percent(share: object) -> str:
    try:
        return f"{float(share) * 100:.2f}%"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"


def timeline_figure(out: Path) -> list[Path]:
    """autoscale_timeline.png from autoscale.json in `out`; nothing (and a note why) without it."""
    path = out / "autoscale.json"
    if not path.exists():
        skip(out, NAME, f"no {path.name} in {out}")
        return []
    doc: dict[str, Any] = json.loads(path.read_text())
    runs: dict[str, Any] = doc.get("runs") or {}
    if not runs:
        skip(out, NAME, "the run recorded no timelines")
        return []
    info = RunInfo.load(path, SCRIPT)
    slo = float(doc.get("slo_ms", math.nan))
    rows = {f"{r['mode']} {r['policy']}": r for r in doc.get("rows", [])}
    params = [f"rate {doc.get('schedule', '?')}", f"service {doc.get('service_time', '?')}", f"SLO {slo:g} ms",
              f"latency p50/p99 per {WINDOW_S:g} s of send times"]  # fmt: skip
    fig, axes = figure("Autoscaling: the same trace against each policy", params, info, 13.0, 1.9 * len(runs),
                       nrows=len(runs), ncols=3, sharex=True)  # fmt: skip
    end = max((p["t"] for run in runs.values() for p in run["timeline"]), default=1.0)
    for k, (name, run) in enumerate(runs.items()):
        pool, load, lat = axes[3 * k : 3 * k + 3]
        points = run["timeline"]
        t = [p["t"] for p in points]
        desired = [math.nan if p["desired"] is None else p["desired"] for p in points]
        running = [math.nan if p["running"] is None else p["running"] for p in points]
        pool.step(t, desired, where="post", color="tab:blue", lw=1.2, ls="--")
        pool.step(t, running, where="post", color="tab:blue", lw=1.8)
        pool.set_ylabel("workers", fontsize=8)
        pool.set_ylim(bottom=0)
        load.step(t, [p["offered"] for p in points], where="post", color="0.45", lw=1.2)
        load.set_ylabel("offered /s", fontsize=8)
        load.set_ylim(bottom=0)
        depth = load.twinx()
        depth.plot(t, [math.nan if p["depth"] is None else p["depth"] for p in points], color="tab:purple", lw=1.0)
        depth.set_ylabel("queue depth", fontsize=8, color="tab:purple")
        depth.set_ylim(bottom=0)
        row = rows.get(name, {})
        up, down = row.get("scale_up_s"), row.get("scale_down_s")
        pool.set_title(f"{name}: {row.get('worker_seconds', '?')} worker-s\n"
                       f"up in {'–' if up is None else f'{up} s'}, down in {'–' if down is None else f'{down} s'}",
                       fontsize=8, loc="left")  # fmt: skip
        load.set_title(f"{row.get('requests', '?')} requests\n{row.get('direction_changes', '?')} direction changes, "
                       f"at most {row.get('most_reversals_per_window', '?')} per window", fontsize=8, loc="left")  # fmt: skip
        centres, p50, p99 = rolling(run.get("latency") or [], WINDOW_S, end)
        lat.plot(centres, p50, color="tab:green", lw=1.2)
        lat.plot(centres, p99, color="tab:red", lw=1.2)
        if math.isfinite(slo):
            lat.axhline(slo, color="k", lw=0.8, ls=":")
        lat.set_yscale("log")
        lat.set_ylabel("latency ms", fontsize=8)
        lat.set_title(f"{percent(row.get('over_slo'))} over the SLO, p99 {row.get('p99_ms', '?')} ms\n"
                      f"{row.get('errors', '?')} errors",
                      fontsize=8, loc="left")  # fmt: skip
        plain_log_ticks(lat.yaxis)
        for ax in (pool, load, depth, lat):
            ax.tick_params(labelsize=7)
    for ax in axes[-3:]:
        ax.set_xlabel("seconds since the start of the trace", fontsize=8)
    legend_outside(fig, [
        Line2D([], [], color="tab:blue", lw=1.8, label="workers running"),
        Line2D([], [], color="tab:blue", lw=1.2, ls="--", label="workers desired"),
        Line2D([], [], color="0.45", lw=1.2, label="offered rate"),
        Line2D([], [], color="tab:purple", lw=1.0, label="queue depth"),
        Line2D([], [], color="tab:green", lw=1.2, label="latency p50"),
        Line2D([], [], color="tab:red", lw=1.2, label="latency p99"),
        Line2D([], [], color="k", lw=0.8, ls=":", label="SLO"),
    ])  # fmt: skip
    return [save(fig, out / NAME)]


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m imgclass.autoscale.figures RESULTS_DIR", file=sys.stderr)
        return 2
    for path in timeline_figure(Path(args[0])):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
