"""The issue's targets: each one is checked against measured rows and printed met / not met.

A suite builds ``Target`` records from its rows (never from assumptions: a target whose row did not
run or failed is "not measured", which counts as not met) and hands them to ``report``, which prints
them and returns them as JSON-able dicts for the suite's results file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str           # what the issue asks, e.g. "int8: size <= 26% and drop <= 0.1"
    met: bool | None    # None: not measured (the row failed or was not run)
    measured: str       # the figures it was judged on, e.g. "25.4%, drop 0.03 (quantize-int8)"


def report(targets: list[Target]) -> list[dict[str, Any]]:
    """Print every target with met / not met / not measured; return them as dicts."""
    if targets:
        width = max(len(t.name) for t in targets)
        print("\ntargets")
        for t in targets:
            verdict = "not measured" if t.met is None else "met" if t.met else "NOT MET"
            print(f"  {t.name:{width}s}  {verdict:12s}  {t.measured}")
    return [asdict(t) for t in targets]


def best(rows: list[dict[str, Any]], ok: Any, key: Any) -> dict[str, Any] | None:
    """The row with the least ``key`` among those for which ``ok(row)`` holds (None if none)."""
    chosen = [r for r in rows if "error" not in r and ok(r)]
    return min(chosen, key=key) if chosen else None
