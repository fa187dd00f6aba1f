"""What every benchmark suite does with its rows: keep a partial re-run's rows, write JSON, print,
plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable


def save_and_print(path: Path, rows: list[dict[str, Any]], only: list[str] | None,
                   table: Callable[[list[dict[str, Any]]], str]) -> list[dict[str, Any]]:
    """Write ``rows`` to ``path`` (a partial re-run with ``only`` updates its rows and keeps the
    others), then print the table of the rows that ran and the error of each that failed; return
    the rows written (what targets are judged on)."""
    if only and path.is_file():
        fresh = {r["name"]: r for r in rows}
        previous = json.loads(path.read_text())
        rows = [fresh.pop(r["name"], r) for r in previous] + list(fresh.values())
    path.write_text(json.dumps(rows, indent=2))
    print("\n" + table([r for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"{r['name']}: {r['error']}")
    return rows


def run_rows(builders: dict[str, Callable[[], dict[str, Any]]],
             wanted: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Build every row ``wanted`` accepts, in order; a row that raises becomes an ``error`` row
    (one broken row must not hide the others)."""
    rows: list[dict[str, Any]] = []
    for name, build in builders.items():
        if not wanted(name):
            continue
        print(f"{name} …", flush=True)
        try:
            rows.append(build())
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (said on stderr) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install '.[plot]')", file=sys.stderr)
        return None
    return plt
