"""PNG plots drawn only from saved results (CSV/JSON); nothing here measures anything."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and testbed nodes
import matplotlib.pyplot as plt

from .stats import read_rows_csv

# Cells of the original report's table (mean RTT, seconds): (servers, mean interval s) -> RTT
ORIGINAL_TABLE = {(1, 0.1): 7.16, (4, 0.1): 0.57}
ORIGINAL_RTT_BY_SIZE_S = {16: 0.2, 32: 0.2, 64: 0.2, 96: 0.2, 128: 0.2, 224: 0.2, 2000: 0.36}


def _f(row: dict[str, str], key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plots(csv_path: str | Path, out_dir: str | Path) -> list[Path]:
    rows = read_rows_csv(csv_path)
    out = Path(out_dir)
    written: list[Path] = []
    policies = sorted({r["policy"] for r in rows})
    servers = sorted({int(r["servers"]) for r in rows})

    # 1. latency (p50, p99) against offered load, one line per n, one panel per policy
    fig, axes = plt.subplots(1, len(policies), figsize=(5.2 * len(policies), 4.2), squeeze=False)
    for ax, policy in zip(axes[0], policies, strict=True):
        for n in servers:
            sel = sorted((r for r in rows if r["policy"] == policy and int(r["servers"]) == n),
                         key=lambda r: _f(r, "offered_rate"))  # fmt: skip
            if not sel:
                continue
            x = [_f(r, "offered_rate") for r in sel]
            line = ax.plot(x, [_f(r, "p50_ms") for r in sel], marker="o", label=f"n={n} p50")[0]
            ax.plot(x, [_f(r, "p99_ms") for r in sel], marker="^", ls="--", color=line.get_color(), label=f"n={n} p99")
            theory = [_f(r, "theory_mean_ms") for r in sel]
            if any(not math.isnan(t) for t in theory):
                ax.plot(x, [_f(r, "mean_ms") for r in sel], marker="s", ls=":", color=line.get_color(), alpha=0.7,
                        label=f"n={n} mean")  # fmt: skip
                ax.plot(x, theory, ls="-", lw=3, alpha=0.25, color=line.get_color(), label=f"n={n} theory mean")
        ax.set_title(f"policy {policy}")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, out / "scaling_latency.png"))

    # 2. throughput against n: the highest offered load per n, per policy
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for policy in policies:
        best = {}
        for r in rows:
            if r["policy"] == policy:
                n = int(r["servers"])
                best[n] = max(best.get(n, 0.0), _f(r, "throughput"))
        ns = sorted(best)
        ax.plot(ns, [best[n] for n in ns], marker="o", label=policy)
    ax.set_xlabel("servers n")
    ax.set_ylabel("throughput at highest offered load (req/s)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "scaling_throughput.png"))

    # 3. policies compared at the largest n
    n_max = servers[-1]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in policies:
        sel = sorted((r for r in rows if r["policy"] == policy and int(r["servers"]) == n_max),
                     key=lambda r: _f(r, "offered_rate"))  # fmt: skip
        x = [_f(r, "offered_rate") for r in sel]
        line = ax.plot(x, [_f(r, "mean_ms") for r in sel], marker="o", label=f"{policy} mean")[0]
        ax.plot(x, [_f(r, "p99_ms") for r in sel], ls="--", marker="^", color=line.get_color(), label=f"{policy} p99")
    ax.set_title(f"dispatch policies at n = {n_max}")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "scaling_policies.png"))

    # 4. the original table's cells next to ours (rows measured at the same n and interval)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels, theirs, ours = [], [], []
    for (n, interval), rtt in sorted(ORIGINAL_TABLE.items()):
        match = [r for r in rows if int(r["servers"]) == n and abs(_f(r, "offered_rate") - 1 / interval) < 1e-6]
        labels.append(f"n={n}\ninterval {interval}s")
        theirs.append(rtt)
        ours.append(_f(match[0], "mean_ms") / 1000 if match else math.nan)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], theirs, width=0.4, label="original report (mean RTT)")
    ax.bar([x + 0.2 for x in xs], [0 if math.isnan(v) else v for v in ours], width=0.4, label="this run (mean)")
    for x, v in zip(xs, ours, strict=True):
        ax.text(x + 0.2, 0 if math.isnan(v) else v, "not run" if math.isnan(v) else f"{v:.3f}s", ha="center",
                va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("mean RTT (s)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=8)
    ax.set_title("original table vs this run")
    written.append(_save(fig, out / "scaling_vs_original.png"))
    return written


def rtt_plots(rtt_csv: str | Path, accuracy_csv: str | Path | None, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    rows = sorted(read_rows_csv(rtt_csv), key=lambda r: _f(r, "size_px"))
    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sizes = [_f(r, "size_px") for r in rows]
    mean = [_f(r, "mean_ms") for r in rows]
    low = [m - _f(r, "mean_ci_low_ms") for m, r in zip(mean, rows, strict=True)]
    high = [_f(r, "mean_ci_high_ms") - m for m, r in zip(mean, rows, strict=True)]
    ax.errorbar(sizes, mean, yerr=[low, high], marker="o", capsize=4, label="mean RTT, 95% CI (batch means)")
    ax.plot(sizes, [_f(r, "p99_ms") for r in rows], marker="^", ls="--", label="p99")
    ax.plot(sizes, [_f(r, "p50_ms") for r in rows], marker="s", ls=":", label="p50")
    orig = sorted(ORIGINAL_RTT_BY_SIZE_S.items())
    ax.plot([s for s, _ in orig], [v * 1000 for _, v in orig], color="gray", marker="x", ls="-", alpha=0.6,
            label="original report")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image size (px, square JPEG)")
    ax.set_ylabel("round-trip time (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "rtt_vs_size.png"))
    if accuracy_csv and Path(accuracy_csv).exists():
        acc = sorted(read_rows_csv(accuracy_csv), key=lambda r: _f(r, "size_px"))
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [_f(r, "size_px") for r in acc]
        for key, label in (("top1", "top-1 vs label"), ("top5", "top-5 vs label"),
                           ("agreement", "top-1 agrees with full resolution")):  # fmt: skip
            ax.plot(xs, [_f(r, key) for r in acc], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("downsampled to (px), then upsampled to 224")
        ax.set_ylabel("fraction of photos")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "accuracy_vs_size.png"))
    return written
