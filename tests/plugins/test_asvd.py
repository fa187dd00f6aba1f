"""``factorize`` method ``asvd``: activation-aware SVD beats plain SVD at equal rank."""
from __future__ import annotations

import csv
import sys

import pytest
import torch

from squeezelang.hooks.context import Context
from squeezelang.models.forward import outputs_for_fidelity
from squeezelang.models.layers import LowRankLinear
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from conftest import SENTENCES, build_tiny_bert


@pytest.fixture(scope="module")
def skewed_bert_dir(tmp_path_factory):
    """A tiny BERT whose LayerNorms give a few channels large activations (as trained models do)."""
    src = build_tiny_bert(tmp_path_factory.mktemp("skewed-bert"), seed=1)
    model = load_model(src).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(torch.exp(1.5 * torch.randn(module.weight.shape, generator=g)))
    model.save_pretrained(src)
    return src


def _ctx(texts=SENTENCES):
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    return ctx


def _stage(src, registries, out_dir, ctx=None, **params):
    handle = load_model(src)
    tech = registries.techniques.get("factorize")
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, ctx or _ctx())
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


def _error(handle, reference, texts):
    out = outputs_for_fidelity(handle, texts)
    return float((out - reference).norm() / reference.norm())


def test_asvd_beats_svd_at_equal_rank(skewed_bert_dir, registries, tmp_path):
    reference = outputs_for_fidelity(load_model(skewed_bert_dir), SENTENCES)
    errors, sizes = {}, {}
    for method in ("svd", "asvd"):
        extra = {"data": "calib"} if method == "asvd" else {}
        handle, estimate, sizes[method], back = _stage(skewed_bert_dir, registries,
                                                       tmp_path / method, method=method,
                                                       rank=0.25, **extra)
        assert abs(estimate - sizes[method]) / sizes[method] < 0.02
        assert sizes[method] < artifact_bytes(skewed_bert_dir)
        assert any(isinstance(m, LowRankLinear) for m in back.model.modules())
        assert torch.equal(outputs_for_fidelity(back, SENTENCES), outputs_for_fidelity(handle, SENTENCES))
        errors[method] = _error(handle, reference, SENTENCES)
    assert abs(sizes["svd"] - sizes["asvd"]) < 16  # the edit record names the method
    assert errors["asvd"] < 0.9 * errors["svd"]


def test_asvd_params(registries):
    tech = registries.techniques.get("factorize")
    assert "alpha" not in tech.defaults_for({}) and tech.defaults_for({"method": "asvd"})["alpha"] == 0.5
    assert [k for k, _ in tech.check({"method": "asvd", "rank": 0.5})] == ["data"]
    assert [k for k, _ in tech.check({"method": "svd", "rank": 0.5, "data": "x"})] == ["data"]


@pytest.mark.slow
def test_asvd_minilm(minilm_dir, shared_data, registries, tmp_path):
    with open(shared_data / "stsb-en-dev.csv", encoding="utf-8") as f:
        texts = [row[0] for row in csv.reader(f)][:128]
    reference = outputs_for_fidelity(load_model(minilm_dir), texts)
    cosine, sizes = {}, {}
    for method in ("svd", "asvd"):
        extra = {"data": "calib"} if method == "asvd" else {}
        handle, estimate, sizes[method], _ = _stage(minilm_dir, registries, tmp_path / method,
                                                    ctx=_ctx(texts), method=method, rank=0.4,
                                                    **extra)
        out = outputs_for_fidelity(handle, texts)
        cosine[method] = float(torch.nn.functional.cosine_similarity(out, reference).mean())
        print(f"minilm factorize {method} rank 40%: size {sizes[method] / artifact_bytes(minilm_dir):.3f}"
              f" of the original, cosine {cosine[method]:.4f}", file=sys.stderr)
        assert abs(estimate - sizes[method]) / sizes[method] < 0.02
    assert abs(sizes["svd"] - sizes["asvd"]) < 16  # the edit record names the method
    assert cosine["asvd"] > cosine["svd"] + 0.02
