"""Where each tensor of a transformers model goes in a GGUF file, and how its layout changes.

Names come from gguf-py's ``TensorNameMap`` (llama.cpp's own table of transformers names); the
layout changes from ``names.Arch``: Conv1D weights transposed to ``[out, in]``, the query and key
rows of llama.cpp's ``llama`` architecture permuted as ``convert_hf_to_gguf.py``'s
``LlamaModel.permute`` does, Gemma's norms stored as ``1 + w``. ``to_gguf`` and ``from_gguf``
apply and undo them (the second for the torch fallback that reads a GGUF back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

if TYPE_CHECKING:
    import numpy as np

    from .names import Arch


#: Llama 3's rotary frequency factors: a GGUF tensor that is no weight of the model.
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Slot:
    """One stored tensor: its state-dict name (``aliases``: other names of the same tensor, a
    tied head), its GGUF name, and the layout change (``heads``: rope permutation over so many
    heads, ``offset``: added to a norm weight)."""

    hf: str
    gguf: str
    transposed: bool = False
    heads: int = 0
    offset: float = 0.0
    aliases: tuple[str, ...] = ()


def _groups(state: dict[str, Any]) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied weights), in state-dict order."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def name_map(arch: Arch, layers: int) -> Any:
    """gguf-py's map of transformers tensor names to llama.cpp's for ``arch``."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch.arch], layers)


def slots(model: Any, arch: Arch, sizes: dict[str, int],
          state: dict[str, Any] | None = None) -> list[Slot]:
    """Every tensor of ``state`` (default: ``model``'s) that the GGUF stores, in state-dict order;
    ``model`` has the standard modules (it says which weights are ``Conv1D``; a model whose
    layers run int8 kernels passes a plain copy, on the meta device). ``SqueezeError`` names a
    tensor llama.cpp has no place for."""
    from squeezelang.plugin import get_module, kind_of

    names = name_map(arch, sizes["layers"])
    out = []
    for group in _groups(model.state_dict() if state is None else state):
        if arch.skip and all(n.endswith(arch.skip) for n in group):
            continue
        found = [(n, names.get_name(n, try_suffixes=(".weight", ".bias"))) for n in group]
        mapped = [(n, g) for n, g in found if g is not None]
        if not mapped:
            raise SqueezeError(f"tensor '{group[0]}' has no place in llama.cpp's '{arch.arch}' "
                               "architecture (is the model changed beyond its standard layout?)")
        hf, gguf_name = mapped[0]
        if any(g == "output.weight" for _, g in mapped[1:]) and gguf_name != "token_embd.weight":
            raise SqueezeError(f"tensor '{hf}' is tied to the output layer but is not the token "
                               "embedding")
        module = get_module(model, hf.rsplit(".", 1)[0])
        transposed = kind_of(module) == "Conv1D" and hf.endswith(".weight")
        heads = 0
        if arch.rope_permute and ".attn_q." in gguf_name:
            heads = sizes["heads"]
        elif arch.rope_permute and ".attn_k." in gguf_name:
            heads = sizes["kv_heads"]
        offset = arch.norm_offset if hf.endswith("norm.weight") else 0.0
        out.append(Slot(hf, gguf_name, transposed, heads, offset, tuple(n for n in group if n != hf)))
    return out


def rope_order(rows: int, heads: int) -> np.ndarray:
    """Row ``i`` of the GGUF tensor is row ``order[i]`` of transformers' (``LlamaModel.permute``)."""
    import numpy as np

    if rows % (2 * heads):
        raise SqueezeError(f"{rows} rows cannot be split into {heads} rotary heads")
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def to_gguf(slot: Slot, values: np.ndarray, offset: bool = True) -> np.ndarray:
    """``values`` (transformers' layout) in the GGUF's layout; ``offset=False`` for integer codes
    and scale maps (norms, the only tensors offset, are never quantized)."""
    import numpy as np

    if slot.transposed:
        values = values.T
    if slot.heads:
        values = values[rope_order(values.shape[0], slot.heads)]
    if offset and slot.offset:
        values = values + np.asarray(slot.offset, dtype=values.dtype)
    return np.ascontiguousarray(values)


def from_gguf(slot: Slot, values: np.ndarray) -> np.ndarray:
    """``to_gguf`` undone: GGUF values back in transformers' layout."""
    import numpy as np

    if slot.offset:
        values = values - np.asarray(slot.offset, dtype=values.dtype)
    if slot.heads:
        values = values[np.argsort(rope_order(values.shape[0], slot.heads))]
    if slot.transposed:
        values = values.T
    return np.ascontiguousarray(values)
