"""LoRA adapters for ``distill``: low-rank updates trained in place of frozen weights, then merged.

Imported only from inside ``Distill.apply_`` (it imports torch at module level).

An adapter on a linear layer whose weight maps ``in`` inputs to ``out`` outputs adds
``scale · B·A`` to it: ``A`` ``[r, in]`` random and small (Kaiming-uniform, as LoRA initialises
it), ``B`` ``[out, r]`` zero, so training starts from the model as it is, and ``scale = alpha / r``
(``r`` is ``rank`` capped at ``min(in, out)``). A GPT-2 ``Conv1D`` stores its weight ``[in, out]``:
its update is ``(B·A)ᵀ``.

A dense float weight runs its adapter beside it, ``y = layer(x) + scale · (x Aᵀ) Bᵀ``: nothing of
the weight's size is computed, which is what keeps LoRA's memory low. A weight that must keep its
zeros (sparse or N:M) or its quantization grid needs the whole updated weight, to mask or to round:
its adapter is a parametrization of the weight, ``W + scale · (B·A) ⊙ mask``, which ``qat`` then
fake-quantizes. Merging (``merge_``) adds the masked update into the weight and removes the adapter
and its hook; ``qat.bake_`` merges the parametrized ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from squeezelang.plugin import kind_of


class LoraAdapter(nn.Module):
    """The low-rank update ``scale · B·A`` of one weight (``mask``: its zeros to keep)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float,
                 transposed: bool, like: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        factory = {"dtype": like.dtype, "device": like.device}
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.scale, self.transposed = scale, transposed
        self.mask = mask  # a plain attribute: no state, nothing for data-parallel to broadcast

    def delta(self) -> torch.Tensor:
        """The update in the weight's own layout, masked."""
        update = (self.B @ self.A) * self.scale
        if self.transposed:
            update = update.t()
        return update if self.mask is None else update * self.mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """As a parametrization: the updated weight."""
        return weight + self.delta()

    def beside(self, x: torch.Tensor) -> torch.Tensor:
        """As a side branch: the update's contribution to the layer's output."""
        return (x @ self.A.t()) @ self.B.t() * self.scale


@dataclass
class Adapted:
    """One layer with its adapter; ``hook`` set when the adapter runs beside the weight."""

    name: str
    module: nn.Module
    adapter: LoraAdapter
    hook: Any = None


def _beside(module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor:
    """The forward hook of a layer whose adapter runs beside it. It reads the adapter from the
    module it is called on, never from a closure, so that a copy of the module (the sharded twin
    that ``data_parallel(mode="fsdp")`` trains) runs its own adapter."""
    return y + module.lora.beside(args[0])


def add_adapters_(targets: list[tuple[str, nn.Module]], rank: int, alpha: float,
                  masks: dict[int, torch.Tensor], whole: set[int]) -> list[Adapted]:
    """Give every target layer an adapter (a tied weight, listed once, gets one); ``masks`` maps
    a weight's id to its nonzero mask, ``whole`` holds the ids of weights that need the whole
    updated weight (quantized ones)."""
    out = []
    for name, module in targets:
        weight = module.weight
        transposed = kind_of(module) == "Conv1D"
        n_out, n_in = (weight.shape[1], weight.shape[0]) if transposed else weight.shape[:2]
        r = min(rank, n_out, n_in)
        mask = masks.get(id(weight))
        adapter = LoraAdapter(n_out, n_in, r, alpha / rank, transposed, weight, mask)
        if mask is not None or id(weight) in whole:
            parametrize.register_parametrization(module, "weight", adapter)
            out.append(Adapted(name, module, adapter))
        else:
            module.add_module("lora", adapter)
            hook = module.register_forward_hook(_beside)
            out.append(Adapted(name, module, adapter, hook))
    return out


def merge_(adapted: list[Adapted]) -> None:
    """Add every side adapter's update into its weight and remove it with its hook (the
    parametrized ones are merged by ``qat.bake_``)."""
    with torch.no_grad():
        for item in adapted:
            if item.hook is None:
                continue
            item.hook.remove()
            item.module.weight.add_(item.adapter.delta())
            del item.module.lora
