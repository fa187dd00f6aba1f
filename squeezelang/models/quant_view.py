"""The integer codes and scales of a model's quantized weights, for formats that store them natively.

The in-memory model holds each quantized weight *dequantized* (``code * scale``); its codec
(``ModelHandle.codecs``) says how it was quantized. ``quantized_weights`` recovers the exact codes
and scales from those values the same way ``models.codec.encode`` does (and checks the round trip),
so an output format for another runtime (ONNX ``MatMulNBits``, GGUF ``Q4_0``, compressed-tensors)
writes the engine's own codes rather than quantizing the weights a second time. A format with no
float8 type refuses a weight whose ``code_format`` is set rather than read its codes as integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle


@dataclass
class QuantizedWeight:
    """One quantized weight: ``codes`` (the weight's shape; zeros where it was pruned: int8 in
    ``-qmax .. qmax``, or ``torch.float8_e4m3fn`` when ``code_format`` is ``"fp8_e4m3"``, the
    codec's ``"format"``; None for integer codes) and float32 ``scales``: ``[out]`` per output channel (``axis``), ``[out,
    n_groups]`` with ``group`` (runs of ``group`` inputs, the last possibly shorter), ``[1]`` for
    one scale per tensor (``axis`` None). ``weight == codes * scales`` broadcast that way."""

    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    axis: int | None
    group: int | None
    sparse: bool = False
    code_format: str | None = None

    def dequantized(self) -> torch.Tensor:
        """``codes * scales`` in float32, the weight's shape."""
        from squeezelang.models.codec import dequantize

        return dequantize(self.codes, self.scales.reshape(-1), self.axis, self.group)


def quantized_weights(handle: ModelHandle) -> dict[str, QuantizedWeight]:
    """Every quantized weight of ``handle`` by state-dict name (tied names once, under the name its
    codec is recorded with); ``SqueezeError`` if a weight is off its grid."""
    from squeezelang.models.codec import _codes, _grid_scales, dequantize, normalize

    state = handle.model.state_dict()
    out: dict[str, QuantizedWeight] = {}
    for name, raw in sorted(handle.codecs.items()):
        spec: dict[str, Any] | None = normalize(raw)
        quant = (spec or {}).get("quant")
        if not quant or name not in state:
            continue
        tensor = state[name].detach().cpu()
        bits, axis, group = quant["bits"], quant["axis"], quant.get("group")
        code_format = quant.get("format")
        wide = tensor.float()
        scales = _grid_scales(wide, bits, axis, group, code_format)
        codes = _codes(wide, scales, bits, axis, group, code_format)
        if not bool((dequantize(codes, scales, axis, group).to(tensor.dtype) == tensor).all()):
            raise SqueezeError(f"tensor '{name}' is not on its {bits}-bit quantization grid "
                               "(was it changed after quantizing?)")
        if group is not None:
            scales = scales.reshape(int(tensor.shape[axis]), -1)
        elif axis is None:
            scales = scales.reshape(1)
        out[name] = QuantizedWeight(name, codes, scales.float(), bits, axis, group,
                                    bool(spec.get("sparse") or spec.get("nm")), code_format)
    return out
