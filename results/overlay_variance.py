#!/usr/bin/env python3
"""How far a finite M/M/1 run's mean lands from theory: at the nominal load, and at the measured one.

    python results/overlay_variance.py [--seconds 300] [--runs 200]

A seeded simulation (Lindley's recursion) of the scaling experiment's hardest cell, n = 1 at
rho = 0.8 with 20 ms exponential services. For each run it compares the mean response time after
a 5 s warm-up with M/M/1 at the offered rate and the configured mean service (nominal), with M/M/1
at the run's achieved arrival rate and mean drawn service (what test_scaling.py's overlay uses),
and with the achieved arrival rate alone. It prints the spread of each error and how often it
exceeds 10%.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rho", type=float, default=0.8)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    mu, warmup = 50.0, 5.0
    lam = args.rho * mu
    errors: dict[str, list[float]] = {"nominal": [], "measured rate and service": [], "measured rate only": []}
    for _ in range(args.runs):
        arrivals = np.cumsum(rng.exponential(1 / lam, int(lam * args.seconds * 1.2)))
        arrivals = arrivals[arrivals < args.seconds]
        services = rng.exponential(1 / mu, arrivals.size)
        response = np.empty(arrivals.size)
        free = 0.0
        for i, (a, s) in enumerate(zip(arrivals.tolist(), services.tolist(), strict=True)):
            free = max(a, free) + s
            response[i] = free - a
        keep = arrivals >= warmup
        mean = response[keep].mean()
        rate = keep.sum() / (args.seconds - warmup)
        service = services[keep].mean()
        errors["nominal"].append(mean * (mu - lam) - 1)
        errors["measured rate and service"].append(mean / (service / (1 - rate * service)) - 1)
        errors["measured rate only"].append(mean / (1 / (mu - rate)) - 1)
    print(f"# M/M/1, rho={args.rho}, 20 ms services, {args.runs} runs of {args.seconds:g} s (seed 1)")
    for name, values in errors.items():
        e = np.asarray(values)
        print(f"theory at {name:28} error sd {e.std():6.1%}   P(|error| > 10%) {np.mean(np.abs(e) > 0.1):6.1%}")


if __name__ == "__main__":
    main()
