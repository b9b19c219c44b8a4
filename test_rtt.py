#!/usr/bin/env python3
"""Round-trip time against image size, and accuracy against resolution (imgclass.rtt)."""

import sys

from imgclass.rtt import main

if __name__ == "__main__":
    sys.exit(main())
