#!/usr/bin/env python3
"""Latency and throughput against offered load, number of servers and dispatch policy (imgclass.scaling)."""

import sys

from imgclass.scaling import main

if __name__ == "__main__":
    sys.exit(main())
