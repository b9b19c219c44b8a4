#!/usr/bin/env bash
# The exact commands behind every file in results/ (run from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
export IMGCLASS_MODEL_DIR="${IMGCLASS_MODEL_DIR:-../shared/models}"
py=.venv/bin/python

# RTT against image size, and accuracy against resolution: one litert server behind the balancer
$py test_rtt.py --local 1 --out results/rtt --quiet

# Scaling: local cluster of sleep servers (exp:20ms), n up to 16, all four policies, theory overlay
$py test_scaling.py --local --servers 1,2,4,8,16 --policies random,round_robin,least_outstanding,p2c \
    --loads 0.2,0.5,0.8 --duration 20 --warmup 3 --min-per-server 400 --stress 500 --out results/scaling --quiet

# Theory check with enough samples for the mean (see results/README.md): n = 8 and 16
$py test_scaling.py --local --servers 8,16 --policies random,least_outstanding --loads 0.8 \
    --duration 180 --warmup 5 --out results/theory_rho08 --quiet
$py test_scaling.py --local --servers 8,16 --policies random,least_outstanding --loads 0.5 \
    --duration 60 --warmup 5 --out results/theory_rho05 --quiet
