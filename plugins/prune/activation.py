"""``prune`` method ``activation``: remove heads, MLP neurons or embedding channels (Minitron-style).

Importance comes from one pass over calibration texts (``models.calibrate``): heads by the L2 norm
of their attention context, MLP neurons by mean |activation|, embedding channels by mean |LayerNorm
output|. The least important are removed physically (``models.surgery``): the result is a smaller
standard model of the same family that plain transformers loads. Counts are the same in every layer
(the config has one size for all layers); which ones go is chosen per layer.

Where the family's head dimension is ``hidden / heads`` (BERT, GPT-2) the attention is as wide as
the hidden size, so removing heads also shrinks the hidden size to ``kept heads × head dimension``,
and removing embedding channels keeps the head count and shrinks each head's dimension. Families
with an explicit head dimension (Llama, Qwen, Gemma, …) keep it: heads go alone (whole key/value
groups, or the same number of query heads per group), and embedding channels go alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang_plugins.prune.base import PruneMethod

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

TARGETS = ("heads", "mlp", "embedding")

#: Properties shared by the calibrated structured methods.
DATA = {"type": "string",
        "description": "declared data set of calibration texts (its 'text' column, or 'a' and 'b')"}
SAMPLES = {"type": "integer", "minimum": 1, "default": 256,
           "description": "at most this many calibration texts"}


def targets_of(params: dict[str, Any]) -> list[str]:
    target = params.get("target", "mlp")
    return [target] if isinstance(target, str) else list(dict.fromkeys(target))


def new_sizes(config: dict[str, Any], targets: list[str], ratio: float) -> dict[str, int]:
    """Sizes after removing ``ratio`` of each target, rounded to counts the config can express."""
    from squeezelang.plugin import family_of, nearest_heads

    fam = family_of(config)
    for target in targets:
        fam.require(f"prune:{target}")
    cur = fam.sizes(config)
    out = {"heads": cur["heads"], "inner": cur["inner"], "hidden": cur["hidden"]}
    if "mlp" in targets:
        out["inner"] = max(1, cur["inner"] - int(round(ratio * cur["inner"])))
    if "heads" in targets:
        out["heads"] = nearest_heads(config, max(1, cur["heads"] - int(round(ratio * cur["heads"]))))
        if fam.tied_head_dim:  # the attention is as wide as the hidden size
            out["hidden"] = out["heads"] * cur["head_dim"]
    if "embedding" in targets:
        want = (1.0 - ratio) * out["hidden"]
        if fam.tied_head_dim or fam.hidden_per_head:  # a multiple of the head count: each
            # head's dimension shrinks, or the config class requires it
            out["hidden"] = max(1, int(round(want / out["heads"]))) * out["heads"]
        else:  # heads and head dimension stay; only the residual stream narrows
            out["hidden"] = max(1, int(round(want)))
    return out


class Activation(PruneMethod):
    name = "activation"
    summary = ("structured, remove the heads / MLP neurons / embedding channels of least "
               "activation on calibration data (a smaller standard model)")
    blockwise = True
    common = ("ratio",)
    properties = {
        "target": {"anyOf": [{"type": "string", "enum": list(TARGETS)},
                             {"type": "array", "items": {"type": "string", "enum": list(TARGETS)},
                              "minItems": 1, "uniqueItems": True}],
                   "default": "mlp",
                   "description": "what to remove: 'heads' (attention heads), 'mlp' (MLP neurons), "
                                  "'embedding' (hidden channels), or a list of them"},
        "data": DATA,
        "samples": SAMPLES,
    }

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return [f"prune:{target}" for target in targets_of(params)]

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if not params.get("data"):
            return [(None, "prune method 'activation' needs calibration data: "
                           "data = <a declared data set>")]
        return []

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        from squeezelang.plugin import resized_meta

        new = new_sizes(meta.config, targets_of(params), float(params["ratio"]))
        return resized_meta(meta, heads=new["heads"], hidden=new["hidden"], inner=new["inner"])

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        from squeezelang.plugin import calibration_texts, choose_heads, collect, reshape_, sizes

        targets = targets_of(params)
        cur = sizes(handle.config)
        new = new_sizes(handle.config.to_dict(), targets, float(params["ratio"]))
        texts = calibration_texts(ctx, params.get("data"), int(params["samples"]), "prune activation")
        stats = collect(handle, texts, samples=int(params["samples"]))
        layers = range(cur["layers"])
        heads = (choose_heads(stats.heads, handle.config, new["heads"])
                 if new["heads"] != cur["heads"] else None)
        mlp = ({i: _top(stats.mlp[i], new["inner"]) for i in layers}
               if new["inner"] != cur["inner"] else None)
        hidden = _top(stats.hidden, new["hidden"]) if new["hidden"] != cur["hidden"] else None
        before = sum(p.numel() for p in handle.model.parameters())
        reshape_(handle.model, heads=heads, hidden=hidden, mlp=mlp)
        after = sum(p.numel() for p in handle.model.parameters())
        ctx.log(f"activation prune of {', '.join(targets)}: heads {cur['heads']}->{new['heads']}, "
                f"mlp {cur['inner']}->{new['inner']}, hidden {cur['hidden']}->{new['hidden']}; "
                f"params {before} -> {after} ({stats.tokens} calibration tokens)")


def _top(scores: Any, k: int) -> list[int]:
    return sorted(int(i) for i in scores.topk(k).indices)
