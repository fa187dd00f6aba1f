"""``prune`` method ``wanda``: zero the weights of least ``|w| × ‖x‖`` (Sun et al., 2023, "A Simple
and Effective Pruning Approach for Large Language Models").

A weight's score is its magnitude times the L2 norm of its input channel over the calibration
tokens, ``|W_ij| · ‖X_j‖₂``: a small weight on an input that is often large (an outlier feature)
matters more than a larger weight on an input that is nearly always zero. Weights are compared
within their output row (``compare = "row"``, the paper's choice for LLMs: each row loses the same
share; where ``ratio × inputs`` is not a whole number the rows whose next-lowest score is lowest
lose one more, so the layer loses exactly ``magnitude``'s count) or over the whole layer
(``compare = "layer"``); with ``n``/``m`` the ``n`` best-scored of every run of ``m`` inputs stay.
The kept weights are not changed. One forward pass per block over calibration ``data`` (``samples``
texts); see ``calibrated`` for the patterns, the storage and the block-by-block pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang_plugins.prune.calibrated import Calibrated, pattern_of, removed_count
from squeezelang_plugins.prune.nm import nm_mask

if TYPE_CHECKING:
    import torch


def row_keep_mask(score: torch.Tensor, removed: int) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` score without its ``removed`` lowest entries, spread over the
    rows: each loses ``removed // out`` (its lowest), and the ``removed % out`` rows whose next
    candidate scores lowest one more. Ties go in position order, so the mask is deterministic."""
    import torch

    rows, cols = score.shape
    order = torch.argsort(score, dim=1, stable=True)
    base, extra = divmod(removed, rows)
    per_row = torch.full((rows,), base, dtype=torch.long, device=score.device)
    if extra:
        nxt = score.gather(1, order[:, base:base + 1]).squeeze(1)
        per_row[torch.argsort(nxt, stable=True)[:extra]] += 1
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=score.device).expand(rows, cols))
    return rank >= per_row[:, None]


def wanda_score(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖`` of a ``[out, in]`` weight, given each input's mean square over tokens (the
    token count scales every score of a layer alike, so the root mean square ranks as the norm)."""
    return weight.abs() * sq_mean.to(weight.device, weight.dtype).sqrt()[None, :]


class Wanda(Calibrated):
    name = "wanda"
    summary = ("unstructured or N:M, zero the weights of least |w| x input norm on calibration "
               "data, per output row (no weight update; stored like magnitude or nm)")
    properties = {
        **Calibrated.properties,
        "compare": {"type": "string", "enum": ["row", "layer"], "default": "row",
                    "description": "which weights a score competes with (wanda, with `ratio`): "
                                   "'row': those of its output row, every row loses `ratio` (the "
                                   "Wanda paper's choice for LLMs); 'layer': the whole layer's"},
    }
    ratio_only = ("compare",)

    def prune_weight(self, weight: torch.Tensor, stats: Any, params: dict[str, Any]) -> torch.Tensor:
        score = wanda_score(weight, stats.sq_mean)
        pattern = pattern_of(params)
        if pattern:
            return weight * nm_mask(score, pattern[0], pattern[1], -1)
        removed = removed_count(weight.numel(), float(params["ratio"]))
        if params.get("compare", "row") == "layer":
            return weight * row_keep_mask(score.reshape(1, -1), removed).reshape(score.shape)
        return weight * row_keep_mask(score, removed)
