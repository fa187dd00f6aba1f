"""Small-data causal LM, Llama family: a character-level Llama trained on tiny-shakespeare, then
compressed by the engine and by two library peers, side by side in one table.

The ``causal_lm`` suite's setting with another architecture: ``charlm`` trains (once, cached) a
4-layer Llama — grouped-query attention (4 query heads sharing 2 key/value heads, head dim 32), a
gated SiLU MLP 384 wide, RMSNorm, rotary positions, tied embeddings; about the GPT-2's parameter
count — with the same data split, tokenizer, training loop and early stopping. Every engine row is
a recipe run by ``squeezelang.run`` and every figure of it is read from the engine's report,
measured on the saved and reloaded artifact, exactly as ``causal_lm`` does (its row, ratio,
latency, control and target code is reused here).

Rows:

- ``original``, ``control``, ``control-final-lr``, ``width-half``, ``width-eq-depth``,
  ``depth-half`` and each of those ``+distill``, ``width-half+distill+int8``: as in
  ``causal_lm`` (Minitron's width — MLP and embedding channels at one ratio, heads kept — against
  depth at equal parameters, distilled from the original, against the same-steps controls);
- ``int8``: the original with int8 weights; ``int4-gptq``: the original with int4 GPTQ weights
  (``GROUP`` inputs a scale, calibrated on the first ``SAMPLES`` training windows; the tied
  embedding rounded to nearest); ``int4-gptq-linears``: the same with the embedding kept in float,
  as llm-compressor's W4A16 keeps it;
- ``mlp-50``: half of every layer's MLP neurons removed (``prune`` ``activation``, target
  ``mlp``), without distillation — the engine's side of the Torch-Pruning peer;
- ``llmcompressor-gptq-w4a16`` (peer): llm-compressor's ``oneshot`` GPTQ W4A16 at the same group
  size and calibration windows, saved compressed, reloaded with transformers
  (``benchmarks.llmc_peer``; it runs in the interpreter that has llm-compressor, see
  ``llmc_python``, and is a "skipped" row where none has);
- ``torch-pruning-mlp-50`` (peer): Torch-Pruning's ``MetaPruner`` (``peers.prune_mlp_``, as for
  MiniLM) with the gate and up projections as roots, half of each layer's MLP channels, saved
  with ``save_pretrained`` and reloaded with transformers.

Peers' figures: size is ``encoder_eval.dir_bytes`` of their directory (weight files and
``config.json``, the engine's convention), parameters the weights of the reloaded model (tied ones
once), validation loss ``charlm.mean_nll`` of the reloaded model on ``val.jsonl`` (equal to the
engine's ``ln(perplexity)``). llm-compressor's artifact is not timed: this interpreter may not
load it.

Targets: (a) and (b) of ``causal_lm`` (half the parameters within 3% of the original after
distillation, also against the better control; width beats depth at equal parameters after
distillation), and (c) an int4 row no larger than llm-compressor's artifact with a validation loss
no worse than its.

Smoke mode (``python -m benchmarks llama_lm --smoke``, or ``SQUEEZE_BENCH_SMOKE=1``): a 2-layer,
64-wide Llama trained 30 steps on the first 60,000 characters, 8 distillation steps, groups of 32,
16 calibration windows; the whole path (train, every row, table, targets, JSON) in a few minutes.
Its numbers mean nothing; it writes ``llama_lm-smoke*.json`` so the real results stay.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from benchmarks import causal_lm, charlm
from benchmarks.rows import run_rows

ROOT = Path(__file__).resolve().parents[1]
DATA = causal_lm.DATA
RESULTS = causal_lm.RESULTS
#: Where ``llmc_python`` looks for an interpreter with llm-compressor when none is named.
LLMC_VENV = ROOT / "benchmarks" / "cache" / "llmc-venv"
SMOKE_ENV = "SQUEEZE_BENCH_SMOKE"
#: The peers' rows, after the engine's.
PEERS = ("llmcompressor-gptq-w4a16", "torch-pruning-mlp-50")
MLP_RATIO = 0.5


@dataclass(frozen=True)
class Settings:
    """What a run of the suite trains and how hard it compresses."""

    hyper: charlm.Hyper
    distill: dict[str, Any] = field(default_factory=lambda: dict(causal_lm.DISTILL))
    #: int4 group size (both the engine's and llm-compressor's): divides every input width
    group: int = 128
    #: calibration windows of GPTQ (both)
    samples: int = 128
    #: the first characters of the data file only (None: all of it)
    chars: int | None = None
    #: appended to the results' file names
    suffix: str = ""


FULL = Settings(charlm.Hyper(arch="llama", kv_heads=2, inner=384))
SMOKE = Settings(charlm.Hyper(arch="llama", layers=2, d_model=64, heads=4, kv_heads=2, inner=128,
                              context=64, batch_size=8, warmup=5, eval_every=10, max_steps=30,
                              train_windows=256),
                 distill={**causal_lm.DISTILL, "steps": 8, "batch_size": 4}, group=32, samples=16,
                 chars=60_000, suffix="-smoke")


def settings() -> Settings:
    """``SMOKE`` when ``SQUEEZE_BENCH_SMOKE=1``, else ``FULL``."""
    return SMOKE if os.environ.get(SMOKE_ENV) == "1" else FULL


def _int4(s: Settings, linears_only: bool = False) -> str:
    exclude = ', exclude = ["model.embed_tokens", "lm_head"]' if linears_only else ""
    return (f'stage q: quantize {{ scheme = "int4", method = "gptq", group_size = {s.group}, '
            f'data = train, samples = {s.samples}{exclude} }}')


MLP = (f'stage mlp: prune {{ method = "activation", target = ["mlp"], ratio = {MLP_RATIO}, '
       f'data = train }}')


def row_stages(ratios: dict[str, float], s: Settings) -> dict[str, str]:
    """Every engine row's stages: ``causal_lm``'s rows, then quantization and MLP pruning alone."""
    rows = causal_lm.row_stages(ratios, s.distill, s.hyper.context)
    rows.update({"int8": causal_lm.INT8, "int4-gptq": _int4(s),
                 "int4-gptq-linears": _int4(s, linears_only=True),
                 f"mlp-{round(MLP_RATIO * 100)}": MLP})
    return rows


def hidden_fits_heads(prepared: charlm.Prepared) -> Callable[[float], bool]:
    """Whether width pruning at a ratio leaves a hidden size that is a multiple of the attention
    heads: transformers' ``LlamaConfig`` refuses any other (even with an explicit ``head_dim``),
    so such a model could not be saved. Sizes are the engine's own (``new_sizes``)."""
    from squeezelang_plugins.prune.activation import new_sizes

    config = json.loads((prepared.model / "config.json").read_text())

    def fits(ratio: float) -> bool:
        sizes = new_sizes(config, causal_lm.WIDTH, ratio)
        return sizes["hidden"] % sizes["heads"] == 0

    return fits


def peer_row(name: str, out: Path, prepared: charlm.Prepared, params: int, val_loss: float,
             seconds: float, note: str, timed: bool) -> dict[str, Any]:
    """A peer's row in the engine rows' shape; its input is the original measured the same way."""
    from benchmarks.encoder_eval import dir_bytes

    size = dir_bytes(out)
    row = {"name": name, "stages": "", "peer": note, "model": str(prepared.model),
           "size_bytes": size, "size_mb": size / 1e6, "params": int(params),
           "perplexity": math.exp(val_loss), "val_loss": val_loss,
           "input": {"size_bytes": dir_bytes(prepared.model),
                     "params": int(prepared.info["params"]),
                     "perplexity": math.exp(prepared.val_loss), "val_loss": prepared.val_loss},
           "log": [], "seconds": seconds}
    if timed:  # ``causal_lm.measure_latency`` times it with the others, then deletes it
        row["path"] = str(out)
    return row


def _val_windows(prepared: charlm.Prepared) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared.model), local_files_only=True)
    return [list(ids) for ids in tokenizer(charlm.read_jsonl(prepared.val))["input_ids"]]


def torch_pruning_mlp(prepared: charlm.Prepared, workdir: Path, ratio: float = MLP_RATIO) -> dict:
    """Torch-Pruning on the gated MLP: gate and up projections as roots, L1 magnitude."""
    from transformers import AutoModelForCausalLM

    from benchmarks.peers import prune_mlp_

    name = f"torch-pruning-mlp-{round(ratio * 100)}"
    out = workdir / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(prepared.model), local_files_only=True)
    prune_mlp_(model, lambda n: n.endswith(("mlp.gate_proj", "mlp.up_proj")), ratio,
               lambda output: output.logits.sum())
    widths = {layer.mlp.gate_proj.out_features for layer in model.model.layers}
    widths |= {layer.mlp.up_proj.out_features for layer in model.model.layers}
    if len(widths) != 1:
        raise RuntimeError(f"layers pruned to different MLP widths {sorted(widths)}: a plain "
                           "config cannot hold them")
    model.config.intermediate_size = widths.pop()
    model.save_pretrained(str(out))
    seconds = time.perf_counter() - started
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    val_loss = charlm.mean_nll(reloaded, _val_windows(prepared))
    params = sum(p.numel() for p in reloaded.parameters())
    note = (f"Torch-Pruning {version('torch-pruning')} MetaPruner, L1 magnitude, gate/up "
            f"projections as roots, ratio {ratio} per layer (intermediate_size "
            f"{model.config.intermediate_size}); save_pretrained, reloaded with transformers")
    return peer_row(name, out, prepared, params, val_loss, seconds, note, timed=True)


def llmc_python() -> tuple[str | None, str]:
    """The interpreter that runs llm-compressor, or None and why there is none.

    ``SQUEEZE_BENCH_LLMC_PYTHON`` if set; else this one if it imports llmcompressor; else
    ``benchmarks/cache/llmc-venv`` (see the README: llm-compressor pins an older transformers, so it
    lives in a venv of its own that borrows this one's torch).
    """
    named = os.environ.get("SQUEEZE_BENCH_LLMC_PYTHON")
    if named:
        return named, "SQUEEZE_BENCH_LLMC_PYTHON"
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable, "this interpreter"
    venv = LLMC_VENV / "bin" / "python"
    if venv.is_file():
        return str(venv), str(LLMC_VENV)
    return None, (f"skipped: llm-compressor is not installed here (its releases pin transformers "
                  f"below this venv's {version('transformers')}), SQUEEZE_BENCH_LLMC_PYTHON is not "
                  f"set and {LLMC_VENV} does not exist (see README, Benchmarks)")


def llmcompressor_gptq(prepared: charlm.Prepared, workdir: Path, s: Settings,
                       threads: int = 2, method: str = "gptq", name: str = PEERS[0]) -> dict:
    """llm-compressor's GPTQ (or AWQ) W4A16 ``oneshot`` (``benchmarks.llmc_peer``, in its
    interpreter)."""
    python, where = llmc_python()
    if python is None:
        raise RuntimeError(where)
    out = workdir / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    command = [python, "-m", "benchmarks.llmc_peer", str(prepared.model), str(prepared.train),
               str(prepared.val), str(out), "--group-size", str(s.group), "--samples",
               str(s.samples), "--context", str(prepared.hyper.context), "--threads", str(threads),
               "--method", method]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmarks.llmc_peer exited {done.returncode} ({where}): {tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    row = peer_row(name, out, prepared, result["params"], result["val_loss"],
                   result["seconds"], f"{result['note']} ({where})", timed=False)
    shutil.rmtree(out, ignore_errors=True)
    return row


def int4_target(rows: list[dict[str, Any]]) -> Any:
    """(c): the best int4 row no larger than llm-compressor's artifact, against its loss."""
    from benchmarks.targets import Target, best

    name = "(c) int4: val loss no worse than llm-compressor GPTQ W4A16 at equal or smaller size"
    peer = next((r for r in rows if r["name"] == PEERS[0] and "error" not in r), None)
    if peer is None:
        return Target(name, None, "the llm-compressor row did not run")
    ours = best(rows, lambda r: r["name"].startswith("int4") and r["size_bytes"] <= peer["size_bytes"],
                lambda r: r["val_loss"])
    if ours is None:
        return Target(name, None, f"no int4 row within llm-compressor's {int(peer['size_bytes'])} bytes")
    return Target(name, ours["val_loss"] <= peer["val_loss"],
                  f"{ours['val_loss']:.4f} ({ours['name']}, {int(ours['size_bytes'])} bytes) vs "
                  f"{peer['val_loss']:.4f} ({peer['name']}, {int(peer['size_bytes'])} bytes)")


def targets(rows: list[dict[str, Any]]) -> list[Any]:
    return causal_lm.targets(rows) + [int4_target(rows)]


def _data(s: Settings) -> Path:
    """The data file, or (smoke) its first ``s.chars`` characters in a cached copy."""
    if s.chars is None:
        return DATA
    head = charlm.CACHE.parent / f"{DATA.stem}-head{s.chars}.txt"
    if not head.is_file():
        head.parent.mkdir(parents=True, exist_ok=True)
        head.write_text(DATA.read_text(encoding="utf-8")[:s.chars], encoding="utf-8")
    return head


def main(only: list[str] | None = None, threads: int = 2) -> int:
    if not DATA.is_file():
        print(f"skipped: the tiny-shakespeare file is not at {DATA}", file=sys.stderr)
        return 0
    import torch

    s = settings()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    prepared = charlm.prepare(_data(s), s.hyper)
    print(f"original (llama{', smoke' if s.suffix else ''}): {prepared.info['params']} parameters, "
          f"best val loss {prepared.val_loss:.4f} at step {prepared.info['best_step']} of "
          f"{prepared.info['steps']} (stopped: {prepared.info['stopped']}; "
          f"{prepared.info['train_seconds']:.0f} s of training)", flush=True)
    ratios = causal_lm.width_ratios(prepared, allowed=hidden_fits_heads(prepared))
    print(f"width ratio {ratios['half']} -> {ratios['half_params']} params (<= "
          f"{causal_lm.HALF:.1%} of {ratios['original']}); width ratio {ratios['eq']} -> "
          f"{ratios['eq_params']} params vs depth {ratios['depth']} (predicted)", flush=True)
    workdir = RESULTS / f"llama_lm{s.suffix}"
    workdir.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, stages in row_stages(ratios, s).items():
        def engine(name: str = name, stages: str = stages) -> dict[str, Any]:
            model = prepared.model
            if name in causal_lm.CONTROLS:
                d = s.distill
                lr = d["lr"] if name == "control" else prepared.info["final_lr"]
                model = charlm.continue_training(prepared, d["steps"], d["batch_size"], lr,
                                                 train_embeddings=d["train_embeddings"])
            return causal_lm.run_row(name, stages, model, prepared, workdir)

        builders[name] = engine
    builders[PEERS[0]] = lambda: llmcompressor_gptq(prepared, workdir, s, threads)
    builders[PEERS[1]] = lambda: torch_pruning_mlp(prepared, workdir)
    rows = run_rows(builders, lambda name: not only or name in only)
    finish(rows, only, prepared, ratios, s, started)
    return 0


def finish(rows: list[dict[str, Any]], only: list[str] | None, prepared: charlm.Prepared,
           ratios: dict[str, Any], s: Settings, started: float) -> None:
    """Time the rows side by side, relate them, write the JSON, the targets and the plot, print."""
    from benchmarks.rows import save_and_print
    from benchmarks.targets import report

    causal_lm.measure_latency(rows, prepared)
    path = RESULTS / f"llama_lm{s.suffix}.json"
    merged = rows
    if only and path.is_file():  # a partial re-run: relate the fresh rows to the kept ones
        kept = {r["name"]: r for r in json.loads(path.read_text())}
        kept.update({r["name"]: r for r in rows})
        merged = list(kept.values())
    causal_lm.relate(merged)
    save_and_print(path, rows, only, causal_lm.table)
    for r in rows:
        if "peer" in r:
            print(f"{r['name']}: {r['peer']}")
    rows = json.loads(path.read_text())
    result = report(targets(rows))
    (RESULTS / f"llama_lm{s.suffix}-targets.json").write_text(json.dumps(
        {"targets": result, "width_vs_depth": causal_lm.comparison(rows), "width_ratios": ratios,
         "distill": s.distill, "group_size": s.group, "gptq_samples": s.samples,
         "training": prepared.info, "cache": str(prepared.dir)}, indent=2))
    causal_lm.plot(rows, RESULTS / f"llama_lm{s.suffix}.png", prepared.info,
                   model="character-level Llama (GQA, gated MLP)")
    print(f"\nllama_lm{s.suffix}: {time.perf_counter() - started:.0f} s", flush=True)

