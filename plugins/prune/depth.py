"""``prune`` method ``depth``: remove whole transformer layers.

Layers are ranked by block importance on calibration data: ``importance = "cosine"`` scores a layer
by ``1 - cosine(layer input, layer output)`` averaged over tokens (a layer that barely changes the
residual stream is cheap to drop); ``"loss"`` by how much the model's output moves (1 - cosine to the
full model's final hidden states) when that layer alone is skipped. ``round(ratio × layers)`` layers
of lowest importance go, or exactly the ``layers`` listed. The result is a standard model with fewer
layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError
from squeezelang_plugins.prune.activation import DATA, SAMPLES
from squeezelang_plugins.prune.base import PruneMethod

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext


def dropped_count(n_layers: int, params: dict[str, Any]) -> int:
    if params.get("layers"):
        return len(set(params["layers"]))
    return min(n_layers - 1, int(round(float(params["ratio"]) * n_layers)))


class Depth(PruneMethod):
    name = "depth"
    summary = "structured, remove the whole layers of least block importance (or those listed)"
    blockwise = True
    common = ("ratio",)
    properties = {
        "importance": {"type": "string", "enum": ["cosine", "loss"], "default": "cosine",
                       "description": "'cosine': 1 - cos(layer input, output); 'loss': output "
                                      "change when the layer alone is skipped"},
        "layers": {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True,
                   "description": "drop exactly these layers (0-based; then ratio and data are unused)"},
        "data": DATA,
        "samples": SAMPLES,
    }

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if not params.get("layers") and not params.get("data"):
            return [(None, "prune method 'depth' needs calibration data (data = <a declared data "
                           "set>) or the layers to drop (layers = [..])")]
        return []

    def _keep(self, n_layers: int, params: dict[str, Any]) -> int:
        drop = dropped_count(n_layers, params)
        if drop >= n_layers:
            raise SqueezeError(f"prune depth would drop all {n_layers} layers")
        return n_layers - drop

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return ["prune:depth"]

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        from squeezelang.plugin import family_of, resized_meta, sizes

        for need in self.family_needs(params):
            family_of(meta.config).require(need)
        return resized_meta(meta, layers=self._keep(sizes(meta.config)["layers"], params))

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        from squeezelang.plugin import drop_layers_, sizes

        n = sizes(handle.config)["layers"]
        keep_n = self._keep(n, params)
        if params.get("layers"):
            bad = [i for i in params["layers"] if i >= n]
            if bad:
                raise SqueezeError(f"prune depth: the model has layers 0..{n - 1}, not {bad}")
            drop = set(params["layers"])
        else:
            scores = block_importance(handle, ctx, params)
            drop = set(sorted(range(n), key=lambda i: scores[i])[:n - keep_n])
        drop_layers_(handle.model, [i for i in range(n) if i not in drop])
        ctx.log(f"dropped layers {sorted(drop)} of {n}")


def block_importance(handle: ModelHandle, ctx: StageContext, params: dict[str, Any]) -> list[float]:
    """Importance of each layer on the calibration data (lower = less important)."""
    from squeezelang.plugin import calibration_texts, collect

    texts = calibration_texts(ctx, params.get("data"), int(params["samples"]), "prune depth")
    if params.get("importance", "cosine") == "cosine":
        return collect(handle, texts, samples=int(params["samples"])).blocks
    return skip_one_importance(handle, texts)


def skip_one_importance(handle: ModelHandle, texts: list[str]) -> list[float]:
    """1 - cosine between the full model's pooled outputs and those with one layer skipped."""
    import torch

    from squeezelang.plugin import layer_modules, outputs_for_fidelity

    reference = outputs_for_fidelity(handle, texts)
    scores = []
    for block in layer_modules(handle.model):
        def skip(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
        hook = block.register_forward_hook(skip, with_kwargs=True)
        try:
            changed = outputs_for_fidelity(handle, texts)
        finally:
            hook.remove()
        cos = torch.nn.functional.cosine_similarity(changed, reference, dim=-1)
        scores.append(float((1 - cos).mean()))
    return scores
