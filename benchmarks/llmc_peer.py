"""llm-compressor's GPTQ or AWQ ``oneshot`` on a character LM, run in an interpreter that has it.

llm-compressor pins transformers to an older release than the project's, so ``benchmarks.llama_lm``
runs this module as a child process in the interpreter that has llm-compressor (see
``llama_lm.llmc_python``) and reads the one JSON line it prints::

    python -m benchmarks.llmc_peer MODEL TRAIN VAL OUT --group-size 128 --samples 128 --context 128 \
        [--method gptq|awq]

What it does, as llm-compressor's documentation shows for a W4A16 checkpoint:
``oneshot(model, dataset, recipe=GPTQModifier(targets="Linear", scheme="W4A16",
ignore=["lm_head"]))`` on the first ``samples`` windows of ``TRAIN`` (the engine's GPTQ
calibrates on the same windows), then ``save_pretrained(OUT, save_compressed=True)``
(compressed-tensors ``pack-quantized``). At another group size than the preset's 128 the scheme is
W4A16's (symmetric 4-bit integer weights, group strategy, activations untouched) with that
``group_size``. ``--method awq`` runs ``AWQModifier`` with the same weight scheme (symmetric, like
the engine's codes, so the two artifacts have the same size) instead of ``GPTQModifier``.
``--method smoothquant`` runs ``SmoothQuantModifier`` then a static W8A8 ``QuantizationModifier``
(the engine's ``quantize { scheme = "w8a8" }``: int8 weights per channel, int8 input activations
on one calibrated scale per tensor); reloaded, compressed-tensors quantizes the activations. The model and tokenizer come from the local directory; nothing is downloaded.

Then it loads ``OUT`` back with plain transformers (which decompresses it through
compressed-tensors) and scores ``VAL`` with ``charlm.mean_nll``: the same windows and tokens as
the engine's ``perplexity`` on ``val.jsonl``. Printed: ``version``, ``params`` (the weights of the
model it quantized, tied ones once: the engine's count), ``val_loss``, ``seconds`` (``oneshot``
and the save) and ``note``; the caller measures the size itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks import charlm


#: SmoothQuant's migration strength of the ``smoothquant`` peer (the engine's ``w8a8`` default).
SMOOTHING = 0.5
#: The ``smoothquant`` peer's scheme, as the engine's ``w8a8``: int8 weights per output channel,
#: int8 input activations with one static (calibrated) asymmetric scale per tensor.
W8A8_STATIC = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
               "input_activations": {"num_bits": 8, "type": "int", "symmetric": False,
                                     "strategy": "tensor", "dynamic": False}}


def recipe(group_size: int, method: str = "gptq") -> Any:
    """GPTQ (or AWQ) at W4A16: the preset at group 128, the same fields at another group size;
    ``smoothquant``: SmoothQuant then static W8A8 (``W8A8_STATIC``), the engine's ``w8a8``."""
    if method == "smoothquant":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=SMOOTHING),
                QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"],
                                                                **W8A8_STATIC}},
                                     ignore=["lm_head"])]
    from llmcompressor.modifiers.quantization import GPTQModifier

    modifier: Any = GPTQModifier
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        modifier = AWQModifier
    if group_size == 128 and method == "gptq":
        return modifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size}
    return modifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                    ignore=["lm_head"])


#: What each ``--method`` ran, for the printed note.
NOTES: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llmc_peer", description=__doc__)
    for name in ("model", "train", "val", "out"):
        parser.add_argument(name)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=("gptq", "awq", "smoothquant"), default="gptq")
    args = parser.parse_args(argv)
    group = f"group {args.group_size}, lm_head ignored"
    NOTES.update(gptq=f"GPTQModifier W4A16 ({group})", awq=f"AWQModifier W4A16 ({group})",
                 smoothquant=f"SmoothQuantModifier (strength {SMOOTHING}) + QuantizationModifier "
                             "W8A8 (int8 weights per channel, static per-tensor int8 input "
                             "activations; lm_head ignored)")

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                 dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    texts = [t for t in charlm.read_jsonl(Path(args.train)) if t.strip()][:args.samples]
    encoded = tokenizer(texts, truncation=True, max_length=args.context)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"],
                                 "attention_mask": encoded["attention_mask"]})
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe(args.group_size, args.method),
            max_seq_length=args.context, num_calibration_samples=len(texts))
    model.save_pretrained(args.out, save_compressed=True)
    seconds = time.perf_counter() - started
    tokenizer.save_pretrained(args.out)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, local_files_only=True)
    windows = [list(ids) for ids in tokenizer(charlm.read_jsonl(Path(args.val)))["input_ids"]]
    val_loss = charlm.mean_nll(reloaded, windows)
    print(json.dumps({
        "version": version("llmcompressor"), "params": params, "val_loss": val_loss,
        "seconds": seconds,
        "note": f"llm-compressor {version('llmcompressor')} oneshot {NOTES[args.method]} "
                f"on {len(texts)} train windows, "
                f"save_compressed (compressed-tensors {version('compressed-tensors')}); reloaded "
                f"with transformers {version('transformers')}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
