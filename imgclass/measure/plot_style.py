"""The look every figure shares: plain tick labels, a title with the run's parameters, legends outside, skips."""

from __future__ import annotations

import json
import math
import shlex
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and testbed nodes
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

TITLE_PT = 11
SUBTITLE_PT = 7.5
DPI = 110


def number(row: dict[str, str], key: str) -> float:
    """A CSV cell as a float; empty, missing or 'nan' cells are NaN."""
    value = row.get(key, "")
    try:
        return float(value) if value not in ("", None) else math.nan
    except ValueError:
        return math.nan


def plain(value: float, _pos: object = None) -> str:
    """20, 300, 0.5: the number a reader would write, not 2x10^1."""
    return f"{value:g}"


def listing(values: Iterable[float]) -> str:
    """'1, 2, 4' for the distinct values, in order."""
    return ", ".join(plain(v) for v in sorted(set(values)))


def span(values: Iterable[float], unit: str = "") -> str:
    """'40' when every value is the same, else '40–400', with the unit after."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return "?"
    text = plain(round(finite[0], 3)) if finite[0] == finite[-1] else f"{finite[0]:g}–{finite[-1]:g}"
    return f"{text} {unit}".rstrip()


def plain_log_ticks(axis: Axis) -> None:
    """Label a log axis with plain numbers; denser labels when it spans few decades.

    Call it once the data are drawn: which labels fit depends on the final limits.
    """
    # get_xlim/get_ylim, not the axis' own view interval: they apply the pending autoscale first
    lo, hi = sorted(axis.axes.get_xlim() if axis.axis_name == "x" else axis.axes.get_ylim())
    decades = math.log10(hi / lo) if lo > 0 else 10.0
    if decades > 3.5:
        subs: tuple[float, ...] = (1.0,)
    elif decades > 2.2:
        subs = (1.0, 2.0, 5.0)
    elif decades > 0.8:
        subs = (1.0, 2.0, 3.0, 5.0)
    else:
        subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
    # Our own candidates, not LogLocator's: on a narrow range it swaps in linear ticks of its own.
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1) for m in subs]
    # Stretch a limit to a labelled value just beyond it (10 below data starting at 11), so the
    # extreme data points have a number near them.
    below, above = [t for t in ticks if t < lo], [t for t in ticks if t > hi]
    if below and math.log10(lo / below[-1]) < 0.12:
        lo = below[-1]
    if above and math.log10(above[0] / hi) < 0.12:
        hi = above[0]
    (axis.axes.set_xlim if axis.axis_name == "x" else axis.axes.set_ylim)(lo, hi)
    inside = [t for t in ticks if lo * 0.999 <= t <= hi * 1.001]
    # a narrow range: evenly spaced values read better than one or two labels
    axis.set_major_locator(FixedLocator(inside) if len(inside) >= 3 else MaxNLocator(nbins=6))
    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(float(k) for k in range(1, 10))))
    axis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks: the grid shows them


def value_ticks(axis: Axis, values: Iterable[float]) -> None:
    """Ticks only at the values measured (1, 2, 4 servers; 16..2000 px), labelled plainly."""
    ticks = sorted(set(values))
    if len(ticks) == 1:  # one value: centre it, where a log axis' autoscale would not
        (axis.axes.set_xlim if axis.axis_name == "x" else axis.axes.set_ylim)(ticks[0] / 1.5, ticks[0] * 1.5)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_locator(NullLocator())


def flags(argv: Sequence[str]) -> dict[str, Any]:
    """--name value / --name=value / bare --name (True), keyed like argparse ('max_conn')."""
    out: dict[str, Any] = {}
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else True
        out[name.replace("-", "_")] = value
    return out


@dataclass
class RunInfo:
    """What a results folder says about the run that wrote it (its JSON file), for subtitles."""

    script: str
    json_name: str  # e.g. 'done_short/scaling.json': names the data a figure was drawn from
    argv: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # every option as parsed; empty for older runs
    command: str = ""
    started: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, script: str) -> RunInfo:
        json_name = f"{path.parent.name}/{path.name}"
        if not path.exists():
            return cls(script, f"{json_name} (missing)")
        doc = json.loads(path.read_text())
        argv = [str(a) for a in doc.get("argv") or []]
        return cls(
            script=doc.get("script", script),
            json_name=json_name,
            argv=argv,
            args=doc.get("args") or {},
            # runs saved before 'command' was recorded: rebuild it from their argv
            command=doc.get("command") or f"python {script} {shlex.join(argv)}".rstrip(),
            started=doc.get("started", ""),
            extra={k: v for k, v in doc.items() if k not in ("rows", "rtt", "accuracy", "stress")},
        )

    def option(self, name: str) -> Any:
        """An option's value: as parsed when the run recorded it, else as typed, else None."""
        if name in self.args:
            return self.args[name]
        return flags(self.argv).get(name)


def subtitle(params: Sequence[str], info: RunInfo, width_in: float) -> list[str]:
    """The lines under a title: the run's parameters, its command line, and its data file."""
    chars = max(40, int(width_in * 72 / (SUBTITLE_PT * 0.56)))
    # no-break spaces inside each parameter: lines break only between parameters
    lines = textwrap.wrap("\u00a0· ".join(p.replace(" ", "\u00a0") for p in params if p), chars, break_on_hyphens=False)
    # break only between arguments, so every '--flag value' stays readable
    lines += textwrap.wrap(info.command, chars, break_on_hyphens=False, break_long_words=False,
                           subsequent_indent="    ")  # fmt: skip
    source = f"data: {info.json_name}"
    lines.append(f"{source}, run started {info.started}" if info.started else source)
    return lines


def figure(
    title: str,
    params: Sequence[str],
    info: RunInfo,
    width: float,
    height: float,
    nrows: int = 1,
    ncols: int = 1,
    **share: bool,
) -> tuple[SubFigure, list[Axes]]:
    """A figure with the title and the run's subtitle above the plots; `height` is the plotting area's."""
    lines = subtitle(params, info, width)
    header = (TITLE_PT * 1.5 + len(lines) * SUBTITLE_PT * 1.3 + 10) / 72  # inches
    fig = plt.figure(figsize=(width, height + header), layout="constrained")
    # Two stacked subfigures: the header's text never collides with the plots or their legend,
    # which constrained layout keeps inside the lower one.
    top, body = fig.subfigures(2, 1, height_ratios=[header, height], hspace=0)
    top.text(0.012, 1 - 4 / 72 / header, title, ha="left", va="top", fontsize=TITLE_PT, weight="bold")
    top.text(0.012, 1 - (4 + TITLE_PT * 1.5) / 72 / header, "\n".join(lines), ha="left", va="top",
             fontsize=SUBTITLE_PT, color="0.25", linespacing=1.2)  # fmt: skip
    grid = body.subplots(nrows, ncols, squeeze=False, **share)
    return body, [ax for row in grid for ax in row]


def legend_outside(
    fig: Figure | SubFigure, handles: Sequence[Any], title: str | None = None, where: str = "upper"
) -> None:
    """A legend to the right of the plotting area: it never covers data."""
    fig.legend(handles=list(handles), loc=f"outside right {where}", fontsize=8, title=title, title_fontsize=8,
               frameon=False)  # fmt: skip


def save(fig: Figure | SubFigure, path: Path) -> Path:
    root = fig.figure if isinstance(fig, SubFigure) else fig
    root.savefig(path, dpi=DPI)
    plt.close(root)
    return path


def skip(out: Path, name: str, reason: str) -> None:
    """Say on stderr why a figure is not drawn; remove an older copy, which would now mislead."""
    old = out / name
    removed = ""
    if old.exists():
        old.unlink()
        removed = " (removed the older file)"
    print(f"{old} not drawn: {reason}{removed}", file=sys.stderr, flush=True)
