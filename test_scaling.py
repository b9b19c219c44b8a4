#!/usr/bin/env python3
"""Latency and throughput against offered load, number of servers and dispatch policy (imgclass.measure.scaling)."""

import sys

from imgclass.measure.scaling import main

if __name__ == "__main__":
    sys.exit(main())
