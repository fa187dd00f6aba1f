"""``prune`` method ``magnitude``: zero the weights of smallest magnitude in linear layers.

Pruned weights stay in the model as zeros and are saved with the ``{"sparse": true}`` codec (a
bitmask plus the nonzero values), so the file shrinks by about ``ratio × 4`` bytes per weight less an
eighth of a byte for the mask.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.errors import SqueezeError
from squeezelang.models.codec import merge
from squeezelang.models.select import LINEAR_KINDS
from squeezelang_plugins.prune.base import PruneMethod

if TYPE_CHECKING:
    import torch

    from squeezelang.executor.context import StageContext
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta


def _magnitude(name: str, module: Any, weight: torch.Tensor, ctx: StageContext) -> torch.Tensor:
    """Importance of each weight: its absolute value."""
    return weight.detach().abs()



def prune_mask(scores: list[torch.Tensor], ratio: float, scope: str) -> list[torch.Tensor]:
    """Boolean keep-masks that drop the ``ratio`` lowest-scored entries, per tensor or over all."""
    import torch

    def keep(flat: torch.Tensor) -> torch.Tensor:
        k = int(round(ratio * flat.numel()))
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        if k > 0:
            mask[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        return mask

    if scope == "layer":
        return [keep(s.reshape(-1)).reshape(s.shape) for s in scores]
    flat = keep(torch.cat([s.reshape(-1).float() for s in scores]))
    return [m.reshape(s.shape) for m, s in zip(flat.split([s.numel() for s in scores]), scores)]


class Magnitude(PruneMethod):
    name = "magnitude"
    produces = frozenset({"sparse"})
    summary = "unstructured, zero the weights of smallest |w| (stored as bitmask + values)"
    properties = {
        "scope": {"type": "string", "enum": ["layer", "global"], "default": "layer",
                  "description": "'layer': every layer loses `ratio` of its weights; 'global': "
                                 "the lowest scores over all selected layers are zeroed"},
    }

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Mark the selected weights sparse at density ``1 - ratio``.

        With ``scope = "global"`` each layer's density is unknown before pruning; every layer gets
        the average. The total stays exact: mask bytes do not depend on density and the values
        total is ``(1 - ratio)`` of all selected weights either way.
        """
        out = meta.copy()
        for mod in out.select(LINEAR_KINDS, params.get("include"), params.get("exclude", ())):
            name = f"{mod.name}.weight"
            if name in out.tensors:
                t = out.tensors[name]
                density = min(1.0 - params["ratio"], (t.codec or {}).get("density", 1.0))
                t.codec = merge(t.codec, {"sparse": True, "density": density})
        out.states.add("sparse")
        return out

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.models.select import select_modules

        targets = select_modules(handle.model, LINEAR_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("prune: include/exclude select no linear layer of the model")
        score = _magnitude
        with torch.no_grad():
            scores = [score(name, m, m.weight, ctx) for name, m in targets]
            masks = prune_mask(scores, float(params["ratio"]), params["scope"])
            for (name, module), mask in zip(targets, masks):
                module.weight.mul_(mask.to(module.weight.dtype))
                key = f"{name}.weight"
                handle.codecs[key] = merge(handle.codecs.get(key), {"sparse": True})
        handle.states.add("sparse")
        zeros = sum(int((~m).sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        ctx.log(f"pruned {zeros}/{total} weights ({zeros / max(total, 1):.1%}) in {len(targets)} layers")


