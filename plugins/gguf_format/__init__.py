"""The ``gguf`` output format: one GGUF file that llama.cpp runs, with the recipe's own codes.

A weight the recipe quantized is written from its exact integer codes (``quantized_weights``):
8-bit codes as ``Q8_0``, 4-bit codes as ``Q4_0``, the float32 scale rounded to the block's float16
scale (the only loss; ``gguf.json`` records the largest relative change). Weights left in float
are written as ``float_type``, or quantized by gguf-py's reference quantizer (llama.cpp's own
arithmetic) when ``type`` asks for ``Q8_0``/``Q4_0`` (the "peer" path: the same model as
llama.cpp's own quantization would give). K-quants are not offered: their sub-block scales are
6- or 8-bit integers times a float16 super-scale (Q4_K and Q5_K also an offset), which
squeezelang's float32 scales do not fit exactly, so the codes would be quantized a second time.

``load`` runs the file in llama.cpp (the optional ``llama`` extra: llama-cpp-python), whose
quantized matrix products round their activations to 8 bits: its logits differ from the in-memory
model's by about as much as int8 weights do (``tests/formats/test_gguf_format.py`` bounds it).
llama.cpp's repacking of quantized weights (AMX, interleaved AVX layouts) is used where a child
process survives it (``runtime.probe_repack``); otherwise the runtime reads "llama.cpp (weights
not repacked)". Without llama-cpp-python the GGUF is read back, dequantized and run in torch, and
the report's runtime says so. Importing this package imports neither torch nor gguf (``squeeze
check`` stays light).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import OutputFormat, SqueezeError, hookimpl, installed

from .names import arch_of, limits

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle

TYPES = ("auto", "Q8_0", "Q4_0", "F16", "BF16", "F32")
FLOAT_TYPES = ("F16", "BF16", "F32")
#: What a stage may store that GGUF cannot hold (``Technique.stores_for`` tags).
REFUSED = {"low-rank": "factorized (low-rank) layers are not an architecture llama.cpp runs",
           "clustered": "clustered weights (codebooks) have no GGUF type",
           "shared-layers": "layers shared between blocks are not an architecture llama.cpp runs",
           "static-activations": "int8 activations with static scales (scheme \"w8a8\") have no "
                                 "GGUF form (use format = \"onnx\" or \"squeeze\")"}
#: Why FP8 weights (``quantize`` scheme "fp8") take a float type.
FP8 = ("FP8 (E4M3) codes have no GGUF type, and Q8_0/Q4_0 would quantize the weights a second "
       "time: write them dequantized with type = \"F32\" (exact), \"F16\" or \"BF16\", or use "
       "format = \"compressed-tensors\"")
#: Each type and the code widths it holds (a float type: any, as dequantized values).
EXACT_WIDTHS = {"auto": (4, 8), "Q8_0": (4, 8), "Q4_0": (4,), "F32": (2, 3, 4, 5, 6, 7, 8),
         "F16": (2, 3, 4, 5, 6, 7, 8), "BF16": (2, 3, 4, 5, 6, 7, 8)}


def _widths(stored: frozenset[str]) -> set[int]:
    widths = {int(t.split(":", 1)[1]) for t in stored if t.startswith("bits:")}
    return widths | ({8} if "int8" in stored else set()) | ({4} if "int4" in stored else set())


def _stage_refusals(options: dict[str, Any], stored: frozenset[str]) -> list[str]:
    """Why one stage's output cannot be written with these options (empty: it can)."""
    reasons = [REFUSED[t] for t in sorted(stored) if t in REFUSED]
    widths = _widths(stored)
    kind = options["type"]
    native = kind in ("auto", "Q8_0", "Q4_0")
    bad = sorted(w for w in widths if w not in EXACT_WIDTHS[kind])
    if bad and kind == "Q4_0" and 8 in bad:
        reasons.append("type \"Q4_0\" would quantize its 8-bit codes a second time (use type "
                       "\"auto\" or \"Q8_0\")")
    elif bad:
        reasons.append(f"{'/'.join(map(str, bad))}-bit codes: GGUF's Q8_0 and Q4_0 hold 8- and "
                       "4-bit codes exactly, other widths are not written (use bits = [4, 8])")
    if native and "fp8" in stored:
        reasons.append(FP8)
    groups = [int(t.split(":", 1)[1]) for t in stored if t.startswith("group:")]
    if native and widths and any(g % 32 for g in groups):
        reasons.append(f"group_size {groups[0]} does not fill GGUF's blocks of 32 values (use a "
                       "multiple of 32)")
    return reasons


def _shape_refusals(config: dict[str, Any] | None) -> list[str]:
    """A hidden size that is not whole 32-blocks: the rows of nearly every quantized tensor (the
    embeddings and every projection reading the hidden state). An MLP width that is not is
    found when saving, naming the tensor: ``check`` cannot see which layers a stage selects."""
    hidden = next((v for k, v in (config or {}).items() if k in ("hidden_size", "n_embd")), None)
    if not isinstance(hidden, int) or hidden % 32 == 0:
        return []
    return [f"Q8_0/Q4_0 blocks hold 32 values of a row and this model's hidden size is {hidden}: "
            "choose type = \"F32\", \"F16\" or \"BF16\""]


class GgufFormat(OutputFormat):
    name = "gguf"
    description = (
        "One GGUF file (model.gguf) for llama.cpp, for GPT-2 and Llama-family decoders "
        "(llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3). type \"auto\" writes weights the "
        "recipe quantized from their own codes, exactly: 8-bit as Q8_0, 4-bit as Q4_0 (group "
        "sizes that are multiples of 32; the scale rounded to float16, the only loss), and the "
        "rest as float_type. type \"Q8_0\"/\"Q4_0\" also quantizes the weights the recipe left in "
        "float with llama.cpp's reference quantizer (gguf-py); \"F16\", \"BF16\", \"F32\" write "
        "every weight in float (dequantized codes); FP8 weights, which have no GGUF type, are "
        "written only so (F32: exactly). Norms and biases stay float32. Pruned zeros are stored "
        "dense. The tokenizer and config.json are copied beside it; gguf.json says "
        "how each tensor was written. Measured in llama.cpp (the 'llama' extra), or, without "
        "it, dequantized and run in torch (the report's runtime says which).")
    schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": list(TYPES), "default": "auto",
                     "description": "\"auto\": quantized weights as Q8_0/Q4_0 from their codes, "
                                    "the others as float_type; \"Q8_0\"/\"Q4_0\": float weights "
                                    "quantized by llama.cpp's reference quantizer too; \"F16\", "
                                    "\"BF16\", \"F32\": every weight in float."},
            "float_type": {"type": "string", "enum": list(FLOAT_TYPES), "default": "F16",
                           "description": "The type of 2-D weights left in float (type \"auto\"), "
                                          "and of those whose rows do not fill blocks of 32."},
        },
    }
    model_files = ("model.gguf",)
    runtime = "llama.cpp"
    example = 'output "out" { format = "gguf", type = "auto" }'

    def check(self, options: dict[str, Any], stages: list[tuple[str, frozenset[str]]], task: str,
              config: dict[str, Any] | None) -> list[tuple[str | None, str]]:
        if task != "causal-lm":
            return [(None, f"GGUF holds causal-lm decoders for llama.cpp, not a '{task}' model")]
        out: list[tuple[str | None, str]] = []
        if config is not None:
            if arch_of(config) is None:
                return [(None, limits(config)[0])]
            out += [(None, reason) for reason in limits(config)]
        shapes = _shape_refusals(config) if options["type"] in ("auto", "Q8_0", "Q4_0") else []
        for stage, stored in stages:
            out += [(stage, reason) for reason in _stage_refusals(options, stored)]
            if _widths(stored) and shapes:
                out += [(stage, shapes[0])]
        return out

    def save(self, handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
        self.require_extra("gguf", "gguf")
        from .writer import GGUF_FILE, MANIFEST, write_gguf

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        options = {**self.defaults(), **options}
        if handle.task != "causal-lm":
            raise SqueezeError(f"output format 'gguf' holds causal-lm decoders, not a "
                               f"'{handle.task}' model")
        before = set(_files(directory))
        write_gguf(handle, directory, options)
        handle.model.config.save_pretrained(str(directory))
        if handle.tokenizer is not None:
            handle.tokenizer.save_pretrained(str(directory))
        return sorted(set(_files(directory)) - before | {GGUF_FILE, MANIFEST, "config.json"})

    def load(self, directory: Path, task: str, options: dict[str, Any], threads: int) -> ModelHandle:
        self.require_extra("gguf", "gguf")
        from squeezelang.plugin import ModelHandle, load_tokenizer

        from .runtime import dequantized_model, llama_cpp_model
        from .writer import GGUF_FILE

        directory = Path(directory)
        path = directory / GGUF_FILE
        if installed("llama_cpp"):
            model: Any = llama_cpp_model(directory, path, threads)
        else:
            model = dequantized_model(directory, path, task)
        return ModelHandle(model=model, tokenizer=load_tokenizer(directory), task=task,
                           source_dir=directory)


def _files(directory: Path) -> list[str]:
    return [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]


@hookimpl
def register_output_formats(registry: Any) -> None:
    registry.add(GgufFormat())
