"""The RTT experiment's figures, drawn from a results folder's rtt.csv, accuracy.csv and rtt.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import plot_style as ps
from .stats import read_rows_csv

Row = dict[str, str]

# The original report's RTT by image size (s): about 0.2 s up to 224 px, 0.36 s at 2000 px
ORIGINAL_RTT_BY_SIZE_S = {16: 0.2, 32: 0.2, 64: 0.2, 96: 0.2, 128: 0.2, 224: 0.2, 2000: 0.36}


def _sizes(rows: Sequence[Row]) -> list[float]:
    return [ps.number(r, "size_px") for r in rows]


def cluster(info: ps.RunInfo) -> str:
    """Which service answered: a local cluster of N servers (and its backend), or a URL."""
    local = info.option("local")
    if local not in (None, 0, "0", False):
        backend = info.option("backend")
        servers = f"{local} server" + ("s" if str(local) != "1" else "")
        return f"local cluster of {servers}" + (f", {backend} backend" if backend else "")
    return f"service at {info.option('url')}" if info.option("url") else ""


def rtt_parameters(rows: Sequence[Row], info: ps.RunInfo) -> list[str]:
    warmup = info.option("warmup_requests")
    image = info.extra.get("image") or info.option("image")
    requests = [ps.number(r, "sent") + ps.number(r, "dropped") for r in rows]
    return [
        f"sizes {ps.listing(_sizes(rows))} px",
        f"{ps.span(requests)} requests per size at {ps.listing(ps.number(r, 'offered_rate') for r in rows)} req/s"
        + (f" after {warmup} warm-up" if warmup not in (None, True) else ""),
        "square JPEG q90" + (f" of {Path(str(image)).name}" if image else ""),
        cluster(info),
    ]


def accuracy_parameters(rows: Sequence[Row], info: ps.RunInfo) -> list[str]:
    labels = info.option("labels")
    return [
        f"{ps.span(ps.number(r, 'photos') for r in rows)} labelled photos",
        f"each downsampled to {ps.listing(_sizes(rows))} px, then upsampled to 224 (bilinear)",
        f"labels from {labels}" if labels not in (None, True) else "",
        cluster(info),
    ]


def rtt_vs_size(rows: Sequence[Row], info: ps.RunInfo, out: Path) -> Path:
    fig, (ax,) = ps.figure("Round-trip time against image size", rtt_parameters(rows, info), info, 8.0, 3.8)
    sizes = _sizes(rows)
    mean = [ps.number(r, "mean_ms") for r in rows]
    low = [m - ps.number(r, "mean_ci_low_ms") for m, r in zip(mean, rows, strict=True)]
    high = [ps.number(r, "mean_ci_high_ms") - m for m, r in zip(mean, rows, strict=True)]
    handles = [ax.errorbar(sizes, mean, yerr=[low, high], marker="o", capsize=4, label="mean, 95% CI")]
    handles += ax.plot(sizes, [ps.number(r, "p50_ms") for r in rows], marker="s", ms=4, ls=":", label="p50")
    handles += ax.plot(sizes, [ps.number(r, "p99_ms") for r in rows], marker="^", ls="--", label="p99")
    orig = sorted(ORIGINAL_RTT_BY_SIZE_S.items())
    handles += ax.plot([s for s, _ in orig], [v * 1000 for _, v in orig], color="0.5", marker="x", ls="-",
                       label="original report")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ps.value_ticks(ax.xaxis, sizes + [float(s) for s, _ in orig])
    ps.plain_log_ticks(ax.yaxis)
    ax.set_xlabel("image size (px, square)")
    ax.set_ylabel("round-trip time (ms)")
    ax.grid(alpha=0.3, which="both")
    ps.legend_outside(fig, handles)
    return ps.save(fig, out / "rtt_vs_size.png")


def accuracy_vs_size(rows: Sequence[Row], info: ps.RunInfo, out: Path) -> Path:
    fig, (ax,) = ps.figure("Accuracy against resolution", accuracy_parameters(rows, info), info, 8.0, 3.6)
    sizes = _sizes(rows)
    top1 = [ps.number(r, "top1") for r in rows]
    top5 = [ps.number(r, "top5") for r in rows]
    agreement = [ps.number(r, "agreement") for r in rows]
    # The three often coincide (all at 1.0 from 128 px; agreement equals top-1 whenever the
    # full-resolution answer is the label): nested markers of three sizes and three line styles,
    # solid under dashed under dotted, keep each one visible where they meet.
    handles = ax.plot(sizes, top1, marker="o", ms=5, ls="-", lw=1.5, color="tab:blue", label="top-1 vs label")
    handles += ax.plot(sizes, agreement, marker="o", ms=9, mfc="none", mew=1.4, ls="--", color="tab:green",
                       label="top-1 agrees with full resolution"
                       + ("\n(equal to top-1 at every size)" if agreement == top1 else ""))  # fmt: skip
    handles += ax.plot(sizes, top5, marker="s", ms=13, mfc="none", mew=1.4, ls=":", lw=2, color="tab:orange",
                       label="top-5 vs label")  # fmt: skip
    ax.set_xscale("log")
    ps.value_ticks(ax.xaxis, sizes)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("downsampled to (px, square), then upsampled to 224")
    ax.set_ylabel("fraction of photos")
    ax.grid(alpha=0.3)
    ps.legend_outside(fig, handles)
    return ps.save(fig, out / "accuracy_vs_size.png")


def rtt_figures(folder: str | Path) -> list[Path]:
    """Every figure of an RTT run, from folder/rtt.csv, folder/accuracy.csv and folder/rtt.json."""
    out = Path(folder)
    info = ps.RunInfo.load(out / "rtt.json", "test_rtt.py")
    rows = sorted(read_rows_csv(out / "rtt.csv"), key=lambda r: ps.number(r, "size_px"))
    written = [rtt_vs_size(rows, info, out)] if rows else []
    accuracy_csv = out / "accuracy.csv"
    acc = sorted(read_rows_csv(accuracy_csv), key=lambda r: ps.number(r, "size_px")) if accuracy_csv.exists() else []
    if acc:
        written.append(accuracy_vs_size(acc, info, out))
    else:
        ps.skip(out, "accuracy_vs_size.png", "no accuracy.csv (a run with --no-accuracy, or without labelled photos)")
    return written
