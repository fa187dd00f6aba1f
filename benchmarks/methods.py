"""LLM-grade methods: each new method beside the one it claims to beat, on both benchmark models.

Two models, the same rows on each:

- ``minilm:…``: all-MiniLM-L6-v2, quality = STS-B dev Spearman × 100 of the saved and reloaded
  artifact (the engine's report, as in ``techniques``), calibration on 512 STS-B train sentences,
  distillation on STS-B train;
- ``llama:…``: the character-level Llama of ``llama_lm`` (trained once on tiny-shakespeare, cached),
  quality = validation loss ``ln(perplexity)`` from the engine's report, calibration on the
  training windows (``llama_lm``'s group size and sample count); the llm-compressor peers (GPTQ
  and AWQ W4A16 ``oneshot`` at the same group size and windows, SmoothQuant + static W8A8 beside
  ``w8a8``) where its interpreter exists.

Rows (``ROWS``): unstructured 50% and 2:4 pruning by ``magnitude``/``nm`` (the baseline),
``wanda`` and ``sparsegpt``; int4 by ``rtn``, ``gptq`` and ``awq`` (equal size: same codec);
``fp8`` beside ``int8``; ``w8a8`` (SmoothQuant, static int8 activations) beside ``int8-dynamic``;
``rotate`` (Hadamard) before int4 RTN and GPTQ (the Llama only); quantization-aware distillation (``distill`` over the int4 model) beside
int4 post-training quantization; LoRA healing beside full distillation after pruning half of the
MLP neurons, each run in a process of its own so the report's peak memory is the row's.

LoRA memory at scale (``scale:lora-memory-full``, ``scale:lora-memory-lora``): on the tiny models
above activations dominate and LoRA's peak memory is not lower, so the same distillation (teacher =
the original; ``LORA_MEMORY``: 6 steps, batches of 4 of the first 256 lines of tiny-shakespeare,
64 tokens at most) runs with and without
``lora_rank = 8`` on ``scale``'s random-weight Llama of about 0.1B parameters (bfloat16; the smoke
model with ``--smoke``), each a ``squeeze run`` in a fresh process whose peak RSS the operating
system reports (``scale.timed``). Random weights are enough: only memory, time and the trained
parameter count (from the stage's log) are measured, no quality.

Targets (the issue's claims; each judged on measured rows, "not measured" when one is missing):
wanda (its default ``compare = "auto"``: per layer, row-wise as in its paper or layer-wise,
whichever changes the layer's output less; and ``compare = "layer"``; ``wanda-50-row``, the paper's
choice alone, is shown but not judged) and sparsegpt beat magnitude at 50% on both models; AWQ
beats RTN and matches or beats GPTQ (within ``MATCH``) on both; QAD closes at least half of the gap
between int4 GPTQ and the original on the causal LM; rotation improves int4 RTN or GPTQ on the causal LM; LoRA distillation peaks
lower in RSS than full distillation on the 0.1B model. Writes ``benchmarks/results/methods.json``
(``methods-smoke.json`` with ``--smoke``, where the Llama is ``llama_lm``'s smoke model, the
LoRA memory rows run on ``scale``'s smoke model, and MiniLM rows are skipped).
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import causal_lm, charlm, llama_lm, scale
from benchmarks.rows import run_rows, save_and_print
from benchmarks.targets import Target, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
#: "matches": AWQ's quality within this of GPTQ's (Spearman points; relative validation loss).
MATCH = {"minilm": 0.1, "llama": 0.005}
#: LoRA rank of the healing rows (and of the LoRA memory rows).
LORA_RANK = 8
#: The LoRA memory rows' distillation: just enough steps for the optimizer state to exist and
#: peak; short texts, so that the activations (and the logits over 32,000 tokens) stay small.
LORA_MEMORY = {"steps": 6, "batch_size": 4, "max_length": 64, "texts": 256}


def stages(model: str, s: llama_lm.Settings) -> dict[str, str]:
    """Every row's stages for ``model`` (``"minilm"`` or ``"llama"``), by row name."""
    calib = "calib" if model == "minilm" else "train"
    group = 128 if model == "minilm" else s.group
    samples = "" if model == "minilm" else f", samples = {s.samples}"
    cal = f"data = {calib}{samples}"
    steps = 300 if not s.suffix else s.distill["steps"]
    if model == "minilm":
        heal = f"data = train, steps = {steps}"
        qad = heal
    else:
        common = (f'data = train, steps = {steps}, batch_size = {s.distill["batch_size"]}, '
                  f'max_length = {s.hyper.context}')
        heal = f'{common}, lr = {s.distill["lr"]}'
        qad = f"{common}, lr = 3e-4"  # the documented rate for int4 codes (see distill)
    int4 = f'scheme = "int4", group_size = {group}'
    mlp = f'stage mlp: prune {{ method = "activation", target = "mlp", ratio = 0.5, {cal} }}'
    rows = {
        "magnitude-50": 'stage s: prune { method = "magnitude", ratio = 0.5 }',
        "wanda-50": f'stage s: prune {{ method = "wanda", ratio = 0.5, {cal} }}',
        "wanda-50-row": (f'stage s: prune {{ method = "wanda", ratio = 0.5, compare = "row", '
                         f'{cal} }}'),
        "wanda-50-layer": (f'stage s: prune {{ method = "wanda", ratio = 0.5, compare = "layer", '
                           f'{cal} }}'),
        "sparsegpt-50": f'stage s: prune {{ method = "sparsegpt", ratio = 0.5, {cal} }}',
        "nm-2:4": 'stage s: prune { method = "nm", n = 2, m = 4 }',
        "wanda-2:4": f'stage s: prune {{ method = "wanda", n = 2, m = 4, {cal} }}',
        "sparsegpt-2:4": f'stage s: prune {{ method = "sparsegpt", n = 2, m = 4, {cal} }}',
        "int4-rtn": f'stage q: quantize {{ {int4}, method = "rtn" }}',
        "int4-gptq": f'stage q: quantize {{ {int4}, method = "gptq", {cal} }}',
        "int4-awq": f'stage q: quantize {{ {int4}, method = "awq", {cal} }}',
        "int8": 'stage q: quantize { scheme = "int8" }',
        "fp8": 'stage q: quantize { scheme = "fp8" }',
        "int4-gptq+qad": (f'stage q: quantize {{ {int4}, method = "gptq", {cal} }}\n'
                          f'stage heal: distill {{ teacher = original, {qad} }}'),
        "int8-dynamic": 'stage q: quantize { scheme = "int8-dynamic" }',
        "w8a8": f'stage q: quantize {{ scheme = "w8a8", {cal} }}',
        "mlp-50+distill": f"{mlp}\nstage heal: distill {{ teacher = original, {heal} }}",
        "mlp-50+lora": (f"{mlp}\nstage heal: distill {{ teacher = original, {heal}, "
                        f"lora_rank = {LORA_RANK} }}"),
    }
    if model == "llama":  # rotate: pre-norm RMSNorm decoders only (BERT is refused)
        rows["rotate+int4-rtn"] = f'stage r: rotate {{ }}\n{rows["int4-rtn"]}'
        rows["rotate+int4-gptq"] = f'stage r: rotate {{ }}\n{rows["int4-gptq"]}'
    return rows


#: llm-compressor's peers of the Llama rows: method -> scheme (``benchmarks.llmc_peer``); the
#: W4A16 ones beside ``int4-gptq``/``int4-awq``, SmoothQuant's static W8A8 beside ``w8a8``.
PEERS = {"gptq": "w4a16", "awq": "w4a16", "smoothquant": "w8a8"}


#: Rows run as ``squeeze run`` in a process of their own: their peak memory is compared.
SEPARATE = ("mlp-50+distill", "mlp-50+lora")


def _in_process_of_its_own(recipe: Path, out: Path) -> tuple[dict[str, Any], float]:
    """``squeeze run`` of ``recipe`` in a fresh interpreter; its report and the seconds taken."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "squeezelang.cli", "run", str(recipe), "-o",
                           str(out), "--force", "-q"], cwd=ROOT, capture_output=True, text=True)
    if not (out / "report.json").is_file():
        raise RuntimeError(f"squeeze run {recipe.name} wrote no report (exit {done.returncode}): "
                           f"{done.stderr.strip()[-1500:]}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - started


def minilm_row(name: str, body: str, workdir: Path, original: dict[str, Any] | None) -> dict[str, Any]:
    from benchmarks import techniques

    workdir = workdir / "minilm"  # its artifacts apart from the Llama rows' of the same name
    workdir.mkdir(parents=True, exist_ok=True)
    if name in SEPARATE:
        recipe = workdir / f"minilm-{name.replace('+', '_')}.squeeze"
        recipe.write_text(techniques.HEADER.format(name=name, shared=SHARED) + body + "\n")
        rep, seconds = _in_process_of_its_own(recipe, workdir / "out" / recipe.stem)
        m = rep["metrics"]
        return {"name": f"minilm:{name}", "quality": m["quality"]["final"],
                "original": m["quality"]["original"], "size_bytes": m["size"]["final"],
                "max_rss_bytes": (rep.get("resources") or {}).get("max_rss_bytes"),
                "seconds": seconds, "stages": body,
                "log": [line for st in rep.get("stages", []) for line in st.get("log", [])]}
    row = techniques.technique_row(name, body, workdir, original)
    return {"name": f"minilm:{name}", "quality": row["spearman_report"],
            "original": row["original_metrics"]["quality"], "size_bytes": row["size_report"],
            "seconds": row["seconds"], "stages": body, "original_metrics": row["original_metrics"]}


def llama_row(name: str, body: str, prepared: charlm.Prepared, workdir: Path) -> dict[str, Any]:
    workdir = workdir / "llama"
    workdir.mkdir(parents=True, exist_ok=True)
    if name in SEPARATE:
        recipe = workdir / f"llama-{name.replace('+', '_')}.squeeze"
        recipe.write_text(causal_lm._recipe(name, prepared.model, prepared, body))
        out = workdir / "out" / recipe.stem
        rep, seconds = _in_process_of_its_own(recipe, out)
        row = causal_lm.row_from_report(name, body, prepared.model, rep, out, seconds)
        row["max_rss_bytes"] = (rep.get("resources") or {}).get("max_rss_bytes")
    else:
        row = causal_lm.run_row(name, body, prepared.model, prepared, workdir)
    return {"name": f"llama:{name}", "quality": row["val_loss"], "original": row["input"]["val_loss"],
            "size_bytes": row["size_bytes"], "seconds": row["seconds"], "stages": body,
            "max_rss_bytes": row.get("max_rss_bytes"), "log": row["log"]}


def lora_memory_stages() -> dict[str, str]:
    """The LoRA memory rows' stages, by row name: the same distillation, full and with LoRA."""
    d = LORA_MEMORY
    full = (f"stage heal: distill {{ teacher = original, data = train, steps = {d['steps']}, "
            f"batch_size = {d['batch_size']}, max_length = {d['max_length']} }}")
    return {"lora-memory-full": full,
            "lora-memory-lora": full.replace(" }", f", lora_rank = {LORA_RANK} }}")}


def lora_memory_recipe(name: str, model: Path, data: Path, body: str) -> str:
    """A LoRA memory row's recipe: ``body`` on the causal LM ``model``, trained on the first lines
    of the text file ``data``; latency as ``scale`` measures it (short, a few repeats)."""
    return (f'recipe "{name}"\nmodel = hf("{model}", task = "causal-lm")\n'
            f'data train = text("{data}", limit = {LORA_MEMORY["texts"]})\n'
            "metric latency = latency(seq = 64, repeats = 3)\n" + body + "\n")


#: The distill stage's summary line (``Trainee.describe``).
_TRAINED = re.compile(r"trained ([\d,]+) of ([\d,]+) parameters.*gradients ([\d,]+) bytes, "
                      r"AdamW state ([\d,]+) bytes")


def trained(log: list[str]) -> dict[str, int]:
    """Parameters trained (of all), gradient and AdamW state bytes, from a distill stage's log."""
    for line in log:
        found = _TRAINED.search(line)
        if found:
            numbers = [int(g.replace(",", "")) for g in found.groups()]
            return dict(zip(("trainable_params", "model_params", "grad_bytes", "adamw_state_bytes"),
                            numbers))
    raise RuntimeError("the distill stage logged no 'trained N of M parameters' line")


def lora_memory_row(name: str, body: str, workdir: Path, size: str,
                    shape: dict[str, int]) -> dict[str, Any]:
    """``body`` on ``scale``'s random Llama of ``size``, a ``squeeze run`` in a fresh process."""
    directory, params = scale.model_dir(size, shape)
    workdir = workdir / "scale"
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = workdir / f"{size}-{name}.squeeze"
    recipe.write_text(lora_memory_recipe(name, directory, SHARED / "tinyshakespeare.txt", body))
    out = workdir / "out" / recipe.stem
    done = scale.timed([sys.executable, "-m", "squeezelang.cli", "run", str(recipe), "-o", str(out),
                        "--force", "-q"])
    if not (out / "report.json").is_file():
        raise RuntimeError(f"squeeze run {recipe.name} wrote no report (exit {done['rc']}): "
                           f"{done['output'].strip()[-1500:]}")
    rep = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # a 0.1B model's artifact; only the report is kept
    log = [line for st in rep.get("stages", []) for line in st.get("log", [])]
    return {"name": f"scale:{name}", "size": size, "params": params,
            "max_rss_bytes": done["max_rss_bytes"],
            "engine_max_rss_bytes": (rep.get("resources") or {}).get("max_rss_bytes"),
            "seconds": done["wall_s"], "stage_s": sum(s["seconds"] for s in rep["stages"]),
            **trained(log), "size_bytes": rep["metrics"]["size"]["final"], "stages": body,
            "notes": "random weights (scale's builder): only peak RSS (the process's, as the "
                     "operating system reports it), wall time and trained parameters are "
                     "measured; no quality", "log": log}


def _get(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["name"] == name and "error" not in r), None)


def _better(model: str, a: float, b: float) -> bool:
    """``a`` is better quality than ``b`` (Spearman: higher; validation loss: lower)."""
    return a > b if model == "minilm" else a < b


def targets(rows: list[dict[str, Any]]) -> list[Target]:
    out = []
    for model in ("minilm", "llama"):
        base = _get(rows, f"{model}:magnitude-50")
        # "wanda-50" is wanda's default (compare = "auto"); "wanda-50-row" is shown, not judged
        for method, row_name in (("wanda", "wanda-50"), ('wanda compare = "layer"', "wanda-50-layer"),
                                 ("sparsegpt", "sparsegpt-50")):
            row = _get(rows, f"{model}:{row_name}")
            name = f"{model}: {method} 50% beats magnitude 50% at equal size"
            if base is None or row is None:
                out.append(Target(name, None, "a row is missing"))
                continue
            equal = abs(row["size_bytes"] - base["size_bytes"]) <= 0.01 * base["size_bytes"]
            out.append(Target(name, equal and _better(model, row["quality"], base["quality"]),
                              f"{row['quality']:.4f} vs {base['quality']:.4f}; size "
                              f"{row['size_bytes']:,} vs {base['size_bytes']:,}"))
        rtn, gptq, awq = (_get(rows, f"{model}:int4-{m}") for m in ("rtn", "gptq", "awq"))
        name = f"{model}: awq beats rtn and matches or beats gptq (int4, equal size)"
        if None in (rtn, gptq, awq):
            out.append(Target(name, None, "a row is missing"))
        else:
            slack = MATCH[model] if model == "minilm" else MATCH[model] * gptq["quality"]
            matches = (awq["quality"] >= gptq["quality"] - slack if model == "minilm"
                       else awq["quality"] <= gptq["quality"] + slack)
            out.append(Target(name, _better(model, awq["quality"], rtn["quality"]) and matches,
                              f"awq {awq['quality']:.4f}, rtn {rtn['quality']:.4f}, "
                              f"gptq {gptq['quality']:.4f}"))
    gptq, qad = _get(rows, "llama:int4-gptq"), _get(rows, "llama:int4-gptq+qad")
    name = "llama: QAD closes at least half of the int4 GPTQ gap to the original"
    if gptq is None or qad is None:
        out.append(Target(name, None, "a row is missing"))
    else:
        gap = gptq["quality"] - gptq["original"]
        closed = (gptq["quality"] - qad["quality"]) / gap if gap > 0 else float("nan")
        out.append(Target(name, gap > 0 and closed >= 0.5,
                          f"closed {closed:.0%} of {gap:.4f} (original {gptq['original']:.4f}, "
                          f"int4 {gptq['quality']:.4f}, +qad {qad['quality']:.4f})"))
    pairs = [(_get(rows, f"llama:rotate+int4-{m}"), _get(rows, f"llama:int4-{m}"))
             for m in ("rtn", "gptq")]
    name = "llama: rotate improves int4 (rtn or gptq)"
    if any(a is None or b is None for a, b in pairs):
        out.append(Target(name, None, "a row is missing"))
    else:
        out.append(Target(name, any(a["quality"] < b["quality"] for a, b in pairs),
                          "; ".join(f"{a['name'].split(':')[1]} {a['quality']:.4f} vs "
                                    f"{b['quality']:.4f}" for a, b in pairs)))
    full, lora = _get(rows, "scale:lora-memory-full"), _get(rows, "scale:lora-memory-lora")
    size = (full or lora or {}).get("size", "0.1B")
    name = f"scale: LoRA distill peak RSS < full distill peak RSS on the {size} model"
    if full is None or lora is None:
        out.append(Target(name, None, "a row is missing"))
    else:
        out.append(Target(name, lora["max_rss_bytes"] < full["max_rss_bytes"],
                          f"{lora['max_rss_bytes'] / 1e9:.2f} GB vs "
                          f"{full['max_rss_bytes'] / 1e9:.2f} GB; trained "
                          f"{lora['trainable_params']:,} vs {full['trainable_params']:,} "
                          "parameters"))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':28s} {'quality':>9s} {'original':>9s} {'size MB':>9s} {'peak GB':>8s} "
             f"{'s':>7s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:28s} error: {r['error']}")
            continue
        rss = r.get("max_rss_bytes")
        quality = (f"{r['quality']:9.4f} {r['original']:9.4f}" if "quality" in r
                   else f"{'-':>9s} {'-':>9s}")  # the LoRA memory rows judge no quality
        lines.append(f"{r['name']:28s} {quality} {r['size_bytes'] / 1e6:9.3f} "
                     f"{(rss or 0) / 1e9:8.2f} {r['seconds']:7.1f}")
    trainees = [r for r in rows if "trainable_params" in r]
    if trainees:
        lines.append(f"\n{'row':28s} {'trained':>12s} {'of':>12s} {'grads MB':>9s} "
                     f"{'AdamW MB':>9s} {'stage s':>8s}")
        lines += [f"{r['name']:28s} {r['trainable_params']:12,} {r['model_params']:12,} "
                  f"{r['grad_bytes'] / 1e6:9.1f} {r['adamw_state_bytes'] / 1e6:9.1f} "
                  f"{r['stage_s']:8.1f}" for r in trainees]
    return "\n".join(lines)


def main(only: list[str] | None = None, threads: int = 2) -> int:
    import torch

    s = llama_lm.settings()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    workdir = RESULTS / f"methods{s.suffix}"
    workdir.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[], dict[str, Any]]] = {}
    if not (SHARED / "tinyshakespeare.txt").is_file():
        print(f"skipped: the shared data is not at {SHARED}", file=sys.stderr)
        return 0
    if not s.suffix:  # MiniLM rows: STS-B; not in smoke mode (no small MiniLM)
        original: dict[str, Any] = {}
        for name, body in stages("minilm", s).items():
            def minilm(name: str = name, body: str = body) -> dict[str, Any]:
                row = minilm_row(name, body, workdir, original.get("metrics"))
                original.setdefault("metrics", row.pop("original_metrics", None))
                return row
            builders[f"minilm:{name}"] = minilm
    # prepared when a row first needs it: the LoRA memory rows alone train no character model
    prepared = functools.cache(lambda: charlm.prepare(llama_lm._data(s), s.hyper))
    for name, body in stages("llama", s).items():
        builders[f"llama:{name}"] = (lambda name=name, body=body:
                                     llama_row(name, body, prepared(), workdir))
    for method, scheme in PEERS.items():
        def peer(method: str = method, scheme: str = scheme) -> dict[str, Any]:
            row = llama_lm.llmcompressor_gptq(prepared(), workdir, s, threads, method,
                                              f"llmcompressor-{method}-{scheme}")
            return {"name": f"llama:{row['name']}", "quality": row["val_loss"],
                    "original": row["input"]["val_loss"], "size_bytes": row["size_bytes"],
                    "seconds": row["seconds"], "peer": row["peer"]}
        builders[f"llama:llmcompressor-{method}-{scheme}"] = peer
    size, shape = ("smoke", scale.SMOKE) if s.suffix else ("0.1B", scale.SIZES["0.1B"])
    for name, body in lora_memory_stages().items():
        builders[f"scale:{name}"] = (lambda name=name, body=body:
                                     lora_memory_row(name, body, workdir, size, shape))
    rows = run_rows(builders, lambda name: not only or name in only
                    or name.split(":", 1)[1] in only)
    path = RESULTS / f"methods{s.suffix}.json"
    save_and_print(path, rows, only, table)
    result = report(targets(json.loads(path.read_text())))
    (RESULTS / f"methods{s.suffix}-targets.json").write_text(json.dumps({"targets": result},
                                                                        indent=2))
    print(f"\nmethods{s.suffix}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0
