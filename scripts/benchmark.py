"""The benchmark's command line (the library: asla.bench; `asla bench` is the same command).

    python scripts/benchmark.py --help
"""
import sys

from asla.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
