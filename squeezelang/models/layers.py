"""Torch modules that techniques put into a model: a low-rank linear layer, int8 linear layers
(dynamic int8 kernels, static W8A8).

Imported only from inside technique methods (it imports torch at module level).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from squeezelang.models import codec


class LowRankLinear(nn.Module):
    """``second(first(x))``: a ``[out, in]`` linear map factored through ``rank`` dimensions.

    Its state dict (``first.weight`` ``[rank, in]``, ``second.weight`` ``[out, rank]``,
    ``second.bias``) is what ``factorize`` saves and what ``rebuild_`` re-creates empty.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, first: torch.Tensor, second: torch.Tensor,
                     bias: torch.Tensor | None) -> LowRankLinear:
        rank, in_features = first.shape
        module = cls(in_features, second.shape[0], rank, bias is not None).to(first.dtype)
        with torch.no_grad():
            module.first.weight.copy_(first)
            module.second.weight.copy_(second)
            if bias is not None:
                module.second.bias.copy_(bias)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a ``Linear`` or a GPT-2 ``Conv1D`` (``[in, out]`` stored)."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


@functools.lru_cache(maxsize=1)
def reduced_activation_range() -> bool:
    """Whether activations must be quantized to 7 bits (torch's default for its x86 kernels).

    Without VNNI, the x86 int8 kernel sums pairs of u8×s8 products in int16 and would saturate
    with full-range activations; with VNNI it accumulates in int32, and the full 8-bit range is
    markedly more accurate (MiniLM sentence embeddings: cosine 0.99 instead of 0.97 to float).
    """
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


class Int8DynamicLinear(nn.Module):
    """A linear layer running torch's dynamic int8 kernel (int8 weights, activations quantized per call).

    Weights are symmetric per output channel on ``codec``'s 8-bit grid. Its state dict is the
    standard one of the layer it replaced — ``weight`` (dequantized float32, ``[in, out]`` again for
    a ``Conv1D``) and ``bias`` — so the model saves with the ``{"quant": …}`` codec like a
    weight-only quantized one; loading such a state dict re-packs the weights.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False,
                 per_tensor: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.per_tensor = per_tensor
        self.out_features, self.in_features = weight.shape
        self._pack(weight, bias)

    @classmethod
    def from_linear(cls, module: nn.Module, per_tensor: bool = False) -> Int8DynamicLinear:
        """The int8 version of a ``Linear`` or ``Conv1D`` (its weights rounded to the int8 grid)."""
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return cls(linear_weight(module), bias, transposed=type(module).__name__ == "Conv1D",
                   per_tensor=per_tensor)

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        axis = None if self.per_tensor else 0
        weight = codec.quantize_weight(weight.detach().float().contiguous(), 8, axis)
        scales = codec.scales_of(weight, 8, axis).expand(weight.shape[0]).contiguous()
        codes = torch.round(weight / scales[:, None]).to(torch.int8)
        with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                codes, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(
            qweight, None if bias is None else bias.detach().float().contiguous())

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dequantized ``[out, in]`` weight and the bias."""
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize().float(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, reduced_activation_range())

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        weight, bias = self.unpacked()
        destination[prefix + "weight"] = weight.t().contiguous() if self.transposed else weight
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        weight = state_dict[prefix + "weight"]
        self._pack(weight.t() if self.transposed else weight, state_dict.get(prefix + "bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic "
                f"per {'tensor' if self.per_tensor else 'channel'}")


#: Levels of ``W8A8Linear``'s activation codes: unsigned 8-bit, ``0 .. 255``.
ACTIVATION_QMAX = 255


def activation_grid(low: float, high: float) -> tuple[float, int]:
    """The static uint8 grid of activations in ``[low, high]``: ``(scale, zero point)``.

    The range is widened to hold zero (so that zero, padding and ReLU zeros, are exact), as ONNX
    Runtime's ``DynamicQuantizeLinear`` does per call: ``scale = (high - low) / 255``, zero point
    ``round(-low / scale)``. An all-zero range gets scale 1.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = float(torch.tensor((high - low) / ACTIVATION_QMAX, dtype=torch.float32))
    if not scale > 0:
        return 1.0, 0
    return scale, int(min(max(round(-low / scale), 0), ACTIVATION_QMAX))


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights and statically quantized 8-bit activations (W8A8).

    Its input is quantized with one scale and zero point calibrated ahead of time (not per call):
    ``q = clamp(round(x / input_scale) + input_zero_point, 0, 255)``, unsigned (ONNX Runtime's
    fastest x86 integer kernels multiply uint8 activations by int8 weights). The weight holds
    values on ``codec``'s symmetric int8 grid (per output channel or per tensor), dequantized.
    The product is what an integer kernel computes — ``Σ (q - zero_point) · code`` in int32, times
    ``input_scale · weight_scale``, plus the bias — here as float32 arithmetic on the dequantized
    values, equal to it up to float rounding. Gradients pass the input rounding unchanged
    (straight through).

    The state dict is the replaced layer's (``weight``, ``[in, out]`` again for a GPT-2
    ``Conv1D``; ``bias``) plus ``input_scale`` (float32) and ``input_zero_point`` (uint8), both
    scalars: the saved model stores them beside the weight's codes.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, transposed: bool = False,
                 scale: float = 1.0, zero_point: int = 0) -> None:
        super().__init__()
        self.transposed = transposed
        self.weight = weight
        self.bias = bias
        rows, columns = weight.shape
        self.out_features, self.in_features = (columns, rows) if transposed else (rows, columns)
        self.register_buffer("input_scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.tensor(int(zero_point), dtype=torch.uint8))

    @classmethod
    def from_linear(cls, module: nn.Module, scale: float = 1.0, zero_point: int = 0) -> W8A8Linear:
        """The W8A8 version of a ``Linear`` or ``Conv1D``, sharing its weight and bias parameters
        (the weight is expected on the int8 grid already: ``quantize_weight_``)."""
        return cls(module.weight, getattr(module, "bias", None),
                   transposed=type(module).__name__ == "Conv1D", scale=scale,
                   zero_point=zero_point)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input's codes ``0 .. 255`` (as floats)."""
        zero = self.input_zero_point.to(x.dtype)
        return torch.clamp(torch.round(x / self.input_scale) + zero, 0, ACTIVATION_QMAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = self.input_zero_point.to(x.dtype)
        rounded = (self.quantized_input(x) - zero) * self.input_scale
        if x.requires_grad:
            rounded = x + (rounded - x).detach()
        weight = self.weight.t() if self.transposed else self.weight
        return nn.functional.linear(rounded, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input_scale={float(self.input_scale):.4g}, "
                f"input_zero_point={int(self.input_zero_point)}")
