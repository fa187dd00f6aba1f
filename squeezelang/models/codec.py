"""Storage codecs: how a tensor is written to ``model.safetensors``, as a JSON spec.

A spec is ``None`` (dense, the tensor's own dtype) or a dict combining:

``{"sparse": true}``
    a bitmask of the nonzero positions (1 bit per element, packed into uint8 like ``np.packbits``,
    little bit order) plus the nonzero values in row-major order.
``{"quant": {"bits": B, "axis": A}}``
    symmetric quantization with ``qmax = 2**(B-1) - 1``: one float32 scale per index of ``axis``
    (``0`` = per row: the output channel of a ``Linear`` ``[out, in]`` or the token of an
    ``Embedding``; ``1`` for a GPT-2 ``Conv1D`` ``[in, out]``; ``null`` = one scale for the tensor),
    codes in ``-qmax .. qmax``. ``B == 8`` stores the codes as int8; other widths (2..7) store
    ``code + 2**(B-1)`` bit-packed into uint8.
``{"quant": {"bits": 8, "axis": A, "format": "fp8_e4m3"}}``
    float codes: FP8 E4M3 (``torch.float8_e4m3fn``, safetensors ``F8_E4M3``, largest magnitude
    448), one byte each, with the same float32 scales along ``axis`` at ``max|w| / 448``; a code
    is ``w / scale`` rounded to the nearest E4M3 value (3 mantissa bits: relative steps of 1/16 to
    1/8 at every magnitude, where integer codes have even steps). Combines with ``group``,
    ``sparse`` and ``nm`` exactly like integer codes.
``{"sparse": true, "quant": {...}}``
    the mask, the codes of the nonzeros only, and the scales.
``{"quant": {"bits": B, "axis": A, "group": G}}``
    group-wise scales (2-D tensors only): one float32 scale per output channel (index of ``axis``)
    *and* per run of ``G`` consecutive elements along the other (input) dimension, the last run
    possibly shorter; scales stored output-channel-major, ``[out, ceil(in / G)]``.
``{"nm": [N, M]}`` / ``{"nm": [N, M, A]}``
    N:M semi-structured sparsity: every run of ``M`` consecutive elements along axis ``A`` (default
    the last; ``0`` for a GPT-2 ``Conv1D``, whose input dimension is axis 0) holds at most ``N``
    nonzeros. Stored as the kept values (``N`` per run, dense, the run's nonzeros in order, padded
    with zeros of the run) plus each kept value's position in its run, ``ceil(log2 M)``-bit packed.
    The length along ``A`` must be a multiple of ``M``. Combines with ``quant`` (codes of the kept
    values replace them; the scales are those of the whole tensor), not with ``sparse``.
``{"cluster": {"bits": B}}``
    weight sharing: the tensor holds at most ``2**B`` distinct values; stored as ``B``-bit packed
    indices into a float32 codebook of ``2**B`` entries (the sorted distinct values, padded with
    the last). Combines with nothing else.

Estimates (``stored_bytes``) may add ``"density"`` (expected fraction of nonzeros, default 1.0) to a
sparse spec, since the count of nonzeros is only known once weights exist; ``save`` never writes it.

The in-memory model holds the *decoded* values, so encoding must be lossless for them:
``decode(encode(w)) == w``. ``quantize_weight`` produces values on the codec's grid — its scales
are chosen so that re-deriving them from the dequantized tensor (``max|w| / qmax``) gives them back
bit for bit — and ``encode`` checks the round trip, raising ``SqueezeError`` rather than writing a
lossy file.

Dtypes: a dense tensor, and the values of a sparse or N:M one, are stored in the tensor's own dtype
(a bfloat16 checkpoint stays bfloat16). Codes are integers (or float8 for ``"format"``) and
scales and codebooks are float32 whatever the weight's dtype: one format for every checkpoint,
exact for half-precision values, at a cost of two bytes per channel or group over half-precision
scales (1/8 bit per weight at groups of 128). A half-precision weight's in-memory values are ``code * scale`` computed in float32 and
rounded to its dtype (``on_grid``); decoding rounds the same way, and ``encode`` re-derives the
same scales and codes from those values, so the round trip stays exact.
"""
from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any, Iterable

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

MASK, VALUES, CODES, SCALES = ".__mask", ".__values", ".__codes", ".__scales"
#: The float code formats of a ``quant`` spec (its ``"format"``): the dtype the codes are stored
#: in and the largest code magnitude (what ``qmax`` is to integer codes).
FP8_E4M3 = "fp8_e4m3"
FLOAT_CODES = {FP8_E4M3: ("float8_e4m3fn", 448.0)}
INDEX, CODEBOOK = ".__index", ".__codebook"
SUFFIXES = (MASK, VALUES, CODES, SCALES, INDEX, CODEBOOK)
#: The largest ``M`` of an N:M spec (positions fit in 6 bits).
NM_MAX_M = 64

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1}
_SAFETENSORS_DTYPE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL", "float8_e4m3fn": "F8_E4M3"}


# ---------------------------------------------------------------------------- specs
def normalize(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Check a spec and return it without estimate-only keys (``density``); ``None`` if dense."""
    if not spec:
        return None
    unknown = set(spec) - {"sparse", "quant", "density", "nm", "cluster"}
    if unknown:
        raise SqueezeError(f"unknown codec key(s) {sorted(unknown)} in {spec}")
    out: dict[str, Any] = {}
    if spec.get("sparse"):
        out["sparse"] = True
    quant = spec.get("quant")
    if quant:
        bits = quant.get("bits", 8)
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise SqueezeError(f"codec quant bits must be an integer in 2..8, not {bits!r}")
        out["quant"] = {"bits": bits, "axis": quant.get("axis", 0)}
        group = quant.get("group")
        if group is not None:
            if not isinstance(group, int) or group < 1:
                raise SqueezeError(f"codec quant group must be a positive integer, not {group!r}")
            if out["quant"]["axis"] is None:
                raise SqueezeError("codec quant group needs an output axis (0 or 1), not null")
            out["quant"]["group"] = group
        code_format = quant.get("format")
        if code_format is not None:
            if code_format not in FLOAT_CODES:
                raise SqueezeError(f"codec quant format must be one of {sorted(FLOAT_CODES)}, "
                                   f"not {code_format!r}")
            if bits != 8:
                raise SqueezeError(f"codec quant format '{code_format}' has 8-bit codes, not "
                                   f"bits = {bits}")
            out["quant"]["format"] = code_format
    if spec.get("nm"):
        out["nm"] = nm_params(spec["nm"], raw=True)
        if out.get("sparse"):
            raise SqueezeError("codec 'nm' cannot combine with 'sparse' (both describe the zeros)")
    if spec.get("cluster"):
        bits = spec["cluster"].get("bits", 4) if isinstance(spec["cluster"], dict) else None
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise SqueezeError(f"codec cluster bits must be an integer in 1..8, not {bits!r}")
        if out:
            raise SqueezeError(f"codec 'cluster' cannot combine with {sorted(out)}: a clustered "
                               "tensor is stored as its codebook indices only")
        out["cluster"] = {"bits": bits}
    return out or None


def nm_params(value: Any, raw: bool = False) -> Any:
    """``(n, m, axis)`` of an ``nm`` codec value (``[n, m]`` or ``[n, m, axis]``).

    With ``raw`` the value is returned checked and in its canonical form (``[n, m]`` when the axis
    is the last, -1).
    """
    ok = isinstance(value, (list, tuple)) and len(value) in (2, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ok:
        n, m = value[0], value[1]
        axis = value[2] if len(value) == 3 else -1
        ok = 1 <= n < m <= NM_MAX_M and axis in (-1, 0, 1)
    if not ok:
        raise SqueezeError(f"codec nm must be [n, m] or [n, m, axis] with 1 <= n < m <= {NM_MAX_M} "
                           f"and axis in -1, 0, 1, not {value!r}")
    if raw:
        return [n, m] if axis == -1 else [n, m, axis]
    return n, m, axis


def index_bits(m: int) -> int:
    """Bits of a position in a run of ``m``: ``ceil(log2 m)``."""
    return max(1, (int(m) - 1).bit_length())


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A spec with ``new``'s keys added to ``old``'s (pruning a quantized weight, and vice versa)."""
    merged = dict(old or {})
    merged.update(new)
    return merged


def _elt(dtype: str) -> int:
    dtype = str(dtype).replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise SqueezeError(f"unsupported tensor dtype '{dtype}'")
    return _DTYPE_BYTES[dtype]


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _packed_bytes(count: int, bits: int) -> int:
    return count if bits == 8 else (count * bits + 7) // 8


def _n_scales(shape: tuple[int, ...], axis: int | None, group: int | None = None) -> int:
    if axis is None:
        return 1
    if group is None:
        return int(shape[axis])
    if len(shape) != 2:
        raise SqueezeError(f"group-wise quantization needs a 2-D tensor, not shape {shape}")
    return int(shape[axis]) * -(-int(shape[1 - axis % 2]) // group)


def expected_nonzeros(numel: int, spec: dict[str, Any]) -> int:
    """The nonzero count an estimate assumes: ``round(density * numel)``."""
    return int(round(float(spec.get("density", 1.0)) * numel))


def layout(name: str, shape: Iterable[int], dtype: str,
           spec: dict[str, Any] | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """The stored tensors ``[(stored name, dtype, shape)]`` for one tensor (estimated nnz if sparse)."""
    shape = tuple(int(d) for d in shape)
    dtype = str(dtype).replace("torch.", "")
    n = _numel(shape)
    quant = (spec or {}).get("quant")
    if not spec or not (spec.get("sparse") or quant or spec.get("nm") or spec.get("cluster")):
        return [(name, dtype, shape)]
    if spec.get("cluster"):
        bits = spec["cluster"].get("bits", 4)
        return [(name + CODES, "uint8", (_packed_bytes(n, bits),)),
                (name + CODEBOOK, "float32", (2 ** bits,))]
    out: list[tuple[str, str, tuple[int, ...]]] = []
    count = n
    if spec.get("sparse"):
        count = expected_nonzeros(n, spec)
        out.append((name + MASK, "uint8", ((n + 7) // 8,)))
        if not quant:
            out.append((name + VALUES, dtype, (count,)))
    if spec.get("nm"):
        nn, m, _ = nm_params(spec["nm"])
        count = n // m * nn
        out.append((name + INDEX, "uint8", (_packed_bytes(count, index_bits(m)),)))
        if not quant:
            out.append((name + VALUES, dtype, (count,)))
    if quant:
        bits = quant.get("bits", 8)
        if bits == 8:
            dense = not (spec.get("sparse") or spec.get("nm"))
            out.append((name + CODES, code_dtype(quant.get("format")),
                        shape if dense else (count,)))
        else:
            out.append((name + CODES, "uint8", (_packed_bytes(count, bits),)))
        out.append((name + SCALES, "float32",
                    (_n_scales(shape, quant.get("axis", 0), quant.get("group")),)))
    return out


def stored_bytes(shape: Iterable[int], dtype: str, spec: dict[str, Any] | None) -> int:
    """Exact data bytes the encoding of a tensor takes (for sparse: at the spec's ``density``).

    The safetensors header entries and the ``squeeze.json`` codec entry are ``index_bytes``.
    """
    return sum(_numel(s) * _elt(d) for _, d, s in layout("t", shape, dtype, spec))


def index_bytes(name: str, shape: Iterable[int], dtype: str, spec: dict[str, Any] | None) -> int:
    """Approximate bytes the tensor adds to the safetensors JSON header and to ``squeeze.json``.

    Offsets are counted at the digits of the tensor's own byte size (an under-estimate of a few
    bytes per tensor in large files — noise next to the data).
    """
    shape = tuple(int(d) for d in shape)
    try:  # planning asks again and again for the same tensors: remember the answers
        key = json.dumps(spec, sort_keys=True, separators=(",", ":")) if spec else None
    except (TypeError, ValueError):
        return _index_bytes(name, shape, str(dtype), spec)
    return _cached_index_bytes(name, shape, str(dtype), key)


@functools.lru_cache(maxsize=1 << 16)
def _cached_index_bytes(name: str, shape: tuple[int, ...], dtype: str, spec_json: str | None) -> int:
    return _index_bytes(name, shape, dtype, json.loads(spec_json) if spec_json else None)


def _index_bytes(name: str, shape: tuple[int, ...], dtype: str, spec: dict[str, Any] | None) -> int:
    total = 0
    for stored, dtype_, s in layout(name, shape, dtype, spec):
        nbytes = _numel(s) * _elt(dtype_)
        entry = {stored: {"dtype": _SAFETENSORS_DTYPE[dtype_], "shape": list(s),
                          "data_offsets": [nbytes, nbytes]}}
        total += len(json.dumps(entry, separators=(",", ":"))) - 1  # braces -> one comma
    clean = normalize(spec)
    if clean:
        total += codec_entry_bytes(name, clean)
    return total


def codec_entry_bytes(name: str, spec: dict[str, Any]) -> int:
    """Bytes of ``name``'s entry in the ``codecs`` object of ``squeeze.json`` (as ``save`` writes it)."""
    return len(squeeze_json_dumps({"codecs": {name: spec}})) - len(squeeze_json_dumps({"codecs": {}}))


def squeeze_json_dumps(doc: dict[str, Any]) -> str:
    """The one serialisation of ``squeeze.json`` (``save`` writes it, estimates measure it)."""
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


FORMAT_NAME, FORMAT_VERSION = "squeezelang", 1


def squeeze_json_doc(task: str, codecs: dict[str, Any], edits: list[dict[str, Any]],
                     states: Iterable[str]) -> dict[str, Any]:
    """The content of ``squeeze.json``."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "task": task, "codecs": codecs,
            "edits": edits, "states": sorted(states)}


def squeeze_json_base_bytes(task: str, states: Iterable[str]) -> int:
    """Bytes of a ``squeeze.json`` without codecs and edits (they add ``codec_entry_bytes``, ``edit_bytes``)."""
    return len(squeeze_json_dumps(squeeze_json_doc(task, {}, [], states)).encode())


def edit_bytes(record: dict[str, Any]) -> int:
    """Bytes an edit record adds to ``squeeze.json`` (techniques add it to ``overhead_bytes``)."""
    return len(squeeze_json_dumps({"edits": [record]}).encode()) - len(squeeze_json_dumps({"edits": []}).encode())


# ---------------------------------------------------------------------------- quantization
def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def code_max(bits: int, code_format: str | None = None) -> float:
    """The largest code magnitude: ``qmax(bits)`` for integer codes, 448 for ``"fp8_e4m3"``."""
    return FLOAT_CODES[code_format][1] if code_format else float(qmax(bits))


def code_dtype(code_format: str | None = None) -> str:
    """The dtype 8-bit codes are stored in: int8, or the float format's (``float8_e4m3fn``)."""
    return FLOAT_CODES[code_format][0] if code_format else "int8"


def _reduce_dims(ndim: int, axis: int | None) -> list[int]:
    return [d for d in range(ndim) if axis is None or d != axis % ndim]


def _view_scales(scales: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scales.reshape([1] * ndim)
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scales.reshape(shape)


def to_groups(tensor: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """A 2-D tensor as ``[out, n_groups, group]`` (output channels on ``axis``; zero-padded tail)."""
    import torch.nn.functional as F

    if tensor.ndim != 2:
        raise SqueezeError(f"group-wise quantization needs a 2-D tensor, not shape {tuple(tensor.shape)}")
    rows = tensor if axis % 2 == 0 else tensor.t()
    n_in = rows.shape[1]
    n_groups = -(-n_in // group)
    if n_groups * group == n_in and rows.is_contiguous():
        return rows.reshape(rows.shape[0], n_groups, group)  # a view: no tail to pad
    return F.pad(rows, (0, n_groups * group - n_in)).reshape(rows.shape[0], n_groups, group)


def from_groups(grouped: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Inverse of ``to_groups`` for a tensor of ``shape``."""
    n_in = shape[1 - axis % 2]
    rows = grouped.reshape(grouped.shape[0], -1)[:, :n_in]
    return (rows if axis % 2 == 0 else rows.t()).contiguous()


def scales_of(tensor: torch.Tensor, bits: int, axis: int | None,
              group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """Symmetric scales ``max|w| / qmax`` over every dim but ``axis`` (1.0 for all-zero channels);
    ``max|w| / 448`` for ``code_format = "fp8_e4m3"`` (``code_max``).

    With ``group``: one per output channel and run of ``group`` inputs (``[out, n_groups]``, flat).
    """
    import torch

    magnitude = tensor.detach().abs().float()
    if group is not None:
        amax = to_groups(magnitude, axis, group).amax(dim=-1)
    else:
        dims = _reduce_dims(tensor.ndim, axis)
        # amax over an empty dim list would reduce everything: a 1-D tensor per channel is its own amax
        amax = magnitude.amax(dim=dims) if dims else magnitude.reshape(-1)
    q = code_max(bits, code_format)
    scales = amax / q
    return torch.where(amax > 0, scales, torch.ones_like(scales)).reshape(-1)


def fixed_point_scales(scales: torch.Tensor, bits: int,
                       code_format: str | None = None) -> torch.Tensor:
    """Nudge float32 scales until ``(s * qmax) / qmax == s``, so ``scales_of`` re-derives them."""
    import torch

    q = code_max(bits, code_format)
    for _ in range(8):
        again = (scales * q) / q
        if torch.equal(again, scales):
            return scales
        scales = again
    # A scale oscillating between neighbours: nudge the remaining ones until they are fixed points.
    for _ in range(64):
        bad = (scales * q) / q != scales
        if not bad.any():
            return scales
        scales = torch.where(bad, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    raise SqueezeError("cannot find exactly representable quantization scales")


def _grid_scales(tensor: torch.Tensor, bits: int, axis: int | None,
                 group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """Scales that ``scales_of`` re-derives exactly from the tensor quantized with them."""
    return fixed_point_scales(scales_of(tensor, bits, axis, group, code_format), bits, code_format)


def _round_codes(ratios: torch.Tensor, bits: int, code_format: str | None) -> torch.Tensor:
    """``w / scale`` rounded to the nearest code, as float32: an integer in ``-qmax .. qmax``, or
    the nearest float8 value (clamped first: E4M3 has no infinity, an overflow would be NaN;
    ``+ 0.0`` turns a negative zero into zero, as integer codes have it)."""
    import torch

    q = code_max(bits, code_format)
    clamped = torch.clamp(ratios, -q, q)
    if code_format:
        return clamped.to(getattr(torch, code_dtype(code_format))).float() + 0.0
    return torch.round(clamped)


def _codes(tensor: torch.Tensor, scales: torch.Tensor, bits: int, axis: int | None,
           group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """The codes of ``tensor`` at ``scales``: int8, or ``code_dtype(code_format)``."""
    import torch

    dtype = getattr(torch, code_dtype(code_format))
    if group is not None:
        grouped = to_groups(tensor.float(), axis, group)
        codes = _round_codes(grouped / scales.reshape(grouped.shape[0], -1, 1), bits, code_format)
        return from_groups(codes, tuple(tensor.shape), axis).to(dtype)
    s = _view_scales(scales, tensor.ndim, axis)
    return _round_codes(tensor.float() / s, bits, code_format).to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, axis: int | None,
               group: int | None = None) -> torch.Tensor:
    """float32 values ``code * scale`` of codes (integer or float8) shaped like the tensor."""
    if group is not None:
        grouped = to_groups(codes.float(), axis, group)
        return from_groups(grouped * scales.reshape(grouped.shape[0], -1, 1),
                           tuple(codes.shape), axis)
    return codes.float() * _view_scales(scales, codes.ndim, axis)


#: Floating dtypes a quantized weight may have in memory (and a dense one on disk).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_float(tensor: torch.Tensor, what: str) -> None:
    if str(tensor.dtype).replace("torch.", "") not in FLOAT_DTYPES:
        raise SqueezeError(f"{what} supports floating weights ({', '.join(FLOAT_DTYPES)}), "
                           f"not {tensor.dtype}")


#: Elements of a 2-D weight quantized per row (``axis = 0``) at a time: its temporaries stay
#: this size (a 32000 x 2048 embedding is rounded in 16 runs of rows, with the same result).
ROW_CHUNK = 1 << 22


def quantize_weight(tensor: torch.Tensor, bits: int = 8, axis: int | None = 0,
                    group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """The fake-quantized (dequantized) copy of a floating tensor, exactly on the codec's grid,
    in the tensor's dtype (computed in float32; see ``on_grid`` for half precision).
    ``code_format``: the spec's ``"format"`` (``"fp8_e4m3"``: float8 codes), None for integers."""
    import torch

    _check_float(tensor, "quantization")
    normalize({"quant": {"bits": bits, "axis": axis, "group": group, "format": code_format}})
    rows = ROW_CHUNK // max(tensor.shape[-1], 1) if tensor.ndim == 2 else 0
    if axis == 0 and 0 < rows < tensor.shape[0]:  # rows are independent: a run at a time
        out = torch.empty_like(tensor)
        for first in range(0, tensor.shape[0], rows):
            out[first:first + rows] = quantize_weight(tensor[first:first + rows], bits, axis,
                                                      group, code_format)
        return out
    values = tensor.detach().float() if tensor.dtype != torch.float32 else tensor
    scales = _grid_scales(values, bits, axis, group, code_format)
    codes = _codes(values, scales, bits, axis, group, code_format)
    return on_grid(dequantize(codes, scales, axis, group), tensor.dtype, bits, axis, group,
                   code_format)


def on_grid(values: torch.Tensor, dtype: Any, bits: int, axis: int | None,
            group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """Float32 values on a ``quant`` grid (``code * scale``) as a tensor of ``dtype`` that
    ``encode`` stores exactly: the rounding of ``code * scale`` to ``dtype``, with scales and codes
    that ``encode`` re-derives from it.

    For float32 (and wider) the values are returned as they are. For half precision the rounded
    values are quantized again until nothing moves: the largest value of a channel or group is its
    scale's ``qmax * scale`` rounded, and rounding moves a value by less than half a code (2**-9
    relative for bfloat16, ``qmax <= 127``; float8 codes are 2**-4 apart relatively), so one more
    pass normally finds the fixed point.
    """
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    if dtype in (torch.float32, torch.float64):
        return values.to(dtype)
    current = values.to(dtype)
    for _ in range(8):
        wide = current.float()
        scales = _grid_scales(wide, bits, axis, group, code_format)
        again = dequantize(_codes(wide, scales, bits, axis, group, code_format), scales, axis,
                           group).to(dtype)
        if torch.equal(again, current):
            return current
        current = again
    raise SqueezeError(f"cannot put the values on a {bits}-bit quantization grid in {dtype}")


def quantize_weight_(tensor: torch.Tensor, bits: int = 8, axis: int | None = 0,
                     group: int | None = None, code_format: str | None = None) -> torch.Tensor:
    """Fake-quantize ``tensor`` in place (see ``quantize_weight``); return it."""
    import torch

    with torch.no_grad():
        tensor.copy_(quantize_weight(tensor.detach(), bits, axis, group, code_format))
    return tensor


# ---------------------------------------------------------------------------- bit packing
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers ``< 2**bits`` (any shape) into a flat uint8 tensor, little bit order."""
    import numpy as np
    import torch

    if 8 % bits == 0:  # whole values per byte: shifts, without a byte per bit on the way
        per = 8 // bits
        flat = values.reshape(-1).to(torch.uint8)
        if flat.numel() % per:
            flat = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
        lanes = flat.reshape(-1, per)
        out = lanes[:, 0].clone()
        for k in range(1, per):
            out |= lanes[:, k] << (k * bits)
        return out
    arr = values.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(arr[:, None], axis=1, count=bits, bitorder="little")  # low bits first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``count`` unsigned integers as int64."""
    import torch

    return _unpacked(packed, bits, count).to(torch.int64)


def _unpacked(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_bits`` as uint8 (``bits <= 8``): a byte per value, and never eight bytes per bit
    on the way (the codes of a large embedding would take gigabytes)."""
    import numpy as np
    import torch

    if 8 % bits == 0:  # whole values per byte (int4 codes): shifts and masks
        per = 8 // bits
        data = packed.reshape(-1).to(torch.uint8)
        if data.numel() * per < count:
            raise ValueError(f"{data.numel()} bytes hold fewer than {count} {bits}-bit values")
        if per == 1:
            return data[:count].clone()
        mask = (1 << bits) - 1
        lanes = torch.stack([(data >> (k * bits)) & mask for k in range(per)], 1)
        return lanes.reshape(-1)[:count].clone()
    flat = np.unpackbits(packed.reshape(-1).to(torch.uint8).numpy(), count=count * bits,
                         bitorder="little")
    # each value's bits, low first, gathered back into one byte (zero-padded to eight bits)
    return torch.from_numpy(np.packbits(flat.reshape(count, bits), axis=1,
                                        bitorder="little").reshape(count))


# ---------------------------------------------------------------------------- N:M runs
def _runs(tensor: torch.Tensor, m: int, axis: int) -> torch.Tensor:
    """``[n_runs, m]``: runs of ``m`` consecutive elements along ``axis`` (moved last)."""
    moved = tensor.movedim(axis, -1)
    if moved.shape[-1] % m:
        raise SqueezeError(f"N:M sparsity with M={m} needs a length along axis {axis} divisible by "
                           f"{m}, not {moved.shape[-1]}")
    return moved.contiguous().reshape(-1, m)


def _unruns(runs: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(axis % len(shape)))
    return runs.reshape(moved).movedim(-1, axis).contiguous()


def nm_positions(tensor: torch.Tensor, n: int, m: int, axis: int) -> torch.Tensor:
    """``[n_runs, n]`` kept positions per run: its nonzeros, then its first zeros, ascending."""
    import torch

    runs = _runs(tensor, m, axis)
    nonzero = runs != 0
    if runs.numel() and int(nonzero.sum(1).max()) > n:
        raise SqueezeError(f"tensor has runs with more than {n} nonzeros of {m}: not {n}:{m} sparse")
    # nonzeros first (key 0), zeros after (key 1); the index breaks ties, so the choice is unique
    key = (~nonzero).long() * m + torch.arange(m).expand_as(runs)
    return torch.sort(torch.topk(key, n, dim=1, largest=False).indices, dim=1).values


# ---------------------------------------------------------------------------- encode / decode
def encode(name: str, tensor: torch.Tensor, spec: dict[str, Any] | None,
           by_rows: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors for ``tensor`` under ``spec`` (names derived from ``name``); a large
    weight quantized per row is encoded a run of rows at a time unless ``by_rows`` is false."""
    import torch

    spec = normalize(spec)
    tensor = tensor.detach().cpu().contiguous()
    if spec is None:
        return {name: tensor}
    if spec.get("cluster"):
        return _encode_cluster(name, tensor, spec["cluster"]["bits"])
    quant = spec.get("quant")
    if by_rows and quant and quant["axis"] == 0 and tensor.ndim == 2 and \
            not spec.get("sparse") and not spec.get("nm") and tensor.numel() > ROW_CHUNK:
        return _encode_rows(name, tensor, spec)
    out: dict[str, torch.Tensor] = {}
    quant = spec.get("quant")
    flat = tensor.reshape(-1)
    mask = positions = None
    if spec.get("sparse"):
        mask = flat != 0
        out[name + MASK] = pack_bits(mask, 1)
        if not quant:
            out[name + VALUES] = flat[mask].clone()
    if spec.get("nm"):
        n, m, axis_nm = nm_params(spec["nm"])
        if tensor.ndim == 0:
            raise SqueezeError(f"'{name}': N:M sparsity needs at least one dimension")
        try:
            positions = nm_positions(tensor, n, m, axis_nm)
        except SqueezeError as exc:
            raise SqueezeError(f"'{name}': {exc}; refusing a lossy save") from None
        out[name + INDEX] = pack_bits(positions, index_bits(m))
        if not quant:
            out[name + VALUES] = _runs(tensor, m, axis_nm).gather(1, positions).reshape(-1).clone()
    if quant:
        bits, axis, group = quant["bits"], quant["axis"], quant.get("group")
        code_format = quant.get("format")
        wide = tensor.float()
        # grid scales: scales_of for float32 values on the grid (they are fixed points already),
        # and the scales on_grid settled on for half-precision ones
        scales = _grid_scales(wide, bits, axis, group, code_format)
        codes = _codes(wide, scales, bits, axis, group, code_format)
        if not torch.equal(dequantize(codes, scales, axis, group).to(tensor.dtype), tensor):
            what = f"{code_format} " if code_format else f"{bits}-bit "
            raise SqueezeError(f"tensor '{name}' is not on its {what}quantization grid "
                               f"(was it changed after quantizing?); refusing a lossy save")
        if mask is not None:
            codes = codes.reshape(-1)[mask]
        elif positions is not None:  # torch gathers no float8: move the codes' bytes
            codes = _runs(codes.view(torch.uint8), m, axis_nm).gather(1, positions).reshape(-1)
            codes = codes.view(getattr(torch, code_dtype(code_format)))
        if bits != 8:
            codes = pack_bits(codes.to(torch.int16) + 2 ** (bits - 1), bits)
        out[name + CODES] = codes.contiguous()
        out[name + SCALES] = scales.float().contiguous()
    return out


def _encode_rows(name: str, tensor: torch.Tensor, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``encode`` of a large 2-D weight quantized per row, a run of rows at a time (its
    temporaries stay ``ROW_CHUNK`` elements): rows are independent, their scales are stored
    row-major, and each run's codes fill whole bytes, so the pieces join into what ``encode``
    writes for the whole tensor."""
    import torch

    bits = spec["quant"]["bits"]
    rows = max(ROW_CHUNK // tensor.shape[1], 1)
    while (rows * tensor.shape[1] * bits) % 8:
        rows += 1
    codes, scales = [], []
    for first in range(0, tensor.shape[0], rows):
        part = encode(name, tensor[first:first + rows], spec, by_rows=False)
        codes.append(part[name + CODES])
        scales.append(part[name + SCALES])
    return {name + CODES: torch.cat(codes), name + SCALES: torch.cat(scales)}


def _encode_cluster(name: str, tensor: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    import torch

    _check_float(tensor, f"'{name}': clustering")
    # float32 holds every half-precision value exactly: one codebook dtype for every checkpoint
    values, index = torch.unique(tensor.reshape(-1).float(), sorted=True, return_inverse=True)
    if values.numel() > 2 ** bits:
        raise SqueezeError(f"'{name}' holds {values.numel()} distinct values, more than the "
                           f"{2 ** bits} of its {bits}-bit codebook; refusing a lossy save")
    book = torch.cat([values, values[-1:].expand(2 ** bits - values.numel())])
    return {name + CODES: pack_bits(index, bits), name + CODEBOOK: book.contiguous()}


def stored_names(name: str, spec: dict[str, Any] | None) -> list[str]:
    """The stored tensor names ``encode`` produces for ``name``."""
    spec = normalize(spec)
    if spec is None:
        return [name]
    if spec.get("cluster"):
        return [name + CODES, name + CODEBOOK]
    names = []
    if spec.get("sparse"):
        names.append(name + MASK)
    if spec.get("nm"):
        names.append(name + INDEX)
    if not spec.get("quant"):
        names.append(name + VALUES)
    else:
        names += [name + CODES, name + SCALES]
    return names


def decode(name: str, stored: dict[str, torch.Tensor], spec: dict[str, Any] | None,
           shape: Iterable[int], dtype: Any) -> torch.Tensor:
    """Rebuild the in-memory tensor of ``name`` from its stored tensors; ``SqueezeError`` if malformed."""
    import torch

    spec = normalize(spec)
    shape = tuple(int(d) for d in shape)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    missing = [n for n in stored_names(name, spec) if n not in stored]
    if missing:
        raise SqueezeError(f"stored tensor(s) {', '.join(missing)} missing for '{name}'")
    try:
        if spec is None:
            t = stored[name]
            if tuple(t.shape) != shape:
                raise SqueezeError(f"'{name}' has shape {tuple(t.shape)}, expected {shape}")
            return t.to(dtype)
        n = _numel(shape)
        if spec.get("cluster"):
            bits = spec["cluster"]["bits"]
            book = stored[name + CODEBOOK].float().reshape(-1)
            if book.numel() != 2 ** bits:
                raise SqueezeError(f"'{name}': codebook of {book.numel()} entries, not {2 ** bits}")
            return book[unpack_bits(stored[name + CODES], bits, n)].reshape(shape).to(dtype)
        quant = spec.get("quant")
        mask = positions = None
        count = n
        if spec.get("sparse"):
            mask = unpack_bits(stored[name + MASK], 1, n).bool()
            count = int(mask.sum())
        if spec.get("nm"):
            nn, m, axis_nm = nm_params(spec["nm"])
            if not shape or shape[axis_nm] % m:
                raise SqueezeError(f"'{name}': shape {shape} does not split into runs of {m}")
            count = n // m * nn
            positions = unpack_bits(stored[name + INDEX], index_bits(m), count).reshape(-1, nn)
            if positions.numel() and int(positions.max()) >= m:
                raise SqueezeError(f"'{name}': N:M position beyond its run of {m}")

        def place(values: torch.Tensor) -> torch.Tensor:
            """Scatter kept ``values`` into a zero tensor of ``shape`` (of their dtype)."""
            if values.numel() != count:
                raise SqueezeError(f"'{name}': {values.numel()} values for {count} kept entries")
            if mask is not None:
                full = torch.zeros(n, dtype=values.dtype)
                full[mask] = values
                return full.reshape(shape)
            if positions is not None:
                runs = torch.zeros(n // m, m, dtype=values.dtype)
                runs.scatter_(1, positions, values.reshape(-1, nn))
                return _unruns(runs, shape, axis_nm)
            return values.reshape(shape)

        if quant:
            bits, axis, group = quant["bits"], quant["axis"], quant.get("group")
            code_format = quant.get("format")
            codes = stored[name + CODES]
            if code_format and str(codes.dtype) != f"torch.{code_dtype(code_format)}":
                raise SqueezeError(f"'{name}': {code_format} codes stored as {codes.dtype}, "
                                   f"not {code_dtype(code_format)}")
            # every code (an integer of at most 8 bits, or a float8 value) is exact in float32,
            # which dequantizing computes in anyway
            if code_format or bits == 8:
                codes = codes.reshape(-1).float()
            else:
                codes = _unpacked(codes, bits, count).float().sub_(2 ** (bits - 1))
            scales = stored[name + SCALES].float().reshape(-1)
            if scales.numel() != _n_scales(shape, axis, group):
                raise SqueezeError(f"'{name}': {scales.numel()} scales for shape {shape}")
            return dequantize(place(codes), scales, axis, group).to(dtype)
        return place(stored[name + VALUES].reshape(-1)).to(dtype)
    except SqueezeError:
        raise
    except Exception as exc:  # malformed stored tensors
        raise SqueezeError(f"cannot decode '{name}': {type(exc).__name__}: {exc}") from None
