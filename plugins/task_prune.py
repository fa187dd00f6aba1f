"""The ``task_prune`` technique: remove the heads or layers a task score depends on least.

Each head (or layer) is masked in turn — a head by zeroing its slice of the attention output
projection's input, a layer by passing its input through — and the task score is measured on
``data``: ``spearman`` (pair data ``a,b,score``: Spearman correlation of the embeddings' cosine with
the gold score), ``accuracy`` (``text,label`` data on a classification model) or ``loss`` (LM loss
of a causal LM on ``text``; lower is better). The least sensitive ``round(ratio × count)`` are
removed physically (``models.surgery``), the same number of heads in every layer. Where the family's
head dimension is ``hidden / heads`` (BERT, GPT-2), removing heads also shrinks the hidden size to
``heads × head dimension`` (channels kept by embedding norm); under grouped-query attention whole
key/value groups, or the same number of query heads per group, are kept.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from squeezelang.plugin import Knob, SqueezeError, Technique, hookimpl

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext


class TaskPrune(Technique):
    name = "task_prune"
    description = ("Remove the attention heads or layers whose masking changes a task score least "
                   "(a smaller standard model).")
    schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "target": {"type": "string", "enum": ["heads", "layers"], "default": "heads",
                       "description": "remove attention heads (same count per layer) or layers"},
            "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.25,
                      "description": "fraction of the heads (per layer) or layers removed"},
            "data": {"type": "string", "description": "declared data set the score is measured on"},
            "score": {"type": "string", "enum": ["spearman", "accuracy", "loss"],
                      "default": "spearman",
                      "description": "'spearman' (a,b,score pairs), 'accuracy' (text,label on a "
                                     "classifier) or 'loss' (LM loss of a causal LM on text)"},
            "samples": {"type": "integer", "minimum": 1, "default": 256,
                        "description": "at most this many rows of data"},
        },
    }
    knobs = (Knob("ratio", 0.0, 0.9, compresses="up", description="fraction removed"),)
    produces = frozenset()
    data_params = {"data": "text|a,b"}
    example = 'stage task: task_prune { target = "heads", ratio = 25%, data = sts, score = "spearman" }'

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if not params.get("data"):
            return [(None, "task_prune needs data = <a declared data set> to score the task on")]
        return []

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return ["task_prune"]

    def _counts(self, config: dict[str, Any], params: dict[str, Any]) -> dict[str, int]:
        from squeezelang.plugin import family_of, nearest_heads

        fam = family_of(config)
        for need in self.family_needs(params):
            fam.require(need)
        cur = fam.sizes(config)
        key = "heads" if params["target"] == "heads" else "layers"
        removed = min(cur[key] - 1, int(round(float(params["ratio"]) * cur[key])))
        if key == "heads":
            return {"heads": nearest_heads(config, cur[key] - removed)}
        return {key: cur[key] - removed}

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        from squeezelang.plugin import resized_meta

        return resized_meta(meta, **self._counts(meta.config, params))

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import (block_module, choose_heads, family_of, layer_modules,
                                        reshape_)
        from squeezelang_plugins.shrink import magnitude_scores

        fam = family_of(handle.config)
        cur = fam.sizes(handle.config)
        keep = self._counts(handle.config.to_dict(), params)
        score = task_score(handle, ctx, params)
        base = score()
        blocks = layer_modules(handle.model)
        if params["target"] == "layers":
            drops = [base - _masked(block, None, None, score) for block in blocks]
            order = sorted(range(len(blocks)), key=lambda i: drops[i])
            kept = sorted(order[len(blocks) - keep["layers"]:])
            reshape_(handle.model, layers=kept)
            ctx.log(f"task score {base:.4f}; kept layers {kept} of {len(blocks)}")
            return
        d = cur["head_dim"]
        sensitivity = []
        for block in blocks:
            proj = block_module(handle.model, block, "o")
            sensitivity.append(torch.tensor([base - _masked(block, proj, (h * d, (h + 1) * d), score)
                                             for h in range(cur["heads"])]))
        # Least sensitive = smallest drop in score; keep the most sensitive.
        heads = choose_heads(sensitivity, handle.config, keep["heads"])
        hidden = None
        if fam.tied_head_dim:  # the hidden size follows the heads (channels kept by embedding norm)
            hidden = magnitude_scores(handle.model)[2].topk(keep["heads"] * d).indices.tolist()
        reshape_(handle.model, heads=heads, hidden=hidden)
        ctx.log(f"task score {base:.4f}; kept heads {heads}")


def _masked(block: Any, proj: Any, span: tuple[int, int] | None,
            score: Callable[[], float]) -> float:
    """The score with one head's context slice zeroed, or the whole block skipped (``span=None``)."""
    if span is None:
        def skip(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
        hook = block.register_forward_hook(skip, with_kwargs=True)
    else:
        def zero(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[..., span[0]:span[1]] = 0
            return (x,) + tuple(args[1:])
        hook = proj.register_forward_pre_hook(zero)
    try:
        return score()
    finally:
        hook.remove()


def task_score(handle: ModelHandle, ctx: StageContext, params: dict[str, Any]) -> Callable[[], float]:
    """A function measuring the task score (higher = better; ``loss`` is negated)."""
    import torch

    from squeezelang.plugin import encode, lm_loss, logits

    rows = ctx.data.rows(params["data"])[: int(params["samples"])]
    kind = params["score"]
    if kind == "spearman":
        if not all(k in rows[0] for k in ("a", "b", "score")):
            raise SqueezeError(f"task_prune score 'spearman' needs columns a, b, score in data set "
                               f"'{params['data']}'")
        a, b = [str(r["a"]) for r in rows], [str(r["b"]) for r in rows]
        gold = torch.tensor([float(r["score"]) for r in rows])

        def spearman() -> float:
            cos = torch.nn.functional.cosine_similarity(encode(handle, a), encode(handle, b))
            return _spearman(cos, gold)
        return spearman
    if kind == "accuracy":
        if handle.task != "classification" or not all(k in rows[0] for k in ("text", "label")):
            raise SqueezeError("task_prune score 'accuracy' needs a classification model and "
                               "columns text, label")
        texts = [str(r["text"]) for r in rows]
        labels = torch.tensor([int(r["label"]) for r in rows])
        return lambda: float((logits(handle, texts).argmax(-1) == labels).float().mean())
    texts = ctx.data.texts(params["data"], limit=int(params["samples"]))
    return lambda: -lm_loss(handle, texts)


def _spearman(x: Any, y: Any) -> float:
    def ranks(v: Any) -> Any:
        return v.argsort().argsort().double()
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / ((rx.norm() * ry.norm()) + 1e-12))


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(TaskPrune())
