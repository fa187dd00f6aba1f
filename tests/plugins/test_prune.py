"""The ``prune`` technique: zeros where expected, a smaller file, an exact estimate, a faithful reload."""
from __future__ import annotations

import sys

import pytest
import torch

from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.select import BLOCKS, LINEAR_KINDS, select_modules
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _stage(src, registries, out_dir, technique="prune", **params):
    """Run one stage on ``src``; return (handle, estimated size, saved size, reloaded handle)."""
    handle = load_model(src)
    tech = registries.techniques.get(technique)
    params = {**tech.defaults(), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


def _zero_fraction(model, include=BLOCKS):
    mods = select_modules(model, LINEAR_KINDS, include)
    zeros = sum(int((m.weight == 0).sum()) for _, m in mods)
    return zeros / sum(m.weight.numel() for _, m in mods)


def test_plugin_modules_import_no_heavy_library():
    import subprocess

    code = ("import sys\n"
            "import squeezelang_plugins.prune, squeezelang_plugins.factorize\n"
            "import squeezelang_plugins.quantize, squeezelang_plugins.formats\n"
            "print([m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_half(request, fixture, scope, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    before = _out(load_model(src).model)
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", ratio=0.5, scope=scope)
    assert _zero_fraction(handle.model) == pytest.approx(0.5, abs=1e-3)
    if scope == "layer":
        for _, m in select_modules(handle.model, LINEAR_KINDS, BLOCKS):
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    # embeddings, pooler and head are untouched
    original_state = load_model(src).model.state_dict()
    pruned = {f"{n}.weight" for n, _ in select_modules(handle.model, LINEAR_KINDS, BLOCKS)}
    for name, tensor in handle.model.state_dict().items():
        assert torch.equal(tensor, original_state[name]) == (name not in pruned), name
    assert handle.states == {"sparse"} and all(c == {"sparse": True} for c in handle.codecs.values())
    after = _out(handle.model)
    assert not torch.allclose(after, before) and torch.allclose(after, before, atol=1.0)
    original = artifact_bytes(src)
    linear_weights = sum(m.weight.numel() for _, m in select_modules(handle.model, LINEAR_KINDS, BLOCKS))
    # ~4 bytes saved per zeroed weight, less the mask; header entries eat a few % on a tiny model
    assert original - real == pytest.approx(linear_weights * (0.5 * 4 - 1 / 8), rel=0.12)
    assert abs(estimate - real) / real < 0.02
    assert torch.equal(_out(back.model), after)
    assert back.codecs == handle.codecs


def test_prune_ratio_zero_changes_nothing_but_ratio_monotone(tiny_bert_dir, registries, tmp_path):
    sizes = []
    for ratio in (0.0, 0.3, 0.7):
        _, estimate, real, _ = _stage(tiny_bert_dir, registries, tmp_path / str(ratio), ratio=ratio)
        sizes.append(real)
        assert abs(estimate - real) / real < 0.02
    assert sizes[0] > sizes[1] > sizes[2]


def test_prune_include_exclude(tiny_bert_dir, registries, tmp_path):
    handle, _, _, _ = _stage(tiny_bert_dir, registries, tmp_path / "out", ratio=0.5,
                             include=["*.attention.*"], exclude=["*.value"])
    assert sorted(handle.codecs) == sorted(
        f"encoder.layer.{i}.attention.{p}.weight" for i in range(2)
        for p in ("self.query", "self.key", "output.dense"))


def test_prune_selecting_nothing_is_an_error(tiny_bert_dir, registries):
    from squeezelang.errors import SqueezeError

    tech = registries.techniques.get("prune")
    with pytest.raises(SqueezeError, match="select no linear layer"):
        tech.apply_(load_model(tiny_bert_dir), {**tech.defaults(), "include": ["nothing.*"]},
                    Context(quiet=True))


def test_prune_then_quantize_combines_codecs(tiny_bert_dir, registries, tmp_path):
    handle = load_model(tiny_bert_dir)
    prune, quant = registries.techniques.get("prune"), registries.techniques.get("quantize")
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, tiny_bert_dir)
    ctx = Context(quiet=True)
    for tech, params in ((prune, {"ratio": 0.5}), (quant, {})):
        params = {**tech.defaults(), **params}
        meta = tech.estimate(meta, params)
        tech.apply_(handle, params, ctx)
    name = "encoder.layer.0.output.dense.weight"
    assert handle.codecs[name] == {"sparse": True, "quant": {"bits": 8, "axis": 0}}
    save_model(handle, tmp_path / "out")
    real = artifact_bytes(tmp_path / "out")
    assert abs(meta.size_bytes() - real) / real < 0.02
    back = load_model(tmp_path / "out", registries)
    assert torch.equal(_out(back.model), _out(handle.model))


def test_schema_knobs_and_example(registries):
    tech = registries.techniques.get("prune")
    assert tech.defaults() == {"method": "magnitude", "ratio": 0.5, "scope": "layer",
                               "include": list(BLOCKS), "exclude": []}
    assert tech.knob("ratio").compresses == "up"
    assert tech.example.startswith("stage ") and "prune" in tech.example
    assert tech.schema["additionalProperties"] is False


@pytest.mark.slow
def test_prune_minilm(minilm_dir, registries, tmp_path):
    handle = load_model(minilm_dir)
    ids = handle.tokenizer(["a man is playing a guitar", "the cat sits on the mat"],
                           padding=True, return_tensors="pt")["input_ids"]
    before = _out(handle.model, ids)
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out", ratio=0.5)
    print(f"minilm prune 0.5: estimate {estimate} real {real} error "
          f"{(estimate - real) / real:+.3%}", file=sys.stderr)
    assert abs(estimate - real) / real < 0.02
    linear_weights = sum(m.weight.numel() for _, m in select_modules(handle.model, LINEAR_KINDS, BLOCKS))
    saved = artifact_bytes(minilm_dir) - real
    assert saved == pytest.approx(linear_weights * (0.5 * 4 - 1 / 8), rel=0.01)
    after = _out(handle.model, ids)
    assert torch.equal(_out(back.model, ids), after)
    cos = torch.nn.functional.cosine_similarity(after.mean(1), before.mean(1))
    assert (cos > 0.5).all() and not torch.equal(after, before)
