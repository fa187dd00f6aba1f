"""GGUF ``Q8_0`` and ``Q4_0`` blocks built from squeezelang's own integer codes, exactly.

Both types are blocks of 32 consecutive values of a row, each with one float16 scale ``d``:
``Q8_0`` holds int8 ``qs`` (value ``d * qs``), ``Q4_0`` holds 4-bit ``q`` packed two per byte
(value ``d * (q - 8)``; byte ``j`` holds ``q[j]`` in its low nibble and ``q[j + 16]`` in its high
one). squeezelang's symmetric codes (``-127..127`` at 8 bits, ``-7..7`` at 4) with one float32
scale per row, per run of a multiple of 32 inputs, or per tensor, therefore map onto them without
rounding anything but the scale: ``qs = code``, ``q = code + 8``, ``d = float16(scale)``.

Tensors the recipe left in float go through gguf-py's reference quantizer (``gguf.quants``, the
same arithmetic as llama.cpp's ``ggml-quants.c``) when a quantized type is asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from squeezelang.plugin import SqueezeError

if TYPE_CHECKING:
    import numpy as np

#: Values per block of Q8_0 and Q4_0.
QK = 32


def block_scales(name: str, scale_map: np.ndarray) -> np.ndarray:
    """The float32 scale of every 32-block of a ``[rows, cols]`` map of each value's scale;
    ``SqueezeError`` if a block would need two (a group that does not fill whole blocks)."""
    rows, cols = scale_map.shape
    if cols % QK:
        raise SqueezeError(f"tensor '{name}': rows of {cols} values cannot be split into GGUF "
                           f"blocks of {QK} (Q8_0/Q4_0 need a row length that is a multiple of "
                           f"{QK}); exclude it from the quantize stage or choose type = \"F32\"")
    blocks = scale_map.reshape(rows, cols // QK, QK)
    first = blocks[..., :1]
    if not bool((blocks == first).all()):
        raise SqueezeError(f"tensor '{name}': its scales change inside a block of {QK} values "
                           "(group_size must be a multiple of 32, with scales per output row)")
    return first[..., 0]


def half_scales(name: str, scales: np.ndarray) -> tuple[np.ndarray, float]:
    """``float16(scales)`` and the largest relative change rounding made; ``SqueezeError`` if a
    scale leaves float16's range (overflows, or a nonzero scale becomes zero)."""
    import numpy as np

    half = scales.astype(np.float16)
    if not np.isfinite(half).all() or bool(((half == 0) & (scales != 0)).any()):
        raise SqueezeError(f"tensor '{name}': a quantization scale ({float(np.abs(scales).max()):g} "
                           f"at most, {float(np.abs(scales[scales != 0]).min()):g} at least) does "
                           "not fit GGUF's float16 block scales")
    wide = half.astype(np.float32)
    nonzero = scales != 0
    change = np.abs(wide[nonzero] - scales[nonzero]) / np.abs(scales[nonzero])
    return half, float(change.max()) if change.size else 0.0


def q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``Q8_0`` bytes ``[rows, blocks * 34]`` of int8 ``codes [rows, cols]`` and float16 ``d``."""
    import numpy as np

    rows, cols = codes.shape
    blocks = codes.astype(np.int8).reshape(rows, cols // QK, QK).view(np.uint8)
    scale = d.astype(np.float16).reshape(rows, cols // QK, 1).view(np.uint8)
    return np.concatenate([scale, blocks], axis=-1).reshape(rows, -1)


def q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``Q4_0`` bytes ``[rows, blocks * 18]`` of codes in ``-8..7`` ``[rows, cols]`` and ``d``."""
    import numpy as np

    rows, cols = codes.shape
    if codes.size and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise SqueezeError("Q4_0 holds codes -8..7 only")
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // QK, 2, QK // 2)
    packed = q[..., 0, :] | (q[..., 1, :] << np.uint8(4))
    scale = d.astype(np.float16).reshape(rows, cols // QK, 1).view(np.uint8)
    return np.concatenate([scale, packed], axis=-1).reshape(rows, -1)


def reference(values: np.ndarray, qtype_name: str) -> np.ndarray:
    """``values`` (float32) quantized by gguf-py's reference quantizer to ``qtype_name``."""
    import gguf
    import numpy as np

    return gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType[qtype_name])


def nonzero(data: np.ndarray, qtype_name: str) -> int:
    """The nonzero values of a tensor's stored bytes, counted without dequantizing it."""
    import numpy as np

    if qtype_name in ("Q8_0", "Q4_0"):
        width = 34 if qtype_name == "Q8_0" else 18
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, width)
        live = blocks[:, :2].copy().view(np.float16)[:, 0] != 0
        if qtype_name == "Q8_0":
            codes = blocks[:, 2:] != 0
        else:
            packed = blocks[:, 2:]
            codes = np.concatenate([(packed & 0x0F) != 8, (packed >> 4) != 8], axis=1)
        return int((codes & live[:, None]).sum())
    if qtype_name == "BF16":
        return int(np.count_nonzero(np.ascontiguousarray(data).view(np.uint16) & 0x7FFF))
    return int(np.count_nonzero(data))
