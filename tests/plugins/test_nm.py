"""``prune`` method ``nm``: N:M runs along the input dimension, compact storage, exact estimates."""
from __future__ import annotations

import sys

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.select import BLOCKS, LINEAR_KINDS, kind_of, select_modules
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _stage(src, registries, out_dir, technique="prune", handle=None, **params):
    handle = handle or load_model(src)
    tech = registries.techniques.get(technique)
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


def _runs_ok(model, n, m):
    for _, module in select_modules(model, LINEAR_KINDS, BLOCKS):
        w = module.weight.detach()
        w = w if kind_of(module) == "Conv1D" else w.t()  # input dimension first
        runs = (w.t() != 0).reshape(-1, m)
        assert int(runs.sum(1).max()) <= n
        assert float((w == 0).float().mean()) >= 1 - n / m


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_prune(request, fixture, n, m, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", method="nm", n=n, m=m)
    assert handle.states == {"sparse"}
    _runs_ok(handle.model, n, m)
    specs = {tuple(v["nm"]) for v in handle.codecs.values()}
    assert specs == ({(n, m, 0)} if "gpt2" in fixture else {(n, m)})
    assert abs(estimate - real) / real < 0.02
    assert real < artifact_bytes(src)
    assert not torch.equal(_out(handle.model), _out(original))
    assert torch.equal(_out(back.model), _out(handle.model))
    assert back.codecs == handle.codecs


def test_nm_keeps_the_largest_of_each_run():
    from squeezelang_plugins.prune.nm import nm_mask

    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    assert nm_mask(w, 2, 4, -1).tolist() == [[False, True, True, False, True, True, False, False]]
    assert torch.equal(nm_mask(w.t(), 2, 4, 0), nm_mask(w, 2, 4, -1).t())


def test_nm_then_int8_stores_codes_of_kept_values(tiny_bert_dir, registries, tmp_path):
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "a", method="nm")
    sparse_size = artifact_bytes(tmp_path / "a")
    handle, estimate, real, back = _stage(tmp_path / "a", registries, tmp_path / "b",
                                          technique="quantize", handle=handle)
    spec = handle.codecs["encoder.layer.0.attention.self.query.weight"]
    assert spec == {"nm": [2, 4], "quant": {"bits": 8, "axis": 0}}
    assert abs(estimate - real) / real < 0.02 and real < 0.5 * sparse_size
    assert torch.equal(_out(back.model), _out(handle.model))


def test_nm_refuses_ratio_and_bad_n(registries):
    tech = registries.techniques.get("prune")
    assert "ratio" not in tech.defaults_for({"method": "nm"})
    assert tech.defaults_for({"method": "nm"})["n"] == 2
    assert [k for k, _ in tech.check({"method": "nm", "ratio": 0.5})] == ["ratio"]
    assert [k for k, _ in tech.check({"method": "nm", "n": 4, "m": 4})] == ["n"]
    assert [k for k, _ in tech.check({"method": "magnitude", "n": 2})] == ["n"]


def test_nm_with_indivisible_layers_is_an_error(tiny_bert_dir, registries):
    tech = registries.techniques.get("prune")
    with pytest.raises(SqueezeError, match="divisible"):
        tech.apply_(load_model(tiny_bert_dir), {"method": "nm", "n": 2, "m": 64,
                                                "include": ["*.attention.output.dense"]}, Context(quiet=True))


@pytest.mark.slow
def test_nm_minilm(minilm_dir, registries, tmp_path):
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out", method="nm")
    size = artifact_bytes(minilm_dir)
    print(f"minilm prune nm 2:4: {real / size:.3f} of the original, estimate error "
          f"{(estimate - real) / real:+.3%}", file=sys.stderr)
    assert abs(estimate - real) / real < 0.02 and real < 0.85 * size
    ids = handle.tokenizer(["a man is playing a guitar"], return_tensors="pt")["input_ids"]
    assert torch.equal(_out(back.model, ids), _out(handle.model, ids))
