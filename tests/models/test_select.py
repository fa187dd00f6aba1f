"""Module selection by kind and glob; the default ``BLOCKS`` include."""
from __future__ import annotations

import pytest

from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model
from squeezelang.models.select import (BLOCKS, LINEAR_KINDS, get_module, output_axis,
                                       select_modules, set_module)


def test_blocks_default_picks_the_encoder_linears_only(tiny_bert_dir):
    model = load_model(tiny_bert_dir).model
    names = [n for n, _ in select_modules(model, LINEAR_KINDS, BLOCKS)]
    assert len(names) == 2 * 6
    assert "encoder.layer.0.attention.self.query" in names
    assert not any(n.startswith(("pooler", "embeddings")) for n in names)


def test_gpt2_conv1d_counts_as_linear_and_lm_head_is_outside_blocks(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir).model
    selected = dict(select_modules(model, LINEAR_KINDS, BLOCKS))
    assert "transformer.h.1.attn.c_attn" in selected
    assert type(selected["transformer.h.1.mlp.c_fc"]).__name__ == "Conv1D"
    assert "lm_head" not in selected
    assert "lm_head" in dict(select_modules(model, LINEAR_KINDS))
    assert output_axis("Conv1D") == 1 and output_axis("Linear") == 0


def test_include_exclude_and_kinds_as_classes(tiny_bert_dir):
    import torch

    model = load_model(tiny_bert_dir).model
    names = [n for n, _ in select_modules(model, (torch.nn.Linear,), ["*.attention.*"],
                                          ["*.output.*"])]
    assert names == [f"encoder.layer.{i}.attention.self.{p}" for i in range(2)
                     for p in ("query", "key", "value")]
    embeddings = [n for n, _ in select_modules(model, ("Embedding",))]
    assert embeddings == ["embeddings.word_embeddings", "embeddings.position_embeddings",
                          "embeddings.token_type_embeddings"]


def test_meta_select_agrees_with_torch_select(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir).model
    meta = meta_from_model(model, "causal-lm")
    assert [m.name for m in meta.select(LINEAR_KINDS, BLOCKS)] == [
        n for n, _ in select_modules(model, LINEAR_KINDS, BLOCKS)]


def test_get_and_set_module(tiny_bert_dir):
    import torch

    from squeezelang.errors import SqueezeError

    model = load_model(tiny_bert_dir).model
    set_module(model, "pooler.dense", torch.nn.Identity())
    assert isinstance(get_module(model, "pooler.dense"), torch.nn.Identity)
    with pytest.raises(SqueezeError, match="no module 'pooler.nope'"):
        get_module(model, "pooler.nope")
