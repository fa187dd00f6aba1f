"""Activation statistics on calibration texts: the importance scores of structured pruning.

Minitron-style, from one pass of forward hooks over at most ``samples`` texts, every statistic
averaged over the non-padding tokens:

* ``heads[layer][h]``: the L2 norm of query head ``h``'s slice of the attention context (the input
  of the attention output projection);
* ``mlp[layer][n]``: the mean |activation| of neuron ``n`` after the MLP nonlinearity;
* ``hidden[c]``: the mean |norm output| of channel ``c``, summed over every hidden-wide norm of the
  family (LayerNorm or RMSNorm: the blocks' norms, the embedding norm and the final norm);
* ``blocks[layer]``: ``1 - cosine(layer input, layer output)`` per token (block importance: lower
  means the layer changes the residual stream less).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle


@dataclass
class Activations:
    heads: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    blocks: list[float] = field(default_factory=list)
    tokens: int = 0


def collect(handle: ModelHandle, texts: Sequence[str], samples: int = 256, batch_size: int = 16,
            max_length: int = 128) -> Activations:
    """Run ``handle.model`` over the first ``samples`` texts and return the activation statistics."""
    import torch

    from squeezelang.models.forward import _batches
    from squeezelang.models.surgery import family_of, get_path, layer_modules

    model = handle.model.eval()
    fam = family_of(model.config)
    dims = fam.sizes(model.config)
    texts = [t for t in texts if str(t).strip()][:samples]
    if not texts:
        raise SqueezeError("calibration needs at least one non-empty text")
    blocks = layer_modules(model)
    n_layers, width = len(blocks), dims["hidden"]
    heads = [torch.zeros(dims["heads"], dtype=torch.float64) for _ in blocks]
    mlp = [torch.zeros(dims["inner"], dtype=torch.float64) for _ in blocks]
    hidden = torch.zeros(width, dtype=torch.float64)
    distance = [0.0] * n_layers
    live: dict[str, Any] = {}

    def tokens(x: torch.Tensor) -> torch.Tensor:
        """The rows of the non-padding tokens: ``[B, T, …] -> [N, …]`` in float64."""
        return x[live["mask"]].double()

    def on_attn(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            ctx = tokens(args[0])
            heads[i] += ctx.reshape(ctx.shape[0], dims["heads"], -1).norm(dim=-1).sum(0)
        return hook

    def on_mlp(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            mlp[i] += tokens(args[0]).abs().sum(0)
        return hook

    def on_norm(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        hidden.add_(tokens(out).abs().sum(0))

    def on_block(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(tokens(x), tokens(y), dim=-1)
            distance[i] += float((1 - cos).sum())
        return hook

    handles = []
    try:
        base = getattr(model, "base_model", model)
        norms = [get_path(base, n) for n in (fam.embedding_norm, fam.final_norm) if n]
        for i, block in enumerate(blocks):
            handles.append(get_path(block, fam.o).register_forward_pre_hook(on_attn(i)))
            handles.append(get_path(block, fam.mlp_out).register_forward_pre_hook(on_mlp(i)))
            handles.append(block.register_forward_hook(on_block(i), with_kwargs=True))
            norms += [get_path(block, n) for n in fam.norms]
        for module in norms:
            handles.append(module.register_forward_hook(on_norm))
        count = 0
        with torch.inference_mode():
            for _, inputs in _batches(handle, texts, None, batch_size, max_length):
                live["mask"] = inputs["attention_mask"].bool()
                model(**inputs)
                count += int(live["mask"].sum())
    finally:
        for h in handles:
            h.remove()
    count = max(count, 1)
    return Activations(heads=[h / count for h in heads], mlp=[m / count for m in mlp],
                       hidden=hidden / count, blocks=[x / count for x in distance], tokens=count)


def calibration_texts(ctx: Any, data: str | None, samples: int, who: str) -> list[str]:
    """The non-empty texts of the declared data set ``data``, at most ``samples``."""
    if not data:
        raise SqueezeError(f"{who} needs calibration data: set data = <a declared data set>")
    texts = [t for t in ctx.data.texts(data) if t.strip()][:samples]
    if not texts:
        raise SqueezeError(f"{who}: data set '{data}' has no non-empty text")
    return texts
