#!/usr/bin/env python3
"""Round-trip time against image size, and accuracy against resolution (imgclass.measure.rtt)."""

import sys

from imgclass.measure.rtt import main

if __name__ == "__main__":
    sys.exit(main())
