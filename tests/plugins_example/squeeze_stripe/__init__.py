"""Example third-party technique: ``stripe`` zeroes every ``period``-th input column of Linears.

A deliberately simple but real technique: its sparsity is known exactly before running
(``1 / period``), so its estimate is exact, and it stores the result with the engine's sparse codec.
"""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import Knob, Technique, hookimpl


class Stripe(Technique):
    name = "stripe"
    description = "zero every period-th input column of the selected Linear layers (stored sparse)"
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "period": {"type": "integer", "minimum": 2, "maximum": 64, "default": 4,
                       "description": "one input column in every `period` is zeroed"},
            "include": {"type": "array", "items": {"type": "string"}, "default": ["encoder.layer.*"]},
            "exclude": {"type": "array", "items": {"type": "string"}, "default": []},
        },
    }
    knobs = (Knob("period", 2, 64, compresses="down", integer=True),)
    produces = frozenset({"sparse"})
    example = 'stage s: stripe { period = 4, include = ["encoder.layer.*"] }'

    def estimate(self, meta: Any, params: dict[str, Any]) -> Any:
        from squeezelang.plugin import merge

        density = 1.0 - 1.0 / params["period"]
        for module in meta.select(("Linear",), params["include"], params["exclude"]):
            name = f"{module.name}.weight"
            tensor = meta.tensors[name]
            tensor.codec = merge(tensor.codec, {"sparse": True, "density": density})
        return meta

    def apply_(self, handle: Any, params: dict[str, Any], ctx: Any) -> None:
        import torch

        from squeezelang.plugin import merge, select_modules

        chosen = select_modules(handle.model, include=params["include"], exclude=params["exclude"])
        with torch.no_grad():
            for name, module in ctx.progress(chosen, desc="striping"):
                module.weight[:, :: params["period"]] = 0.0
                key = f"{name}.weight"
                handle.codecs[key] = merge(handle.codecs.get(key), {"sparse": True})


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Stripe())
