"""Measured per-layer sensitivity: what replacing one weight ``W`` by ``Ŵ`` costs the model's outputs.

**Local error.** One pass over calibration texts (``linear_stats.input_stats`` with the Gram matrix)
gives, for every linear layer, ``H = XᵀX / tokens`` of its inputs; the mean squared change of the
layer's outputs per token is then exact for any replacement, without running the model again:

    error(W, Ŵ) = trace((W - Ŵ) H (W - Ŵ)ᵀ) = mean over tokens of ||(W - Ŵ) x||²

An embedding is a linear layer on one-hot inputs, so its ``H`` is diagonal — the frequency of each
row's id among the calibration tokens — and the same formula holds with ``H = diag(counts / tokens)``.

**What makes the sum over layers meaningful: each weight's effect on the final outputs, measured
around the uniform setting.** Local errors are not comparable across layers (outputs of very
different scale feed softmaxes, LayerNorms and residual sums), and local noise-to-signal ratios are
not either: on MiniLM a sum of ratios prunes the MLP output projections to 95% — their output energy
sits in a few outlier channels — and loses to the uniform setting. So ``costs`` measures:

1. every weight is set to its ``reference`` candidate — the uniform setting, the point the allocation
   moves away from — and the outputs' loss ``L`` is measured there (``around``, below);
2. for each weight in turn, every candidate that is *riskier* than the reference (a larger local
   error) is put in place and ``ΔL`` measured: that is its cost (at least 0). The loss grows faster
   than linearly with larger errors (2-bit codes, heavy pruning), so these are never extrapolated —
   measured on MiniLM, extrapolating from one step below int4 sends a third of the tensors to 2 bits
   and loses 7 Spearman points;
3. the *safer* candidates (smaller local error) can only help; they cost ``gain · (error - error_ref)``
   (at most 0), with ``gain = ΔL / Δerror`` measured at the safest-but-one neighbour of the reference.

With ``around = "uniform"`` the costs are changes of ``L`` around the uniform setting, where the
other layers are already compressed, so interactions between layers count to first order; their sum
over layers predicts how ``L`` changes with an allocation near that point (callers keep their
candidates near the reference). That suits pruning, whose layers interact strongly: measured alone,
sensitivities pick an allocation that loses to uniform 50% sparsity on MiniLM. ``around =
"original"`` measures each weight alone against the original model (the reference's own effect
subtracted). That suits rounding noise: at the uniform width the other layers' noise swamps one
layer's move, and differences measured there sent a third of MiniLM's tensors to 2 bits (7 Spearman
points lost against int4); measured alone, ``mixed`` at 4 bits beats int4. ``L`` is the mean squared change, against the original model on
the calibration texts, of what the task uses: for an embedding model the pairwise cosine
similarities of the texts' embeddings (invariant to rotations and shifts no similarity search
notices; cosine to the original embeddings did not track STS quality), otherwise the unit-length
fidelity rows (``forward.outputs_for_fidelity``: logits). It costs one forward pass over the texts per
riskier candidate and weight, one per weight for the safer side (and for the reference when measured
alone), and one more.
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
    index of the uniform setting's candidate (see the module docstring).
    """

    weight: Any
    readers: list[tuple[str, Any]]
    make: Callable[[], list[torch.Tensor]]
    reference: int


def costs(handle: ModelHandle, texts: Sequence[str], items: Sequence[Candidates],
          progress: Callable[..., Any] | None = None, around: str = "uniform") -> list[list[float]]:
    """``cost[i][o]``: the predicted change of the loss when weight ``i`` takes candidate ``o`` instead
    of its reference (see the module docstring). The model is left as it was.

    ``around = "uniform"`` measures each weight with every other weight at its reference;
    ``"original"`` with the others unchanged (each weight alone).
    """
    import torch

    stats = output_stats(handle, texts, [r for item in items for r in item.readers])
    target = signature(handle, texts)
    originals = [item.weight.detach().clone() for item in items]
    refs = [item.make()[item.reference] for item in items]
    out = []
    try:
        with torch.no_grad():
            if around == "uniform":
                for item, ref in zip(items, refs):
                    item.weight.copy_(ref)
            base = _loss(handle, texts, target)

            def loss_with(item: Candidates, candidate: torch.Tensor, rest: torch.Tensor) -> float:
                item.weight.copy_(candidate)
                try:
                    return _loss(handle, texts, target)
                finally:
                    item.weight.copy_(rest)

            for i in (progress(range(len(items)), desc="sensitivity") if progress else range(len(items))):
                item, ref, weight = items[i], refs[i], originals[i]
                rest = ref if around == "uniform" else weight
                item.weight.copy_(weight)  # make() reads the weight in place: the original
                candidates = item.make()
                item.weight.copy_(rest)
                local = [sum(stats[name].error(weight - c) for name, _ in item.readers)
                         for c in candidates]
                mid = local[item.reference]
                at_ref = base if around == "uniform" else loss_with(item, ref, rest)
                row = [0.0] * len(candidates)
                for o, err in enumerate(local):
                    if err > mid:
                        row[o] = max(loss_with(item, candidates[o], rest) - at_ref, 0.0)
                safer = [o for o, err in enumerate(local) if err < mid]
                if safer:
                    probe = max(safer, key=lambda o: local[o])
                    change = loss_with(item, candidates[probe], rest) - at_ref
                    gain = max(change / (local[probe] - mid), 0.0)
                    for o in safer:
                        row[o] = gain * (local[o] - mid)
                out.append(row)
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
