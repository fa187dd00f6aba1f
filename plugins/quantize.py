"""The built-in ``quantize`` technique: 8-bit weights, weight-only or with dynamic int8 kernels.

``scheme = "int8"`` rounds the weights of linear layers and embeddings to symmetric int8 (per
output channel or per tensor) and keeps the dequantized values in the model; the file stores int8
codes plus float32 scales (about a quarter of float32). ``scheme = "int8-dynamic"`` does the same
to the linear layers and also swaps them for torch's dynamic int8 kernel (activations quantized per
call), which is faster on CPU; loading re-applies the swap after the weights are read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang import hookimpl
from squeezelang.errors import SqueezeError
from squeezelang.hooks.technique import Technique
from squeezelang.models.codec import edit_bytes, merge
from squeezelang.models.select import LINEAR_KINDS, output_axis

if TYPE_CHECKING:
    from squeezelang.executor.context import StageContext
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta

SCHEMES = ("int8", "int8-dynamic")
EMBEDDING_KINDS = ("Embedding",)


def _kinds(scheme: str) -> tuple[str, ...]:
    return LINEAR_KINDS + EMBEDDING_KINDS if scheme == "int8" else LINEAR_KINDS


def _axis(kind: str, granularity: str) -> int | None:
    return output_axis(kind) if granularity == "channel" else None


def _shared_weights(model: Any) -> set[int]:
    """ids of parameters reachable under several names (tied embeddings and heads)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, n in count.items() if n > 1}


class Quantize(Technique):
    name = "quantize"
    description = (
        "Store weights as 8-bit integers with float32 scales (symmetric; per output channel by "
        "default). scheme \"int8\": weight-only, on linear layers and embeddings; the model keeps "
        "running in float with the rounded weights. scheme \"int8-dynamic\": linear layers only, "
        "and they run torch's int8 kernels on CPU (faster). Either way the saved weights are about "
        "a quarter of float32. A model cannot be quantized twice.")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "scheme": {"type": "string", "enum": list(SCHEMES), "default": "int8",
                       "description": "\"int8\" (weight-only) or \"int8-dynamic\" (int8 CPU kernels "
                                      "for linear layers)."},
            "granularity": {"type": "string", "enum": ["channel", "tensor"], "default": "channel",
                            "description": "One scale per output channel (row of an embedding), or "
                                           "one per tensor."},
            "include": {"type": "array", "items": {"type": "string"}, "default": ["*"],
                        "description": "Globs of module names to quantize (default: every linear "
                                       "layer, and every embedding for \"int8\")."},
            "exclude": {"type": "array", "items": {"type": "string"}, "default": [],
                        "description": "Globs of module names to keep in float."},
        },
    }
    produces = frozenset({"quantized"})
    refuses = frozenset({"quantized"})
    example = 'stage int8: quantize { scheme = "int8", granularity = "channel" }'

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        out = meta.copy()
        scheme, granularity = params["scheme"], params["granularity"]
        modules = []
        for mod in out.select(_kinds(scheme), params.get("include"), params.get("exclude", ())):
            name = f"{mod.name}.weight"
            if name not in out.tensors:
                continue  # tied to a tensor owned by another module
            t = out.tensors[name]
            t.codec = merge(t.codec, {"quant": {"bits": 8, "axis": _axis(mod.kind, granularity)}})
            modules.append(mod.name)
        if scheme == "int8-dynamic" and modules:
            out.overhead_bytes += edit_bytes(self._record(modules, granularity))
        out.states.add("quantized")
        return out

    def _record(self, modules: list[str], granularity: str) -> dict[str, Any]:
        return {"technique": self.name, "scheme": "int8-dynamic", "when": "after_load",
                "granularity": granularity, "modules": modules}

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.models.codec import quantize_weight_
        from squeezelang.models.layers import Int8DynamicLinear
        from squeezelang.models.select import kind_of, select_modules, set_module

        scheme, granularity = params["scheme"], params["granularity"]
        model = handle.model
        targets = select_modules(model, _kinds(scheme), params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("quantize: include/exclude select no linear layer or embedding")
        shared = _shared_weights(model)
        seen: set[int] = set()
        swapped: list[str] = []
        with torch.no_grad():
            for name, module in targets:
                weight = module.weight
                if id(weight) in seen:
                    continue
                seen.add(id(weight))
                axis = _axis(kind_of(module), granularity)
                if scheme == "int8-dynamic":
                    if id(weight) in shared:
                        ctx.log(f"quantize: '{name}' shares its weight with another module "
                                "(tied embedding); left in float")
                        continue
                    set_module(model, name, Int8DynamicLinear.from_linear(module, axis is None))
                    swapped.append(name)
                else:
                    quantize_weight_(weight.data, 8, axis)
                key = f"{name}.weight"
                handle.codecs[key] = merge(handle.codecs.get(key),
                                           {"quant": {"bits": 8, "axis": axis}})
        if scheme == "int8-dynamic":
            if not swapped:
                raise SqueezeError("quantize: no selected linear layer can use int8 kernels")
            handle.edits.append(self._record(swapped, granularity))
        handle.states.add("quantized")
        ctx.log(f"quantized {len(seen)} weights ({scheme}, per {granularity})")

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        from squeezelang.models.layers import Int8DynamicLinear
        from squeezelang.models.select import get_module, kind_of, set_module

        if record.get("scheme") != "int8-dynamic":
            return model
        per_tensor = record.get("granularity") == "tensor"
        for name in record.get("modules", []):
            module = get_module(model, name)
            if kind_of(module) not in LINEAR_KINDS:
                raise SqueezeError(f"quantize: module '{name}' is a {kind_of(module)}, "
                                   "not a linear layer")
            set_module(model, name, Int8DynamicLinear.from_linear(module, per_tensor))
        return model


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Quantize())
