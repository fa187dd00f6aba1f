"""Write a ``ModelHandle`` as one GGUF file with gguf-py's ``GGUFWriter``.

Every tensor gets a type (``choose``): one the recipe quantized keeps its own codes (``Q8_0`` for
8-bit codes, ``Q4_0`` for 4-bit ones; ``quants``), one left in float gets the ``float_type`` or,
when ``type`` asks for a quantized type, gguf-py's reference quantizer; 1-D tensors (norms,
biases) and the position embedding stay float32, as llama.cpp's converter keeps them. Beside the
file, ``gguf.json`` says how each tensor was written (``codes``, ``reference``, ``float``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

from . import FP8
from .names import FLOAT_KEYS, arch_of, facts, limits, rope_parameters

if TYPE_CHECKING:
    import numpy as np

    from squeezelang.plugin import ModelHandle, QuantizedWeight

    from .names import Arch
    from .tensors import Slot

GGUF_FILE = "model.gguf"
MANIFEST = "gguf.json"
#: GGUF tensors kept in float32 whatever the type asked (llama.cpp's converter does the same).
FLOAT32_TENSORS = ("position_embd.weight",)


@dataclass
class Written:
    """What ``write_gguf`` stored: per tensor its type and source, and the counts a
    ``RuntimeCounts`` reports."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: int = 0
    nonzero: int = 0
    memory: int = 0
    scale_rounding: float = 0.0

    def add(self, name: str, qtype: str, source: str, shape: tuple[int, ...], data: np.ndarray,
            nonzero: int) -> None:
        import math

        from .tensors import ROPE_FREQS

        self.tensors[name] = {"type": qtype, "source": source, "shape": list(shape)}
        self.memory += int(data.nbytes)
        if name != ROPE_FREQS:  # rotary factors, not weights
            self.params += math.prod(shape)
            self.nonzero += nonzero


def refuse_changes(handle: ModelHandle) -> None:
    """Refuse what GGUF cannot hold: structural edits and clustered weights."""
    from squeezelang.plugin import AFTER_LOAD

    structural = sorted({r["technique"] for r in handle.edits if r.get("when") != AFTER_LOAD})
    if structural:
        raise SqueezeError(f"output format 'gguf' cannot hold a model changed by "
                           f"{', '.join(structural)} (its modules are not a standard "
                           "architecture llama.cpp runs)")
    for name, spec in sorted(handle.codecs.items()):
        if "cluster" in (spec or {}):
            raise SqueezeError(f"output format 'gguf' cannot hold tensor '{name}': it is "
                               "clustered (a codebook), which GGUF has no type for")


def _scale_map(q: QuantizedWeight) -> np.ndarray:
    """Each value's float32 scale, shaped like the weight (transformers' layout): the codec's own
    dequantization of codes that are all one."""
    import dataclasses

    import torch

    return dataclasses.replace(q, codes=torch.ones_like(q.codes)).dequantized().numpy()


#: The code widths each quantized type holds exactly.
HOLDS = {"Q8_0": (4, 8), "Q4_0": (4,)}


def choose(slot: Slot, quant: QuantizedWeight | None, options: dict[str, Any], ndim: int) -> str:
    """The GGUF type of one tensor (see the module docstring)."""
    asked = options["type"]
    if ndim < 2 or (slot.gguf in FLOAT32_TENSORS and quant is None):
        return "F32"
    if quant is None:
        return options["float_type"] if asked == "auto" else asked
    if asked not in ("auto", *HOLDS):
        return asked  # a float type: the dequantized codes
    if quant.code_format is not None:
        raise SqueezeError(f"tensor '{slot.hf}' holds {quant.code_format} codes: {FP8}")
    native = {8: "Q8_0", 4: "Q4_0"}.get(quant.bits) if asked == "auto" else asked
    if native is None or quant.bits not in HOLDS[native]:
        again = native == "Q4_0" and quant.bits == 8
        raise SqueezeError(
            f"tensor '{slot.hf}' holds {quant.bits}-bit codes: " + (
                "type \"Q4_0\" would quantize them a second time; use type \"auto\" or \"Q8_0\""
                if again else "GGUF's Q8_0 and Q4_0 hold 8- and 4-bit codes exactly, other "
                "widths are not written"))
    return native


def _encode(slot: Slot, values: Any, quant: QuantizedWeight | None, qtype: str,
            options: dict[str, Any], written: Written) -> tuple[np.ndarray, str]:
    """The stored array of one tensor and its type (``qtype``, or the float fallback of rows
    that do not fill blocks), recorded in ``written``."""
    from . import quants
    from .tensors import to_gguf

    if quant is not None and qtype in HOLDS:
        codes = to_gguf(slot, quant.codes.numpy(), offset=False)
        if codes.ndim != 2:
            raise SqueezeError(f"tensor '{slot.hf}': only 2-D weights are written as {qtype}")
        scales = quants.block_scales(slot.hf, to_gguf(slot, _scale_map(quant), offset=False))
        d, change = quants.half_scales(slot.hf, scales)
        written.scale_rounding = max(written.scale_rounding, change)
        data = quants.q8_0(codes, d) if qtype == "Q8_0" else quants.q4_0(codes, d)
        written.add(slot.gguf, qtype, "codes", codes.shape, data, quants.nonzero(data, qtype))
        return data, qtype
    array = to_gguf(slot, values.detach().float().cpu().numpy())
    if qtype in HOLDS and array.shape[-1] % quants.QK == 0:
        data = quants.reference(array, qtype)
        written.add(slot.gguf, qtype, "reference", array.shape, data, quants.nonzero(data, qtype))
        return data, qtype
    source = "float" if quant is None else "dequantized codes"
    if qtype in HOLDS:  # rows that do not fill blocks: convert_hf_to_gguf.py's fallback
        qtype, source = options["float_type"], f"float (rows of {array.shape[-1]}, not whole blocks)"
    data = _float(array, qtype)
    written.add(slot.gguf, qtype, source, array.shape, data, quants.nonzero(data, qtype))
    return data, qtype


def _float(array: np.ndarray, qtype: str) -> np.ndarray:
    import numpy as np

    from .quants import reference

    if qtype == "F32":
        return array.astype(np.float32)
    if qtype == "F16":
        return array.astype(np.float16)
    return reference(array, "BF16")


def _metadata(writer: Any, arch: Arch, values: dict[str, Any]) -> None:
    for key, fact in arch.keys:
        value = values.get(fact)
        if value is None:
            continue
        full = f"{arch.arch}.{key}"
        if key in FLOAT_KEYS:
            writer.add_float32(full, float(value))
        else:
            writer.add_uint32(full, int(value))
    rope = rope_parameters(values)
    if rope.get("rope_type") == "linear":
        writer.add_string(f"{arch.arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch.arch}.rope.scaling.factor", float(rope["factor"]))


def _rope_freqs(values: dict[str, Any], head_dim: int) -> np.ndarray | None:
    """Llama 3's frequency factors (``rope_type = "llama3"``) as llama.cpp's ``rope_freqs``
    tensor, computed as ``convert_hf_to_gguf.py`` does; ``None`` for other rope types."""
    import math

    import numpy as np

    rope = rope_parameters(values)
    if rope.get("rope_type") != "llama3":
        return None
    base, factor = float(rope.get("rope_theta", 10000.0)), float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _file_type(types: set[str]) -> int:
    import gguf

    for name, ftype in (("Q4_0", "MOSTLY_Q4_0"), ("Q8_0", "MOSTLY_Q8_0"), ("BF16", "MOSTLY_BF16"),
                        ("F16", "MOSTLY_F16")):
        if name in types:
            return int(gguf.LlamaFileType[ftype])
    return int(gguf.LlamaFileType.ALL_F32)


def _standard(handle: ModelHandle) -> Any:
    """A model with the standard modules of ``handle``'s architecture: itself, or, when stages
    swapped in runtime-only modules (int8 kernels), a plain one on the meta device."""
    from squeezelang.plugin import from_config

    return from_config(handle.model.config, handle.task, meta=True) if handle.edits else handle.model


def _name(handle: ModelHandle, config: dict[str, Any]) -> str:
    """``general.name``: the source directory's name. Not the model type: llama.cpp gives
    vocabularies of models named like "phi3" special-token rules that expect Phi-3's tokens."""
    source = handle.source_dir or config.get("_name_or_path")
    return Path(str(source)).name if source else "model"


def _checked(handle: ModelHandle) -> tuple[Arch, dict[str, Any], dict[str, int]]:
    """The model's ``Arch``, full config (every default filled in, unlike ``config.json``) and
    sizes; ``SqueezeError`` for what llama.cpp would not run as transformers does."""
    from squeezelang.plugin import sizes

    refuse_changes(handle)
    if handle.tokenizer is None:
        raise SqueezeError("output format 'gguf' needs the model's tokenizer (GGUF holds it)")
    config = handle.model.config.to_dict()
    arch = arch_of(config)
    dims = sizes(handle.model.config) if arch is not None else {}
    problems = limits(config, dims.get("layers"))
    if arch is None or problems:
        raise SqueezeError("output format 'gguf' cannot write this model: " + "; ".join(problems))
    return arch, config, dims


def write_gguf(handle: ModelHandle, directory: Path, options: dict[str, Any]) -> Written:
    """Write ``handle`` as ``directory/model.gguf``; return what was written."""
    import gguf

    from squeezelang.plugin import quantized_weights

    from .tensors import ROPE_FREQS, slots
    from .tokenizer import add_tokenizer

    arch, config, dims = _checked(handle)
    values = facts(config, dims)
    quantized = quantized_weights(handle)
    state = handle.model.state_dict()
    writer = gguf.GGUFWriter(str(Path(directory) / GGUF_FILE), arch.arch)
    writer.add_name(_name(handle, config))
    _metadata(writer, arch, values)
    add_tokenizer(writer, handle.tokenizer, int(values["vocab_size"]))
    written = Written()
    for slot in slots(_standard(handle), arch, dims, state):
        quant = next((quantized[n] for n in (slot.hf, *slot.aliases) if n in quantized), None)
        tensor = state[slot.hf]
        data, qtype = _encode(slot, tensor, quant, choose(slot, quant, options, tensor.dim()),
                              options, written)
        writer.add_tensor(slot.gguf, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    freqs = _rope_freqs(values, dims["head_dim"])
    if freqs is not None:
        import numpy as np

        writer.add_tensor(ROPE_FREQS, freqs)
        written.add(ROPE_FREQS, "F32", "float", freqs.shape, freqs, int(np.count_nonzero(freqs)))
    types = {t["type"] for t in written.tensors.values()}
    writer.add_file_type(_file_type(types))
    if types & {"Q8_0", "Q4_0"}:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    _manifest(Path(directory) / MANIFEST, written, options)
    return written


def _manifest(path: Path, written: Written, options: dict[str, Any]) -> None:
    doc = {"file": GGUF_FILE, "options": dict(options), "params": written.params,
           "nonzero": written.nonzero, "tensor_bytes": written.memory,
           "scale_rounding_max_relative": written.scale_rounding, "tensors": written.tensors}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
