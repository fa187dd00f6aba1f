"""``block_stats``: block-after-block calibration that runs each block once gives the statistics
``input_stats`` gives when the model runs from the start, with the earlier blocks already changed."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertModel, GPT2LMHeadModel

from squeezelang.models.block_inputs import block_stats
from squeezelang.models.codec import quantize_weight
from squeezelang.models.handle import ModelHandle
from squeezelang.models.linear_stats import by_block, input_stats
from squeezelang.models.select import LINEAR_KINDS, kind_of, output_axis, select_modules

from conftest import FAMILY_CONFIGS, SENTENCES, build_family_handle, build_tiny_bert, build_tiny_gpt2

TEXTS = SENTENCES[:10]


def _handle(name: str, tmp_path) -> ModelHandle:
    if name == "bert":
        directory = build_tiny_bert(tmp_path / "bert")
        return ModelHandle(model=BertModel.from_pretrained(directory).eval(),
                           tokenizer=AutoTokenizer.from_pretrained(directory), task="embedding")
    if name == "gpt2":
        directory = build_tiny_gpt2(tmp_path / "gpt2")
        return ModelHandle(model=GPT2LMHeadModel.from_pretrained(directory).eval(),
                           tokenizer=AutoTokenizer.from_pretrained(directory), task="causal-lm")
    return build_family_handle(name)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())))


@pytest.mark.parametrize("name", ["bert", "gpt2", *FAMILY_CONFIGS])
def test_each_block_sees_what_a_full_pass_sees_after_the_earlier_blocks_changed(name, tmp_path):
    handle = _handle(name, tmp_path)
    targets = select_modules(handle.model, LINEAR_KINDS, ["*.[0-9]*"])
    groups = by_block(handle.model, targets)
    assert len(groups) >= 2 and all(block is not None for block, _ in groups)
    seen = 0
    for block, members, stats in block_stats(handle, TEXTS, groups, gram=True, batch_size=4):
        expected = input_stats(handle, TEXTS, members, gram=True, batch_size=4, stop_after=block)
        for member, _ in members:
            assert stats[member].tokens == expected[member].tokens
            assert _close(stats[member].gram, expected[member].gram), member
            assert _close(stats[member].abs_mean, expected[member].abs_mean), member
        with torch.no_grad():  # change the block: the next one must see it
            for _, module in members:
                module.weight.copy_(quantize_weight(module.weight, 2, output_axis(kind_of(module)), 8))
        seen += 1
    assert seen == len(groups)


def test_blocks_without_members_still_carry_the_inputs(tmp_path):
    handle = build_family_handle("llama")
    first = select_modules(handle.model, LINEAR_KINDS, ["model.layers.0.*"])
    last = select_modules(handle.model, LINEAR_KINDS, ["model.layers.2.*"])
    groups = by_block(handle.model, first + last)
    with torch.no_grad():  # the middle block, never calibrated, does change its outputs
        for p in handle.model.model.layers[1].parameters():
            p.mul_(3.0)
    results = list(block_stats(handle, TEXTS, groups, gram=True))
    assert [len(m) for _, m, _ in results] == [len(first), len(last)]
    _, members, stats = results[1]
    expected = input_stats(handle, TEXTS, members, gram=True, stop_after=results[1][0])
    for member, _ in members:
        assert _close(stats[member].gram, expected[member].gram), member


def test_modules_outside_the_blocks_come_last_from_a_full_pass(tmp_path):
    handle = build_family_handle("llama")
    targets = select_modules(handle.model, LINEAR_KINDS, ["model.layers.1.*", "lm_head"])
    groups = by_block(handle.model, targets)
    results = list(block_stats(handle, TEXTS, groups))
    assert results[-1][0] is None and [n for n, _ in results[-1][1]] == ["lm_head"]
    expected = input_stats(handle, TEXTS, results[-1][1])
    assert _close(results[-1][2]["lm_head"].sq_mean, expected["lm_head"].sq_mean)


def test_a_block_called_twice_per_pass_falls_back_to_full_passes(tmp_path):
    handle = build_family_handle("llama")
    layers = handle.model.model.layers
    layers[1] = layers[0]  # one block shared by two layers: carrying its inputs would be wrong
    targets = select_modules(handle.model, LINEAR_KINDS, ["model.layers.0.*", "model.layers.2.*"])
    groups = by_block(handle.model, targets)
    results = list(block_stats(handle, TEXTS, groups, gram=True))
    assert len(results) == 2
    block, members, stats = results[1]
    expected = input_stats(handle, TEXTS, members, gram=True, stop_after=block)
    for member, _ in members:
        assert _close(stats[member].gram, expected[member].gram), member
