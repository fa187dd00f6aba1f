"""Run benchmarks by name (default: all): ``python -m benchmarks [techniques] [causal_lm]
[llama_lm] [overhead] [allocation] [runtimes] [scale] [methods] [--only ROW…] [--smoke]``. Each suite prints a table and its
targets (met / not met) and writes ``benchmarks/results/<suite>.json`` (and a PNG where it plots).
``--smoke`` runs ``llama_lm`` and ``methods`` on a tiny model trained a few steps, and ``scale`` on
one tiny random model (``SQUEEZE_BENCH_SMOKE=1``): the code path in minutes, numbers meaningless."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# First: encoder_eval sets OMP_WAIT_POLICY before anything imports torch (see its docstring).
importlib.import_module("benchmarks.encoder_eval")
from benchmarks import (allocation, causal_lm, llama_lm, methods, overhead,  # noqa: E402
                        runtimes, scale, techniques)

SUITES = {"techniques": techniques.main, "causal_lm": causal_lm.main, "llama_lm": llama_lm.main,
          "overhead": overhead.main, "allocation": allocation.main, "runtimes": runtimes.main,
          "scale": scale.main, "methods": methods.main}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``suites`` is every suite when none is named."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    # checked below, not with choices=: argparse checks a nargs="*" default against choices as one value
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=", ".join(SUITES) + " (default: all)")
    parser.add_argument("--only", nargs="*", help="rows to run (names as in the table)")
    parser.add_argument("--smoke", action="store_true",
                        help="llama_lm: a tiny model trained a few steps, to check the code path "
                             "(writes llama_lm-smoke.json)")
    args = parser.parse_args(argv)
    for name in args.suites:
        if name not in SUITES:
            parser.error(f"invalid choice: {name!r} (choose from {', '.join(SUITES)})")
    args.suites = args.suites or list(SUITES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        os.environ[llama_lm.SMOKE_ENV] = "1"
    status = 0
    for name in args.suites:
        status |= SUITES[name](args.only)
    return status


if __name__ == "__main__":
    sys.exit(main())
