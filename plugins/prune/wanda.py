"""``prune`` method ``wanda``: zero the weights of least ``|w| × ‖x‖`` (Sun et al., 2023, "A Simple
and Effective Pruning Approach for Large Language Models").

A weight's score is its magnitude times the L2 norm of its input channel over the calibration
tokens, ``|W_ij| · ‖X_j‖₂``: a small weight on an input that is often large (an outlier feature)
matters more than a larger weight on an input that is nearly always zero. Weights are compared
within their output row (``compare = "row"``, the paper's choice for LLMs: each row loses the same
share; where ``ratio × inputs`` is not a whole number the rows whose next-lowest score is lowest
lose one more, so the layer loses exactly ``magnitude``'s count) or over the whole layer
(``compare = "layer"``). Neither wins everywhere (on the benchmark Llama "layer" does, on MiniLM
both beat magnitude), so by default (``compare = "auto"``) each layer takes, of the two masks, the
one that changes its output less on the calibration tokens, measured exactly with the inputs'
second-moment matrix ``H = XᵀX / tokens``: ``tr(ΔW H ΔWᵀ)``, ``ΔW`` the removed weights (this
costs the Gram matrix in the calibration pass, as for ``sparsegpt``; the stage log counts the
layers of each). With ``n``/``m`` the ``n`` best-scored of every run of ``m`` inputs stay. The kept
weights are not changed. One forward pass per block over calibration ``data`` (``samples`` texts);
see ``calibrated`` for the patterns, the storage and the block-by-block pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang_plugins.prune.calibrated import Calibrated, pattern_of, removed_count
from squeezelang_plugins.prune.nm import nm_mask

if TYPE_CHECKING:
    from collections import Counter

    import torch

#: Elements of one row chunk of ``ΔW`` (and of ``ΔW H``) in ``output_error``: 64 MiB of float32.
CHUNK = 1 << 24


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


def output_error(removed: torch.Tensor, gram: torch.Tensor, chunk: int = CHUNK) -> float:
    """``tr(ΔW H ΔWᵀ)``: the mean squared change per token of a layer's outputs when the ``[out,
    in]`` weights ``removed`` are taken away, given ``H = XᵀX / tokens`` of its inputs; a few rows
    at a time (``chunk`` elements), so a 32,000-row layer needs no ``[out, in]`` product."""
    import torch

    h = gram.to(removed.device, torch.float32)
    step = max(1, chunk // max(removed.shape[1], 1))
    total = 0.0
    for start in range(0, removed.shape[0], step):
        d = removed[start:start + step].float()
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return total


def keep_mask(weight: torch.Tensor, stats: Any, removed: int, compare: str,
              tally: Counter[str] | None = None) -> torch.Tensor:
    """Wanda's keep-mask of an unstructured ``[out, in]`` weight losing ``removed`` entries,
    compared by ``compare`` (``"row"``, ``"layer"`` or ``"auto"``: the one of the two whose removed
    weights change the outputs less, by ``output_error`` with ``stats.gram``; a tie keeps "row").
    ``tally`` counts the comparison taken."""
    score = wanda_score(weight, stats.sq_mean)
    masks = {}
    if compare in ("row", "auto"):
        masks["row"] = row_keep_mask(score, removed)
    if compare in ("layer", "auto"):
        masks["layer"] = row_keep_mask(score.reshape(1, -1), removed).reshape(score.shape)
    if len(masks) > 1:
        error = {k: output_error(weight * ~mask, stats.gram) for k, mask in masks.items()}
        compare = "layer" if error["layer"] < error["row"] else "row"
    if tally is not None:
        tally[f'compare = "{compare}"'] += 1
    return masks[compare]


class Wanda(Calibrated):
    name = "wanda"
    summary = ("unstructured or N:M, zero the weights of least |w| x input norm on calibration "
               "data, per output row or layer (no weight update; stored like magnitude or nm)")
    properties = {
        **Calibrated.properties,
        "compare": {"type": "string", "enum": ["auto", "row", "layer"], "default": "auto",
                    "description": "which weights a score competes with (wanda, with `ratio`): "
                                   "'row': those of its output row, every row loses `ratio` (the "
                                   "Wanda paper's choice for LLMs); 'layer': the whole layer's; "
                                   "'auto': per layer, whichever of the two changes the layer's "
                                   "output less on the calibration data (exactly, with XᵀX of "
                                   "its inputs)"},
    }
    ratio_only = ("compare",)

    def needs_gram(self, params: dict[str, Any]) -> bool:
        return not pattern_of(params) and params.get("compare", "auto") == "auto"

    def prune_weight(self, weight: torch.Tensor, stats: Any, params: dict[str, Any],
                     tally: Counter[str] | None = None) -> torch.Tensor:
        pattern = pattern_of(params)
        if pattern:
            return weight * nm_mask(wanda_score(weight, stats.sq_mean), pattern[0], pattern[1], -1)
        removed = removed_count(weight.numel(), float(params["ratio"]))
        return weight * keep_mask(weight, stats, removed, params.get("compare", "auto"), tally)
