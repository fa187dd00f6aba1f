"""Measured per-layer sensitivity: what replacing one weight ``W`` by ``Ŵ`` costs the model's outputs.

**Local error.** One pass over calibration texts (``linear_stats.input_stats`` with the Gram matrix)
gives, for every linear layer, ``H = XᵀX / tokens`` of its inputs; the mean squared change of the
layer's outputs per token is then exact for any replacement, without running the model again:

    error(W, Ŵ) = trace((W - Ŵ) H (W - Ŵ)ᵀ) = mean over tokens of ||(W - Ŵ) x||²

An embedding is a linear layer on one-hot inputs, so its ``H`` is diagonal — the frequency of each
row's id among the calibration tokens — and the same formula holds with ``H = diag(counts / tokens)``.

**What makes the sum over layers meaningful: an end-to-end gain per weight, at the uniform
setting.** Local errors are not comparable across layers (outputs of very different scale feed
softmaxes, LayerNorms and residual sums), and local noise-to-signal ratios are not either: on MiniLM a
sum of ratios prunes the MLP output projections to 95% — their output energy sits in a few outlier
channels — and loses to the uniform setting. So each weight's local error is converted into its
effect on the model's final outputs, measured:

1. every weight is set to its ``reference`` candidate — the uniform setting, the point the allocation
   moves away from — and the outputs' loss ``L`` is measured there;
2. each weight in turn is moved to its ``probe`` candidate (a neighbour of the reference), ``L`` is
   measured again, and ``gain = ΔL / Δerror`` (clamped at 0);
3. a candidate costs ``gain · error(W, Ŵ)``.

That is the first-order expansion of ``L`` around the uniform setting, where the other layers are
already compressed, so interactions between layers count; summed over layers it predicts how ``L``
changes with any allocation near that point (callers keep their candidates near the reference:
measured on MiniLM, a sensitivity taken on the uncompressed model mispredicts both interactions and
large moves, and the allocation it picks at 50% sparsity loses to uniform). ``L`` is the mean squared
change, against the original model on the calibration texts, of what the task uses: for an
embedding model the pairwise cosine similarities of the texts' embeddings (invariant to rotations
and shifts that no similarity search notices; cosine to the original embeddings did not track STS
quality), otherwise the unit-length fidelity rows (``forward.outputs_for_fidelity``: logits). It costs
one forward pass over the texts per weight, plus one.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle


@dataclass
class OutputStats:
    """The second moment of one module's inputs over ``tokens`` calibration tokens.

    ``second`` is ``XᵀX / tokens`` (``[in, in]``) for a ``Linear``/``Conv1D``, and the frequency of each
    row's id (``[rows]``) for an ``Embedding``. ``kind`` says how the weight is laid out.
    """

    kind: str
    second: torch.Tensor
    tokens: int

    def error(self, delta: torch.Tensor) -> float:
        """Mean squared change of the outputs per token when the weight changes by ``delta``."""
        import torch

        d = delta.detach().float()
        if self.kind == "Embedding":
            return float((d.pow(2).sum(1).double() * self.second).sum())
        if self.kind == "Conv1D":  # GPT-2 stores [in, out]
            d = d.t()
        h = self.second.to(torch.float32)
        return float(((d @ h) * d).sum(dtype=torch.float64))


@dataclass
class Candidates:
    """The options of one weight in an allocation.

    ``weight`` is the parameter (once, even if several modules read it: ``readers``, ``[(name,
    module)]``); ``make()`` returns its candidate replacements, same shape; ``reference`` is the
    index of the uniform setting's candidate and ``probe`` that of a neighbour (see the module
    docstring).
    """

    weight: Any
    readers: list[tuple[str, Any]]
    make: Callable[[], list[torch.Tensor]]
    reference: int
    probe: int


def costs(handle: ModelHandle, texts: Sequence[str], items: Sequence[Candidates],
          progress: Callable[..., Any] | None = None) -> list[list[float]]:
    """``cost[i][o]``: the predicted loss when weight ``i`` takes candidate ``o`` (``gain · error``, up
    to a constant per weight; see the module docstring). The model is left as it was."""
    import torch

    stats = output_stats(handle, texts, [r for item in items for r in item.readers])
    target = signature(handle, texts)
    originals = [item.weight.detach().clone() for item in items]
    local, refs, probes = [], [], []
    for item, weight in zip(items, originals):
        candidates = item.make()
        local.append([sum(stats[name].error(weight - c) for name, _ in item.readers)
                      for c in candidates])
        refs.append(candidates[item.reference])
        probes.append(candidates[item.probe])
    out = []
    try:
        with torch.no_grad():
            for item, ref in zip(items, refs):
                item.weight.copy_(ref)
            loss = _loss(handle, texts, target)
            for i in (progress(range(len(items)), desc="sensitivity") if progress else range(len(items))):
                item = items[i]
                moved = local[i][item.probe] - local[i][item.reference]
                item.weight.copy_(probes[i])
                change = _loss(handle, texts, target) - loss
                item.weight.copy_(refs[i])
                gain = max(change / moved, 0.0) if moved else 0.0
                out.append([gain * e for e in local[i]])
    finally:
        with torch.no_grad():
            for item, weight in zip(items, originals):
                item.weight.copy_(weight)
    return out


def signature(handle: ModelHandle, texts: Sequence[str]) -> torch.Tensor:
    """What the loss compares: pairwise cosines of the embeddings, or unit-length fidelity rows."""
    import torch

    from squeezelang.models.forward import outputs_for_fidelity

    rows = outputs_for_fidelity(handle, texts).double()
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-12)
    if handle.task != "embedding" or len(rows) < 2:
        return rows
    upper = torch.triu_indices(len(rows), len(rows), 1)
    return (rows @ rows.t())[upper[0], upper[1]]


def _loss(handle: ModelHandle, texts: Sequence[str], target: torch.Tensor) -> float:
    """Mean squared change of the signature against ``target`` (the original model's)."""
    return float((signature(handle, texts) - target).pow(2).mean())


def output_stats(handle: ModelHandle, texts: Sequence[str],
                 modules: Sequence[tuple[str, Any]]) -> dict[str, OutputStats]:
    """``OutputStats`` of every ``(name, module)`` (linear layers and embeddings), in one pass."""
    from squeezelang.models.linear_stats import input_stats
    from squeezelang.models.select import LINEAR_KINDS, kind_of

    linear = [(n, m) for n, m in modules if kind_of(m) in LINEAR_KINDS]
    embeddings = [(n, m) for n, m in modules if kind_of(m) == "Embedding"]
    with _counting_ids(handle, embeddings) as (counts, tokens):
        stats = input_stats(handle, texts, linear, gram=True)
    out = {n: OutputStats(kind_of(m), stats[n].gram, stats[n].tokens) for n, m in linear}
    for name, _ in embeddings:
        out[name] = OutputStats("Embedding", counts[name] / max(tokens[name], 1), tokens[name])
    return out


@contextmanager
def _counting_ids(handle: ModelHandle, embeddings: Sequence[tuple[str, Any]]) -> Iterator[
        tuple[dict[str, Any], dict[str, int]]]:
    """Count the ids each embedding looks up on non-padding tokens while the block runs.

    Yields ``(counts, tokens)`` filled in place. The attention mask is taken from the model's own call
    (``model(**inputs)``); an id tensor that does not broadcast to it is counted whole.
    """
    import torch

    model = handle.model
    live: dict[str, Any] = {"mask": None}
    counts = {n: torch.zeros(m.num_embeddings, dtype=torch.float64) for n, m in embeddings}
    tokens = {n: 0 for n, _ in embeddings}

    def on_model(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        live["mask"] = mask.bool() if mask is not None else None

    def on_embedding(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            ids, mask = args[0], live["mask"]
            if mask is not None:
                try:
                    ids = ids.expand_as(mask)[mask]
                except RuntimeError:  # not broadcastable to [batch, tokens]: count every id
                    pass
            ids = ids.reshape(-1)
            counts[name] += torch.bincount(ids, minlength=module.num_embeddings).double()
            tokens[name] += int(ids.numel())
        return hook

    hooks = [model.register_forward_pre_hook(on_model, with_kwargs=True)] if embeddings else []
    hooks += [m.register_forward_pre_hook(on_embedding(n)) for n, m in embeddings]
    try:
        yield counts, tokens
    finally:
        for h in hooks:
            h.remove()
