"""The built-in ``factorize`` technique: replace linear layers by truncated-SVD low-rank pairs.

A ``[out, in]`` weight becomes ``second @ first`` with ``first`` ``[r, in]`` and ``second``
``[out, r]`` (``squeezelang.plugin.LowRankLinear``), fewer parameters whenever
``r * (in + out) < in * out``; layers where that does not hold are left alone. The change is
structural, so the saved model records an edit that ``rebuild_`` replays when loading.

``method = "asvd"`` (activation-aware SVD, Yuan et al., 2023) factors ``W S`` instead, where ``S``
scales each input channel by ``mean|x| ** alpha`` measured on calibration ``data``, and folds
``S⁻¹`` back into ``first``: the truncation then discards what matters least for the layer's
*outputs* on real inputs rather than for the weight entries.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import (BLOCKS, LINEAR_KINDS, Candidate, Knob, ModuleMeta, SqueezeError,
                                Technique, TensorMeta, hookimpl)

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext


def target_rank(rank: float, full: int) -> int:
    """A ``rank`` parameter as a rank: below 1 a fraction of ``full``, from 1 on a count."""
    if rank < 1:
        return max(1, int(round(rank * full)))
    return min(int(rank), full)


def saves(rank: int, n_in: int, n_out: int) -> bool:
    return rank * (n_in + n_out) < n_in * n_out


def _in_out(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """``(in, out)`` of a weight of a ``Linear`` (``[out, in]``) or ``Conv1D`` (``[in, out]``)."""
    return (shape[0], shape[1]) if kind == "Conv1D" else (shape[1], shape[0])


def _low_rank(module: Any, params: dict[str, Any], scale: Any) -> tuple[Any, int] | None:
    """``(LowRankLinear, rank)`` replacing ``module`` at the stage's ``rank`` or ``energy``
    (its SVD taken on the weight times ASVD's input ``scale`` when given), or ``None`` when the
    pair would not be smaller."""
    import torch

    from squeezelang.plugin import LowRankLinear, linear_weight

    weight = linear_weight(module).double()
    if scale is not None:
        weight = weight * scale[None, :]
    n_out, n_in = weight.shape
    full = min(n_in, n_out)
    if params.get("rank") is not None:
        r = target_rank(params["rank"], full)
        if not saves(r, n_in, n_out):
            return None
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    if params.get("energy") is not None:
        cum = torch.cumsum(s ** 2, 0) / torch.sum(s ** 2).clamp_min(1e-30)
        r = min(full, int(torch.searchsorted(cum, torch.tensor(params["energy"],
                                                                dtype=cum.dtype))) + 1)
        if not saves(r, n_in, n_out):
            return None
    root = s[:r].sqrt()
    right = vh[:r] / scale[None, :] if scale is not None else vh[:r]
    first = (root[:, None] * right).to(module.weight.dtype)
    second = (u[:, :r] * root[None, :]).to(module.weight.dtype)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return LowRankLinear.from_factors(first, second, bias), r


class Factorize(Technique):
    name = "factorize"
    description = (
        "Replace linear layers by two thinner ones from a truncated SVD of the weight (method "
        "'svd'). Give `rank` (below 1: a fraction of each layer's full rank min(in, out); from 1 "
        "on: a rank) or `energy` (keep the smallest rank holding that fraction of the squared "
        "singular values). Layers that would not get smaller are left alone. Changes the "
        "architecture: the result loads with squeezelang.load, not plain transformers.")
    methods = ("svd", "asvd")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {"type": "string", "enum": ["svd", "asvd"], "default": "svd",
                       "description": "How the factors are computed: \"svd\" of the weight, or "
                                      "\"asvd\" of the weight with its input channels scaled by "
                                      "their mean |activation| on calibration `data`."},
            "data": {"type": "string",
                     "description": "asvd only: the declared data set of calibration texts."},
            "samples": {"type": "integer", "minimum": 1, "default": 128,
                        "description": "asvd only: calibration texts used at most."},
            "alpha": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.5,
                      "description": "asvd only: exponent of the channel scale mean|x|**alpha "
                                     "(0 = plain svd)."},
            "rank": {"type": "number", "exclusiveMinimum": 0,
                     "description": "Below 1: fraction of each layer's full rank (0.25 = 25%); from 1 "
                                    "on: the rank itself (an integer). Exclusive with `energy`."},
            "energy": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                       "description": "Keep the smallest rank whose singular values hold this "
                                      "fraction of the squared total. Exclusive with `rank`."},
            "include": {"type": "array", "items": {"type": "string"}, "default": list(BLOCKS),
                        "description": "Globs of module names to factorize (default: the linear "
                                       "layers of the numbered transformer blocks)."},
            "exclude": {"type": "array", "items": {"type": "string"}, "default": [],
                        "description": "Globs of module names to leave alone."},
        },
    }
    knobs = (Knob("rank", 0.05, 0.95, compresses="down",
                  description="fraction of each layer's full rank kept"),)
    produces = frozenset({"factorized"})
    data_params = {"data": "text|a,b"}
    example = 'stage lowrank: factorize { rank = 25%, exclude = ["*.attention.*"] }'

    def stores_for(self, params: dict[str, Any]) -> frozenset[str]:
        return frozenset({"low-rank"})

    def candidates(self, task: str) -> list[Candidate]:
        return [Candidate("svd", {"method": "svd", "rank": 0.5}, risk=4.0, order=45, autos=("rank",))]

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """``samples`` and ``alpha`` only for asvd."""
        values = self.defaults()
        if params.get("method", "svd") != "asvd":
            values = {k: v for k, v in values.items() if k not in ("samples", "alpha")}
        return values

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if params.get("method", "svd") == "asvd" and not params.get("data"):
            return [("data", "method \"asvd\" needs calibration data = <a data set>")]
        if params.get("method", "svd") != "asvd" and "data" in params:
            return [("data", "'data' applies to method \"asvd\" only")]
        has_rank, has_energy = params.get("rank") is not None, params.get("energy") is not None
        if has_rank == has_energy:
            return [(None, "give exactly one of `rank` or `energy`")]
        rank = params.get("rank")
        if has_rank and rank >= 1 and rank != int(rank):
            return [("rank", f"rank {rank} is neither a fraction below 1 nor an integer")]
        return []

    def _resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        problems = self.check(params)
        if problems:
            raise SqueezeError("factorize: " + "; ".join(m for _, m in problems))
        return params

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Exact for `rank`. For `energy` the rank needs the weights; it assumes rank = energy ×
        full rank (roughly right for trained transformer layers) and says so in ``meta.notes``."""
        params = self._resolved(params)
        out = meta.copy()
        record: dict[str, Any] = {"technique": self.name, "method": params["method"], "modules": {}}
        for mod in list(out.select(LINEAR_KINDS, params.get("include"), params.get("exclude", ()))):
            wname = f"{mod.name}.weight"
            if wname not in out.tensors:
                continue
            w = out.tensors[wname]
            n_in, n_out = _in_out(w.shape, mod.kind)
            full = min(n_in, n_out)
            if params.get("energy") is not None:
                r = max(1, int(math.ceil(params["energy"] * full)))
            else:
                r = target_rank(params["rank"], full)
            if not saves(r, n_in, n_out):
                continue
            bname = f"{mod.name}.bias"
            bias = out.tensors.pop(bname, None)
            del out.tensors[wname]
            del out.modules[mod.name]
            first, second = f"{mod.name}.first", f"{mod.name}.second"
            out.tensors[f"{first}.weight"] = TensorMeta((r, n_in), w.dtype)
            out.tensors[f"{second}.weight"] = TensorMeta((n_out, r), w.dtype)
            out.modules[first] = ModuleMeta(first, "Linear", [f"{first}.weight"])
            out.modules[second] = ModuleMeta(second, "Linear", [f"{second}.weight"])
            if bias is not None:
                out.tensors[f"{second}.bias"] = TensorMeta(bias.shape, bias.dtype)
                out.modules[second].tensors.append(f"{second}.bias")
            record["modules"][mod.name] = r
        if record["modules"]:
            out.add_edit(record)
            out.states.add("factorized")
        if params.get("energy") is not None:
            out.notes.append(f"factorize: the rank for energy={params['energy']} depends on the "
                             "weights; estimated as that fraction of each layer's full rank")
        return out

    def blockwise_for(self, params: dict[str, Any]) -> bool:
        return True  # ASVD's statistics from forward passes; each block factorized while resident

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        from squeezelang.plugin import by_block, resident, select_modules, set_module

        params = self._resolved(params)
        targets = select_modules(handle.model, LINEAR_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("factorize: include/exclude select no linear layer of the model")
        done: dict[str, int] = {}
        scale: dict[str, Any] = {}
        if params["method"] == "asvd":
            from squeezelang.plugin import calibration_texts, input_stats

            texts = calibration_texts(ctx, params.get("data"), int(params.get("samples", 128)),
                                      "factorize asvd")
            alpha = float(params.get("alpha", 0.5))
            for name, stats in input_stats(handle, texts, targets).items():
                s = stats.abs_mean.clamp_min(1e-8 * float(stats.abs_mean.max().clamp_min(1e-30)))
                scale[name] = s.pow(alpha)
        # block by block: an offloaded model reads each block once, and writes it back changed
        for _, members in ctx.progress(by_block(handle.model, targets), desc=params["method"]):
            with resident(handle.model, *(m for _, m in members)):
                for name, module in members:
                    found = _low_rank(module, params, scale.get(name))
                    if found is None:
                        continue
                    set_module(handle.model, name, found[0])
                    for key in [k for k in handle.codecs if k.startswith(name + ".")]:
                        del handle.codecs[key]  # the factors are new dense tensors
                    done[name] = found[1]
        if not done:
            ctx.log("factorize: no selected layer gets smaller at this rank; nothing changed")
            return
        handle.edits.append({"technique": self.name, "method": params["method"], "modules": done})
        handle.states.add("factorized")
        ctx.log(f"factorized {len(done)} of {len(targets)} layers")

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        from squeezelang.plugin import LowRankLinear, get_module, kind_of, set_module

        for name, rank in record.get("modules", {}).items():
            module = get_module(model, name)
            kind = kind_of(module)
            if kind not in LINEAR_KINDS:
                raise SqueezeError(f"factorize: module '{name}' is a {kind}, not a linear layer")
            n_in, n_out = _in_out(tuple(module.weight.shape), kind)
            set_module(model, name, LowRankLinear(n_in, n_out, int(rank),
                                                  getattr(module, "bias", None) is not None
                                                  ).to(module.weight.dtype))
        return model


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Factorize())
