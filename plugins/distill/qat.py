"""Quantization-aware distillation: quantized weights trained as float shadows through their codes.

Imported only from inside ``Distill.apply_`` (it imports torch at module level).

A weight whose codec has ``quant`` (int8, int4 or mixed widths, per channel, per tensor or
group-wise; float8 codes alike) becomes a parametrization of its float *shadow*: every forward
pass reads ``quantize_weight(shadow)``, the codes and scales recomputed from the shadow with the
codec's own rule (``max|w| / qmax`` per channel or group, round to nearest) — the very function
the ``quantize`` stage puts weights on their grid with, so what the student computes with is at
every step exactly what would be saved. The rounding has no useful gradient; the straight-through
estimator passes the output's gradient to the shadow unchanged (the largest magnitude of a channel
or group sets its scale, so no value is ever clipped and there is no clipping mask to apply).
At the start the shadow is the quantized weight itself, so the student starts as the quantized
model; at the end the parametrization is removed leaving the quantized values (``bake_``), and a
weight that trained in float32 on behalf of a float16 checkpoint is put on its float16 grid
(``requantize_``), as the quantize stage does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from squeezelang.plugin import quantize_weight, quantize_weight_


class _Quantized(torch.autograd.Function):
    """The quantized values of a shadow weight, with the straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, shadow: torch.Tensor, quant: dict[str, Any]) -> torch.Tensor:
        return on_codec_grid(shadow, quant)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def on_codec_grid(weight: torch.Tensor, quant: dict[str, Any]) -> torch.Tensor:
    """``weight`` quantized with a codec's ``quant`` entry (the values the file would hold)."""
    return quantize_weight(weight.detach(), quant.get("bits", 8), quant.get("axis", 0),
                           quant.get("group"), quant.get("format"))


class FakeQuant(nn.Module):
    """A parametrization: the shadow weight as its codec quantizes it."""

    def __init__(self, quant: dict[str, Any]) -> None:
        super().__init__()
        self.quant = dict(quant)

    def forward(self, shadow: torch.Tensor) -> torch.Tensor:
        return _Quantized.apply(shadow, self.quant)


def fake_quantize_(model: nn.Module, specs: dict[int, dict[str, Any]]) -> int:
    """Parametrize every module weight whose parameter (by id) has a ``quant`` spec in ``specs``
    (a tied weight in each module that holds it, so every reader sees the quantized values);
    return the number of weights."""
    places = [(module, name, id(param)) for module, name, param in _weights(model)
              if id(param) in specs]
    for module, name, key in places:
        parametrize.register_parametrization(module, name, FakeQuant(specs[key]))
    return len({key for _, _, key in places})


def _weights(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """``(module, tensor name, parameter)`` of every module's own parameters; a parametrized one
    (a LoRA adapter already on it) by the tensor it stands for, its ``original``."""
    out = []
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue
        own = dict(module.named_parameters(recurse=False))
        for name, plist in (getattr(module, "parametrizations", None) or {}).items():
            own[name] = plist.original
        out.extend((module, name, param) for name, param in own.items())
    return out


def bake_(model: nn.Module) -> None:
    """Remove every parametrization, leaving the values it computes in the parameter itself
    (LoRA adapters merged, codes final); a tied parameter stays one object."""
    for module in list(model.modules()):
        for name in list(getattr(module, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def requantize_(weights: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
    """Put each weight on its codec's grid in its own dtype (a no-op for the float32 values
    ``bake_`` leaves; a float16 weight trained in float32 is rounded as the quantize stage does)."""
    with torch.no_grad():
        for weight, quant in weights:
            quantize_weight_(weight, quant.get("bits", 8), quant.get("axis", 0),
                             quant.get("group"), quant.get("format"))
