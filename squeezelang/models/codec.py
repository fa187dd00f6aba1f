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
``{"sparse": true, "quant": {...}}``
    the mask, the codes of the nonzeros only, and the scales.

Estimates (``stored_bytes``) may add ``"density"`` (expected fraction of nonzeros, default 1.0) to a
sparse spec, since the count of nonzeros is only known once weights exist; ``save`` never writes it.

The in-memory model holds the *decoded* values, so encoding must be lossless for them:
``decode(encode(w)) == w``. ``quantize_weight`` produces values on the codec's grid — its scales
are chosen so that re-deriving them from the dequantized tensor (``max|w| / qmax``) gives them back
bit for bit — and ``encode`` checks the round trip, raising ``SqueezeError`` rather than writing a
lossy file.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

MASK, VALUES, CODES, SCALES = ".__mask", ".__values", ".__codes", ".__scales"
SUFFIXES = (MASK, VALUES, CODES, SCALES)

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
_SAFETENSORS_DTYPE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL"}


# ---------------------------------------------------------------------------- specs
def normalize(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Check a spec and return it without estimate-only keys (``density``); ``None`` if dense."""
    if not spec:
        return None
    unknown = set(spec) - {"sparse", "quant", "density"}
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
    return out or None


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


def _n_scales(shape: tuple[int, ...], axis: int | None) -> int:
    return 1 if axis is None else int(shape[axis])


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
    if not spec or (not spec.get("sparse") and not quant):
        return [(name, dtype, shape)]
    out: list[tuple[str, str, tuple[int, ...]]] = []
    count = n
    if spec.get("sparse"):
        count = expected_nonzeros(n, spec)
        out.append((name + MASK, "uint8", ((n + 7) // 8,)))
        if not quant:
            out.append((name + VALUES, dtype, (count,)))
    if quant:
        bits = quant.get("bits", 8)
        if bits == 8:
            out.append((name + CODES, "int8", shape if not spec.get("sparse") else (count,)))
        else:
            out.append((name + CODES, "uint8", (_packed_bytes(count, bits),)))
        out.append((name + SCALES, "float32", (_n_scales(shape, quant.get("axis", 0)),)))
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


def _reduce_dims(ndim: int, axis: int | None) -> list[int]:
    return [d for d in range(ndim) if axis is None or d != axis % ndim]


def _view_scales(scales: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scales.reshape([1] * ndim)
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scales.reshape(shape)


def scales_of(tensor: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric scales ``max|w| / qmax`` over every dim but ``axis`` (1.0 for all-zero channels)."""
    import torch

    magnitude = tensor.detach().abs().float()
    dims = _reduce_dims(tensor.ndim, axis)
    # amax over an empty dim list would reduce everything: a 1-D tensor per channel is its own amax
    amax = magnitude.amax(dim=dims) if dims else magnitude.reshape(-1)
    q = float(qmax(bits))
    scales = amax / q
    return torch.where(amax > 0, scales, torch.ones_like(scales)).reshape(-1)


def _grid_scales(tensor: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Scales that ``scales_of`` re-derives exactly from the tensor quantized with them."""
    import torch

    scales = scales_of(tensor, bits, axis)
    q = float(qmax(bits))
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


def _codes(tensor: torch.Tensor, scales: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    import torch

    q = qmax(bits)
    s = _view_scales(scales, tensor.ndim, axis)
    return torch.clamp(torch.round(tensor.float() / s), -q, q).to(torch.int8)


def quantize_weight(tensor: torch.Tensor, bits: int = 8, axis: int | None = 0) -> torch.Tensor:
    """The fake-quantized (dequantized) copy of a float32 tensor, exactly on the codec's grid."""
    import torch

    if tensor.dtype != torch.float32:
        raise SqueezeError(f"quantization supports float32 weights, not {tensor.dtype}")
    normalize({"quant": {"bits": bits, "axis": axis}})
    scales = _grid_scales(tensor, bits, axis)
    codes = _codes(tensor, scales, bits, axis)
    return codes.float() * _view_scales(scales, tensor.ndim, axis)


def quantize_weight_(tensor: torch.Tensor, bits: int = 8, axis: int | None = 0) -> torch.Tensor:
    """Fake-quantize ``tensor`` in place (see ``quantize_weight``); return it."""
    import torch

    with torch.no_grad():
        tensor.copy_(quantize_weight(tensor.detach(), bits, axis))
    return tensor


# ---------------------------------------------------------------------------- bit packing
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers ``< 2**bits`` (any shape) into a flat uint8 tensor, little bit order."""
    import numpy as np
    import torch

    arr = values.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(arr[:, None], axis=1, count=8, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``count`` unsigned integers as int64."""
    import numpy as np
    import torch

    flat = np.unpackbits(packed.reshape(-1).to(torch.uint8).numpy(), count=count * bits,
                         bitorder="little")
    planes = flat.reshape(count, bits).astype(np.int64)
    return torch.from_numpy(planes @ (1 << np.arange(bits, dtype=np.int64)))


# ---------------------------------------------------------------------------- encode / decode
def encode(name: str, tensor: torch.Tensor, spec: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The stored tensors for ``tensor`` under ``spec`` (names derived from ``name``)."""
    import torch

    spec = normalize(spec)
    tensor = tensor.detach().cpu().contiguous()
    if spec is None:
        return {name: tensor}
    out: dict[str, torch.Tensor] = {}
    quant = spec.get("quant")
    flat = tensor.reshape(-1)
    if spec.get("sparse"):
        mask = flat != 0
        out[name + MASK] = pack_bits(mask, 1)
        if not quant:
            out[name + VALUES] = flat[mask].clone()
    if quant:
        bits, axis = quant["bits"], quant["axis"]
        scales = scales_of(tensor, bits, axis)
        codes = _codes(tensor, scales, bits, axis)
        if not torch.equal(codes.float() * _view_scales(scales, tensor.ndim, axis), tensor.float()):
            raise SqueezeError(f"tensor '{name}' is not on its {bits}-bit quantization grid "
                               f"(was it changed after quantizing?); refusing a lossy save")
        codes = codes.reshape(-1)[mask] if spec.get("sparse") else codes
        if bits != 8:
            codes = pack_bits(codes.to(torch.int16) + 2 ** (bits - 1), bits)
        out[name + CODES] = codes.contiguous()
        out[name + SCALES] = scales.float().contiguous()
    return out


def stored_names(name: str, spec: dict[str, Any] | None) -> list[str]:
    """The stored tensor names ``encode`` produces for ``name``."""
    spec = normalize(spec)
    if spec is None:
        return [name]
    names = []
    if spec.get("sparse"):
        names.append(name + MASK)
        if not spec.get("quant"):
            names.append(name + VALUES)
    if spec.get("quant"):
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
        quant = spec.get("quant")
        mask = None
        if spec.get("sparse"):
            mask = unpack_bits(stored[name + MASK], 1, n).bool()
        if quant:
            bits, axis = quant["bits"], quant["axis"]
            count = int(mask.sum()) if mask is not None else n
            codes = stored[name + CODES]
            if bits == 8:
                codes = codes.reshape(-1).to(torch.int64)
            else:
                codes = unpack_bits(codes, bits, count) - 2 ** (bits - 1)
            if codes.numel() != count:
                raise SqueezeError(f"'{name}': {codes.numel()} codes for {count} values")
            scales = stored[name + SCALES].float().reshape(-1)
            if scales.numel() != _n_scales(shape, axis):
                raise SqueezeError(f"'{name}': {scales.numel()} scales for shape {shape}")
            full = torch.zeros(n, dtype=torch.int64)
            if mask is not None:
                full[mask] = codes
            else:
                full = codes
            values = full.reshape(shape).float() * _view_scales(scales, len(shape), axis)
            return values.to(dtype)
        values = stored[name + VALUES].reshape(-1)
        if values.numel() != int(mask.sum()):
            raise SqueezeError(f"'{name}': {values.numel()} values for {int(mask.sum())} mask bits")
        out = torch.zeros(n, dtype=values.dtype)
        out[mask] = values
        return out.reshape(shape).to(dtype)
    except SqueezeError:
        raise
    except Exception as exc:  # malformed stored tensors
        raise SqueezeError(f"cannot decode '{name}': {type(exc).__name__}: {exc}") from None
