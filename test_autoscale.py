#!/usr/bin/env python3
"""The same load trace against each autoscaling policy and fixed pools (imgclass.autoscale.experiment)."""

import sys

from imgclass.autoscale.experiment import main

if __name__ == "__main__":
    sys.exit(main())
