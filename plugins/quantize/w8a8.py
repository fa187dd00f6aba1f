"""``quantize`` scheme ``w8a8``: int8 weights and statically quantized 8-bit activations, with
SmoothQuant's migration.

Dynamic int8 kernels (``int8-dynamic``) find each input's range on every call; W8A8 calibrates it
once. On calibration ``data``:

1. SmoothQuant (Xiao et al., 2023): where the producer of a group of linear layers' inputs can
   absorb a per-channel scale (``scale_pairs``: a pre-norm block's norms before the attention and
   MLP projections, values before the output projection, up before down in a gated MLP), the
   input channel ``j`` is divided by ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``α = smoothing``;
   ``max|W_j|`` over every layer reading the channel) and the weights' input channel multiplied
   by it: the float model computes the same function, and the outlier channels that would
   stretch a per-tensor activation scale move into the weights, which have a scale per output
   channel. ``max|X_j|`` is measured once on the float model (folding changes no function, so one
   pass serves every place). Layers whose input has no such producer — a post-norm encoder's
   attention and MLP inputs (the norm's output is also the residual), the MLP's down projection
   after GELU, a plain output projection — are quantized without migration (logged).
2. The weights are rounded to the symmetric int8 grid, per output channel (or per tensor), as
   scheme ``int8`` does; embeddings (which have no integer kernel) too, run in float.
3. Each linear layer's input range is measured on the calibration tokens (with the rounded
   weights) and fixed as an unsigned 8-bit grid: ``scale = (high - low) / 255`` and a zero point
   (``activation_grid``), ``[low, high]`` being the input's extremes clipped at the
   ``percentile`` of ``|x|`` over all its values (100: the extremes themselves). Unsigned
   activations times signed weights is what ONNX Runtime's x86 integer kernels run fastest
   (U8S8); the zero point spends the 256 levels on the actual range (a GELU output barely goes
   below zero).
4. Each layer becomes a ``W8A8Linear``, which quantizes its input with that grid and multiplies as
   the integer kernel does; its scale and zero point are saved beside the weight's codes (4 + 1
   bytes a layer) and an edit record rebuilds the layers when the model is loaded.

The ``onnx`` output format runs these layers as ``QuantizeLinear`` with the stored grid and ONNX
Runtime's ``MatMulIntegerToFloat``.
"""
from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.plugin import LINEAR_KINDS, SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

SCHEME = "w8a8"
#: The tensors a ``W8A8Linear`` adds to its layer's state dict, with their dtypes (scalars).
GRID_TENSORS = (("input_scale", "float32"), ("input_zero_point", "uint8"))
#: The default ``percentile`` of ``|x|`` at which static input ranges are clipped.
PERCENTILE = 100
NEEDS_DATA = ("scheme \"w8a8\" calibrates its static activation scales (and SmoothQuant's) on "
              "data = <a data set>")


def record(technique: str, modules: Sequence[str]) -> dict[str, Any]:
    """The edit record that rebuilds the W8A8 layers before the saved weights are loaded (their
    state dicts hold the activation grids)."""
    return {"technique": technique, "scheme": SCHEME, "modules": list(modules)}


def estimate_(meta: ModelMeta, technique: str, modules: Sequence[str]) -> None:
    """Add each W8A8 layer's activation scale and zero point to ``meta``, and its edit record."""
    from squeezelang.plugin import TensorMeta

    for name in modules:
        for key, dtype in GRID_TENSORS:
            meta.tensors[f"{name}.{key}"] = TensorMeta((), dtype)
            meta.modules[name].tensors.append(f"{name}.{key}")
    meta.add_edit(record(technique, modules))


def _rows(module: Any) -> torch.Tensor:
    """A linear layer's weight as ``[out, in]`` (a ``Conv1D`` stores ``[in, out]``)."""
    from squeezelang.plugin import linear_weight

    return linear_weight(module).float()


def _role(name: str) -> str:
    """A layer's name with its block number as ``*`` (``encoder.layer.*.output.dense``)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _unusable(pair: Any, model: Any, layers: set[str], codecs: dict[str, Any],
              shared: set[int]) -> str | None:
    """Why no scale folds at ``pair`` in this stage, or ``None`` when it can."""
    from squeezelang.plugin import get_module

    if not any(c in layers for c in pair.consumers):
        return "no layer reading it is quantized w8a8 here"
    for name in pair.consumers + (() if pair.norm_kind else (pair.producer,)):
        codec = codecs.get(f"{name}.weight") or {}
        if "quant" in codec or "cluster" in codec:
            return f"'{name}' is already quantized or clustered"
        if id(get_module(model, name).weight) in shared:
            return f"'{name}' shares its weight with another module"
    return None


def _scales(pair: Any, consumers: list[Any], channel_max: torch.Tensor,
            alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|X|^α / max|W|^(1-α)`` per producer channel (1 where either is 0)."""
    import torch

    index = pair.index(channel_max.shape[0])
    channels = pair.channels(channel_max.shape[0])

    def per_channel(values: torch.Tensor) -> torch.Tensor:  # grouped-query attention: the largest
        return torch.zeros(channels).scatter_reduce(0, index, values.float(), "amax")

    x = per_channel(channel_max)
    w = per_channel(torch.stack([_rows(c).abs().amax(0).cpu() for c in consumers]).amax(0))
    live = (x > 0) & (w > 0)
    s = x.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(min=1e-5)


def _spread(channel_max: torch.Tensor) -> float:
    """How much the largest input channel stands out: its ``max|x|`` over the median channel's."""
    median = float(channel_max.float().median())
    return float(channel_max.max()) / median if median > 0 else float("inf")


def smooth_(handle: ModelHandle, layers: Sequence[tuple[str, Any]], texts: Sequence[str],
            alpha: float, shared: set[int], ctx: StageContext) -> set[str] | None:
    """Fold SmoothQuant's scales wherever the inputs of ``layers`` (the stage's W8A8 layers) have
    a producer that absorbs them; return the names of the layers whose inputs were smoothed
    (``None`` at ``alpha = 0``: no migration asked for)."""
    import torch

    from squeezelang.plugin import fold_scales_, get_module, input_ranges, scale_pairs

    model = handle.model
    names = {n for n, _ in layers}
    if alpha == 0:
        ctx.log("quantize w8a8: smoothing = 0, no SmoothQuant migration")
        return None
    try:
        pairs = scale_pairs(model)
    except SqueezeError as exc:  # no registered family: nothing known to fold into
        ctx.log(f"quantize w8a8: no SmoothQuant migration ({exc})")
        return set()
    chosen = []
    for pair in pairs:
        reason = _unusable(pair, model, names, handle.codecs, shared)
        if reason is None:
            chosen.append(pair)
        elif any(c in names for c in pair.consumers):
            ctx.log(f"quantize w8a8: no migration at '{pair.producer}': {reason}")
    if not chosen:
        return set()
    readers = [(p.consumers[0], get_module(model, p.consumers[0])) for p in chosen]
    ranges = input_ranges(handle, texts, list(dict(readers).items()))
    before, after = [], []
    with torch.no_grad():
        for pair in chosen:
            channel_max = ranges[pair.consumers[0]].channel_max
            s = _scales(pair, [get_module(model, c) for c in pair.consumers], channel_max, alpha)
            fold_scales_(model, pair, s)
            before.append(_spread(channel_max))
            after.append(_spread(channel_max / s[pair.index(channel_max.shape[0])]))
    ctx.log(f"quantize w8a8: SmoothQuant (α = {alpha:g}) folded scales at {len(chosen)} places; "
            f"largest input channel / median channel {statistics.median(before):.1f} -> "
            f"{statistics.median(after):.1f} (median over the places)")
    return {c for p in chosen for c in p.consumers}


def swap_(handle: ModelHandle, layers: Sequence[tuple[str, Any]], texts: Sequence[str],
          percentile: float, smoothed: set[str] | None, ctx: StageContext) -> list[str]:
    """Calibrate each layer's activation grid and replace it by a ``W8A8Linear``; return their
    names (the weights are on their int8 grid already). ``smoothed``: the layers whose inputs
    SmoothQuant migrated (``None``: none was asked for)."""
    from squeezelang.plugin import W8A8Linear, activation_grid, input_ranges, set_module

    ranges = input_ranges(handle, texts, layers, percentile)
    for name, module in layers:
        scale, zero = activation_grid(ranges[name].low, ranges[name].high)
        set_module(handle.model, name, W8A8Linear.from_linear(module, scale, zero))
    tokens = max(r.tokens for r in ranges.values())
    clipped = ("the extremes" if percentile >= 100
               else f"clipped at the {percentile:g}th percentile of |x|")
    ctx.log(f"quantize w8a8: static uint8 activation grids of {len(layers)} layers from "
            f"{tokens:,} calibration tokens ({clipped})")
    plain = [n for n, _ in layers if smoothed is not None and n not in smoothed]
    if plain:
        roles: dict[str, int] = {}
        for name in plain:
            roles[_role(name)] = roles.get(_role(name), 0) + 1
        ctx.log(f"quantize w8a8: {len(plain)} of {len(layers)} layers quantized without "
                "SmoothQuant migration (no producer of their input can absorb a scale): "
                + ", ".join(f"{role} x{count}" for role, count in roles.items()))
    return [n for n, _ in layers]


def rebuild_(model: Any, record: dict[str, Any]) -> Any:
    """Replace the recorded layers by ``W8A8Linear`` shells (before the weights are loaded)."""
    from squeezelang.plugin import W8A8Linear, get_module, kind_of, set_module

    for name in record.get("modules", []):
        module = get_module(model, name)
        if kind_of(module) not in LINEAR_KINDS:
            raise SqueezeError(f"quantize: module '{name}' is a {kind_of(module)}, "
                               "not a linear layer")
        set_module(model, name, W8A8Linear.from_linear(module))
    return model
