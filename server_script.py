#!/usr/bin/env python3
"""Run one model server: python server_script.py --port 5001 [options] (same as `imgclass serve`)."""

import sys

from imgclass.cli import run

if __name__ == "__main__":
    sys.exit(run("serve", sys.argv[1:]))
