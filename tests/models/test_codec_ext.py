"""Codec extensions: group-wise scales, N:M runs, clustered codebooks — exact round trips and sizes."""
from __future__ import annotations

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models import codec


def _data_bytes(stored):
    return sum(t.numel() * t.element_size() for t in stored.values())


def _nm(shape, n, m, axis, seed=0):
    """A random tensor with at most ``n`` nonzeros in every run of ``m`` along ``axis``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    runs = w.movedim(axis, -1).contiguous().reshape(-1, m)
    keep = torch.rand(runs.shape, generator=g).argsort(1)[:, :n]
    kept = torch.zeros_like(runs).scatter_(1, keep, runs.gather(1, keep))
    kept[::3, 0] = 0  # some runs with fewer than n nonzeros
    moved = list(w.movedim(axis, -1).shape)
    return kept.reshape(moved).movedim(-1, axis).contiguous()


def _check(w, spec):
    stored = codec.encode("layer.weight", w, spec)
    assert sorted(stored) == sorted(codec.stored_names("layer.weight", spec))
    back = codec.decode("layer.weight", stored, spec, w.shape, w.dtype)
    assert back.dtype == w.dtype and back.shape == w.shape
    assert torch.equal(back, w)
    assert codec.stored_bytes(w.shape, "float32", spec) == _data_bytes(stored)
    return stored


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape,group", [((16, 256), 128), ((7, 13), 4), ((24, 40), 64), ((5, 9), 1)])
def test_group_quant_round_trip(bits, axis, shape, group):
    w = torch.randn(shape)
    w[2] = 0
    fq = codec.quantize_weight(w, bits, axis, group)
    spec = {"quant": {"bits": bits, "axis": axis, "group": group}}
    stored = _check(fq, spec)
    n_in = shape[1 - axis]
    assert stored["layer.weight.__scales"].numel() == shape[axis] * -(-n_in // group)
    assert torch.equal(codec.quantize_weight(fq, bits, axis, group), fq)  # idempotent


def test_group_quant_is_finer_than_per_channel():
    w = torch.randn(64, 512) * torch.linspace(0.01, 3, 512)
    per_channel = (codec.quantize_weight(w, 4, 0) - w).pow(2).mean()
    grouped = (codec.quantize_weight(w, 4, 0, 64) - w).pow(2).mean()
    assert grouped < 0.5 * per_channel


def test_int4_packs_two_per_byte():
    fq = codec.quantize_weight(torch.randn(32, 256), 4, 0, 128)
    stored = codec.encode("w", fq, {"quant": {"bits": 4, "axis": 0, "group": 128}})
    assert stored["w.__codes"].dtype == torch.uint8 and stored["w.__codes"].numel() == 32 * 256 // 2
    assert stored["w.__scales"].numel() == 32 * 2


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (3, 8), (1, 2), (4, 16)])
@pytest.mark.parametrize("axis", [-1, 0])
def test_nm_round_trip_and_size(n, m, axis):
    shape = (16, 32)
    w = _nm(shape, n, m, axis)
    spec = {"nm": [n, m] if axis == -1 else [n, m, axis]}
    stored = _check(w, spec)
    kept = w.numel() // m * n
    assert stored["layer.weight.__values"].numel() == kept
    assert stored["layer.weight.__index"].numel() == -(-kept * codec.index_bits(m) // 8)


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 8)])
def test_nm_with_quant_round_trip(bits, group):
    w = codec.quantize_weight(_nm((16, 32), 2, 4, -1), bits, 0, group)
    spec = {"nm": [2, 4], "quant": {"bits": bits, "axis": 0, "group": group}}
    stored = _check(w, spec)
    assert "layer.weight.__values" not in stored


def test_nm_2_4_halves_float32():
    w = _nm((64, 64), 2, 4, -1)
    assert codec.stored_bytes(w.shape, "float32", {"nm": [2, 4]}) == 64 * 64 // 2 * 4 + 64 * 64 // 2 // 4


def test_nm_refuses_too_many_nonzeros_and_bad_lengths():
    with pytest.raises(SqueezeError, match="more than 2 nonzeros"):
        codec.encode("w", torch.randn(4, 8), {"nm": [2, 4]})
    with pytest.raises(SqueezeError, match="divisible"):
        codec.encode("w", torch.zeros(4, 6), {"nm": [2, 4]})
    for bad in ([4, 4], [0, 4], [2, 128], [2, 4, 2], "2:4"):
        with pytest.raises(SqueezeError, match="codec nm"):
            codec.normalize({"nm": bad})
    with pytest.raises(SqueezeError, match="cannot combine"):
        codec.normalize({"nm": [2, 4], "sparse": True})


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(16, 24), (7,), (3, 4, 5)])
def test_cluster_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits)
    centroids = torch.randn(2 ** bits, generator=g)
    w = centroids[torch.randint(0, 2 ** bits, shape, generator=g)]
    stored = _check(w, {"cluster": {"bits": bits}})
    assert stored["layer.weight.__codebook"].numel() == 2 ** bits


def test_cluster_with_fewer_values_and_refusals():
    w = torch.tensor([[0.5, -1.0], [0.5, 0.5]])
    _check(w, {"cluster": {"bits": 3}})
    with pytest.raises(SqueezeError, match="distinct values"):
        codec.encode("w", torch.randn(10, 10), {"cluster": {"bits": 4}})
    with pytest.raises(SqueezeError, match="cannot combine"):
        codec.normalize({"cluster": {"bits": 4}, "quant": {"bits": 8}})


def test_malformed_extension_tensors_raise():
    w = _nm((8, 8), 2, 4, -1)
    stored = codec.encode("w", w, {"nm": [2, 4]})
    stored["w.__values"] = stored["w.__values"][:-1]
    with pytest.raises(SqueezeError, match="values"):
        codec.decode("w", stored, {"nm": [2, 4]}, w.shape, w.dtype)
    stored = codec.encode("w", torch.ones(4, 4), {"cluster": {"bits": 2}})
    stored["w.__codebook"] = stored["w.__codebook"][:2]
    with pytest.raises(SqueezeError, match="codebook"):
        codec.decode("w", stored, {"cluster": {"bits": 2}}, (4, 4), torch.float32)
