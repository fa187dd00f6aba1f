"""``prune`` method ``sparsegpt``: prune with weight reconstruction (Frantar & Alistarh, 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Each layer's output on the calibration tokens is kept as close as possible to the dense layer's:
with ``H = XᵀX`` of its inputs (dampened by 1% of its mean diagonal), the columns (inputs) are
processed left to right in blocks of ``BLOCK``; when a weight is zeroed, the optimal-brain-surgeon
update spreads its error over the weights of the same row in the columns not yet processed, through
the Cholesky factor of ``H⁻¹`` (the scheme of GPTQ, with pruning instead of rounding). The mask is
chosen adaptively, one block at a time on the already-updated weights, by the OBS error
``w² / [H⁻¹]_cc²``: with ``ratio``, the lowest-scored entries of the whole block (each block loses
its share of the layer's count, as in the reference implementation, so the layer loses exactly
``magnitude``'s count); with ``n``/``m``, the ``m - n`` lowest of each run of ``m`` inputs, chosen
when the run is reached. See ``calibrated`` for the patterns, the storage and the block-by-block
pass over calibration ``data`` (``samples`` texts).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError
from squeezelang_plugins.prune.calibrated import Calibrated, pattern_of, removed_count

if TYPE_CHECKING:
    from collections import Counter

    import torch

#: Columns per block (the paper's and the reference's choice; N:M rounds it to a multiple of m).
BLOCK = 128
#: The dampening added to the Hessian's diagonal, as a fraction of its mean.
DAMP = 0.01


def _inverse_factor(gram: torch.Tensor, device: Any) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` (float32); inputs never seen
    get a unit diagonal, so their weights are scored by magnitude and move no other weight."""
    import torch

    H = gram.detach().to(device, torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += DAMP * float(torch.diag(H).mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=device)
    try:
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as exc:
        raise SqueezeError(f"SparseGPT: the Hessian is not positive definite ({exc}); more "
                           "calibration data may help") from None
    return factor.float()


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, removed: int = 0,
                    pattern: tuple[int, int] | None = None, block: int = BLOCK) -> torch.Tensor:
    """SparseGPT on a ``[out, in]`` float32 weight given ``XᵀX`` of its inputs; return the pruned,
    updated weight.

    Without ``pattern``, ``removed`` entries are zeroed (each block of columns loses its share,
    ``round(removed · end / in) - round(removed · start / in)``); with ``pattern`` ``(n, m)``, at
    most ``n`` of every run of ``m`` inputs stay. Entries already zero are zeroed first and stay
    zero (an earlier stage's sparsity survives the updates).
    """
    import torch

    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    cols = W.shape[1]
    zero = W == 0
    Hinv = _inverse_factor(gram, W.device)
    if pattern:
        block = max(pattern[1], block // pattern[1] * pattern[1])  # runs never straddle blocks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the column loop is thousands of small ops: no thread hand-offs
    try:
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            mask = zero[:, i1:i2].clone()
            if pattern is None:
                k = round(removed * i2 / cols) - round(removed * i1 / cols)
                score = (W1 / d).pow(2).masked_fill(mask, -1.0)
                mask.view(-1)[torch.argsort(score.reshape(-1), stable=True)[:k]] = True
            for i in range(i2 - i1):
                if pattern and i % pattern[1] == 0:
                    n, m = pattern
                    run = slice(i, i + m)
                    score = (W1[:, run] / d[run]).pow(2).masked_fill(mask[:, run], -1.0)
                    mask[:, run].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices,
                                          True)
                w = W1[:, i]
                q = w.masked_fill(mask[:, i], 0.0)
                Q1[:, i] = q
                err = (w - q) / d[i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    finally:
        torch.set_num_threads(threads)
    return W


class SparseGPT(Calibrated):
    name = "sparsegpt"
    summary = ("unstructured or N:M, zero weights by OBS error on calibration data and update the "
               "kept ones to reconstruct each layer's output (stored like magnitude or nm)")
    gram = True

    def prune_weight(self, weight: torch.Tensor, stats: Any, params: dict[str, Any],
                     tally: Counter[str] | None = None) -> torch.Tensor:
        pattern = pattern_of(params)
        removed = 0 if pattern else removed_count(weight.numel(), float(params["ratio"]))
        return sparsegpt_prune(weight, stats.gram, removed, pattern)
