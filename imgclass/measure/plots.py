"""Every figure of a results folder, redrawn from its saved CSV/JSON: python -m imgclass.measure.plots DIR."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Only the figure modules: nothing here measures anything or speaks HTTP, so old results can be
# redrawn anywhere matplotlib runs.
from .rtt_figures import rtt_figures
from .scaling_figures import scaling_figures

__all__ = ["main", "plot_folder", "rtt_figures", "scaling_figures"]


def plot_folder(folder: str | Path) -> list[Path]:
    """Draw the figures of whichever experiments wrote into `folder`; the paths written."""
    out = Path(folder)
    written: list[Path] = []
    if (out / "scaling.csv").exists():
        written += scaling_figures(out)
    if (out / "rtt.csv").exists():
        written += rtt_figures(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imgclass.measure.plots",
        description="Redraw every plot of results folders from their saved scaling.csv/json and rtt.csv/json.",
    )
    parser.add_argument("folders", nargs="+", metavar="DIR", help="a folder written by test_scaling.py or test_rtt.py")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.folders:
        if not any((Path(folder) / name).exists() for name in ("scaling.csv", "rtt.csv")):
            print(f"{folder}: no scaling.csv or rtt.csv, nothing to plot", file=sys.stderr)
            status = 1
            continue
        for path in plot_folder(folder):
            print(f"wrote {path}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
