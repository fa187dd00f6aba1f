"""Run benchmarks by name (default: all): ``python -m benchmarks techniques``, ``… allocation``."""
from __future__ import annotations

import argparse
import sys

from benchmarks import allocation, techniques

SUITES = {"techniques": techniques.main, "allocation": allocation.main}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], default=list(SUITES))
    parser.add_argument("--only", nargs="*", help="rows to run (names as in the table)")
    args = parser.parse_args(argv)
    status = 0
    for name in args.suites or SUITES:
        status |= SUITES[name](args.only)
    return status


if __name__ == "__main__":
    sys.exit(main())
