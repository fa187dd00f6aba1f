"""The ``factorize`` technique: low-rank layers, fewer parameters, exact estimates, rebuild on load."""
from __future__ import annotations

import sys

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _stage(src, registries, out_dir, **params):
    handle = load_model(src)
    tech = registries.techniques.get("factorize")
    params = {**tech.defaults(), **params}
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out_dir)
    return handle, estimate, artifact_bytes(out_dir), load_model(out_dir, registries)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_factorize_quarter_rank(request, fixture, registries, tmp_path):
    from squeezelang.models.layers import LowRankLinear

    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", rank=0.25)
    lowrank = {n: m for n, m in handle.model.named_modules() if isinstance(m, LowRankLinear)}
    # hidden 32 -> rank 8; BERT has 6 linear layers per block, GPT-2 4 Conv1D
    assert len(lowrank) == (8 if "gpt2" in fixture else 12)
    assert all(m.rank == 8 for m in lowrank.values())
    assert handle.edits == [{"technique": "factorize", "method": "svd",
                             "modules": {n: 8 for n in lowrank}}]
    assert handle.states == {"factorized"}
    assert _params(handle.model) < _params(original)
    assert estimate.params() == _params(handle.model)
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert real < artifact_bytes(src)
    before, after = _out(original), _out(handle.model)
    assert not torch.allclose(after, before) and torch.allclose(after, before, atol=2.0)
    assert {n for n, m in back.model.named_modules() if isinstance(m, LowRankLinear)} == set(lowrank)
    assert torch.equal(_out(back.model), after)


def test_full_rank_factors_reproduce_the_layer(tiny_bert_dir, registries):
    from squeezelang.models.layers import LowRankLinear, linear_weight

    handle = load_model(tiny_bert_dir)
    layer = handle.model.encoder.layer[0].intermediate.dense  # 32 -> 64: rank 32 never saves
    u, s, vh = torch.linalg.svd(linear_weight(layer).double(), full_matrices=False)
    low = LowRankLinear.from_factors((s.sqrt()[:, None] * vh).float(), (u * s.sqrt()).float(),
                                     layer.bias.detach())
    x = torch.randn(3, 32)
    assert torch.allclose(low(x), layer(x), atol=1e-5)


def test_layers_that_would_grow_are_skipped(tiny_bert_dir, registries, tmp_path):
    handle, estimate, real, _ = _stage(tiny_bert_dir, registries, tmp_path / "out", rank=0.6)
    # rank 19 of 32: a 32x32 layer would grow (19*64 > 1024), a 32x64 one shrinks (19*96 < 2048)
    assert sorted(handle.edits[0]["modules"]) == sorted(
        f"encoder.layer.{i}.{p}" for i in range(2) for p in ("intermediate.dense", "output.dense"))
    assert abs(estimate.size_bytes() - real) / real < 0.02


def test_integer_rank_and_energy(tiny_bert_dir, registries, tmp_path):
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "a", rank=4)
    assert set(handle.edits[0]["modules"].values()) == {4}
    handle, estimate, real, back = _stage(tiny_bert_dir, registries, tmp_path / "b", energy=0.5)
    ranks = handle.edits[0]["modules"]
    assert ranks and all(1 <= r < 16 for r in ranks.values())
    assert estimate.notes  # the estimate says it had to assume a rank
    assert torch.equal(_out(back.model), _out(handle.model))


def test_nothing_to_gain_changes_nothing(tiny_bert_dir, registries, tmp_path):
    handle, estimate, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "out", rank=0.95)
    assert handle.edits == [] and handle.states == set()
    assert not (tmp_path / "out" / "squeeze.json").exists()


@pytest.mark.parametrize("params, message", [
    ({}, "exactly one of `rank` or `energy`"),
    ({"rank": 0.5, "energy": 0.9}, "exactly one of `rank` or `energy`"),
    ({"rank": 2.5}, "neither a fraction below 1 nor an integer"),
])
def test_bad_params(params, message, registries, tiny_bert_dir):
    tech = registries.techniques.get("factorize")
    assert any(message in m for _, m in tech.check({**tech.defaults(), **params}))
    with pytest.raises(SqueezeError, match="factorize"):
        tech.apply_(load_model(tiny_bert_dir), {**tech.defaults(), **params}, Context(quiet=True))


def test_prune_then_factorize_drops_stale_codecs(tiny_bert_dir, registries, tmp_path):
    handle = load_model(tiny_bert_dir)
    ctx = Context(quiet=True)
    prune, fact = registries.techniques.get("prune"), registries.techniques.get("factorize")
    prune.apply_(handle, {**prune.defaults(), "ratio": 0.5}, ctx)
    fact.apply_(handle, {**fact.defaults(), "rank": 0.25, "include": ["*.attention.*"]}, ctx)
    assert not any(".attention." in k for k in handle.codecs)
    assert any(".intermediate." in k for k in handle.codecs)
    save_model(handle, tmp_path / "out")
    back = load_model(tmp_path / "out", registries)
    assert torch.equal(_out(back.model), _out(handle.model))


def test_schema_and_knob(registries):
    tech = registries.techniques.get("factorize")
    assert tech.knob("rank").compresses == "down"
    assert tech.defaults()["method"] == "svd"
    assert "rank" not in tech.defaults() and "energy" not in tech.defaults()


@pytest.mark.slow
def test_factorize_minilm(minilm_dir, registries, tmp_path):
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out", rank=0.25,
                                          include=["*.intermediate.*", "*.output.dense"],
                                          exclude=["*.attention.*"])
    print(f"minilm factorize 0.25 (mlp): estimate {estimate.size_bytes()} real {real} error "
          f"{(estimate.size_bytes() - real) / real:+.3%}", file=sys.stderr)
    assert len(handle.edits[0]["modules"]) == 12
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert real < artifact_bytes(minilm_dir)
    ids = handle.tokenizer(["a man is playing a guitar"], return_tensors="pt")["input_ids"]
    assert torch.equal(_out(back.model, ids), _out(handle.model, ids))
