#!/usr/bin/env python3
"""Entry point: `python run_ablations.py --help`."""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
