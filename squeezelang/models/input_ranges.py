"""Ranges of the inputs of linear layers on calibration texts: what static activation quantization
and SmoothQuant read.

``input_ranges`` runs the model once over the texts with forward pre-hooks on chosen ``Linear`` /
``Conv1D`` modules and records, over the non-padding tokens, each input channel's largest ``|x|``,
the input's smallest and largest value, and, for a ``percentile`` below 100, a histogram of
``|x|`` over every value of the input (``BINS_PER_OCTAVE`` logarithmic bins an octave: a relative
resolution of about 2%), from which the input's range is clipped to that percentile of ``|x|``.
Layers reading one tensor (``q``, ``k``, ``v``) share its statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle

#: Logarithmic histogram of ``|x|``: bins per octave, and the octaves covered (``2**LOW`` to
#: ``2**HIGH``; smaller values, zeros included, fall in the first bin).
BINS_PER_OCTAVE = 32
LOW, HIGH = -40, 40


@dataclass
class InputRange:
    """The input range of one linear layer over ``tokens`` calibration tokens.

    ``channel_max``: ``max |x_j|`` per input channel (float32, ``[in]``); ``low`` and ``high``:
    the smallest and largest value, clipped to ``±clip``, the ``percentile`` of ``|x|`` over every
    value (the exact extremes at 100).
    """

    tokens: int
    channel_max: torch.Tensor
    low: float
    high: float
    clip: float


class _Sums:
    """What the hooks accumulate for one input tensor."""

    def __init__(self) -> None:
        self.tokens = 0
        self.channel_max: Any = None
        self.low = math.inf
        self.high = -math.inf
        self.histogram: Any = None


def _bins(magnitudes: torch.Tensor) -> torch.Tensor:
    """Counts of ``|x|`` in the logarithmic bins."""
    import torch

    count = (HIGH - LOW) * BINS_PER_OCTAVE
    index = torch.floor((torch.log2(magnitudes) - LOW) * BINS_PER_OCTAVE)
    index = torch.nan_to_num(index, nan=0.0, neginf=0.0).clamp_(0, count - 1).long()
    return torch.bincount(index, minlength=count)


def _percentile(histogram: torch.Tensor, percentile: float) -> float:
    """The upper edge of the bin holding the ``percentile`` of the counted values."""
    import torch

    total = int(histogram.sum())
    rank = max(1, math.ceil(total * percentile / 100.0))
    where = int(torch.searchsorted(torch.cumsum(histogram, 0), rank))
    return 2.0 ** (LOW + (where + 1) / BINS_PER_OCTAVE)


def input_ranges(handle: ModelHandle, texts: Sequence[str], modules: Sequence[tuple[str, Any]],
                 percentile: float = 100.0, batch_size: int = 16,
                 max_length: int = 128) -> dict[str, InputRange]:
    """The input ranges of ``modules`` (``[(name, module)]``) over the texts' tokens (one pass).

    ``percentile`` (in ``(0, 100]``) clips each input's range to that percentile of ``|x|``;
    ``SqueezeError`` for a module the texts never reach.
    """
    import torch

    from squeezelang.models.forward import _batches
    from squeezelang.models.linear_stats import no_cache

    if not 0 < percentile <= 100:
        raise SqueezeError(f"percentile must be in (0, 100], not {percentile}")
    model = handle.model.eval()
    sums: dict[str, _Sums] = {}
    live: dict[str, Any] = {}

    def measure(x: torch.Tensor) -> tuple[int, Any, float, float, Any]:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        if key not in live["seen"]:
            mask = live["mask"]
            rows = x[mask] if tuple(x.shape[:2]) == tuple(mask.shape) else x
            rows = rows.reshape(-1, x.shape[-1]).float()
            magnitudes = rows.abs()
            histogram = _bins(magnitudes.reshape(-1)) if percentile < 100 else None
            live["seen"][key] = (x, rows.shape[0], magnitudes.amax(0), float(rows.min()),
                                 float(rows.max()), histogram)
        return live["seen"][key][1:]

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            n, channel_max, low, high, histogram = measure(args[0])
            acc = sums.setdefault(name, _Sums())
            acc.tokens += n
            acc.channel_max = (channel_max.clone() if acc.channel_max is None
                               else torch.maximum(acc.channel_max, channel_max))
            acc.low, acc.high = min(acc.low, low), max(acc.high, high)
            if histogram is not None:
                acc.histogram = (histogram.clone() if acc.histogram is None
                                 else acc.histogram + histogram)
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    try:
        with torch.inference_mode():
            for _, inputs in _batches(handle, list(texts), None, batch_size, max_length):
                live["mask"], live["seen"] = inputs["attention_mask"].bool(), {}
                model(**inputs, **no_cache(model))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, _ in modules:
        acc = sums.get(name)
        if acc is None or not acc.tokens:
            raise SqueezeError(f"calibration: layer '{name}' was never called on the data")
        clip = max(-acc.low, acc.high)
        if acc.histogram is not None:
            clip = min(clip, _percentile(acc.histogram, percentile))
        out[name] = InputRange(acc.tokens, acc.channel_max.cpu(), max(acc.low, -clip),
                               min(acc.high, clip), clip)
    return out
