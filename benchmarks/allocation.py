"""Per-layer allocation against the uniform setting at equal size, on all-MiniLM-L6-v2.

Pairs of rows with the same saved size: magnitude pruning with every layer at ``ratio`` (``scope =
"layer"``) against ``scope = "allocated"`` (a sparsity per layer from measured sensitivity), and int4
(group 128) against ``scheme = "mixed"`` at ``avg_bits = 4`` (a width per tensor among 2, 3, 4, 5,
6 and 8 bits, the same bytes), and 3 bits on average against uniform 3-bit (``bits = [3]``). Quality is STS-Benchmark dev
Spearman × 100 of the saved, reloaded artifact (as in ``benchmarks.techniques``); fidelity the mean
cosine to the original's embeddings on 500 dev pairs. Calibration texts are STS-B *train* sentences.
"stage s" is the seconds the stage took (allocation measures sensitivity: one forward pass over the
calibration texts per layer). The original is measured once for all rows. Writes
``benchmarks/results/allocation.json`` and prints a table. Latency is not compared here.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from benchmarks.techniques import HEADER, RESULTS, SHARED
from benchmarks.rows import save_and_print

METRICS = 'data probe = csv("{shared}/stsb-en-dev.csv", columns = ["a", "b", "score"], limit = 500)\n' \
          'metric faithful = fidelity(probe)\n'

#: name -> (stages, the row it is compared with at equal size, or None for a baseline)
ROWS: dict[str, tuple[str, str | None]] = {
    "prune-magnitude-50": ('stage s: prune { method = "magnitude", ratio = 0.5 }', None),
    "prune-magnitude-50-global": ('stage s: prune { method = "magnitude", ratio = 0.5, scope = "global" }',
                                  "prune-magnitude-50"),
    "prune-magnitude-50-allocated": ('stage s: prune { method = "magnitude", ratio = 0.5, '
                                     'scope = "allocated", data = calib }', "prune-magnitude-50"),
    "prune-magnitude-70": ('stage s: prune { method = "magnitude", ratio = 0.7 }', None),
    "prune-magnitude-70-global": ('stage s: prune { method = "magnitude", ratio = 0.7, scope = "global" }',
                                  "prune-magnitude-70"),
    "prune-magnitude-70-allocated": ('stage s: prune { method = "magnitude", ratio = 0.7, '
                                     'scope = "allocated", data = calib }', "prune-magnitude-70"),
    "quantize-int4": ('stage s: quantize { scheme = "int4" }', None),
    "quantize-mixed-avg4": ('stage s: quantize { scheme = "mixed", avg_bits = 4, data = calib }',
                            "quantize-int4"),
    "quantize-uniform-3bit": ('stage s: quantize { scheme = "mixed", bits = [3], avg_bits = 3, '
                              'data = calib }', None),
    "quantize-mixed-avg3": ('stage s: quantize { scheme = "mixed", avg_bits = 3, data = calib }',
                            "quantize-uniform-3bit"),
}


def run_row(name: str, stages: str, workdir: Path, original: dict[str, float] | None) -> dict:
    """Run one row like ``squeeze run`` does, with the original's metrics measured once for all rows
    and none after the stage (only the saved artifact's are compared)."""
    from squeezelang.api import load_recipe, registries
    from squeezelang.executor.run import execute
    from squeezelang.planner.resolve import resolve

    recipe = workdir / f"{name}.squeeze"
    recipe.write_text(HEADER.format(name=name, shared=SHARED) + METRICS.format(shared=SHARED)
                      + stages + "\n", encoding="utf-8")
    out = workdir / "out" / recipe.stem
    started = time.perf_counter()
    regs = registries()
    result = execute(resolve(load_recipe(recipe), regs), regs, output=out, force=True, quiet=True,
                     original_metrics=original, stage_metrics="none")
    m = result.report["metrics"]
    row = {
        "name": name, "stages": stages,
        "size_mb": m["size"]["final"] / 1e6, "size_ratio": m["size"]["final"] / m["size"]["original"],
        "spearman": m["quality"]["final"], "spearman_original": m["quality"]["original"],
        "spearman_drop": m["quality"]["original"] - m["quality"]["final"],
        "fidelity": m["faithful"]["final"],
        "log": result.report["stages"][0].get("log", []),
        "stage_seconds": result.report["stages"][0]["seconds"],
        "seconds": time.perf_counter() - started,
        "original": {k: v["original"] for k, v in m.items()},
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [f"{'row':30s} {'size MB':>8s} {'size %':>7s} {'Spearman':>8s} {'drop':>6s} "
             f"{'fidelity':>8s} {'stage s':>7s} {'vs':>26s} {'Δ size':>7s} {'Δ Spearman':>10s}"]
    for r in rows:
        base = by_name.get(ROWS.get(r["name"], ("", None))[1] or "")
        versus = (f"{base['name']:>26s} {(r['size_mb'] / base['size_mb'] - 1) * 100:+6.2f}% "
                  f"{r['spearman'] - base['spearman']:+10.2f}") if base else ""
        lines.append(f"{r['name']:30s} {r['size_mb']:8.2f} {r['size_ratio'] * 100:6.1f}% "
                     f"{r['spearman']:8.2f} {r['spearman_drop']:6.2f} {r['fidelity']:8.4f} "
                     f"{r['stage_seconds']:7.0f} {versus}")
    return "\n".join(lines)


def main(only: list[str] | None = None) -> int:
    if not SHARED.is_dir():
        print(f"skipped: the STS-Benchmark files are not at {SHARED}", file=sys.stderr)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "allocation"
    workdir.mkdir(exist_ok=True)
    rows: list[dict] = []
    original = None
    for name, (stages, _) in ROWS.items():
        if only and name not in only:
            continue
        try:
            rows.append(run_row(name, stages, workdir, original))
            original = rows[-1]["original"]
        except Exception as exc:  # one broken row must not hide the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
        ok = [r for r in rows if "error" not in r]
        print(table(ok[-1:]) if ok and ok[-1]["name"] == name else "", flush=True)
    save_and_print(RESULTS / "allocation.json", rows, only, table)
    return 0
