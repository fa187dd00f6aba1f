"""The built-in model source ``hf``: locating, meta-data without weights, and loading."""
from __future__ import annotations

import jsonschema
import pytest

from squeezelang.errors import SqueezeError
from squeezelang.models.handle import ModelHandle
from squeezelang_plugins.sources import HfSource


def test_registered_through_the_hook():
    from squeezelang.hooks.manager import build_registries, plugin_manager

    regs = build_registries(plugin_manager(["squeezelang_plugins.sources"], entry_points=False))
    assert isinstance(regs.model_sources.get("hf"), HfSource)


def test_schema():
    source = HfSource()
    source.validate_definition()
    jsonschema.validate({"path": "x", "task": "causal-lm"}, source.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"path": "x", "task": "translation"}, source.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"path": "x", "tsk": "embedding"}, source.schema)


def test_locate(tiny_bert_dir, tmp_path):
    assert HfSource().locate({"path": str(tiny_bert_dir)}) == tiny_bert_dir
    with pytest.raises(SqueezeError, match="does not exist"):
        HfSource().locate({"path": str(tmp_path / "missing")})
    with pytest.raises(SqueezeError, match="no config.json"):
        HfSource().locate({"path": str(tmp_path)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(SqueezeError, match="is a file"):
        HfSource().meta({"path": str(tmp_path / "file")})


@pytest.mark.parametrize("fixture, task", [("tiny_bert_dir", "embedding"),
                                           ("tiny_gpt2_dir", "causal-lm")])
def test_meta_matches_the_loaded_model(request, fixture, task):
    directory = request.getfixturevalue(fixture)
    meta = HfSource().meta({"path": str(directory), "task": task})
    handle = HfSource().load({"path": str(directory), "task": task})
    assert isinstance(handle, ModelHandle)
    assert handle.task == task and handle.source_dir == directory
    assert handle.tokenizer is not None and not handle.model.training
    assert meta.task == task
    assert meta.params() == sum(p.numel() for p in handle.model.parameters())
    from squeezelang.models.size import artifact_bytes
    assert meta.size_bytes() == artifact_bytes(directory)  # the overhead is fitted to the files
    weights = (directory / "model.safetensors").stat().st_size
    assert abs(meta.size_bytes() - (weights + meta.overhead_bytes)) < 0.01 * weights


def test_meta_of_a_bad_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(SqueezeError, match="config.json"):
        HfSource().meta({"path": str(tmp_path)})
