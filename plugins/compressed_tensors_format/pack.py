"""The engine's codes of one linear layer as compressed-tensors ``pack-quantized`` tensors.

``weight_packed`` holds the codes packed into int32 by compressed-tensors' own ``pack_to_int32``
(``32 / bits`` codes per word, offset by ``2**(bits-1)``), ``weight_scale`` the scales in the
weight's dtype (as llm-compressor writes them, and as transformers and vLLM load them: a
bfloat16 model's float32 scales are rounded to bfloat16), ``weight_shape`` the logical
``[out, in]``. FP8 E4M3 codes are ``float-quantized``: the float8 codes themselves as ``weight``
and ``weight_scale`` (``[out, 1]`` per channel, ``[1]`` per tensor). The codes are written as
the engine made them, never rounded again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from squeezelang.plugin import FP8_E4M3, SqueezeError

from .scheme import BITS, Scheme

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import QuantizedWeight


def scheme_of(weight: QuantizedWeight, module: str) -> Scheme:
    """The compressed-tensors scheme of a linear layer's weight ``[out, in]``; ``SqueezeError`` for
    what vLLM cannot run (another width, a group that does not divide the inputs)."""
    if weight.axis not in (0, None):
        raise SqueezeError(f"output format 'compressed-tensors': '{module}' is quantized along "
                           f"axis {weight.axis}; a linear layer's scales run along its outputs")
    if weight.code_format is not None:
        if weight.code_format != FP8_E4M3 or weight.group is not None:
            raise SqueezeError(f"output format 'compressed-tensors': '{module}' has "
                               f"{weight.code_format} codes"
                               + (f" in groups of {weight.group}" if weight.group else "")
                               + "; it writes FP8 E4M3 weights per channel or per tensor")
        return Scheme(8, "tensor" if weight.axis is None else "channel", type="float")
    if weight.bits not in BITS:
        raise SqueezeError(f"output format 'compressed-tensors': '{module}' has {weight.bits}-bit "
                           "codes; compressed-tensors (vLLM) packs 4- or 8-bit codes")
    if weight.group is None:
        return Scheme(weight.bits, "channel")
    inputs = int(weight.codes.shape[1])
    if inputs % weight.group:
        raise SqueezeError(f"output format 'compressed-tensors': group_size {weight.group} does not "
                           f"divide the {inputs} inputs of '{module}' (compressed-tensors and "
                           "vLLM need whole groups): choose a group_size that divides every "
                           "quantized layer's inputs, or exclude this layer from the stage")
    return Scheme(weight.bits, "group", weight.group)


def pack(weight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` (in ``dtype``) and ``weight_shape`` of a linear weight
    quantized along its output axis (``weight.axis`` 0, or None for one scale per tensor); for
    float8 codes, ``weight`` and ``weight_scale``."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out, inputs = (int(d) for d in weight.codes.shape)
    if weight.code_format is not None:  # float-quantized: the float8 codes are the weight
        shape = (1,) if weight.axis is None else (out, 1)
        return {"weight": weight.codes.contiguous(),
                "weight_scale": weight.scales.reshape(shape).to(dtype).contiguous()}
    if weight.group is not None:
        scales = weight.scales.reshape(out, -1)
    elif weight.axis is None:  # one scale: repeated per channel, the same values
        scales = weight.scales.reshape(1, 1).expand(out, 1)
    else:
        scales = weight.scales.reshape(out, 1)
    return {"weight_packed": pack_to_int32(weight.codes.to(torch.int8).contiguous(), weight.bits),
            "weight_scale": scales.to(dtype).contiguous(),
            "weight_shape": torch.tensor([out, inputs], dtype=torch.int64)}
