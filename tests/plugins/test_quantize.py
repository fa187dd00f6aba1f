"""The ``quantize`` technique: int8 weights (fake-quantized in memory), int8 CPU kernels, exact reloads."""
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


def _stage(src, registries, out_dir, **params):
    handle = load_model(src)
    tech = registries.techniques.get("quantize")
    params = {**tech.defaults(), **params}
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_int8_weight_only(request, fixture, granularity, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", scheme="int8",
                                          granularity=granularity)
    assert handle.states == {"quantized"} and handle.edits == []
    kinds = {type(handle.model.get_submodule(k.rsplit(".", 1)[0])).__name__ for k in handle.codecs}
    assert kinds == ({"Conv1D", "Embedding"} if "gpt2" in fixture else {"Linear", "Embedding"})
    if "gpt2" in fixture:  # the tied head is quantized through its embedding, once
        assert "lm_head.weight" not in handle.codecs
        assert handle.codecs["transformer.h.0.mlp.c_fc.weight"]["quant"]["axis"] == (
            1 if granularity == "channel" else None)
    for name in handle.codecs:  # weights now hold at most 255 distinct levels per channel
        w = handle.model.get_parameter(name)
        assert not torch.equal(w, original.get_parameter(name))
    assert real < 0.45 * artifact_bytes(src)
    assert abs(estimate - real) / real < 0.02
    before, after = _out(original), _out(handle.model)
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=0.1)
    assert torch.equal(_out(back.model), after)
    assert back.codecs == handle.codecs


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_int8_dynamic(request, fixture, registries, tmp_path):
    from squeezelang.models.layers import Int8DynamicLinear

    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", scheme="int8-dynamic")
    swapped = [n for n, m in handle.model.named_modules() if isinstance(m, Int8DynamicLinear)]
    assert swapped and handle.edits == [{"technique": "quantize", "scheme": "int8-dynamic",
                                         "when": "after_load", "granularity": "channel",
                                         "modules": swapped}]
    assert "lm_head" not in swapped  # tied to the embedding: left in float
    assert real < 0.75 * artifact_bytes(src)
    assert abs(estimate - real) / real < 0.02
    before, after = _out(original), _out(handle.model)
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=0.1)
    assert [n for n, m in back.model.named_modules() if isinstance(m, Int8DynamicLinear)] == swapped
    assert torch.allclose(_out(back.model), after, atol=1e-6)
    # the saved weights are the int8 grid the kernel uses: a dense model with them is close
    dense = load_model(src).model
    dense.load_state_dict(handle.model.state_dict())
    assert torch.allclose(_out(dense), after, atol=0.05)


def test_excluded_layers_stay_float(tiny_bert_dir, registries, tmp_path):
    tech = registries.techniques.get("quantize")
    assert "quantized" in tech.produces
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "out", exclude=["embeddings.*"])
    assert not any(k.startswith("embeddings.") for k in handle.codecs)
    assert "pooler.dense.weight" in handle.codecs


def test_int8_dynamic_stores_embeddings_as_int8(tiny_bert_dir, registries, tmp_path):
    handle, estimate, real, back = _stage(tiny_bert_dir, registries, tmp_path / "out",
                                          scheme="int8-dynamic")
    assert handle.codecs["embeddings.word_embeddings.weight"]["quant"]["bits"] == 8
    assert "embeddings.word_embeddings" not in handle.edits[0]["modules"]
    assert real < 0.45 * artifact_bytes(tiny_bert_dir) and abs(estimate - real) / real < 0.02
    assert torch.equal(back.model.embeddings.word_embeddings.weight,
                       handle.model.embeddings.word_embeddings.weight)


def test_second_quantize_stage_on_other_layers(tiny_bert_dir, registries, tmp_path):
    """int4 embeddings, then int8 kernels for the linear layers: two stages on disjoint layers;
    the estimate is the saved size, and the reload runs the same int8 kernels."""
    from squeezelang.models.layers import Int8DynamicLinear

    tech = registries.techniques.get("quantize")
    handle = load_model(tiny_bert_dir)
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, tiny_bert_dir)
    first = {**tech.defaults(), "scheme": "int4", "include": ["embeddings.*"]}
    second = {**tech.defaults(), "scheme": "int8-dynamic", "exclude": ["embeddings.*"]}
    estimate = tech.estimate(tech.estimate(meta, first), second).size_bytes()
    tech.apply_(handle, first, Context(quiet=True))
    tech.apply_(handle, second, Context(quiet=True))
    save_model(handle, tmp_path / "out")
    real = artifact_bytes(tmp_path / "out")
    assert abs(estimate - real) / real < 0.02
    assert handle.codecs["embeddings.word_embeddings.weight"]["quant"]["bits"] == 4
    assert handle.codecs["encoder.layer.0.attention.self.query.weight"]["quant"]["bits"] == 8
    back = load_model(tmp_path / "out", registries)
    assert isinstance(back.model.encoder.layer[0].attention.self.query, Int8DynamicLinear)
    assert torch.allclose(_out(back.model), _out(handle.model), atol=1e-6)


def test_quantizing_a_layer_twice_is_refused(tiny_bert_dir, registries):
    tech = registries.techniques.get("quantize")
    handle = load_model(tiny_bert_dir)
    meta = tech.estimate(meta_from_model(handle.model, handle.task), tech.defaults())
    with pytest.raises(SqueezeError, match="'embeddings.word_embeddings.weight' is already "
                                           "quantized by an earlier stage"):
        tech.estimate(meta, {**tech.defaults(), "scheme": "int4"})
    tech.apply_(handle, tech.defaults(), Context(quiet=True))
    with pytest.raises(SqueezeError, match="already quantized by an earlier stage"):
        tech.apply_(handle, {**tech.defaults(), "scheme": "int8-dynamic",
                             "include": ["encoder.*"]}, Context(quiet=True))


def test_selecting_nothing_is_an_error(tiny_bert_dir, registries):
    tech = registries.techniques.get("quantize")
    with pytest.raises(SqueezeError, match="select no"):
        tech.apply_(load_model(tiny_bert_dir), {**tech.defaults(), "include": ["none"]},
                    Context(quiet=True))


def test_schema(registries):
    tech = registries.techniques.get("quantize")
    assert tech.defaults_for({}) == {"scheme": "int8", "granularity": "channel", "include": ["*"],
                                     "exclude": []}
    assert tech.example.startswith("stage ")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_quantize_minilm(minilm_dir, registries, tmp_path, scheme):
    handle = load_model(minilm_dir)
    ids = handle.tokenizer(["a man is playing a guitar", "the cat sits on the mat"],
                           padding=True, return_tensors="pt")["input_ids"]
    before = _out(handle.model, ids)
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out", scheme=scheme)
    print(f"minilm quantize {scheme}: estimate {estimate} real {real} error "
          f"{(estimate - real) / real:+.3%}", file=sys.stderr)
    assert abs(estimate - real) / real < 0.02
    assert real < 0.3 * artifact_bytes(minilm_dir)  # int8-dynamic stores its embeddings as int8 too
    after = _out(handle.model, ids)
    cos = torch.nn.functional.cosine_similarity(after.mean(1), before.mean(1))
    # dynamic int8 also rounds activations (to 7 bits on CPUs without VNNI: cosine ~0.97)
    assert (cos > (0.99 if scheme == "int8" else 0.96)).all() and not torch.equal(after, before)
    assert torch.allclose(_out(back.model, ids), after, atol=1e-5)
