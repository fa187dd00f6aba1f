"""The built-in ``quantize`` technique: 8-bit weights (int8 weight-only, with dynamic int8 kernels
or with static int8 activations, or FP8), or 4-bit groups.

``scheme = "int8"`` rounds the weights of linear layers and embeddings to symmetric int8 (per
output channel or per tensor) and keeps the dequantized values in the model; the file stores int8
codes plus float32 scales (about a quarter of float32). ``scheme = "int8-dynamic"`` does the same
and also swaps the linear layers for torch's dynamic int8 kernel (activations quantized per call),
which is faster on CPU; loading re-applies the swap after the weights are read. Its embeddings
(no int8 kernel) and a linear layer tied to one run in float from their int8 codes.
``scheme = "fp8"`` (``fp8.py``) rounds the weights of linear layers only (as llm-compressor's FP8
schemes do) to FP8 E4M3 codes, per output channel or per tensor, stored as float8_e4m3fn plus
float32 scales: the same size as int8, with steps that grow with the magnitude.
``scheme = "w8a8"`` (``w8a8.py``) stores int8's weights and also quantizes the linear layers'
inputs with static uint8 scales calibrated on ``data`` (after SmoothQuant's migration, folded
where a producer absorbs it): ``W8A8Linear`` layers, which the ``onnx`` format runs on ONNX
Runtime's integer kernels without measuring each input's range per call.

Half-precision checkpoints (bfloat16, float16) keep their dtype: the rounding is computed in
float32 and the in-memory weight holds ``code * scale`` rounded to its dtype (``codec.on_grid``),
which is what loading the saved codes gives back; the scales are stored as float32 for every dtype
(see ``models.codec``). Embeddings, norms and other tensors the stage does not quantize are left as
they are, so they are saved in the checkpoint's dtype.
``scheme = "int4"`` is weight-only with one scale per output channel and run of ``group_size``
inputs, two codes per byte (about 1/7 of float32 at group 128); ``method = "gptq"`` rounds the
linear layers with GPTQ on calibration ``data`` (error compensation through ``XᵀX``) instead of to
the nearest level (``"rtn"``); ``method = "awq"`` (``awq.py``) first folds activation-aware
per-channel scales into the norms and projections that feed the linear layers and searches each
group's clipping on calibration ``data``, then rounds: the same codes and file as ``"rtn"``.
Weights already pruned keep their zeros under every method.

``scheme = "mixed"`` is int4's grouped format with a width per tensor, chosen among ``bits``: the
tensors together may take the bytes they would at ``avg_bits`` code bits per weight (plus their
group scales, the same at every width), and ``models.allocate`` picks the widths that least disturb
the layers' outputs on calibration ``data`` (``models.sensitivity``: the summed noise-to-signal
ratio of every quantized layer, embeddings included — an embedding is a linear layer on one-hot
inputs, weighted by how often each token occurs). ``avg_bits = 4`` is therefore exactly the size of
``scheme = "int4"`` with the same ``group_size``. Each candidate is scored with round-to-nearest
codes; ``method = "gptq"`` (or ``"awq"``) then rounds the linear layers at their chosen widths
with GPTQ (or AWQ).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import (LINEAR_KINDS, Candidate, Knob, SqueezeError, Technique, hookimpl,
                                merge, output_axis, stored_bytes)

from . import awq, fp8, w8a8

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

SCHEMES = ("int8", "int8-dynamic", "int4", "mixed", "fp8", "w8a8")
#: The schemes whose linear layers run int8 kernels (they need float32 activations).
KERNELS = ("int8-dynamic", "w8a8")
#: The weight-only schemes with group-wise scales.
GROUPED = ("int4", "mixed")
#: The grouped schemes' methods that calibrate the linear layers on ``data``.
CALIBRATED = ("gptq", "awq")
EMBEDDING_KINDS = ("Embedding",)


def _applies(scheme: str, method: str) -> set[str]:
    """The parameters a scheme (and, for the grouped ones, a method) reads."""
    keys = {"scheme", "include", "exclude"}
    if scheme == "w8a8":
        return keys | {"granularity", "data", "samples", "smoothing", "percentile"}
    if scheme not in GROUPED:
        return keys | {"granularity"}
    keys |= {"method", "group_size"}
    if scheme == "mixed":
        keys |= {"bits", "avg_bits", "data", "samples"}
    elif method in CALIBRATED:
        keys |= {"data", "samples"}
    return keys


def _kinds(scheme: str) -> tuple[str, ...]:
    """Every scheme but fp8 (linear layers only) stores linear layers and embeddings
    (int8-dynamic's embeddings, which have no int8 kernel, are stored as int8 codes like
    ``int8``'s and run in float)."""
    return fp8.KINDS if scheme == "fp8" else LINEAR_KINDS + EMBEDDING_KINDS


def _axis(kind: str, granularity: str) -> int | None:
    return output_axis(kind) if granularity == "channel" else None


def _spec(kind: str, params: dict[str, Any], bits: int = 4) -> dict[str, Any]:
    """The ``quant`` codec entry of a weight of ``kind`` (``bits``: a grouped scheme's width)."""
    if params["scheme"] in GROUPED:
        return {"bits": bits, "axis": output_axis(kind), "group": int(params["group_size"])}
    if params["scheme"] == "fp8":
        return fp8.spec(kind, params["granularity"])
    return {"bits": 8, "axis": _axis(kind, params["granularity"])}


def _code_bytes(count: int, bits: float) -> int:
    """Bytes of ``count`` codes at ``bits`` each, packed like ``models.codec`` (8 bits: one byte)."""
    return count if bits == 8 else math.ceil(count * bits / 8)


def _budget_bytes(shape: tuple[int, ...], dtype: str, spec: dict[str, Any], avg_bits: float) -> int:
    """The stored bytes of a tensor under ``spec`` (a ``quant`` codec) with its codes at ``avg_bits``."""
    from squeezelang.plugin import CODES, layout, stored_bytes

    wide = merge(spec, {"quant": {**spec["quant"], "bits": 8}})
    count = next(math.prod(s) for n, _, s in layout("t", shape, dtype, wide) if n.endswith(CODES))
    return stored_bytes(shape, dtype, wide) - count + _code_bytes(count, avg_bits)


def _counted(spec: dict[str, Any] | None, weight: Any) -> dict[str, Any] | None:
    """``spec`` with a sparse weight's actual density, so ``stored_bytes`` counts its nonzeros."""
    if spec and spec.get("sparse"):
        return {**spec, "density": int((weight != 0).sum()) / weight.numel()}
    return spec


def _shared_weights(model: Any) -> set[int]:
    """ids of parameters reachable under several names (tied embeddings and heads)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, n in count.items() if n > 1}


def _once(name: str, weight: Any, shared: set[int]) -> Any:
    """What a weight is counted once by: a weight tied to several modules by its identity, any
    other by its layer's name (an offloaded model's weights are fresh tensors each time their
    block is read: an identity could be reused by another block's)."""
    return id(weight) if id(weight) in shared else name


def _each_resident(model: Any, targets: list[tuple[str, Any]]) -> Any:
    """``targets`` block by block, each block's in memory while its layers are yielded (an
    offloaded model reads it once and writes it back changed; nothing for a model in memory)."""
    from squeezelang.plugin import by_block, resident

    for _, members in by_block(model, targets):
        with resident(model, *(m for _, m in members)):
            yield from members


def _fresh(name: str, codec: dict[str, Any] | None) -> None:
    """Refuse a weight that an earlier stage already quantized or clustered."""
    if "cluster" in (codec or {}):
        raise SqueezeError(f"quantize: '{name}' is clustered (share method \"cluster\"); it cannot "
                           "also be quantized")
    if "quant" in (codec or {}):
        raise SqueezeError(f"quantize: '{name}' is already quantized by an earlier stage; a second "
                           "quantize stage must select other layers (include / exclude)")


def _float32_kernels(targets: list[tuple[str, Any]], scheme: str) -> None:
    """Refuse int8 kernels for a half-precision model: they take and give float32 activations."""
    import torch

    from squeezelang.plugin import kind_of

    for name, module in targets:
        if kind_of(module) in LINEAR_KINDS and module.weight.dtype != torch.float32:
            dtype = str(module.weight.dtype).replace("torch.", "")
            raise SqueezeError(f"quantize: scheme \"{scheme}\" runs float32 int8 kernels, and "
                               f"'{name}' is {dtype} (the checkpoint's dtype, or the run's "
                               "dtype = ...); use scheme \"int8\" (weight-only, same file size) "
                               "for a half-precision model, or run with dtype = \"float32\"")


class Quantize(Technique):
    name = "quantize"
    description = (
        "Store weights as 8-bit codes with float32 scales (symmetric; per output channel by "
        "default). scheme \"int8\": weight-only, on linear layers and embeddings; the model keeps "
        "running in float with the rounded weights. scheme \"int8-dynamic\": the same, and linear "
        "layers run torch's int8 kernels on CPU (faster; embeddings, which have none, run in "
        "float). Either way the saved weights are about a quarter of float32 (half of bfloat16 or "
        "float16, whose other tensors keep their dtype). scheme \"fp8\": weight-only FP8 "
        "(E4M3) codes, on linear layers only (as llm-compressor's FP8 schemes; embeddings stay "
        "in float), stored as float8_e4m3fn with float32 scales per output channel or per "
        "tensor: int8's size, a relative precision at every magnitude. scheme \"int4\": "
        "4-bit codes with group-wise scales, rounded to nearest (method \"rtn\"), with GPTQ "
        "(\"gptq\") or with AWQ's activation-aware scales and clipping (\"awq\"), both "
        "calibrated on `data`; scheme "
        "\"mixed\": a width per tensor among `bits`, chosen from each layer's measured "
        "sensitivity on calibration `data` to fit the bytes of `avg_bits` per weight. scheme "
        "\"w8a8\": int8's weights, and linear layers quantize their inputs to 8 bits with static "
        "scales calibrated on `data` after SmoothQuant's migration (`smoothing`), which the onnx "
        "format runs on ONNX Runtime's integer kernels (float32 models). A later "
        "quantize stage may quantize other layers (include / exclude), not the same ones twice.")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "scheme": {"type": "string", "enum": list(SCHEMES), "default": "int8",
                       "description": "\"int8\" (weight-only), \"int8-dynamic\" (int8 CPU kernels "
                                      "for linear layers), \"int4\" (weight-only, 4-bit codes "
                                      "with group-wise scales), \"mixed\" (like int4 with a "
                                      "width per tensor, allocated from measured sensitivity), "
                                      "\"fp8\" (weight-only FP8 E4M3 codes, linear layers "
                                      "only) or \"w8a8\" (int8 weights and static int8 "
                                      "activations with SmoothQuant, calibrated on `data`)."},
            "method": {"type": "string", "enum": ["rtn", "gptq", "awq"], "default": "rtn",
                       "description": "int4/mixed: \"rtn\" rounds to the nearest level; \"gptq\" "
                                      "quantizes linear layers column by column, compensating "
                                      "the error with calibration `data`; \"awq\" folds "
                                      "per-channel scales searched on `data` into the norms and "
                                      "projections feeding the linear layers and clips each "
                                      "group, then rounds (embeddings stay rtn with either)."},
            "group_size": {"type": "integer", "minimum": 1, "default": 128,
                           "description": "int4/mixed: inputs sharing one scale per output channel."},
            "data": {"type": "string",
                     "description": "mixed, w8a8, and int4 gptq or awq: the declared data set "
                                    "of calibration texts."},
            "samples": {"type": "integer", "minimum": 1, "default": 128,
                        "description": "mixed, w8a8, and int4 gptq or awq: calibration texts used "
                                       "at most."},
            "smoothing": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                          "description": "w8a8 only: SmoothQuant's migration strength α: input "
                                         "channel j is divided by max|X_j|^α / max|W_j|^(1-α) "
                                         "and the weights multiplied by it, where the producer "
                                         "of the input absorbs the scale (pre-norm blocks' "
                                         "norms, values, a gated MLP's up projection); 0 "
                                         "migrates nothing."},
            "percentile": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                           "default": w8a8.PERCENTILE,
                           "description": "w8a8 only: each layer's static input range is its "
                                          "smallest and largest calibration value clipped at "
                                          "this percentile of |x| (100: the extremes)."},
            "bits": {"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 8},
                     "minItems": 1, "uniqueItems": True, "default": [2, 3, 4, 5, 6, 8],
                     "description": "mixed only: the widths a tensor may get."},
            "avg_bits": {"type": "number", "minimum": 2, "maximum": 8, "default": 4,
                         "description": "mixed only: the size budget, in code bits per quantized "
                                        "weight on average (group scales come on top, as for "
                                        "int4: avg_bits = 4 is the size of int4)."},
            "granularity": {"type": "string", "enum": ["channel", "tensor"], "default": "channel",
                            "description": "int8, int8-dynamic, fp8, w8a8: one weight scale per "
                                           "output channel "
                                           "(row of an embedding), or one per tensor."},
            "include": {"type": "array", "items": {"type": "string"}, "default": ["*"],
                        "description": "Globs of module names to quantize (default: every linear "
                                       "layer and embedding; fp8: every linear layer)."},
            "exclude": {"type": "array", "items": {"type": "string"}, "default": [],
                        "description": "Globs of module names to keep in float."},
        },
    }
    methods = ("rtn", "gptq", "awq")
    knobs = (Knob("avg_bits", 2, 8, compresses="down",
                  description="mixed: average code bits per weight (the size budget)"),)
    produces = frozenset({"quantized"})
    #: A second quantize stage may follow a first one on other layers (say int4 embeddings, then
    #: int8 kernels for the linear layers); a layer quantized twice is refused by ``_fresh``.
    refuses: frozenset[str] = frozenset()
    data_params = {"data": "text|a,b"}
    example = 'stage int8: quantize { scheme = "int8", granularity = "channel" }'

    def candidates(self, task: str) -> list[Candidate]:
        """Last in a pipeline: int8 (near lossless), int8 kernels (faster), int4 (smaller)."""
        return [
            Candidate("int8", {"scheme": "int8"}, risk=1.0, order=90),
            Candidate("int8-dynamic", {"scheme": "int8-dynamic"}, risk=1.2, order=90, speeds_up=True),
            Candidate("int4-gptq", {"scheme": "int4", "method": "gptq"}, risk=3.5, order=90,
                      needs_data=True),
            Candidate("int4", {"scheme": "int4"}, risk=4.0, order=90),
        ]

    def blockwise_for(self, params: dict[str, Any]) -> bool:
        """int8 and int4 (round to nearest or GPTQ) change one weight at a time: an offloaded
        model is quantized block by block. Kernel swaps, FP8, AWQ's folding and ``mixed``'s
        sensitivity passes need the whole model."""
        scheme, method = params.get("scheme", "int8"), params.get("method", "rtn")
        return scheme == "int8" or (scheme == "int4" and method in ("rtn", "gptq"))

    def stores_for(self, params: dict[str, Any]) -> frozenset[str]:
        """int8 codes (per channel or per tensor; int8-dynamic also swaps in int8 kernels, w8a8
        layers with static activation scales), int4 codes or a width per tensor among ``bits``,
        with group-wise scales."""
        scheme = params.get("scheme", "int8")
        if scheme == "fp8":  # float8 codes: not the integer widths formats read from "bits:N"
            return frozenset({"fp8"} | ({"per-tensor"} if params.get("granularity") == "tensor"
                                        else set()))
        if scheme in GROUPED:
            widths = [4] if scheme == "int4" else list(params.get("bits", [2, 3, 4, 5, 6, 8]))
            return frozenset({scheme, f"group:{int(params.get('group_size', 128))}"}
                             | {f"bits:{b}" for b in widths})
        tags = {"int8", "bits:8"} | ({"int8-kernels"} if scheme == "int8-dynamic" else set())
        tags |= {"static-activations"} if scheme == "w8a8" else set()
        return frozenset(tags | ({"per-tensor"} if params.get("granularity") == "tensor" else set()))

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only the defaults of the parameters the scheme (and a grouped scheme's method) reads."""
        used = _applies(params.get("scheme", "int8"), params.get("method", "rtn"))
        return {k: v for k, v in self.defaults().items() if k in used}

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        scheme, method = params.get("scheme", "int8"), params.get("method", "rtn")
        used = _applies(scheme, method)
        errors: list[tuple[str | None, str]] = []
        for key in params:
            if key in used or (key == "method" and method == "rtn"):
                continue
            if key == "method":
                message = f"method \"{method}\" needs scheme \"int4\" or \"mixed\", not \"{scheme}\""
            elif key == "granularity":
                message = f"scheme \"{scheme}\" has group-wise scales: set group_size"
            elif key in ("bits", "avg_bits"):
                message = f"'{key}' applies to scheme \"mixed\" only, not \"{scheme}\""
            elif key in ("smoothing", "percentile"):
                message = f"'{key}' applies to scheme \"w8a8\" only, not \"{scheme}\""
            elif scheme == "int4":
                message = f"'{key}' applies to methods \"gptq\" and \"awq\" only"
            elif key in ("data", "samples"):
                message = (f"'{key}' applies to schemes \"int4\" (methods gptq, awq), \"mixed\" "
                           f"and \"w8a8\" only, not \"{scheme}\"")
            else:
                message = f"'{key}' applies to schemes \"int4\" and \"mixed\" only, not \"{scheme}\""
            errors.append((key, message))
        if "data" in used and not params.get("data"):
            errors.append(("data", "scheme \"mixed\" measures each layer's sensitivity on calibration "
                                   "data = <a data set>" if scheme == "mixed" else
                                   w8a8.NEEDS_DATA if scheme == "w8a8" else
                                   f"method \"{method}\" needs calibration data = <a data set>"))
        bits, avg = params.get("bits"), params.get("avg_bits")
        if scheme == "mixed" and bits and isinstance(avg, (int, float)) and avg < min(bits):
            errors.append(("avg_bits", f"avg_bits = {avg:g} is below the narrowest width allowed "
                                       f"(bits = {sorted(bits)}): no allocation fits"))
        return errors

    def _resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        params = {**self.defaults_for(params), **params}
        method = params.get("method", "rtn")
        if method in CALIBRATED and params["scheme"] not in GROUPED:
            raise SqueezeError(f"quantize: method \"{method}\" needs scheme \"int4\" or \"mixed\"")
        if "data" in _applies(params["scheme"], method) and not params.get("data"):
            if params["scheme"] == "w8a8":
                raise SqueezeError(f"quantize: {w8a8.NEEDS_DATA}")
            who = "scheme \"mixed\"" if params["scheme"] == "mixed" else f"method \"{method}\""
            raise SqueezeError(f"quantize: {who} needs calibration data = <a data set>")
        return params

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """The codecs the stage writes; exact except for ``"mixed"``, whose widths depend on data.

        ``"mixed"`` is estimated at its budget, the bound the allocation is held to: every tensor
        gets the widest width's codec and ``overhead_bytes`` takes back the difference between
        those codes and codes of ``avg_bits`` (capped at the widest width). The saved size is at
        most this, less by what the widths leave of the budget (a fraction of a layer).
        """
        params = self._resolved(params)
        out = meta.copy()
        scheme = params["scheme"]
        widest = max(params["bits"]) if scheme == "mixed" else 4
        modules = []
        if scheme == "fp8":
            fp8.check_meta(out, params.get("include"), params.get("exclude", ()))
        for mod in out.select(_kinds(scheme), params.get("include"), params.get("exclude", ())):
            name = f"{mod.name}.weight"
            if name not in out.tensors:
                continue  # tied to a tensor owned by another module
            t = out.tensors[name]
            if scheme in GROUPED and len(t.shape) != 2:
                continue
            _fresh(name, t.codec)
            t.codec = merge(t.codec, {"quant": _spec(mod.kind, params, widest)})
            if scheme == "mixed":
                avg = min(float(params["avg_bits"]), widest)
                out.overhead_bytes += (_budget_bytes(t.shape, t.dtype, t.codec, avg)
                                       - stored_bytes(t.shape, t.dtype, t.codec))
            modules.append(mod.name)
        linears = [m.name for m in out.select(LINEAR_KINDS, params.get("include"),
                                               params.get("exclude", ()))
                   if m.name in modules]
        if scheme == "int8-dynamic" and linears:
            out.add_edit(self._record(linears, params["granularity"]))
        if scheme == "w8a8" and linears:
            w8a8.estimate_(out, self.name, linears)
        out.states.add("quantized")
        return out

    def _record(self, modules: list[str], granularity: str) -> dict[str, Any]:
        return {"technique": self.name, "scheme": "int8-dynamic", "when": "after_load",
                "granularity": granularity, "modules": modules}

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import (Int8DynamicLinear, calibration_texts, kind_of,
                                        quantize_weight_, select_modules, set_module)

        params = self._resolved(params)
        scheme, granularity = params["scheme"], params.get("granularity", "channel")
        model = handle.model
        if scheme == "fp8":
            fp8.check_model(model, params.get("include"), params.get("exclude", ()))
        targets = select_modules(model, _kinds(scheme), params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("quantize: include/exclude select no linear layer or embedding")
        for name, _ in targets:
            _fresh(f"{name}.weight", handle.codecs.get(f"{name}.weight"))
        if scheme == "fp8":
            fp8.quantize_(handle, targets, granularity, ctx)
            return
        if scheme in GROUPED:
            self._grouped_(handle, targets, params, ctx)
            return
        if scheme in KERNELS:
            _float32_kernels(targets, scheme)
        shared = _shared_weights(model)
        seen: set[Any] = set()
        swapped: list[str] = []
        static = [(n, m) for n, m in targets
                  if scheme == "w8a8" and kind_of(m) in LINEAR_KINDS and id(m.weight) not in shared]
        if scheme == "w8a8":
            if not static:
                raise SqueezeError("quantize: no selected linear layer can use int8 kernels")
            texts = calibration_texts(ctx, params.get("data"), int(params["samples"]),
                                      "quantize scheme \"w8a8\"")
            smoothed = w8a8.smooth_(handle, static, texts, float(params["smoothing"]), shared, ctx)
        with torch.no_grad():
            for name, module in _each_resident(model, targets):
                weight = module.weight
                if _once(name, weight, shared) in seen:
                    continue
                seen.add(_once(name, weight, shared))
                axis = _axis(kind_of(module), granularity)
                kernel = scheme in KERNELS and kind_of(module) in LINEAR_KINDS
                if kernel and id(weight) in shared:
                    kernel = False
                    ctx.log(f"quantize: '{name}' shares its weight with another module (tied "
                            "embedding): stored as int8 codes, run in float")
                if kernel and scheme == "int8-dynamic":
                    set_module(model, name, Int8DynamicLinear.from_linear(module, axis is None))
                    swapped.append(name)
                else:  # w8a8 layers too: they are swapped once calibrated, below
                    quantize_weight_(weight.data, 8, axis)
                key = f"{name}.weight"
                handle.codecs[key] = merge(handle.codecs.get(key),
                                           {"quant": {"bits": 8, "axis": axis}})
        if scheme == "w8a8":
            swapped = w8a8.swap_(handle, static, texts, float(params["percentile"]), smoothed, ctx)
            handle.edits.append(w8a8.record(self.name, swapped))
        if scheme == "int8-dynamic":
            if not swapped:
                raise SqueezeError("quantize: no selected linear layer can use int8 kernels")
            handle.edits.append(self._record(swapped, granularity))
        handle.states.add("quantized")
        ctx.log(f"quantized {len(seen)} weights ({scheme}, per {granularity})")

    def _grouped_(self, handle: ModelHandle, targets: list[tuple[str, Any]], params: dict[str, Any],
                  ctx: StageContext) -> None:
        """Group-wise weights (4-bit, or allocated widths), rounded to nearest, with GPTQ or AWQ."""
        import torch

        from squeezelang.plugin import (block_stats, by_block, calibration_texts, gptq_rows,
                                        kind_of, on_grid, quantize_weight)

        shared = _shared_weights(handle.model)
        targets = [(n, m) for n, m in targets if m.weight.ndim == 2]
        mixed, method = params["scheme"] == "mixed", params["method"]
        calibrating = method in CALIBRATED
        calibrated = {n for n, m in targets
                      if calibrating and kind_of(m) in LINEAR_KINDS and id(m.weight) not in shared}
        texts = calibration_texts(ctx, params.get("data"), int(params["samples"]),
                                  "quantize mixed" if mixed else f"quantize {method}"
                                  ) if mixed or calibrating else []
        widths = self._widths(handle, targets, texts, params, ctx) if mixed else {}
        group = int(params["group_size"])
        seen: set[Any] = set()

        def quantize_(name: str, module: Any, gram: Any = None, values: Any = None) -> None:
            """Put a weight on its grid and record its codec: GPTQ given ``gram``, the grid
            nearest float32 ``values`` (``[out, in]``, AWQ's clipped rounding) given them, else
            rounded to nearest."""
            weight = module.weight
            if _once(name, weight, shared) in seen:
                return
            seen.add(_once(name, weight, shared))
            kind = kind_of(module)
            key = f"{name}.weight"
            old = handle.codecs.get(key) or {}
            bits = widths.get(key, 4)
            if gram is not None:
                transposed = kind == "Conv1D"
                w = weight.detach().t() if transposed else weight.detach()
                keep = (w != 0) if (old.get("sparse") or old.get("nm")) else None
                target = weight.t() if transposed else weight
                runs = gptq_rows(w, gram, bits, group, keep)
                del gram  # freed once gptq_rows holds its permuted copy (127 MB at 5632 inputs)
                for first, last, rows in runs:
                    target[first:last] = on_grid(rows, weight.dtype, bits, 0, group)
            elif values is not None:
                q = on_grid(quantize_weight(values.float(), bits, 0, group), weight.dtype, bits, 0,
                            group)
                weight.copy_(q.t() if kind == "Conv1D" else q)
            else:
                weight.copy_(quantize_weight(weight.detach(), bits, output_axis(kind), group))
            handle.codecs[key] = merge(old, {"quant": _spec(kind, params, bits)})

        # Rounded to nearest first (embeddings, tied heads), then GPTQ block by block, in order:
        # a block's inputs are captured with everything before it already quantized, so each
        # block corrects the error the earlier ones left, and only one block's input statistics
        # are held at a time.
        blocks = by_block(handle.model, [(n, m) for n, m in targets if n in calibrated])
        with torch.no_grad():
            rounded = [(n, m) for n, m in targets if n not in calibrated]
            for name, module in ctx.progress(_each_resident(handle.model, rounded),
                                             total=len(rounded), desc=params["method"]):
                quantize_(name, module)
            if method == "awq":
                awq.awq_(handle, blocks, texts, lambda n: widths.get(f"{n}.weight", 4), group,
                         quantize_, shared, ctx)
            for _, members, stats in ctx.progress(block_stats(handle, texts, blocks, gram=True),
                                                  total=len(blocks), desc="gptq"
                                                  ) if method == "gptq" else ():
                for name, module in members:  # each XᵀX dropped once used
                    quantize_(name, module, stats.pop(name).gram)
        handle.states.add("quantized")
        what = "mixed widths" if mixed else "int4"
        ctx.log(f"quantized {len(seen)} weights to {what} ({params['method']}, groups of {group}"
                + (f", {len(calibrated)} with {method}" if calibrated else "") + ")")

    def _widths(self, handle: ModelHandle, targets: list[tuple[str, Any]], texts: list[str],
                params: dict[str, Any], ctx: StageContext) -> dict[str, int]:
        """``scheme = "mixed"``: the width of every weight (by codec key), from ``models.allocate``.

        A weight's cost at a width is the predicted effect of its round-to-nearest codes on the
        model's outputs (``models.sensitivity``, each weight measured alone, relative to the width
        nearest ``avg_bits``); its size is its stored bytes. A weight read by several
        modules (tied) is one choice.
        """
        from squeezelang.plugin import (Candidates, allocate, costs, describe, kind_of,
                                        quantize_weight)

        widths = sorted(set(params["bits"]))
        avg = min(float(params["avg_bits"]), widths[-1])
        reference = min(range(len(widths)), key=lambda i: (abs(widths[i] - avg), widths[i]))
        readers: dict[int, list[tuple[str, Any]]] = {}
        for name, module in targets:
            readers.setdefault(id(module.weight), []).append((name, module))
        keys, items, sizes, budget = [], [], [], 0
        for users in readers.values():
            name, module = users[0]
            shape, key = tuple(module.weight.shape), f"{name}.weight"
            old = _counted(handle.codecs.get(key), module.weight)
            specs = [merge(old, {"quant": _spec(kind_of(module), params, b)}) for b in widths]

            def make(weight: Any = module.weight, specs: list[dict[str, Any]] = specs) -> list[Any]:
                return [quantize_weight(weight.detach(), s["quant"]["bits"], s["quant"]["axis"],
                                        s["quant"]["group"]) for s in specs]

            keys.append(key)
            items.append(Candidates(module.weight, users, make, reference))
            dtype = str(module.weight.dtype).replace("torch.", "")
            sizes.append([stored_bytes(shape, dtype, spec) for spec in specs])
            budget += _budget_bytes(shape, dtype, specs[-1], avg)
        # each weight measured alone (see models.sensitivity): measured on MiniLM, differences at
        # the uniform width drown in the other layers' rounding noise and send tensors to 2 bits
        choice = allocate(costs(handle, texts, items, ctx.progress, around="original"), sizes,
                          budget, keys, what='quantize scheme "mixed"')
        chosen = {k: widths[i] for k, i in zip(keys, choice)}
        used = sum(s[i] for s, i in zip(sizes, choice))
        counts = ", ".join(f"{b} bits x{list(chosen.values()).count(b)}" for b in widths)
        ctx.log(f"mixed widths ({counts}) take {used:,} of a {budget:,}-byte budget: "
                + describe([k.removesuffix(".weight") for k in keys], [str(b) for b in chosen.values()]))
        return chosen

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        from squeezelang.plugin import Int8DynamicLinear, get_module, kind_of, set_module

        if record.get("scheme") == "w8a8":
            return w8a8.rebuild_(model, record)
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
