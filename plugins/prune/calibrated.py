"""What the calibrated unstructured methods (``wanda``, ``sparsegpt``) share: the pattern, the
checks, the estimate and the block-by-block pass over calibration data.

Either pattern of the magnitude methods, and the same file as theirs:

* ``ratio`` (unstructured): every selected layer loses ``round(ratio × weights)`` weights, stored
  with ``magnitude``'s ``{"sparse": true}`` codec, so the file is exactly as large as
  ``magnitude``'s at the same ``ratio``;
* ``n`` and ``m`` (N:M, instead of ``ratio``): ``n`` weights stay in every run of ``m`` consecutive
  inputs, stored with ``nm``'s ``{"nm": [n, m]}`` codec (layers whose input dimension is not a
  multiple of ``m`` stay dense, as with ``nm``).

The layers are pruned block by block, in the order the blocks run: a block's inputs are captured
(``models.linear_stats.input_stats``) with every earlier block already pruned, so each block sees
the inputs it will see at inference, and only one block's statistics are held at a time — the
scheme of GPTQ in ``quantize`` and of the Wanda and SparseGPT reference code. A weight read by
several selected modules is pruned once, with the inputs of its first reader.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.plugin import LINEAR_KINDS, SqueezeError, merge
from squeezelang_plugins.prune.activation import DATA, SAMPLES
from squeezelang_plugins.prune.base import PruneMethod
from squeezelang_plugins.prune.magnitude import Magnitude
from squeezelang_plugins.prune.nm import NM, input_axis, nm_spec

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

#: The N:M parameters, which replace ``ratio``.
NM_KEYS = ("n", "m")


def pattern_of(params: dict[str, Any]) -> tuple[int, int] | None:
    """``(n, m)`` when the stage asks for N:M runs (``n`` or ``m`` given), else ``None`` (``ratio``)."""
    if not any(k in params for k in NM_KEYS):
        return None
    return int(params.get("n", 2)), int(params.get("m", 4))


def removed_count(numel: int, ratio: float) -> int:
    """The weights a layer loses at ``ratio``: ``magnitude``'s count, which its estimate assumes."""
    return int(round(ratio * numel))


class Calibrated(PruneMethod):
    """A method that prunes each layer from its weights and statistics of its inputs."""

    produces = frozenset({"sparse"})
    properties = {"n": NM.properties["n"], "m": NM.properties["m"], "data": DATA, "samples": SAMPLES}
    #: Whether ``prune_weight`` needs the inputs' second-moment matrix ``XᵀX / tokens`` (the
    #: default of ``needs_gram``).
    gram: ClassVar[bool] = False
    #: Properties only the unstructured pattern (``ratio``) reads.
    ratio_only: ClassVar[tuple[str, ...]] = ()

    def needs_gram(self, params: dict[str, Any]) -> bool:
        """Whether ``prune_weight`` needs the inputs' second-moment matrix ``XᵀX / tokens`` (in
        ``stats.gram``) for these parameters; ``gram`` unless a method says otherwise."""
        return self.gram

    def prune_weight(self, weight: torch.Tensor, stats: Any, params: dict[str, Any],
                     tally: Counter[str] | None = None) -> torch.Tensor:
        """The pruned ``[out, in]`` float32 ``weight`` given its inputs' ``InputStats``: with N:M
        runs (``pattern_of(params)``), at most ``n`` nonzeros in every run of ``m`` along a row;
        else ``removed_count(weight.numel(), params["ratio"])`` zeros (on a dense weight,
        exactly). Zeros it has already (an earlier stage's) are the first to go, so they stay
        zero. ``tally`` counts a choice the method made for the layer (the stage log lists the
        counts)."""
        raise NotImplementedError

    def used(self, all_properties: dict[str, Any], params: dict[str, Any] | None = None) -> set[str]:
        keys = super().used(all_properties, params)
        if params is not None:
            keys -= {"ratio", *self.ratio_only} if pattern_of(params) else set(NM_KEYS)
        return keys

    def stores(self, params: dict[str, Any]) -> frozenset[str]:
        return frozenset({"n:m"}) if pattern_of(params) else frozenset({"sparse"})

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        errors: list[tuple[str | None, str]] = []
        if pattern_of(params):
            if "ratio" in params:
                errors.append(("ratio", f"prune method '{self.name}' takes either ratio "
                                        "(unstructured) or n and m (N:M runs, which remove "
                                        "1 - n/m), not both"))
            errors += [(key, f"'{key}' applies to unstructured pruning (ratio) only, not to N:M "
                             "runs") for key in self.ratio_only if key in params]
        errors += NM().check(params)
        if not params.get("data"):
            errors.append((None, f"prune method '{self.name}' needs calibration data: "
                                 "data = <a declared data set>"))
        return errors

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Exact, and the same as ``nm``'s (N:M) or ``magnitude``'s (``ratio``, scope "layer")."""
        if pattern_of(params):
            return NM().estimate(meta, params)
        return Magnitude().estimate(meta, params)

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import (by_block, calibration_texts, input_stats, kind_of,
                                        select_modules)

        problems = self.check(params)
        if problems:
            raise SqueezeError("prune: " + "; ".join(msg for _, msg in problems))
        pattern = pattern_of(params)
        targets = select_modules(handle.model, LINEAR_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("prune: include/exclude select no linear layer of the model")
        texts = calibration_texts(ctx, params.get("data"), int(params["samples"]),
                                  f"prune {self.name}")
        seen: set[int] = set()
        layers, dense = [], []
        for name, module in targets:
            if id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            if pattern and module.weight.shape[input_axis(kind_of(module))] % pattern[1]:
                dense.append(name)
            else:
                layers.append((name, module))
        if dense:
            ctx.log(f"prune {self.name}: {len(dense)} layer(s) with an input dimension not a "
                    f"multiple of {pattern[1]} left dense: {', '.join(dense[:3])}")
        if not layers:
            raise SqueezeError(f"prune: no selected layer has an input dimension divisible by "
                               f"m={pattern[1]}")
        zeros = total = 0
        tally: Counter[str] = Counter()
        with torch.no_grad():
            for block, members in ctx.progress(by_block(handle.model, layers), desc=self.name):
                stats = input_stats(handle, texts, members, gram=self.needs_gram(params),
                                    stop_after=block)
                for name, module in members:
                    kind = kind_of(module)
                    weight = module.weight
                    w = weight.detach().t() if kind == "Conv1D" else weight.detach()
                    pruned = self.prune_weight(w.float(), stats[name], params, tally)
                    weight.copy_((pruned.t() if kind == "Conv1D" else pruned).to(weight.dtype))
                    key = f"{name}.weight"
                    old = handle.codecs.get(key)
                    handle.codecs[key] = (nm_spec(old, pattern[0], pattern[1], kind) if pattern
                                          else merge(old, {"sparse": True}))
                    zeros += int((weight == 0).sum())
                    total += weight.numel()
        handle.states.add("sparse")
        what = f"{pattern[0]}:{pattern[1]} runs" if pattern else "unstructured"
        ctx.log(f"prune {self.name} ({what}): {zeros}/{total} weights zero "
                f"({zeros / max(total, 1):.1%}) in {len(layers)} layers, calibrated on "
                f"{len(texts)} texts"
                + "".join(f"; {choice}: {n} layer(s)" for choice, n in sorted(tally.items())))
