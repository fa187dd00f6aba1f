"""The ``share`` technique: clustered weights, a tied output layer, shared blocks — sizes and reloads."""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model, read_weights
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from conftest import SENTENCES, build_tiny_bert, build_tiny_gpt2

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


@pytest.fixture(scope="module")
def deep_bert_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("bert4"), layers=4)


@pytest.fixture(scope="module")
def deep_gpt2_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt4"), layers=4)


@pytest.fixture(scope="module")
def untied_gpt2_dir(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 with its own output layer (``tie_word_embeddings = False``)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2-untied")
    config = AutoConfig.from_pretrained(tiny_gpt2_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(out)
    load_model(tiny_gpt2_dir).tokenizer.save_pretrained(out)
    return out


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _stage(src, registries, out_dir, handle=None, **params):
    """Estimate, apply, save and reload one share stage (as the executor does)."""
    handle = handle or load_model(src)
    tech = registries.techniques.get("share")
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    handle.states |= tech.produces_for(params)
    save_model(handle, out_dir)
    return handle, estimate, artifact_bytes(out_dir), load_model(out_dir, registries)


def _close(estimate, real):
    return abs(estimate.size_bytes() - real) / real < 0.02


# ---------------------------------------------------------------------------- cluster
@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("bits", [2, 4])
def test_cluster_shrinks_to_bits_over_32(request, fixture, bits, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", bits=bits)
    clustered = {k: v for k, v in handle.codecs.items()}
    # BERT: 6 linear layers per block, GPT-2: 4 Conv1D; two blocks each
    assert len(clustered) == (8 if "gpt2" in fixture else 12)
    assert set(map(json.dumps, clustered.values())) == {json.dumps({"cluster": {"bits": bits}})}
    state = handle.model.state_dict()
    numel = sum(state[k].numel() for k in clustered)
    for key in clustered:
        assert torch.unique(state[key]).numel() <= 2 ** bits
    # the weights shrink from 4 bytes to bits/8 per value, plus a 2**bits float32 codebook each
    stored = read_weights(tmp_path / "out")
    data = sum(stored[k + suffix].nbytes for k in clustered for suffix in (".__codes", ".__codebook"))
    assert data == sum((state[k].numel() * bits + 7) // 8 + 4 * 2 ** bits for k in clustered)
    saved = 4 * numel - data
    assert saved > 4 * numel * (1 - bits / 32) - len(clustered) * 4 * 2 ** bits - 8
    # the rest of the difference is the codec index (header entries, squeeze.json)
    assert 0 < real - (artifact_bytes(src) - saved) < 0.1 * saved
    assert _close(estimate, real)
    assert handle.states == {"clustered"}
    assert back.codecs == clustered
    assert torch.equal(_out(back.model), _out(handle.model))
    assert not torch.equal(_out(handle.model), _out(original))


def test_cluster_bits6_stays_close(tiny_bert_dir, registries, tmp_path):
    original = load_model(tiny_bert_dir).model
    handle, _, _, back = _stage(tiny_bert_dir, registries, tmp_path / "out", bits=6)
    before, after = _out(original), _out(handle.model)
    assert not torch.equal(after, before)
    cos = torch.nn.functional.cosine_similarity(after.flatten(1), before.flatten(1))
    assert float(cos.min()) > 0.99
    assert torch.equal(_out(back.model), after)


def test_cluster_embeddings_and_tied_head_once(tiny_gpt2_dir, registries, tmp_path):
    handle, estimate, real, back = _stage(tiny_gpt2_dir, registries, tmp_path / "out", bits=4,
                                          include=["transformer.wte", "lm_head"])
    # lm_head shares wte's weight: clustered once, under the first name
    assert list(handle.codecs) == ["transformer.wte.weight"]
    assert handle.model.lm_head.weight is handle.model.transformer.wte.weight
    assert _close(estimate, real)
    assert torch.equal(_out(back.model), _out(handle.model))


def test_kmeans_is_deterministic_and_chunked(monkeypatch):
    from squeezelang_plugins import share

    torch.manual_seed(0)
    w = torch.randn(300, 70)
    a, b = w.clone(), w.clone()
    share.cluster_weight_(a, 3)
    monkeypatch.setattr(share, "CHUNK", 1000)
    share.cluster_weight_(b, 3)
    assert torch.equal(a, b) and torch.unique(a).numel() == 8
    # Lloyd's iterations beat the quantile starting points
    starts = torch.quantile(w.reshape(-1), (torch.arange(8) + 0.5) / 8)
    nearest = starts[(w.reshape(-1, 1) - starts).abs().argmin(1)].reshape(w.shape)
    assert ((a - w) ** 2).mean() < ((nearest - w) ** 2).mean()
    # a tensor with fewer distinct values than centroids keeps them
    few = torch.tensor([0.5, -1.0, 0.5, 2.0])
    share.cluster_weight_(few, 4)
    assert torch.equal(few, torch.tensor([0.5, -1.0, 0.5, 2.0]))


def test_cluster_refuses_other_codecs(tiny_bert_dir, registries):
    handle = load_model(tiny_bert_dir)
    prune = registries.techniques.get("prune")
    prune.apply_(handle, {**prune.defaults(), "ratio": 0.5}, Context(quiet=True))
    share = registries.techniques.get("share")
    with pytest.raises(SqueezeError, match="combines with nothing"):
        share.apply_(handle, share.defaults(), Context(quiet=True))
    meta = meta_from_model(handle.model, handle.task, handle.codecs)
    with pytest.raises(SqueezeError, match="combines with nothing"):
        share.estimate(meta, share.defaults())
    assert "quantized" in share.refuses


# ---------------------------------------------------------------------------- tie
def test_tie_removes_the_output_layer(untied_gpt2_dir, registries, tmp_path):
    original = load_model(untied_gpt2_dir)
    wte = original.model.transformer.wte.weight.numel()
    handle, estimate, real, back = _stage(untied_gpt2_dir, registries, tmp_path / "out",
                                          method="tie")
    assert "lm_head.weight" not in estimate.tensors
    assert handle.model.lm_head.weight is handle.model.transformer.wte.weight
    assert handle.model.config.tie_word_embeddings is True
    assert abs(artifact_bytes(untied_gpt2_dir) - real - 4 * wte) < 0.02 * real
    assert _close(estimate, real)
    assert not (tmp_path / "out" / "squeeze.json").exists()  # a plain transformers checkpoint
    assert back.model.lm_head.weight is back.model.transformer.wte.weight
    assert torch.equal(_out(back.model), _out(handle.model))
    assert not torch.equal(_out(handle.model), _out(original.model))


def test_tie_after_cluster_keeps_the_embedding_codec(untied_gpt2_dir, registries, tmp_path):
    handle = load_model(untied_gpt2_dir)
    share = registries.techniques.get("share")
    share.apply_(handle, {**share.defaults(), "include": ["transformer.wte", "lm_head"]},
                 Context(quiet=True))
    assert set(handle.codecs) == {"transformer.wte.weight", "lm_head.weight"}
    handle, estimate, real, back = _stage(untied_gpt2_dir, registries, tmp_path / "out",
                                          handle=handle, method="tie")
    assert list(handle.codecs) == ["transformer.wte.weight"]
    assert torch.equal(_out(back.model), _out(handle.model))


@pytest.mark.parametrize("fixture, message", [("tiny_gpt2_dir", "already tied"),
                                              ("tiny_bert_dir", "causal LM")])
def test_tie_refusals(request, fixture, message, registries):
    src = request.getfixturevalue(fixture)
    handle = load_model(src)
    share = registries.techniques.get("share")
    with pytest.raises(SqueezeError, match=message):
        share.apply_(handle, {"method": "tie"}, Context(quiet=True))
    with pytest.raises(SqueezeError, match=message):
        share.estimate(meta_from_model(handle.model, handle.task), {"method": "tie"})


# ---------------------------------------------------------------------------- cross_layer
@pytest.mark.parametrize("fixture", ["deep_bert_dir", "deep_gpt2_dir"])
def test_cross_layer_groups_remove_whole_blocks(request, fixture, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", method="cross_layer",
                                          groups=2)
    prefix = "transformer.h" if "gpt2" in fixture else "encoder.layer"
    assert handle.edits == [{"technique": "share", "method": "cross_layer", "blocks": prefix,
                             "groups": [[0, 1], [2, 3]]}]
    block = sum(p.numel() for p in original.get_submodule(f"{prefix}.0").parameters())
    stored = set(read_weights(tmp_path / "out"))
    assert stored == {k for k in original.state_dict() if not k.startswith(
        (f"{prefix}.1.", f"{prefix}.3.", "lm_head."))}
    # two blocks' data less (and their header entries; squeeze.json is small next to them)
    assert 2 * 4 * block < artifact_bytes(src) - real < 1.1 * 2 * 4 * block
    assert _close(estimate, real)
    for model in (handle.model, back.model):
        for rep, member in ((0, 1), (2, 3)):
            a, b = (model.get_submodule(f"{prefix}.{i}") for i in (rep, member))
            assert all(p is q for p, q in zip(a.parameters(), b.parameters()))
        assert sum(p.numel() for p in model.parameters()) == \
            sum(p.numel() for p in original.parameters()) - 2 * block
    assert torch.equal(_out(back.model), _out(handle.model))
    # the shared block is the mean of its group
    w = [original.get_submodule(f"{prefix}.{i}").state_dict() for i in (0, 1)]
    for key, value in handle.model.get_submodule(f"{prefix}.0").state_dict().items():
        assert torch.allclose(value, (w[0][key] + w[1][key]) / 2)


def test_cross_layer_threshold_shares_only_close_blocks(deep_bert_dir, registries, tmp_path):
    handle = load_model(deep_bert_dir)
    layers = handle.model.encoder.layer
    with torch.no_grad():
        for p, q in zip(layers[2].parameters(), layers[1].parameters()):
            p.copy_(q + 0.01 * torch.randn_like(q) * q.abs().mean())
    handle, estimate, real, back = _stage(deep_bert_dir, registries, tmp_path / "out",
                                          handle=handle, method="cross_layer", average=False)
    assert handle.edits[0]["groups"] == [[1, 2]]
    assert any("threshold" in n for n in estimate.notes)
    assert layers[2].attention.self.query.weight is layers[1].attention.self.query.weight
    assert torch.equal(_out(back.model), _out(handle.model))


def test_cross_layer_nothing_close(tiny_bert_dir, registries, tmp_path):
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "out", method="cross_layer",
                             threshold=0.1)
    assert handle.edits == []


def test_cross_layer_refuses_encoded_blocks_and_too_many_groups(deep_bert_dir, registries):
    share = registries.techniques.get("share")
    handle = load_model(deep_bert_dir)
    share.apply_(handle, share.defaults(), Context(quiet=True))
    with pytest.raises(SqueezeError, match="already encoded"):
        share.apply_(handle, {"method": "cross_layer", "groups": 2, "average": True},
                     Context(quiet=True))
    with pytest.raises(SqueezeError, match="has 4 blocks"):
        share.estimate(meta_from_model(handle.model, handle.task),
                       {"method": "cross_layer", "groups": 5, "average": True})


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, key, message", [
    ({"method": "tie", "bits": 4}, "bits", "does not apply to share method 'tie'"),
    ({"method": "cluster", "groups": 2}, "groups", "does not apply to share method 'cluster'"),
    ({"method": "cross_layer", "include": ["*"]}, "include", "does not apply"),
    ({"method": "cross_layer", "groups": 2, "threshold": 0.3}, "groups", "not both"),
])
def test_check(params, key, message, registries):
    share = registries.techniques.get("share")
    problems = share.check({**share.defaults_for(params), **params})
    assert any(k == key and message in m for k, m in problems), problems


def test_defaults_and_knob(registries):
    share = registries.techniques.get("share")
    assert share.defaults() == {"method": "cluster", "bits": 4, "iterations": 15,
                                "include": ["*.[0-9]*"], "exclude": []}
    assert share.defaults_for({"method": "tie"}) == {"method": "tie"}
    assert share.defaults_for({"method": "cross_layer"}) == {
        "method": "cross_layer", "threshold": 0.5, "average": True}
    assert "threshold" not in share.defaults_for({"method": "cross_layer", "groups": 3})
    knob = share.knob("bits")
    assert knob.compresses == "down" and knob.integer and (knob.lo, knob.hi) == (2, 8)
    assert share.produces_for({"method": "tie"}) == frozenset()


def test_plugin_module_does_not_import_torch():
    import subprocess

    code = ("import sys, squeezelang_plugins.share; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------- MiniLM
def _embed(handle, texts):
    enc = handle.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = handle.model(**enc)[0]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_cluster_minilm(minilm_dir, registries, tmp_path):
    original = load_model(minilm_dir)
    started = time.perf_counter()
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out", bits=4)
    seconds = time.perf_counter() - started
    texts = SENTENCES[:8]
    cos = torch.nn.functional.cosine_similarity(_embed(handle, texts), _embed(original, texts))
    src = artifact_bytes(minilm_dir)
    print(f"minilm share cluster 4 bits: {src} -> {real} bytes ({real / src:.1%}), estimate "
          f"{estimate.size_bytes()} ({(estimate.size_bytes() - real) / real:+.3%}), cosine "
          f"min {float(cos.min()):.4f} mean {float(cos.mean()):.4f}, {seconds:.1f} s",
          file=sys.stderr)
    assert len(handle.codecs) == 36
    assert real < 0.6 * src
    assert _close(estimate, real)
    assert float(cos.min()) > 0.9
    assert torch.equal(_embed(back, texts), _embed(handle, texts))
