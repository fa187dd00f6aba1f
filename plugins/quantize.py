"""The built-in ``quantize`` technique: 8-bit weights (weight-only or dynamic int8 kernels), or 4-bit groups.

``scheme = "int8"`` rounds the weights of linear layers and embeddings to symmetric int8 (per
output channel or per tensor) and keeps the dequantized values in the model; the file stores int8
codes plus float32 scales (about a quarter of float32). ``scheme = "int8-dynamic"`` does the same
to the linear layers and also swaps them for torch's dynamic int8 kernel (activations quantized per
call), which is faster on CPU; loading re-applies the swap after the weights are read.
``scheme = "int4"`` is weight-only with one scale per output channel and run of ``group_size``
inputs, two codes per byte (about 1/7 of float32 at group 128); ``method = "gptq"`` rounds the
linear layers with GPTQ on calibration ``data`` (error compensation through ``XᵀX``) instead of to
the nearest level (``"rtn"``). Weights already pruned keep their zeros under either method.
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

SCHEMES = ("int8", "int8-dynamic", "int4")
#: Parameters that only the grouped weight-only scheme reads.
INT4_ONLY = ("method", "group_size", "data", "samples")
EMBEDDING_KINDS = ("Embedding",)


def _kinds(scheme: str) -> tuple[str, ...]:
    return LINEAR_KINDS if scheme == "int8-dynamic" else LINEAR_KINDS + EMBEDDING_KINDS


def _axis(kind: str, granularity: str) -> int | None:
    return output_axis(kind) if granularity == "channel" else None


def _spec(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The ``quant`` codec entry of a weight of ``kind`` under the stage's parameters."""
    if params["scheme"] == "int4":
        return {"bits": 4, "axis": output_axis(kind), "group": int(params["group_size"])}
    return {"bits": 8, "axis": _axis(kind, params["granularity"])}


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
                       "description": "\"int8\" (weight-only), \"int8-dynamic\" (int8 CPU kernels "
                                      "for linear layers) or \"int4\" (weight-only, 4-bit codes "
                                      "with group-wise scales)."},
            "method": {"type": "string", "enum": ["rtn", "gptq"], "default": "rtn",
                       "description": "int4 only: \"rtn\" rounds to the nearest level; \"gptq\" "
                                      "quantizes linear layers column by column, compensating "
                                      "the error with calibration `data` (embeddings stay rtn)."},
            "group_size": {"type": "integer", "minimum": 1, "default": 128,
                           "description": "int4 only: inputs sharing one scale per output channel."},
            "data": {"type": "string",
                     "description": "int4 gptq only: the declared data set of calibration texts."},
            "samples": {"type": "integer", "minimum": 1, "default": 128,
                        "description": "int4 gptq only: calibration texts used at most."},
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
    methods = ("rtn", "gptq")
    produces = frozenset({"quantized"})
    refuses = frozenset({"quantized"})
    data_params = {"data": "text|a,b"}
    example = 'stage int8: quantize { scheme = "int8", granularity = "channel" }'

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only the defaults of the parameters the scheme (and int4's method) reads."""
        values = self.defaults()
        if params.get("scheme", "int8") != "int4":
            drop: tuple[str, ...] = INT4_ONLY
        elif params.get("method", "rtn") != "gptq":
            drop = ("granularity", "data", "samples")
        else:
            drop = ("granularity",)
        return {k: v for k, v in values.items() if k not in drop}

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        scheme, method = params.get("scheme", "int8"), params.get("method", "rtn")
        if scheme != "int4":
            return [(k, f"'{k}' applies to scheme \"int4\" only, not \"{scheme}\"")
                    for k in INT4_ONLY if k in params and not (k == "method" and method == "rtn")]
        errors: list[tuple[str | None, str]] = []
        if "granularity" in params:
            errors.append(("granularity", "scheme \"int4\" has group-wise scales: set group_size"))
        if method != "gptq":
            errors += [(k, f"'{k}' applies to method \"gptq\" only") for k in ("data", "samples")
                       if k in params]
        elif not params.get("data"):
            errors.append(("data", "method \"gptq\" needs calibration data = <a data set>"))
        return errors

    def _resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        params = {**self.defaults_for(params), **params}
        if params.get("method", "rtn") == "gptq" and params["scheme"] != "int4":
            raise SqueezeError("quantize: method \"gptq\" needs scheme \"int4\"")
        if params.get("method") == "gptq" and not params.get("data"):
            raise SqueezeError("quantize: method \"gptq\" needs calibration data = <a data set>")
        return params

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        params = self._resolved(params)
        out = meta.copy()
        scheme = params["scheme"]
        modules = []
        for mod in out.select(_kinds(scheme), params.get("include"), params.get("exclude", ())):
            name = f"{mod.name}.weight"
            if name not in out.tensors:
                continue  # tied to a tensor owned by another module
            t = out.tensors[name]
            if scheme == "int4" and len(t.shape) != 2:
                continue
            t.codec = merge(t.codec, {"quant": _spec(mod.kind, params)})
            modules.append(mod.name)
        if scheme == "int8-dynamic" and modules:
            out.overhead_bytes += edit_bytes(self._record(modules, params["granularity"]))
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

        params = self._resolved(params)
        scheme, granularity = params["scheme"], params.get("granularity", "channel")
        model = handle.model
        targets = select_modules(model, _kinds(scheme), params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("quantize: include/exclude select no linear layer or embedding")
        for name, _ in targets:
            if "cluster" in (handle.codecs.get(f"{name}.weight") or {}):
                raise SqueezeError(f"quantize: '{name}.weight' is clustered (share method "
                                   "\"cluster\"); it cannot also be quantized")
        if scheme == "int4":
            self._int4_(handle, targets, params, ctx)
            return
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

    def _int4_(self, handle: ModelHandle, targets: list[tuple[str, Any]], params: dict[str, Any],
               ctx: StageContext) -> None:
        """Group-wise 4-bit weights, rounded to nearest or with GPTQ on calibration data."""
        import torch

        from squeezelang.models.codec import quantize_weight
        from squeezelang.models.calibrate import calibration_texts
        from squeezelang.models.linear_stats import gptq_quantize, input_stats
        from squeezelang.models.select import kind_of

        shared = _shared_weights(handle.model)
        targets = [(n, m) for n, m in targets if m.weight.ndim == 2]
        stats = {}
        if params["method"] == "gptq":
            calibrated = [(n, m) for n, m in targets
                          if kind_of(m) in LINEAR_KINDS and id(m.weight) not in shared]
            texts = calibration_texts(ctx, params.get("data"), int(params["samples"]), "quantize gptq")
            stats = input_stats(handle, texts, calibrated, gram=True)
        group = int(params["group_size"])
        seen: set[int] = set()
        with torch.no_grad():
            for name, module in ctx.progress(targets, desc=params["method"]):
                weight = module.weight
                if id(weight) in seen:
                    continue
                seen.add(id(weight))
                kind = kind_of(module)
                key = f"{name}.weight"
                old = handle.codecs.get(key) or {}
                if name in stats:
                    transposed = kind == "Conv1D"
                    w = weight.detach().t() if transposed else weight.detach()
                    keep = (w != 0) if (old.get("sparse") or old.get("nm")) else None
                    q = gptq_quantize(w.float(), stats[name].gram, 4, group, keep)
                    weight.copy_(q.t() if transposed else q)
                else:
                    weight.copy_(quantize_weight(weight.detach().float(), 4, output_axis(kind), group))
                handle.codecs[key] = merge(old, {"quant": _spec(kind, params)})
        handle.states.add("quantized")
        ctx.log(f"quantized {len(seen)} weights to int4 ({params['method']}, groups of {group}"
                + (f", {len(stats)} with gptq" if stats else "") + ")")

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
