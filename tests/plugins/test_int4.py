"""``quantize`` scheme ``int4``: group-wise 4-bit weights, rounded to nearest or with GPTQ."""
from __future__ import annotations

import csv
import sys

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.forward import outputs_for_fidelity
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

from conftest import SENTENCES

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def _ctx(texts=SENTENCES):
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    return ctx


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _stage(src, registries, out_dir, ctx=None, handle=None, technique="quantize", **params):
    handle = handle or load_model(src)
    tech = registries.techniques.get(technique)
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, ctx or _ctx())
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


def _fidelity(handle, reference, texts):
    out = outputs_for_fidelity(handle, texts)
    return float(torch.nn.functional.cosine_similarity(out, reference).mean())


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int4(request, fixture, method, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    extra = {"data": "calib"} if method == "gptq" else {}
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", scheme="int4",
                                          method=method, group_size=16, **extra)
    assert handle.states == {"quantized"}
    axis = 1 if "gpt2" in fixture else 0
    block = "transformer.h.0.mlp.c_fc" if "gpt2" in fixture else "encoder.layer.0.intermediate.dense"
    assert handle.codecs[f"{block}.weight"] == {"quant": {"bits": 4, "axis": axis, "group": 16}}
    w = handle.model.get_submodule(block).weight
    assert len(torch.unique(w)) <= 15 * w.numel() // 16  # at most 15 levels per group
    assert real < 0.5 * artifact_bytes(src)
    assert abs(estimate - real) / real < 0.02
    assert not torch.equal(_out(handle.model), _out(original))
    assert torch.equal(_out(back.model), _out(handle.model))
    assert back.codecs == handle.codecs


def test_gptq_beats_rtn_at_equal_size(tiny_bert_dir, registries, tmp_path):
    reference = outputs_for_fidelity(load_model(tiny_bert_dir), SENTENCES)
    scores, sizes = {}, {}
    for method in ("rtn", "gptq"):
        extra = {"data": "calib"} if method == "gptq" else {}
        handle, _, sizes[method], _ = _stage(tiny_bert_dir, registries, tmp_path / method,
                                             scheme="int4", method=method, group_size=16,
                                             exclude=["embeddings.*"], **extra)
        scores[method] = 1 - _fidelity(handle, reference, SENTENCES)
    assert sizes["rtn"] == sizes["gptq"]
    assert scores["gptq"] < 0.5 * scores["rtn"]  # 1 - cosine


def test_gptq_keeps_pruned_zeros(tiny_bert_dir, registries, tmp_path):
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "a", technique="prune",
                             method="nm")
    name = "encoder.layer.0.output.dense.weight"
    zeros = handle.model.get_parameter(name) == 0
    handle, estimate, real, back = _stage(tmp_path / "a", registries, tmp_path / "b",
                                          handle=handle, scheme="int4", method="gptq",
                                          data="calib", group_size=16)
    assert (handle.model.get_parameter(name)[zeros] == 0).all()  # rounding may add zeros
    assert handle.codecs[name] == {"nm": [2, 4], "quant": {"bits": 4, "axis": 0, "group": 16}}
    assert abs(estimate - real) / real < 0.02
    assert torch.equal(_out(back.model), _out(handle.model))


def test_int4_params_are_checked(registries, tiny_bert_dir):
    tech = registries.techniques.get("quantize")
    assert {**tech.defaults_for({"scheme": "int4"}), "scheme": "int4"} == {
        "scheme": "int4", "method": "rtn", "group_size": 128, "include": ["*"], "exclude": []}
    assert "samples" in tech.defaults_for({"scheme": "int4", "method": "gptq"})
    assert [k for k, _ in tech.check({"scheme": "int8", "group_size": 64})] == ["group_size"]
    assert [k for k, _ in tech.check({"scheme": "int4", "method": "gptq"})] == ["data"]
    assert [k for k, _ in tech.check({"scheme": "int4", "data": "x"})] == ["data"]
    assert [k for k, _ in tech.check({"scheme": "int4", "granularity": "tensor"})] == ["granularity"]
    with pytest.raises(SqueezeError, match="needs calibration data"):
        tech.apply_(load_model(tiny_bert_dir), {"scheme": "int4", "method": "gptq"}, _ctx())


@pytest.mark.slow
def test_int4_minilm_gptq_vs_rtn(minilm_dir, shared_data, registries, tmp_path):
    with open(shared_data / "stsb-en-dev.csv", encoding="utf-8") as f:
        texts = [row[0] for row in csv.reader(f)][:128]
    reference = outputs_for_fidelity(load_model(minilm_dir), texts)
    size = artifact_bytes(minilm_dir)
    scores, sizes = {}, {}
    for method in ("rtn", "gptq"):
        extra = {"data": "calib"} if method == "gptq" else {}
        handle, estimate, sizes[method], back = _stage(
            minilm_dir, registries, tmp_path / method, ctx=_ctx(texts), scheme="int4",
            method=method, exclude=["embeddings.*"], **extra)
        scores[method] = _fidelity(handle, reference, texts)
        assert abs(estimate - sizes[method]) / sizes[method] < 0.02
        print(f"minilm int4 {method}: size {sizes[method] / size:.3f} of the original, cosine "
              f"{scores[method]:.4f}", file=sys.stderr)
    assert sizes["rtn"] == sizes["gptq"] < 0.6 * size
    assert scores["gptq"] > scores["rtn"] + 0.02
    assert torch.equal(outputs_for_fidelity(back, texts[:8]), outputs_for_fidelity(handle, texts[:8]))
