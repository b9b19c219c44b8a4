#!/usr/bin/env python3
"""Run the load balancer: python load_balancer.py --port 5000 --backends URL,URL (same as `imgclass balance`)."""

import sys

from imgclass.cli import run

if __name__ == "__main__":
    sys.exit(run("balance", sys.argv[1:]))
