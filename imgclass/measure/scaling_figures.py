"""The scaling experiment's figures, drawn from a results folder's scaling.csv and scaling.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from . import plot_style as ps
from .stats import read_rows_csv

Row = dict[str, str]

# Cells of the original report's table (mean RTT, seconds): (servers, mean interval s) -> RTT
ORIGINAL_TABLE = {(1, 0.1): 7.16, (4, 0.1): 0.57}

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
POLICY_MARKERS = ["o", "s", "^", "D", "v", "P"]
# How each statistic is drawn; theory is a wide translucent line with hollow markers, so that a
# run with a single load per curve still shows it, and a measured mean on top of it stays visible.
P50 = {"ls": "-", "marker": "o", "ms": 5}
P99 = {"ls": "--", "marker": "^", "ms": 5}
MEAN = {"ls": ":", "marker": "s", "ms": 4}


def theory_style(color: str) -> dict[str, object]:
    return {"ls": "-", "lw": 4, "color": to_rgba(color, 0.3), "marker": "D", "ms": 8, "mfc": "none",
            "mec": color, "mew": 1.3}  # fmt: skip


def _order(values: Sequence[str]) -> list[str]:
    """Distinct values in the order the run met them (the order given on the command line)."""
    return list(dict.fromkeys(values))


def _servers(rows: Sequence[Row]) -> list[int]:
    return sorted({int(r["servers"]) for r in rows})


def _sel(rows: Sequence[Row], policy: str, n: int) -> list[Row]:
    chosen = [r for r in rows if r["policy"] == policy and int(r["servers"]) == n]
    return sorted(chosen, key=lambda r: ps.number(r, "offered_rate"))


def _column(rows: Sequence[Row], key: str) -> list[float]:
    return [ps.number(r, key) for r in rows]


def _has(rows: Sequence[Row], key: str) -> bool:
    return any(math.isfinite(ps.number(r, key)) for r in rows)


def parameters(rows: Sequence[Row], info: ps.RunInfo) -> list[str]:
    """The run's parameters, from its rows first (always saved) and its options where they add to them."""
    policies = _order([r["policy"] for r in rows])
    rates = _column(rows, "offered_rate")
    loads = [v for v in _column(rows, "utilisation") if math.isfinite(v)]
    params = [
        f"n = {ps.listing(_servers(rows))}",
        ("policies " if len(policies) > 1 else "policy ") + ", ".join(policies),
    ]
    if loads:
        params.append(f"ρ = {ps.listing(loads)} ({ps.span(rates, 'req/s')})")
    elif info.option("intervals"):
        params.append(f"mean intervals {info.option('intervals').replace(',', ', ')} s ({ps.span(rates, 'req/s')})")
    else:
        params.append(f"offered {ps.listing(rates)} req/s")
    requests = [ps.number(r, "sent") + (ps.number(r, "dropped") if _has([r], "dropped") else 0) for r in rows]
    params.append(f"{ps.span(requests)} requests per run")
    # A run that lost requests is not the steady state its parameters describe: say so up front.
    dropped, errors = sum(_column(rows, "dropped")), sum(_column(rows, "errors"))
    if dropped > 0:
        params.append(f"{dropped:.0f} dropped by the in-flight bound")
    if errors > 0:
        params.append(f"{errors:.0f} errors")
    warmup = info.option("warmup")
    params.append(f"{ps.span(_column(rows, 'duration_s'), 's')} measured per run"
                  + (f" after {warmup} s warm-up" if warmup not in (None, True) else ""))  # fmt: skip
    backend, service = info.option("backend"), info.option("service_time")
    if backend and backend != "sleep":
        params.append(f"{backend} backend")
    elif service and (backend == "sleep" or info.option("local")):
        params.append(f"sleep servers, service {service}")
    elif loads:  # runs saved before their options were: rho = lambda s / n gives the mean service time
        s = [ρ * int(r["servers"]) / ps.number(r, "offered_rate") * 1000 for r, ρ in zip(rows, _column(rows, "utilisation"), strict=True) if math.isfinite(ρ)]  # fmt: skip
        params.append(f"mean service {ps.span([round(x, 1) for x in s], 'ms')}")
    max_conn = info.option("max_conn")
    if max_conn not in (None, "0", 0, True):
        params.append(f"max-conn {max_conn}")
    if info.option("min_per_server") not in (None, 0, "0", True):
        params.append(f"≥ {info.option('min_per_server')} requests per server")
    return params


def latency(rows: Sequence[Row], params: list[str], info: ps.RunInfo, out: Path) -> Path:
    """p50 and p99 (and mean against theory where there is one) against offered load, a panel per policy."""
    policies = _order([r["policy"] for r in rows])
    servers = _servers(rows)
    colors = {n: COLORS[i % len(COLORS)] for i, n in enumerate(servers)}
    ncols = 1 if len(policies) == 1 else 2
    nrows = math.ceil(len(policies) / ncols)
    fig, axes = ps.figure("Latency against offered load", params, info, 3.0 + 4.0 * ncols, 3.3 * nrows, nrows, ncols,
                          sharex=True, sharey=True)  # fmt: skip
    theory_drawn = False
    # --rates and --intervals offer every n the same loads: draw each n slightly apart there, or
    # near-equal latencies (n = 2 and 4 at light load) hide one another
    by_n = {n: {r["offered_rate"] for r in rows if int(r["servers"]) == n} for n in servers}
    shared = len(servers) > 1 and all(loads == by_n[servers[0]] for loads in by_n.values())
    for ax, policy in zip(axes, policies, strict=False):
        for i, n in enumerate(servers):
            sel = _sel(rows, policy, n)
            if not sel:
                continue
            shift = _dodge(i, len(servers)) if shared else 1.0
            x, c = [v * shift for v in _column(sel, "offered_rate")], colors[n]
            theory = _column(sel, "theory_mean_ms")
            if any(math.isfinite(t) for t in theory):
                theory_drawn = True
                ax.plot(x, theory, **theory_style(c))
                ax.plot(x, _column(sel, "mean_ms"), color=c, **MEAN)
            ax.plot(x, _column(sel, "p50_ms"), color=c, **P50)
            ax.plot(x, _column(sel, "p99_ms"), color=c, **P99)
        ax.set_title(f"policy {policy}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(policies) :]:
        ax.set_visible(False)  # an odd number of policies leaves one cell of the grid empty
    for ax in axes[: len(policies)]:
        ax.set_xlabel("offered load (requests/s)" + (", each n drawn slightly apart" if shared else ""))
        ax.set_ylabel("latency (ms)")
        ax.label_outer()  # shared axes: the labels once per row and column
    rates = {ps.number(r, "offered_rate") for r in rows}
    if len(rates) <= 6:  # few loads: label exactly those
        ps.value_ticks(axes[0].xaxis, rates)
    else:
        ps.plain_log_ticks(axes[0].xaxis)
    ps.plain_log_ticks(axes[0].yaxis)
    ps.legend_outside(fig, [Line2D([], [], color=colors[n], lw=2, label=f"n = {n}") for n in servers], "servers")
    stats = [Line2D([], [], color="0.2", label="p50", **P50), Line2D([], [], color="0.2", label="p99", **P99)]
    if theory_drawn:
        stats += [Line2D([], [], color="0.2", label="mean", **MEAN),
                  Line2D([], [], label="theory mean", **theory_style("0.2"))]  # fmt: skip
    ps.legend_outside(fig, stats, "statistic", where="lower")
    return ps.save(fig, out / "scaling_latency.png")


def _dodge(index: int, count: int) -> float:
    """A factor that moves series `index` of `count` sideways on a log axis, so equal values stay visible."""
    return 2 ** (0.07 * (index - (count - 1) / 2))


def throughput(rows: Sequence[Row], params: list[str], info: ps.RunInfo, out: Path) -> Path | None:
    """Throughput at each n's highest offered load, per policy; skipped with one n."""
    servers = _servers(rows)
    if len(servers) < 2:
        ps.skip(out, "scaling_throughput.png", f"one value of n ({servers[0]}), nothing to compare across n")
        return None
    policies = _order([r["policy"] for r in rows])
    fig, (ax,) = ps.figure("Throughput against the number of servers", params, info, 8.0, 3.8)
    tops = {(p, n): max(sel, key=lambda r: ps.number(r, "offered_rate")) for p in policies for n in servers
            if (sel := _sel(rows, p, n))}  # fmt: skip
    offered = {n: max(ps.number(r, "offered_rate") for (_, m), r in tops.items() if m == n) for n in servers}
    # the offered load underneath, wide and pale: every policy that keeps up lies on it
    handles = ax.plot(servers, [offered[n] for n in servers], color="0.6", alpha=0.45, lw=7, solid_capstyle="round",
                      label="offered load")  # fmt: skip
    for i, policy in enumerate(policies):
        ns = [n for n in servers if (policy, n) in tops]
        handles += ax.plot([n * _dodge(i, len(policies)) for n in ns], [ps.number(tops[policy, n], "throughput") for n in ns],
                           marker=POLICY_MARKERS[i % len(POLICY_MARKERS)], ms=6, lw=1, label=policy, color=COLORS[i])  # fmt: skip
    loads = sorted({ps.number(r, "utilisation") for r in tops.values()})
    at = f" (ρ = {loads[0]:g})" if len(loads) == 1 and math.isfinite(loads[0]) else ""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ps.value_ticks(ax.xaxis, servers)
    ax.set_xlim(servers[0] / 1.4, servers[-1] * 1.4)
    # the same load at every n (--rates, --intervals) is a flat line: a log axis' own
    # autoscale would then span two decades around it
    values = [v for line in handles for v in line.get_ydata() if math.isfinite(v) and v > 0]
    ax.set_ylim(min(values) / 1.5, max(values) * 1.5)
    ps.plain_log_ticks(ax.yaxis)
    ax.set_xlabel("servers n" + (" (policies drawn slightly apart so none hides another)" if len(policies) > 1 else ""))
    ax.set_ylabel(f"completed requests/s\nat the highest load{at}")
    ax.grid(alpha=0.3, which="both")
    ps.legend_outside(fig, handles)
    return ps.save(fig, out / "scaling_throughput.png")


def policies_compared(rows: Sequence[Row], params: list[str], info: ps.RunInfo, out: Path) -> Path | None:
    """Mean and p99 per policy at the largest n (with theory where there is one); skipped with one policy."""
    n_max = _servers(rows)[-1]
    policies = _order([r["policy"] for r in rows if int(r["servers"]) == n_max])
    if len(policies) < 2:
        ps.skip(out, "scaling_policies.png", f"one policy ({policies[0]}) at n = {n_max}, nothing to compare")
        return None
    fig, (ax,) = ps.figure(f"Dispatch policies at n = {n_max}", params, info, 8.0, 3.8)
    rates = sorted({ps.number(r, "offered_rate") for r in rows if int(r["servers"]) == n_max})
    # One load: the policies side by side, so that one policy's mean never sits on another's p99.
    # Several: offered load along x as in the latency plot, each policy drawn slightly apart.
    side_by_side = len(rates) == 1
    handles = []
    for i, policy in enumerate(policies):
        sel, c = _sel(rows, policy, n_max), COLORS[i % len(COLORS)]
        x = (
            [float(i)] * len(sel)
            if side_by_side
            else [v * _dodge(i, len(policies)) for v in _column(sel, "offered_rate")]
        )
        if _has(sel, "theory_mean_ms"):
            handles += ax.plot(x, _column(sel, "theory_mean_ms"), label=f"{policy} theory mean", **theory_style(c))
        handles += ax.plot(x, _column(sel, "mean_ms"), color=c, label=f"{policy} mean", ls="-", marker="o", ms=5)
        handles += ax.plot(x, _column(sel, "p99_ms"), color=c, label=f"{policy} p99", **P99)
    ax.set_yscale("log")
    if side_by_side:
        ax.set_xticks(range(len(policies)), policies)
        ax.set_xlim(-0.6, len(policies) - 0.4)
        ax.set_xlabel(f"policy, at {rates[0]:g} requests/s offered")
    else:
        ax.set_xscale("log")
        if len(rates) <= 6:  # few loads: label exactly those
            ps.value_ticks(ax.xaxis, rates)
        else:
            ps.plain_log_ticks(ax.xaxis)
        ax.set_xlabel("offered load (requests/s), each policy drawn slightly apart")
    ps.plain_log_ticks(ax.yaxis)
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ps.legend_outside(fig, handles)
    return ps.save(fig, out / "scaling_policies.png")


def versus_original(rows: Sequence[Row], params: list[str], info: ps.RunInfo, out: Path) -> Path | None:
    """The original report's table cells next to ours at the same n and interval; skipped if none was run."""
    cells = []
    for (n, interval), theirs in sorted(ORIGINAL_TABLE.items()):
        match = [r for r in rows if int(r["servers"]) == n and abs(ps.number(r, "offered_rate") - 1 / interval) < 1e-6]
        if match:
            cells.append((n, interval, theirs * 1000, ps.number(match[0], "mean_ms"), match[0]["policy"]))
    if not cells:
        wanted = " and ".join(f"n = {n} at {i} s" for n, i in ORIGINAL_TABLE)
        ps.skip(out, "scaling_vs_original.png", f"this run has none of the original table's cells ({wanted})")
        return None
    fig, (ax,) = ps.figure("The original report's mean RTT next to this run's", params, info, 7.5, 3.8)
    xs = range(len(cells))
    theirs, ours = [c[2] for c in cells], [c[3] for c in cells]
    theirs_bars = ax.bar([x - 0.2 for x in xs], theirs, width=0.4, color="0.6", label="original report")
    ours_bars = ax.bar([x + 0.2 for x in xs], ours, width=0.4, color="tab:blue", label="this run")
    for bars, values, digits in ((theirs_bars, theirs, 0), (ours_bars, ours, 1)):
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.{digits}f} ms", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(list(xs), [f"n = {n}, interval {i} s\n(ours: {p})" for n, i, _, _, p in cells])
    ax.set_xlim(-0.9, len(cells) - 0.1)  # one cell: bars of the same width as with two
    ax.set_yscale("log")
    ax.set_ylim(min(ours) / 2, max(theirs) * 3)
    ps.plain_log_ticks(ax.yaxis)
    ax.set_ylabel("mean RTT (ms)")
    ax.grid(alpha=0.3, which="both", axis="y")
    ps.legend_outside(fig, [theirs_bars, ours_bars])
    return ps.save(fig, out / "scaling_vs_original.png")


def scaling_figures(folder: str | Path) -> list[Path]:
    """Every figure of a scaling run, from folder/scaling.csv and folder/scaling.json, written beside them."""
    out = Path(folder)
    rows = read_rows_csv(out / "scaling.csv")
    if not rows:
        ps.skip(out, "scaling_latency.png", f"{out / 'scaling.csv'} has no rows")
        return []
    info = ps.RunInfo.load(out / "scaling.json", "test_scaling.py")
    params = parameters(rows, info)
    drawn = [draw(rows, params, info, out) for draw in (latency, throughput, policies_compared, versus_original)]
    return [path for path in drawn if path is not None]
