"""The built-in ``prune`` technique: one technique, several methods, each in its own module.

``METHODS`` maps a method name to a ``PruneMethod``: the schema properties it adds, its checks, its
estimate and its ``apply_``. The technique's schema is the union of every method's properties; a
property that the chosen method does not use is a check-time error (``check``), so a recipe never
carries a silently ignored parameter. Adding a method is adding a module and one line below.
"""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import Candidate, Knob, Technique, hookimpl
from squeezelang_plugins.prune.base import COMMON, PruneMethod
from squeezelang_plugins.prune.activation import Activation
from squeezelang_plugins.prune.depth import Depth
from squeezelang_plugins.prune.magnitude import Magnitude
from squeezelang_plugins.prune.nm import NM
from squeezelang_plugins.prune.sparsegpt import SparseGPT
from squeezelang_plugins.prune.wanda import Wanda

#: method name -> implementation; the first is the default.
METHODS: dict[str, PruneMethod] = {m.name: m for m in (Magnitude(), Activation(), Depth(), NM(),
                                                       Wanda(), SparseGPT())}


def _schema() -> dict[str, Any]:
    props: dict[str, Any] = {
        "method": {"type": "string", "enum": list(METHODS), "default": next(iter(METHODS)),
                   "description": "the pruning algorithm: " + "; ".join(
                       f"{m.name}: {m.summary}" for m in METHODS.values())},
        **COMMON,
    }
    for method in METHODS.values():
        for key, prop in method.properties.items():
            props.setdefault(key, prop)
    return {"type": "object", "additionalProperties": False, "properties": props}


class Prune(Technique):
    name = "prune"
    description = ("Remove the least important weights. Unstructured methods zero single weights "
                   "(stored as bitmask + values, so the file shrinks); structured methods remove "
                   "whole heads, neurons, channels or layers, leaving a smaller standard "
                   "architecture. `ratio` is the fraction removed.")
    methods = tuple(METHODS)
    schema = _schema()
    knobs = (Knob("ratio", 0.0, 0.95, compresses="up", description="fraction removed"),)
    produces = frozenset({"sparse"})
    data_params = {"data": "text|a,b"}
    example = 'stage sparse: prune { method = "magnitude", ratio = 50%, scope = "layer" }'

    def candidates(self, task: str) -> list[Candidate]:
        """Unstructured pruning by magnitude, or by Wanda's |w| x input norm on calibration data
        (the same file; less damage than magnitude, so tried first when there is data), MLP
        neurons by activation (smaller and faster), or whole layers by block importance (depth:
        smaller and faster in proportion, the riskiest, as a dropped layer takes all it
        computed); the ratio is left to the search."""
        return [
            Candidate("magnitude", {"method": "magnitude", "ratio": 0.5}, risk=3.0, order=40,
                      autos=("ratio",)),
            Candidate("wanda", {"method": "wanda", "ratio": 0.5}, risk=2.5, order=40,
                      autos=("ratio",), needs_data=True),
            Candidate("activation-mlp", {"method": "activation", "target": "mlp", "ratio": 0.5},
                      risk=3.5, order=30, autos=("ratio",), needs_data=True, speeds_up=True),
            Candidate("depth", {"method": "depth", "ratio": 0.5}, risk=4.5, order=20,
                      autos=("ratio",), needs_data=True, speeds_up=True),
        ]

    def _method(self, params: dict[str, Any]) -> PruneMethod:
        return METHODS[params.get("method") or self.methods[0]]

    def produces_for(self, params: dict[str, Any]) -> frozenset[str]:
        return self._method(params).produces

    def stores_for(self, params: dict[str, Any]) -> frozenset[str]:
        """Unstructured zeros (magnitude; wanda and sparsegpt with ``ratio``), N:M runs (nm; wanda
        and sparsegpt with ``n``/``m``); structured methods leave a smaller standard architecture."""
        return self._method(params).stores(params)

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only the defaults of the properties the chosen method uses."""
        used = self._method(params).used(self.schema["properties"], params)
        return {k: p["default"] for k, p in self.schema["properties"].items()
                if k in used and "default" in p}

    def defaults(self) -> dict[str, Any]:
        """The default method's defaults (other methods' properties would be check errors)."""
        return self.defaults_for({})

    def resolve_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**self.defaults_for(params), **params}

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        method = self._method(params)
        used = method.used(self.schema["properties"])
        errors = [(key, f"'{key}' does not apply to prune method '{method.name}'")
                  for key in params if key not in used]
        return errors + method.check(params)

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return self._method(params).family_needs(params)

    def estimate(self, meta: Any, params: dict[str, Any]) -> Any:
        return self._method(params).estimate(meta, self.resolve_defaults(params))

    def blockwise_for(self, params: dict[str, Any]) -> bool:
        return self._method(params).blockwise

    def apply_(self, handle: Any, params: dict[str, Any], ctx: Any) -> None:
        self._method(params).apply_(handle, self.resolve_defaults(params), ctx)

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        return METHODS[record["method"]].rebuild_(model, record)


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Prune())
