"""Run benchmarks by name (default: all): ``python -m benchmarks [techniques] [causal_lm]
[overhead] [allocation] [--only ROW…]``. Each suite prints a table and its targets (met / not met)
and writes ``benchmarks/results/<suite>.json`` (and a PNG where it plots)."""
from __future__ import annotations

import argparse
import importlib
import sys

# First: encoder_eval sets OMP_WAIT_POLICY before anything imports torch (see its docstring).
importlib.import_module("benchmarks.encoder_eval")
from benchmarks import allocation, causal_lm, overhead, techniques  # noqa: E402

SUITES = {"techniques": techniques.main, "causal_lm": causal_lm.main, "overhead": overhead.main,
          "allocation": allocation.main}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``suites`` is every suite when none is named."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    # checked below, not with choices=: argparse checks a nargs="*" default against choices as one value
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=", ".join(SUITES) + " (default: all)")
    parser.add_argument("--only", nargs="*", help="rows to run (names as in the table)")
    args = parser.parse_args(argv)
    for name in args.suites:
        if name not in SUITES:
            parser.error(f"invalid choice: {name!r} (choose from {', '.join(SUITES)})")
    args.suites = args.suites or list(SUITES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    status = 0
    for name in args.suites:
        status |= SUITES[name](args.only)
    return status


if __name__ == "__main__":
    sys.exit(main())
