"""The ``shrink`` technique: a smaller model of the same family, initialised from the teacher.

Meant to be followed by distillation: it picks the layers, heads, MLP neurons and hidden channels to
keep and copies their weights (``models.surgery``), giving a standard checkpoint that plain
transformers loads. With ``data`` the choice follows activation importance on those texts (Minitron
style; layers by block importance); without it, weight magnitude (heads by the norm of their output
projection, neurons by ``|w_in| · |w_out|``, channels by the embedding norm) and evenly spaced layers.
Sizes not given stay as they are; in a family whose head dimension is ``hidden / heads`` (BERT,
GPT-2) ``heads`` alone also sets the hidden size to ``heads × head dimension``; under grouped-query
attention ``heads`` must be a count the key/value groups can share evenly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import Technique, hookimpl

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

SIZES = ("layers", "heads", "hidden", "intermediate")


def _size(description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "description": description}


class Shrink(Technique):
    name = "shrink"
    description = ("Build a smaller model of the same family (fewer layers, heads, neurons or hidden "
                   "channels) initialised from the model's own weights; follow it with distill.")
    schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "layers": _size("keep this many layers (evenly spaced, or by block importance with data)"),
            "heads": _size("attention heads per layer (the hidden size becomes heads × head "
                           "dimension unless hidden is given)"),
            "hidden": _size("hidden (embedding) size; a multiple of the head count"),
            "intermediate": _size("MLP neurons per layer"),
            "data": {"type": "string", "description": "declared data set of calibration texts: "
                     "choose what to keep by activation importance instead of weight magnitude"},
            "samples": {"type": "integer", "minimum": 1, "default": 256,
                        "description": "at most this many calibration texts"},
        },
    }
    knobs = ()
    produces = frozenset()
    data_params = {"data": "text|a,b"}
    example = 'stage student: shrink { layers = 3, intermediate = 768, data = calib }'

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if not any(params.get(k) for k in SIZES):
            return [(None, "shrink needs at least one of " + ", ".join(SIZES))]
        return []

    def _targets(self, config: dict[str, Any], params: dict[str, Any]) -> dict[str, int]:
        from squeezelang.plugin import family_of, shrunk_config

        fam = family_of(config)
        cur = fam.sizes(config)
        heads = params.get("heads") or cur["heads"]
        if params.get("hidden"):
            hidden = params["hidden"]
        elif params.get("heads") and fam.tied_head_dim:
            hidden = heads * cur["head_dim"]
        else:
            hidden = cur["hidden"]
        out = {"layers": params.get("layers") or cur["layers"], "heads": heads, "hidden": hidden,
               "inner": params.get("intermediate") or cur["inner"]}
        shrunk_config(config, **out)  # raises SqueezeError for sizes the family cannot express
        return out

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return ["shrink"]

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        from squeezelang.plugin import family_of, resized_meta

        for need in self.family_needs(params):  # at plan time too, naming the family
            family_of(meta.config).require(need)
        return resized_meta(meta, **self._targets(meta.config, params))

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        from squeezelang.plugin import choose_heads, reshape_, sizes

        cur = sizes(handle.config)
        new = self._targets(handle.config.to_dict(), params)
        stats = None
        if params.get("data"):
            from squeezelang.plugin import calibration_texts, collect

            samples = int(params.get("samples", 256))
            stats = collect(handle, calibration_texts(ctx, params["data"], samples, "shrink"), samples)
        heads_s, mlp_s, hidden_s = (stats.heads, stats.mlp, stats.hidden) if stats else \
            magnitude_scores(handle.model)
        n = cur["layers"]
        if new["layers"] == n:
            layers = None
        elif stats is not None:
            layers = sorted(sorted(range(n), key=lambda i: -stats.blocks[i])[:new["layers"]])
        else:
            layers = evenly_spaced(n, new["layers"])
        reshape_(handle.model, layers=layers,
                 heads=(choose_heads(heads_s, handle.config, new["heads"])
                        if new["heads"] != cur["heads"] else None),
                 hidden=_top(hidden_s, new["hidden"]) if new["hidden"] != cur["hidden"] else None,
                 mlp=({i: _top(mlp_s[i], new["inner"]) for i in range(n)}
                      if new["inner"] != cur["inner"] else None))
        ctx.log(f"shrunk to {new} (from {dict((k, cur[k]) for k in new)}), "
                f"{'activation' if stats else 'magnitude'} selection; kept layers {layers or 'all'}")


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices spread evenly, always keeping the first and last."""
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def magnitude_scores(model: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Weight-only importance: per-layer heads and neurons, and hidden channels."""
    from squeezelang.plugin import family_of, get_path, layer_modules

    fam = family_of(model.config)
    cur = fam.sizes(model.config)

    def in_major(module: Any) -> torch.Tensor:
        """A projection's weight as ``[in, out]``."""
        w = module.weight.detach()
        return w if fam.conv1d else w.t()

    heads, mlp = [], []
    for block in layer_modules(model):
        wo = in_major(get_path(block, fam.o))                          # [heads × head_dim, hidden]
        w_out = in_major(get_path(block, fam.mlp_out))                 # [inner, hidden]
        if fam.mlp_fused is not None:
            w_in = in_major(get_path(block, fam.mlp_fused)).t()[:cur["inner"]]   # the gate half
        else:  # the first input projection: the gate of a gated MLP
            w_in = in_major(get_path(block, fam.mlp_in[0])).t()        # [inner, hidden]
        heads.append(wo.reshape(cur["heads"], -1).norm(dim=1))
        mlp.append(w_in.norm(dim=1) * w_out.norm(dim=1))
    base = getattr(model, "base_model", model)
    emb = get_path(base, fam.embeddings[0]).weight.detach()
    return heads, mlp, emb.norm(dim=0)


def _top(scores: Any, k: int) -> list[int]:
    return sorted(int(i) for i in scores.topk(k).indices)


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Shrink())
