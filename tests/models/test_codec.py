"""Storage codecs: lossless round trips of the in-memory values, exact byte accounting."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models import codec


def _sparse(shape, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w * (torch.rand(shape, generator=g) < density)


def _data_bytes(stored):
    return sum(t.numel() * t.element_size() for t in stored.values())


SPECS = [
    None,
    {"sparse": True},
    {"quant": {"bits": 8, "axis": 0}},
    {"quant": {"bits": 8, "axis": 1}},
    {"quant": {"bits": 8, "axis": None}},
    {"quant": {"bits": 4, "axis": 0}},
    {"quant": {"bits": 3, "axis": 1}},
    {"quant": {"bits": 2, "axis": None}},
    {"sparse": True, "quant": {"bits": 8, "axis": 0}},
    {"sparse": True, "quant": {"bits": 4, "axis": 1}},
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(16, 24), (7, 13), (5,), (3, 4, 5)])
def test_round_trip_is_exact_and_sized_as_predicted(spec, shape):
    w = _sparse(shape)
    quant = (spec or {}).get("quant")
    if quant and quant["axis"] is not None and quant["axis"] >= len(shape):
        pytest.skip("axis beyond the tensor's dims")
    if quant:
        w = codec.quantize_weight(w, quant["bits"], quant["axis"])
    stored = codec.encode("layer.weight", w, spec)
    assert sorted(stored) == sorted(codec.stored_names("layer.weight", spec))
    back = codec.decode("layer.weight", stored, spec, w.shape, w.dtype)
    assert back.dtype == w.dtype and back.shape == w.shape
    assert torch.equal(back, w)
    density = float((w != 0).float().mean())
    estimate_spec = dict(spec or {}, density=density) if spec and spec.get("sparse") else spec
    assert codec.stored_bytes(shape, "float32", estimate_spec) == _data_bytes(stored)


def test_sparse_storage_is_mask_plus_values():
    w = _sparse((64, 64), density=0.5)
    nnz = int((w != 0).sum())
    stored = codec.encode("w", w, {"sparse": True})
    assert stored["w.__mask"].dtype == torch.uint8 and stored["w.__mask"].numel() == 64 * 64 // 8
    assert stored["w.__values"].numel() == nnz
    assert _data_bytes(stored) == 512 + 4 * nnz < w.numel() * 4


def test_int8_codes_and_per_row_scales():
    w = codec.quantize_weight(torch.randn(10, 6), 8, 0)
    stored = codec.encode("w", w, {"quant": {"bits": 8, "axis": 0}})
    assert stored["w.__codes"].dtype == torch.int8 and stored["w.__codes"].shape == (10, 6)
    assert stored["w.__scales"].shape == (10,)
    assert stored["w.__codes"].abs().amax(1).eq(127).all()  # each row's max hits the grid's end


def test_quantize_weight_scales_are_fixed_points_for_many_tensors():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(64, 48, generator=g) * (10.0 ** (seed % 7 - 3))
        w[3] = 0  # an all-zero row keeps scale 1 and decodes to zeros
        for bits, axis in ((8, 0), (8, 1), (4, 0), (5, None), (2, 1)):
            fq = codec.quantize_weight(w, bits, axis)
            spec = {"quant": {"bits": bits, "axis": axis}}
            assert torch.equal(codec.decode("w", codec.encode("w", fq, spec), spec, w.shape, w.dtype), fq)
            assert torch.equal(codec.quantize_weight(fq, bits, axis), fq)  # idempotent
            assert (fq - w).abs().max() <= codec.scales_of(w, bits, axis).max() * 0.5001


def test_quantize_in_place_changes_values_a_little():
    w = torch.randn(8, 8)
    original = w.clone()
    assert codec.quantize_weight_(w, 8, 0) is w
    assert not torch.equal(w, original)
    assert torch.allclose(w, original, atol=original.abs().max() / 127)


def test_encode_refuses_a_tensor_off_its_grid():
    w = torch.randn(4, 4)
    with pytest.raises(SqueezeError, match="not on its 8-bit quantization grid"):
        codec.encode("w", w, {"quant": {"bits": 8, "axis": 0}})


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits):
    values = torch.randint(0, 2 ** bits, (37,))
    packed = codec.pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * bits + 7) // 8
    assert torch.equal(codec.unpack_bits(packed, bits, 37), values)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_is_a_little_endian_bit_stream(bits):
    """Value ``i`` takes bits ``i*bits .. (i+1)*bits - 1`` of the stream, low bit first: the
    layout of every file saved so far."""
    values = torch.randint(0, 2 ** bits, (37,), generator=torch.Generator().manual_seed(bits))
    stream = sum(int(v) << (i * bits) for i, v in enumerate(values))
    expected = list(stream.to_bytes((37 * bits + 7) // 8, "little"))
    assert codec.pack_bits(values, bits).tolist() == expected


DECODE_PEAK = """
import sys, torch
from squeezelang.models import codec
bits, group = int(sys.argv[1]), int(sys.argv[2]) or None
w = torch.randn(4096, 4096)
stored = codec.encode("w", codec.quantize_weight(w, bits, 0, group),
                      {"quant": {"bits": bits, "axis": 0, "group": group}})
del w
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:  # the high-water mark starts again from here
    f.write("5")
before = hwm()
out = codec.decode("w", stored, {"quant": {"bits": bits, "axis": 0, "group": group}},
                   (4096, 4096), torch.bfloat16)
print((hwm() - before) / out.numel())
"""


@pytest.mark.skipif(not os.path.isfile("/proc/self/clear_refs"), reason="Linux-only: VmHWM")
@pytest.mark.parametrize("bits, group", [(8, 0), (4, 128)])
def test_decoding_takes_a_few_bytes_per_weight_on_the_way(bits, group):
    """Decoding a quantized weight holds its codes as float32, never as int64 (or eight bytes per
    bit, as unpacking did): a large embedding's codes would take gigabytes while a model loads."""
    done = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(bits), str(group)],
                          capture_output=True, text=True, check=True)
    assert float(done.stdout.split()[-1]) < 16  # bytes per weight above the stored codes


def test_mask_packing_matches_numpy_packbits_little():
    import numpy as np

    mask = torch.rand(29) > 0.5
    assert codec.pack_bits(mask, 1).numpy().tolist() == np.packbits(
        mask.numpy(), bitorder="little").tolist()


def test_density_only_changes_estimates():
    assert codec.normalize({"sparse": True, "density": 0.3}) == {"sparse": True}
    assert codec.stored_bytes((100, 100), "float32", {"sparse": True, "density": 0.25}) == 1250 + 2500 * 4
    assert codec.stored_bytes((100, 100), "float32", None) == 40000
    assert codec.stored_bytes((100, 100), "float32", {"quant": {"bits": 8, "axis": 0}}) == 10000 + 400
    assert codec.stored_bytes((100, 100), "float32", {"quant": {"bits": 4, "axis": None}}) == 5000 + 4


@pytest.mark.parametrize("spec, message", [
    ({"quant": {"bits": 9}}, "bits must be an integer in 2..8"),
    ({"quant": {"bits": 1}}, "bits must be an integer in 2..8"),
    ({"zip": True}, "unknown codec key"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SqueezeError, match=message):
        codec.normalize(spec)


def test_decode_reports_missing_and_malformed_tensors():
    w = _sparse((8, 8))
    stored = codec.encode("w", w, {"sparse": True})
    with pytest.raises(SqueezeError, match=r"w.__values missing"):
        codec.decode("w", {"w.__mask": stored["w.__mask"]}, {"sparse": True}, w.shape, w.dtype)
    stored["w.__values"] = stored["w.__values"][:-1]
    with pytest.raises(SqueezeError, match="values for"):
        codec.decode("w", stored, {"sparse": True}, w.shape, w.dtype)
    with pytest.raises(SqueezeError, match="has shape"):
        codec.decode("w", {"w": w}, None, (4, 16), w.dtype)


def test_squeeze_json_byte_helpers_agree_with_the_serialisation():
    doc = codec.squeeze_json_doc("embedding", {}, [], {"sparse"})
    assert codec.squeeze_json_base_bytes("embedding", {"sparse"}) == len(codec.squeeze_json_dumps(doc))
    record = {"technique": "factorize", "modules": {"a.b": 3}}
    with_edit = codec.squeeze_json_dumps(codec.squeeze_json_doc("embedding", {}, [record], {"sparse"}))
    assert abs(len(with_edit) - len(codec.squeeze_json_dumps(doc)) - codec.edit_bytes(record)) <= 4


@pytest.mark.parametrize("bits,group,shape,dtype", [
    (4, 128, (300, 256), "bfloat16"), (8, None, (301, 77), "float32"),
    (4, 32, (33, 65), "float32"), (3, 16, (41, 48), "float32"), (5, 7, (50, 31), "float16")])
def test_large_weights_are_quantized_and_encoded_a_run_of_rows_at_a_time_with_the_same_result(
        monkeypatch, bits, group, shape, dtype):
    """Rows are independent: quantizing and encoding in runs of rows (what keeps a 32000-row
    head's temporaries small) gives the bytes the whole tensor gives, codes packed across runs."""
    import torch

    from squeezelang.models import codec as codecs

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    raw = torch.randn(*shape).to(dtype)
    spec = {"quant": {"bits": bits, "axis": 0, "group": group}}
    monkeypatch.setattr(codecs, "ROW_CHUNK", 1 << 40)
    whole_q = codecs.quantize_weight(raw, bits, 0, group)
    whole = codecs.encode("w", whole_q, spec)
    monkeypatch.setattr(codecs, "ROW_CHUNK", 1000)  # runs of a few rows, not whole bytes of codes
    runs_q = codecs.quantize_weight(raw, bits, 0, group)
    runs = codecs.encode("w", runs_q, spec)
    assert torch.equal(runs_q, whole_q)
    assert runs.keys() == whole.keys()
    assert all(torch.equal(runs[k], whole[k]) for k in whole)
    assert torch.equal(codecs.decode("w", runs, spec, shape, dtype), whole_q)
