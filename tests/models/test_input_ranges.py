"""``input_ranges``: per-channel maxima and clipped extremes of linear layers' inputs (one pass)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import SENTENCES
from squeezelang.errors import SqueezeError
from squeezelang.models.input_ranges import BINS_PER_OCTAVE, input_ranges
from squeezelang.models.load import load_model


def _captured(handle, modules):
    """Every real token's input of ``modules``, captured by hand: ``{name: [tokens, in]}``."""
    from squeezelang.models.forward import _batches

    rows = {name: [] for name, _ in modules}
    live = {}

    def hook_for(name):
        def hook(module, args):
            rows[name].append(args[0][live["mask"]].reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    with torch.no_grad():
        for _, inputs in _batches(handle, SENTENCES, None, 4, 128):
            live["mask"] = inputs["attention_mask"].bool()
            handle.model(**inputs)
    for h in hooks:
        h.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def test_ranges_are_the_inputs_extremes(tiny_bert_dir):
    handle = load_model(tiny_bert_dir)
    layer = handle.model.encoder.layer[0]
    modules = [("q", layer.attention.self.query), ("k", layer.attention.self.key),
               ("down", layer.output.dense)]
    ranges = input_ranges(handle, SENTENCES, modules, batch_size=4)
    inputs = _captured(handle, modules)
    for name, x in inputs.items():
        r = ranges[name]
        assert r.tokens == x.shape[0] == int(sum(len(handle.tokenizer(s)["input_ids"])
                                                  for s in SENTENCES))
        assert torch.equal(r.channel_max, x.abs().amax(0))
        assert (r.low, r.high) == (float(x.min()), float(x.max()))
    assert torch.equal(ranges["q"].channel_max, ranges["k"].channel_max)  # one input, shared


def test_a_percentile_clips_within_a_bin(tiny_bert_dir):
    handle = load_model(tiny_bert_dir)
    modules = [("down", handle.model.encoder.layer[1].output.dense)]
    x = _captured(handle, modules)["down"]
    for percentile in (99.0, 99.9):
        r = input_ranges(handle, SENTENCES, modules, percentile=percentile)["down"]
        values = x.abs().reshape(-1).sort().values
        exact = float(values[math.ceil(len(values) * percentile / 100) - 1])  # that order statistic
        assert exact <= r.clip <= exact * 2 ** (1 / BINS_PER_OCTAVE) * (1 + 1e-6)
        assert r.high == min(float(x.max()), r.clip) and r.low == max(float(x.min()), -r.clip)
        assert r.clip < float(x.abs().max())


def test_a_layer_never_reached_is_an_error(tiny_bert_dir):
    handle = load_model(tiny_bert_dir)
    stray = torch.nn.Linear(4, 4)
    with pytest.raises(SqueezeError, match="layer 'stray' was never called"):
        input_ranges(handle, SENTENCES[:2], [("stray", stray)])
    with pytest.raises(SqueezeError, match=r"percentile must be in \(0, 100\]"):
        input_ranges(handle, SENTENCES[:2], [("stray", stray)], percentile=0)
