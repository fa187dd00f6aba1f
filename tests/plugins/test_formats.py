"""Output formats: ``squeeze`` (codecs and edits) and ``dense`` (a plain transformers checkpoint)."""
from __future__ import annotations

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS)[0]


def _apply(handle, registries, technique, **params):
    tech = registries.techniques.get(technique)
    tech.apply_(handle, {**tech.defaults(), **params}, Context(quiet=True))
    return handle


def test_both_formats_are_registered(registries):
    assert {"squeeze", "dense"} <= set(registries.output_formats.names())
    assert all(f.description for f in registries.output_formats)


@pytest.mark.parametrize("technique, params", [
    ("prune", {"ratio": 0.5}), ("quantize", {"scheme": "int8"}),
    ("quantize", {"scheme": "int8-dynamic"}),
])
def test_dense_loads_with_plain_transformers(tiny_bert_dir, registries, tmp_path, technique, params):
    from transformers import AutoModel

    handle = _apply(load_model(tiny_bert_dir), registries, technique, **params)
    squeeze_files = registries.output_formats.get("squeeze").save(handle, tmp_path / "sq")
    dense_files = registries.output_formats.get("dense").save(handle, tmp_path / "dense")
    assert "squeeze.json" in squeeze_files and "squeeze.json" not in dense_files
    assert "modules.json" in dense_files
    plain = AutoModel.from_pretrained(tmp_path / "dense").eval()
    expected = _out(handle.model)
    if technique == "quantize" and params["scheme"] == "int8-dynamic":
        assert torch.allclose(_out(plain), expected, atol=0.05)  # float kernels, same weights
    else:
        assert torch.equal(_out(plain), expected)
    assert artifact_bytes(tmp_path / "sq") < artifact_bytes(tmp_path / "dense")
    assert torch.equal(_out(load_model(tmp_path / "sq", registries).model), expected)


def test_dense_refuses_factorized_models(tiny_bert_dir, registries, tmp_path):
    handle = _apply(load_model(tiny_bert_dir), registries, "factorize", rank=0.25)
    with pytest.raises(SqueezeError, match="factorize.*format = \"squeeze\""):
        registries.output_formats.get("dense").save(handle, tmp_path / "dense")


def test_squeeze_format_of_an_untouched_model_is_plain(tiny_gpt2_dir, registries, tmp_path):
    from transformers import AutoModelForCausalLM

    handle = load_model(tiny_gpt2_dir)
    files = registries.output_formats.get("squeeze").save(handle, tmp_path / "sq")
    assert "squeeze.json" not in files
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sq").eval()
    assert torch.equal(_out(plain), _out(handle.model))
