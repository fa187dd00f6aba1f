"""``quantize`` ``scheme = "fp8"``: FP8 E4M3 weights of linear layers, one float32 scale per
output channel (``granularity = "channel"``) or per tensor.

A weight becomes ``fp8(w / scale) * scale`` with ``scale = max|w| / 448`` (E4M3's largest value):
its codes are the nearest ``torch.float8_e4m3fn`` values, stored one byte each with the float32
scales (the codec ``{"quant": {"bits": 8, "axis": A, "format": "fp8_e4m3"}}``, see
``models.codec``), and the in-memory model keeps the dequantized weights, as int8 weight-only
does. A half-precision weight holds ``code * scale`` rounded to its dtype (``on_grid``), which is
what loading the saved codes gives back.

Like llm-compressor's FP8 schemes, only linear layers are quantized (embeddings stay in float):
an include glob that reaches embeddings and no linear layer is refused rather than ignored, and a
head tied to an embedding stays in float with it. Where int8 steps evenly from zero to the
largest weight, E4M3's steps grow with the magnitude (3 mantissa bits: every value is within
1/16 of its code, relatively), so the small weights of a channel with outliers keep their
precision.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from squeezelang.plugin import FP8_E4M3, LINEAR_KINDS, SqueezeError, merge, output_axis

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, StageContext

#: The module kinds scheme "fp8" quantizes.
KINDS = LINEAR_KINDS
#: Kinds the other schemes quantize and fp8 leaves in float.
OTHER_KINDS = ("Embedding",)


def spec(kind: str, granularity: str) -> dict[str, Any]:
    """The ``quant`` codec entry of a weight of ``kind``: float8 codes, scales per output channel
    or one per tensor."""
    axis = output_axis(kind) if granularity == "channel" else None
    return {"bits": 8, "axis": axis, "format": FP8_E4M3}


def refuse_other_kinds(select: Callable[[tuple[str, ...], list[str]], list[tuple[str, str]]],
                       include: list[str] | None) -> None:
    """Refuse an include glob that reaches modules fp8 leaves in float (embeddings) and no linear
    layer. ``select(kinds, [glob])`` lists the ``(name, kind)`` the glob reaches (exclude
    applied)."""
    for glob in include or ["*"]:
        if select(KINDS, [glob]):
            continue
        other = select(OTHER_KINDS, [glob])
        if other:
            name, kind = other[0]
            raise SqueezeError(f"quantize: scheme \"fp8\" quantizes linear layers only (as "
                               f"llm-compressor's FP8 schemes do), and include '{glob}' selects "
                               f"{kind} '{name}'" + (f" and {len(other) - 1} more" if len(other) > 1
                                                      else "")
                               + ": quantize embeddings with scheme \"int8\" or \"int4\" in "
                                 "another stage")


def first_owners(model: Any) -> dict[int, tuple[str, str]]:
    """``{id(parameter): (module name, kind)}`` of the first module holding each parameter (in
    ``named_modules`` order, the module whose tensor a tied weight is saved under)."""
    from squeezelang.plugin import kind_of

    owners: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (name, kind_of(module)))
    return owners


def quantize_(handle: ModelHandle, targets: list[tuple[str, Any]], granularity: str,
              ctx: StageContext) -> None:
    """Round the weights of the linear layers ``targets`` to FP8 E4M3 in place and record their
    codecs; a weight saved under another module (tied to an embedding) is left as it is."""
    import torch

    from squeezelang.plugin import kind_of, quantize_weight_

    owners = first_owners(handle.model)
    done = 0
    with torch.no_grad():
        for name, module in targets:
            owner, kind = owners[id(module.weight)]
            if owner != name:  # saved under its first holder: quantized through it, or not at all
                if kind not in KINDS:
                    ctx.log(f"quantize: '{name}' shares its weight with {kind} '{owner}', which "
                            "scheme \"fp8\" leaves in float: left in float")
                continue
            entry = spec(kind_of(module), granularity)
            quantize_weight_(module.weight.data, 8, entry["axis"], code_format=FP8_E4M3)
            key = f"{name}.weight"
            handle.codecs[key] = merge(handle.codecs.get(key), {"quant": entry})
            done += 1
    if not done:
        raise SqueezeError("quantize: scheme \"fp8\" found no linear layer to quantize (the "
                           "selected ones share their weights with embeddings)")
    handle.states.add("quantized")
    ctx.log(f"quantized {done} weights to fp8 (E4M3, per {granularity})")


def check_meta(meta: Any, include: list[str] | None, exclude: list[str]) -> None:
    """``refuse_other_kinds`` on the estimate's ``ModelMeta``."""
    refuse_other_kinds(lambda kinds, globs: [(m.name, m.kind) for m in
                                             meta.select(kinds, globs, exclude)], include)


def check_model(model: Any, include: list[str] | None, exclude: list[str]) -> None:
    """``refuse_other_kinds`` on the model itself."""
    from squeezelang.plugin import kind_of, select_modules

    refuse_other_kinds(lambda kinds, globs: [(n, kind_of(m)) for n, m in
                                             select_modules(model, kinds, globs, exclude)], include)
