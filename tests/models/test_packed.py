"""Packed outputs cannot be loaded wrongly: plain loaders refuse them, squeezelang.load gives them back.

A packed directory (encoded tensors or replaced modules) used to load "fine" with
``AutoModel.from_pretrained`` and ``SentenceTransformer``, with every weight initialised at random.
"""
from __future__ import annotations

import json

import pytest
import torch

import squeezelang
from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models import packed
from squeezelang.models.hf import read_config
from squeezelang.models.load import load_model
from squeezelang.models.meta import measured_overhead, meta_from_model
from squeezelang.models.size import artifact_bytes

TEXTS = ["a man is playing a guitar", "the cat sits on the mat", "a dog runs in the park"]
IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])

PACKING = [
    ("quantize", {"scheme": "int8"}),
    ("quantize", {"scheme": "int4", "group_size": 16}),
    ("quantize", {"scheme": "int8-dynamic"}),
    ("prune", {"ratio": 0.5}),
    ("prune", {"method": "nm", "n": 2, "m": 4}),
    ("share", {"method": "cluster", "bits": 4}),
    ("factorize", {"rank": 0.25}),
]


def _apply(handle, registries, technique, params):
    tech = registries.techniques.get(technique)
    tech.apply_(handle, {**tech.defaults_for(params), **params}, Context(quiet=True))
    handle.states |= set(tech.produces_for(params))
    return handle


def _mean_pooled(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(params=PACKING, ids=lambda p: f"{p[0]}-{'-'.join(map(str, p[1].values()))}")
def packed_dir(request, tiny_bert_dir, registries, tmp_path):
    technique, params = request.param
    handle = _apply(load_model(tiny_bert_dir), registries, technique, params)
    registries.output_formats.get("squeeze").save(handle, tmp_path / "out")
    return tmp_path / "out", handle


def test_plain_transformers_refuses_a_packed_output_naming_squeezelang_load(packed_dir):
    from transformers import AutoModel

    directory, _ = packed_dir
    with pytest.raises(ValueError, match=r"squeezelang\.load"):
        AutoModel.from_pretrained(directory)


def test_sentence_transformers_refuses_a_packed_output(packed_dir):
    from sentence_transformers import SentenceTransformer

    directory, _ = packed_dir
    with pytest.raises(ValueError, match=r"squeezelang\.load"):
        SentenceTransformer(str(directory), device="cpu")


def test_squeezelang_load_gives_back_a_sentence_transformer_with_its_pooling(packed_dir):
    from sentence_transformers import SentenceTransformer

    directory, handle = packed_dir
    st = squeezelang.load(directory, sentence_transformer=True)
    assert isinstance(st, SentenceTransformer)
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"]
    got = st.encode(TEXTS, convert_to_tensor=True)
    expected = _mean_pooled(handle.model, handle.tokenizer)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_estimate_counts_the_packed_config(packed_dir, registries, tiny_bert_dir):
    directory, handle = packed_dir
    config = json.loads((directory / "config.json").read_text())
    assert packed.is_packed(config) and config[packed.REAL_TYPE_KEY] == "bert"
    assert read_config(directory)["model_type"] == "bert"
    plain_config = (tiny_bert_dir / "config.json").read_text()
    extra = packed.packed_config_extra_bytes({"model_type": "bert"})
    assert len(plain_config.encode()) + extra == len((directory / "config.json").read_bytes())


def test_an_unpacked_output_still_loads_with_both_plain_loaders(tiny_bert_dir, registries, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    handle = _apply(load_model(tiny_bert_dir), registries, "prune", {"method": "depth", "layers": [1]})
    registries.output_formats.get("squeeze").save(handle, tmp_path / "out")
    assert not packed.is_packed(json.loads((tmp_path / "out" / "config.json").read_text()))
    plain = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS)[0], handle.model(input_ids=IDS)[0])
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert torch.allclose(st.encode(TEXTS, convert_to_tensor=True),
                          _mean_pooled(handle.model, handle.tokenizer), atol=1e-5)


def test_a_plain_model_directory_is_refused_as_a_sentence_transformer(tiny_gpt2_dir):
    with pytest.raises(SqueezeError, match="no modules.json"):
        squeezelang.load(tiny_gpt2_dir, sentence_transformer=True)


def test_pack_and_unpack_are_inverse():
    config = {"model_type": "llama", "hidden_size": 8, "architectures": ["LlamaForCausalLM"]}
    marked = packed.pack_config(config)
    assert marked["model_type"] == packed.PACKED_MODEL_TYPE and "squeezelang.load" in marked["model_type"]
    assert packed.unpack_config(marked) == config
    assert packed.pack_config(marked) == marked
    assert packed.unpack_config(config) is config


@pytest.mark.parametrize("technique, params", PACKING[:2] + PACKING[3:4] + PACKING[6:])
def test_the_estimate_of_a_packed_output_is_its_saved_size(tiny_bert_dir, registries, tmp_path,
                                                             technique, params):
    handle = load_model(tiny_bert_dir)
    tech = registries.techniques.get(technique)
    full = {**tech.defaults_for(params), **params}
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, tiny_bert_dir)
    estimate = tech.estimate(meta, full)
    assert estimate.packed
    _apply(handle, registries, technique, params)
    registries.output_formats.get("squeeze").save(handle, tmp_path / "out")
    # within the estimates' own few bytes of header rounding, well under the ~110 the marker adds
    assert abs(estimate.size_bytes() - artifact_bytes(tmp_path / "out")) < 48
