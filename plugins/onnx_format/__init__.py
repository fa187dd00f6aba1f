"""The ``onnx`` output format: the compressed model as an ONNX graph run by ONNX Runtime on the CPU.

``save`` traces a float32 copy of the model (``export``), then replaces the layers whose weights
are quantized by ONNX Runtime's integer kernels fed with the engine's own codes and scales
(``integer``): 8-bit codes per channel or per tensor run as ``MatMulInteger`` on dynamically
quantized activations (a W8A8 layer's, ``quantize`` scheme ``w8a8``, as ``MatMulIntegerToFloat``
on activations quantized with its static scale: ``static``), group-wise 4- and 8-bit codes as
``MatMulNBits``; quantized embeddings are gathered from their codes. ``load`` runs the saved
graph in an ``onnxruntime.InferenceSession`` (``runtime``), so every metric of the run measures
what ONNX Runtime computes.

Importing this module imports neither torch nor onnx (``squeeze check`` stays light); the modules
that need them are imported inside ``save`` and ``load``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import OutputFormat, hookimpl

from squeezelang_plugins.onnx_format.integer import WIDTHS, block_size_problem

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle

#: The ``model_type`` values whose export is tested (tests/formats/test_onnx_format.py).
FAMILIES = ("bert", "roberta", "xlm-roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3",
            "gemma2", "gemma3_text")


#: Why FP8 weights (``quantize`` scheme "fp8") are refused.
FP8 = ("FP8 (E4M3) weights: ONNX Runtime's CPU kernels have no float8 matrix product, and "
       "dequantized they would be float32, four times larger; use format = \"compressed-tensors\" "
       "(vLLM) or \"squeeze\"")


def stage_problem(tags: frozenset[str]) -> str | None:
    """Why the graph cannot hold what a stage stores (``Technique.stores_for`` tags), or None."""
    if "clustered" in tags:
        return ("clustered weights (codebooks) have no ONNX Runtime kernel, and stored dense they "
                "would be no smaller; quantize instead, or use format = \"squeeze\"")
    if "fp8" in tags:
        return FP8
    widths = sorted(int(t.split(":", 1)[1]) for t in tags if t.startswith("bits:"))
    other = [w for w in widths if w not in WIDTHS]
    if other:
        return (f"ONNX Runtime's integer kernels (MatMulInteger, MatMulNBits) take 4- and 8-bit "
                f"codes, not {', '.join(map(str, other))}-bit ones")
    for tag in sorted(tags):
        if tag.startswith("group:"):
            problem = block_size_problem(int(tag.split(":", 1)[1]))
            if problem:
                return problem
    return None


class OnnxFormat(OutputFormat):
    name = "onnx"
    description = (
        "model.onnx for ONNX Runtime (CPU), with config.json and the tokenizer: "
        "InferenceSession(dir/model.onnx) + AutoTokenizer.from_pretrained(dir). Inputs input_ids, "
        "attention_mask (and token_type_ids when the tokenizer makes them), dynamic batch and "
        "sequence (right padding honoured); outputs last_hidden_state (embedding models) or "
        "logits and last_hidden_state (the final hidden state). Quantized weights keep their "
        "codes: 8-bit ones run as MatMulInteger on dynamically quantized int8 activations "
        "(W8A8 layers, quantize scheme \"w8a8\": MatMulIntegerToFloat on activations quantized "
        "with their static scales), "
        "group-wise 4/8-bit ones as MatMulNBits (groups: powers of two from 16), embeddings are "
        "gathered from their codes; an encoder's self-attention runs as one Attention kernel "
        "(QAttention on 8-bit codes) when that computes what the plain graph does. Pruned zeros (unstructured or N:M) are stored dense; pruned, "
        "factorized and shared layers are simply a smaller graph. Clustered weights, FP8 weights "
        "and other widths are refused. Float weights are float32 (a half-precision model is "
        "widened).")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "opset": {"type": "integer", "minimum": 17, "maximum": 21, "default": 18,
                      "description": "ONNX opset of the graph's standard operators."},
            "activations": {"type": "string", "enum": ["dynamic", "float"], "default": "dynamic",
                            "description": "\"dynamic\": quantized layers quantize their inputs "
                                           "to 8 bits per call (MatMulInteger; MatMulNBits "
                                           "accuracy level 4), fastest on CPU; \"float\": their "
                                           "codes are dequantized and multiplied in float32 "
                                           "(more exact, slower). Layers of quantize scheme "
                                           "\"w8a8\" always quantize their inputs with their "
                                           "static scales, as they do in torch."},
            "fuse_attention": {"type": "boolean", "default": True,
                               "description": "Encoders (BERT, RoBERTa, XLM-R layouts): each "
                                              "self-attention becomes one ONNX Runtime Attention "
                                              "kernel (QAttention on 8-bit codes), kept only when "
                                              "it computes what the plain graph does; false: "
                                              "the plain graph."},
            "float_activations": {"type": "array", "items": {"type": "string"}, "default": [],
                                  "description": "Globs of module names whose quantized weights "
                                                 "multiply float activations even with "
                                                 "activations = \"dynamic\" (layers whose "
                                                 "inputs have outliers, such as the MLP's output "
                                                 "projection): their codes stay stored as they "
                                                 "are, only the activations are not rounded "
                                                 "(w8a8 layers excepted)."},
        },
    }
    model_files = ("model.onnx", "model.onnx.data")
    runtime = "onnxruntime"
    example = 'output "out" { format = "onnx", activations = "dynamic" }'

    def check(self, options: dict[str, Any], stages: list[tuple[str, frozenset[str]]], task: str,
              config: dict[str, Any] | None) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        family = (config or {}).get("model_type")
        if config is not None and family not in FAMILIES:
            problems.append((None, f"it is tested on {', '.join(FAMILIES)} models, not "
                                   f"model_type '{family}'"))
        for stage, tags in stages:
            problem = stage_problem(tags)
            if problem:
                problems.append((stage, problem))
        return problems

    def save(self, handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
        from squeezelang_plugins.onnx_format.artifact import save

        return save(handle, directory, {**self.defaults(), **options})

    def load(self, directory: Path, task: str, options: dict[str, Any],
             threads: int) -> ModelHandle:
        from squeezelang.plugin import ModelHandle, load_tokenizer

        from squeezelang_plugins.onnx_format.artifact import MODEL_FILE, needs_runtime

        needs_runtime()
        from squeezelang_plugins.onnx_format.runtime import load_runtime_model

        directory = Path(directory)
        model = load_runtime_model(directory / MODEL_FILE, threads)
        return ModelHandle(model=model, tokenizer=load_tokenizer(directory), task=task,
                           source_dir=directory)


@hookimpl
def register_output_formats(registry: Any) -> None:
    registry.add(OnnxFormat())
