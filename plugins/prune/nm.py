"""``prune`` method ``nm``: N:M semi-structured sparsity (2:4 by default) on linear layers.

In every run of ``m`` consecutive weights along the input dimension only the ``n`` of largest
``|w|`` stay; the others become zeros. That is the pattern sparse tensor cores accelerate, and it
is stored with the ``{"nm": [n, m]}`` codec: the ``n`` kept values of each run plus their
positions in ``ceil(log2 m)`` bits. The removed fraction is ``1 - n/m``, so there is no ``ratio``.
Layers whose input dimension is not a multiple of ``m`` are left alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import LINEAR_KINDS, NM_MAX_M, SqueezeError
from squeezelang_plugins.prune.base import PruneMethod

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext


def input_axis(kind: str) -> int:
    """The weight axis of the input channels: ``-1`` for ``Linear`` ``[out, in]``, ``0`` for ``Conv1D``."""
    return 0 if kind == "Conv1D" else -1


def nm_spec(old: dict[str, Any] | None, n: int, m: int, kind: str) -> dict[str, Any]:
    """``old`` with its zeros described by N:M runs instead of a bitmask (``sparse`` dropped)."""
    axis = input_axis(kind)
    spec = {k: v for k, v in (old or {}).items() if k not in ("sparse", "density", "nm")}
    spec["nm"] = [n, m] if axis == -1 else [n, m, axis]
    return spec


def nm_mask(weight: torch.Tensor, n: int, m: int, axis: int) -> torch.Tensor:
    """Boolean keep-mask of the ``n`` largest ``|w|`` in every run of ``m`` along ``axis``."""
    import torch

    moved = weight.detach().movedim(axis, -1)
    runs = moved.abs().reshape(-1, m)
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(1, torch.topk(runs, n, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


class NM(PruneMethod):
    name = "nm"
    produces = frozenset({"sparse"})
    summary = ("semi-structured N:M, keep the n largest |w| of every m consecutive inputs "
               "(2:4 by default; removes 1 - n/m; stored as kept values + positions)")
    properties = {
        "n": {"type": "integer", "minimum": 1, "maximum": NM_MAX_M - 1, "default": 2,
              "description": "weights kept in every run of `m` (methods nm, wanda, sparsegpt; for the "
                             "last two, n and m ask for N:M runs instead of `ratio`)"},
        "m": {"type": "integer", "minimum": 2, "maximum": NM_MAX_M, "default": 4,
              "description": "length of a run of consecutive input weights (methods nm, wanda, "
                             "sparsegpt)"},
    }
    common = ("include", "exclude")

    def stores(self, params: dict[str, Any]) -> frozenset[str]:
        return frozenset({"n:m"})

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        n, m = params.get("n", 2), params.get("m", 4)
        if isinstance(n, int) and isinstance(m, int) and n >= m:
            return [("n", f"n ({n}) must be smaller than m ({m})")]
        return []

    def _fits(self, shape: tuple[int, ...], kind: str, m: int) -> bool:
        return len(shape) == 2 and shape[input_axis(kind)] % m == 0

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Exact: the kept count is ``n/m`` of each weight whatever its values."""
        n, m = int(params["n"]), int(params["m"])
        out = meta.copy()
        for mod in out.select(LINEAR_KINDS, params.get("include"), params.get("exclude", ())):
            name = f"{mod.name}.weight"
            if name in out.tensors and self._fits(out.tensors[name].shape, mod.kind, m):
                t = out.tensors[name]
                t.codec = nm_spec(t.codec, n, m, mod.kind)
        out.states.add("sparse")
        return out

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import kind_of, select_modules

        problems = self.check(params)
        if problems:
            raise SqueezeError("prune: " + "; ".join(msg for _, msg in problems))
        n, m = int(params["n"]), int(params["m"])
        targets = select_modules(handle.model, LINEAR_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("prune: include/exclude select no linear layer of the model")
        done, skipped = 0, []
        with torch.no_grad():
            for name, module in targets:
                kind = kind_of(module)
                if not self._fits(tuple(module.weight.shape), kind, m):
                    skipped.append(name)
                    continue
                mask = nm_mask(module.weight, n, m, input_axis(kind))
                module.weight.mul_(mask.to(module.weight.dtype))
                key = f"{name}.weight"
                handle.codecs[key] = nm_spec(handle.codecs.get(key), n, m, kind)
                done += 1
        if skipped:
            ctx.log(f"prune nm: {len(skipped)} layer(s) with an input dimension not a multiple of "
                    f"{m} left dense: {', '.join(skipped[:3])}")
        if not done:
            raise SqueezeError(f"prune: no selected layer has an input dimension divisible by m={m}")
        handle.states.add("sparse")
        ctx.log(f"pruned {done} layers to {n}:{m} sparsity ({1 - n / m:.0%} removed)")
