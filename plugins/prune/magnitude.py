"""``prune`` method ``magnitude``: zero the weights of smallest magnitude in linear layers.

Pruned weights stay in the model as zeros and are saved with the ``{"sparse": true}`` codec (a
bitmask plus the nonzero values), so the file shrinks by about ``ratio × 4`` bytes per weight less an
eighth of a byte for the mask.

``scope`` says how the pruned weights are spread over the selected layers: ``"layer"`` removes
``ratio`` of every layer, ``"global"`` the lowest ``|w|`` over all of them, and ``"allocated"`` gives
each layer its own sparsity within ``BAND`` (20 points) of ``ratio``, chosen by ``models.allocate``
to remove as many weights in total as ``"layer"`` does while least changing the model's outputs on
calibration ``data``, as predicted by ``models.sensitivity`` around the uniform setting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import LINEAR_KINDS, SqueezeError, merge
from squeezelang_plugins.prune.activation import DATA, SAMPLES
from squeezelang_plugins.prune.base import PruneMethod

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

#: The sparsities a layer may get with ``scope = "allocated"``: these within ``BAND`` of ``ratio``,
#: and ``ratio`` itself. The costs are a first-order expansion around the uniform setting
#: (``models.sensitivity``), so the layers stay near it.
GRID = tuple(round(0.05 * i, 2) for i in range(20))
BAND = 0.2
#: Parameters only ``scope = "allocated"`` reads.
ALLOCATED_ONLY = ("data", "samples")


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
        "scope": {"type": "string", "enum": ["layer", "global", "allocated"], "default": "layer",
                  "description": "'layer': every layer loses `ratio` of its weights; 'global': "
                                 "the lowest scores over all selected layers are zeroed; "
                                 "'allocated': each layer gets its own sparsity (within 20 points "
                                 "of `ratio`), chosen from its measured sensitivity on calibration "
                                 "`data` so that the same number of weights goes as with 'layer'"},
        "data": DATA,
        "samples": SAMPLES,
    }

    def used(self, all_properties: dict[str, Any], params: dict[str, Any] | None = None) -> set[str]:
        keys = super().used(all_properties, params)
        if params is not None and params.get("scope") != "allocated":
            keys -= set(ALLOCATED_ONLY)
        return keys

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if params.get("scope") != "allocated":
            return [(k, f"'{k}' applies to scope \"allocated\" only") for k in ALLOCATED_ONLY
                    if k in params]
        if not params.get("data"):
            return [("scope", "scope \"allocated\" measures each layer's sensitivity on "
                              "calibration data: set data = <a declared data set>")]
        return []

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Mark the selected weights sparse at density ``1 - ratio``.

        With ``scope = "global"`` or ``"allocated"`` each layer's density is unknown before pruning;
        every layer gets the average. The total stays exact: mask bytes do not depend on density and
        the values total is ``(1 - ratio)`` of all selected weights either way (``"allocated"``
        keeps exactly the weights this estimate counts, see ``allocated_counts``).
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

        from squeezelang.plugin import select_modules

        targets = select_modules(handle.model, LINEAR_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("prune: include/exclude select no linear layer of the model")
        score = _magnitude
        with torch.no_grad():
            scores = [score(name, m, m.weight, ctx) for name, m in targets]
            if params["scope"] == "allocated":
                removed = allocated_counts(handle, targets, scores, params, ctx)
                masks = [_drop_lowest(s, k) for s, k in zip(scores, removed)]
            else:
                masks = prune_mask(scores, float(params["ratio"]), params["scope"])
            for (name, module), mask in zip(targets, masks):
                module.weight.mul_(mask.to(module.weight.dtype))
                key = f"{name}.weight"
                handle.codecs[key] = merge(handle.codecs.get(key), {"sparse": True})
        handle.states.add("sparse")
        zeros = sum(int((~m).sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        ctx.log(f"pruned {zeros}/{total} weights ({zeros / max(total, 1):.1%}) in {len(targets)} layers")


def _lowest_first(score: torch.Tensor) -> torch.Tensor:
    """Flat indices from the lowest score up (ties in position order, so choices are deterministic)."""
    import torch

    return torch.argsort(score.reshape(-1), stable=True)


def _drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask without the ``k`` lowest scores."""
    import torch

    mask = torch.ones(score.numel(), dtype=torch.bool)
    mask[_lowest_first(score)[:k]] = False
    return mask.reshape(score.shape)


def allocated_counts(handle: ModelHandle, targets: list[tuple[str, Any]], scores: list[torch.Tensor],
                     params: dict[str, Any], ctx: StageContext) -> list[int]:
    """How many weights each layer loses with ``scope = "allocated"``.

    Every layer's candidates are the sparsities of ``GRID`` within ``BAND`` of ``ratio``, and
    ``ratio`` (the lowest scores go first); a candidate's cost is its predicted effect on the
    model's outputs on the calibration texts (``models.sensitivity``, measured around ``ratio``), its
    size the bytes of the values it keeps. ``models.allocate`` keeps
    at most the values ``estimate`` counts (``round((1 - ratio) · n)`` of each layer, which
    ``"layer"`` would keep); what the grid's steps leave over goes back to the layers whose choice
    costs most, so the total is exact.
    """
    import torch

    from squeezelang.plugin import Candidates, allocate, calibration_texts, costs, describe

    ratio = float(params["ratio"])
    texts = calibration_texts(ctx, params.get("data"), int(params["samples"]),
                              'prune magnitude (scope "allocated")')
    grid = sorted({s for s in GRID if abs(s - ratio) <= BAND + 1e-9} | {ratio})
    options: list[list[int]] = []  # per layer: the kept counts it may get, most first
    items, sizes, elts, budget = [], [], [], 0
    for (name, module), score in zip(targets, scores):
        weight = module.weight
        n, elt = weight.numel(), weight.element_size()
        nonzero = int((weight != 0).sum())
        kept = sorted({min(int(round((1 - s) * n)), nonzero) for s in grid}, reverse=True)
        uniform = min(int(round((1 - ratio) * n)), nonzero)

        def make(weight: Any = weight, score: torch.Tensor = score, kept: list[int] = kept) -> list[Any]:
            order, flat, out = _lowest_first(score), weight.detach().reshape(-1), []
            for k in kept:
                pruned = flat.clone()
                pruned[order[:flat.numel() - k]] = 0
                out.append(pruned.reshape(weight.shape))
            return out

        items.append(Candidates(weight, [(name, module)], make, kept.index(uniform)))
        options.append(kept)
        elts.append(elt)
        sizes.append([k * elt for k in kept])
        budget += uniform * elt
    cost = costs(handle, texts, items, ctx.progress)
    names = [name for name, _ in targets]
    choice = allocate(cost, sizes, budget, names, what='prune scope "allocated"')
    keep = [kept[i] for kept, i in zip(options, choice)]
    spare = budget - sum(s[i] for s, i in zip(sizes, choice))
    for j in sorted(range(len(keep)), key=lambda j: -cost[j][choice[j]]):
        extra = min(spare // elts[j], options[j][0] - keep[j])
        keep[j] += extra
        spare -= extra * elts[j]
    removed = [m.weight.numel() - k for (_, m), k in zip(targets, keep)]
    ctx.log("allocated sparsity per layer: " + describe(
        names, [f"{r / m.weight.numel():.0%}" for r, (_, m) in zip(removed, targets)]))
    return removed
