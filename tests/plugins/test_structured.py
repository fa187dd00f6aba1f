"""Structured compression: surgery, calibrated ``prune`` methods, ``shrink`` and ``task_prune``.

Every result must be a smaller *standard* model: fewer parameters, an estimate within 2% of the
saved size, and a directory that plain transformers loads giving the in-memory model's outputs.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models import surgery
from squeezelang.models.load import load_model
from squeezelang.models.meta import measured_overhead, meta_from_model
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

from conftest import SENTENCES, calib_context

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])



def _out(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain(directory, task):
    import transformers

    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    return cls.from_pretrained(str(directory), local_files_only=True).eval()


def _stage(src, registries, out_dir, technique="prune", ctx=None, **params):
    """Run one stage; return (handle, estimated meta, saved size, plainly reloaded model)."""
    handle = load_model(src)
    tech = registries.techniques.get(technique)
    params = tech.resolve_defaults(params) if hasattr(tech, "resolve_defaults") else {
        **tech.defaults(), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, ctx or calib_context())
    save_model(handle, out_dir)
    assert not (out_dir / "squeeze.json").exists()
    return handle, estimate, artifact_bytes(out_dir), _plain(out_dir, handle.task)


# ---------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_surgery_removing_silent_units_is_exact(request, fixture):
    """Heads whose output projection is zero, and neurons whose output weights are zero, go exactly."""
    handle = load_model(request.getfixturevalue(fixture))
    model = handle.model
    gpt2 = surgery.family(model.config) == "gpt2"
    with torch.no_grad():
        for block in surgery.layer_modules(model):
            o = block.attn.c_proj.weight if gpt2 else block.attention.output.dense.weight
            (o[8:16] if gpt2 else o[:, 8:16]).zero_()          # head 1 (head_dim 8)
            m = block.mlp.c_proj.weight if gpt2 else block.output.dense.weight
            (m[:16] if gpt2 else m[:, :16]).zero_()            # neurons 0..15
    before = _out(model)
    n = len(surgery.layer_modules(model))
    surgery.prune_mlp_(model, {i: range(16, 64 if not gpt2 else 128) for i in range(n)})
    assert torch.allclose(_out(model), before, atol=1e-5)
    cur = surgery.sizes(model.config)
    assert cur["inner"] == (48 if not gpt2 else 112)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_surgery_ops_match_meta_and_config(request, fixture, tmp_path):
    src = request.getfixturevalue(fixture)
    for op in ("heads", "mlp", "hidden", "layers"):
        handle = load_model(src)
        meta = meta_from_model(handle.model, handle.task)
        if op == "heads":
            surgery.prune_heads_(handle.model, {0: [0, 1, 2], 1: [1, 2, 3]}, hidden=range(24))
            est = surgery.heads_meta(meta, 3)
        elif op == "mlp":
            surgery.prune_mlp_(handle.model, {0: range(32), 1: range(1, 33)})
            est = surgery.mlp_meta(meta, 32)
        elif op == "hidden":
            surgery.prune_hidden_(handle.model, range(0, 32, 2))
            est = surgery.hidden_meta(meta, 16)
        else:
            surgery.drop_layers_(handle.model, [1])
            est = surgery.layers_meta(meta, 1)
        assert est.params() == meta_from_model(handle.model, handle.task).params() < meta.params()
        save_model(handle, tmp_path / op)
        back = _plain(tmp_path / op, handle.task)
        assert torch.allclose(_out(back), _out(handle.model), atol=1e-5)


def test_surgery_errors(tiny_bert_dir):
    model = load_model(tiny_bert_dir).model
    with pytest.raises(SqueezeError, match="same number"):
        surgery.prune_mlp_(model, {0: range(10), 1: range(12)})
    with pytest.raises(SqueezeError, match="hidden size"):
        surgery.prune_heads_(model, {0: [0, 1], 1: [0, 1]})
    with pytest.raises(SqueezeError, match="multiple"):
        surgery.prune_hidden_(model, range(30))
    from transformers import T5Config

    with pytest.raises(SqueezeError, match="supports model types"):
        surgery.family(T5Config())


# ---------------------------------------------------------------------------- prune activation/depth
@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("target", ["mlp", "heads", "embedding", ["heads", "mlp"]])
def test_activation_prune(request, fixture, target, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src)
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", method="activation",
                                          target=target, ratio=0.5, data="calib", samples=16)
    cur, new = surgery.sizes(original.config), surgery.sizes(handle.config)
    targets = [target] if isinstance(target, str) else target
    assert new["inner"] == (cur["inner"] // 2 if "mlp" in targets else cur["inner"])
    assert new["heads"] == (cur["heads"] // 2 if "heads" in targets else cur["heads"])
    assert new["hidden"] == (cur["hidden"] // 2 if set(targets) & {"heads", "embedding"} else cur["hidden"])
    assert estimate.params() == _params(back) < _params(original.model)
    assert abs(estimate.size_bytes() - real) / real < 0.02
    after = _out(handle.model)
    assert torch.allclose(_out(back), after, atol=1e-5)
    if handle.task == "causal-lm" or targets == ["mlp"]:
        assert after.shape == _out(original.model).shape


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("extra", [{"data": "calib"}, {"data": "calib", "importance": "loss"},
                                   {"layers": [0]}])
def test_depth_prune(request, fixture, extra, registries, tmp_path):
    from conftest import build_tiny_bert, build_tiny_gpt2

    build = build_tiny_bert if fixture == "tiny_bert_dir" else build_tiny_gpt2
    src = build(tmp_path / "src", layers=4)
    original = load_model(src)
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", method="depth",
                                          ratio=0.5, samples=16, **extra)
    assert surgery.sizes(handle.config)["layers"] == (3 if "layers" in extra else 2)
    assert estimate.params() == _params(back) < _params(original.model)
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert torch.allclose(_out(back), _out(handle.model), atol=1e-5)
    assert _out(back).shape == _out(original.model).shape


def test_structured_methods_need_data(registries):
    tech = registries.techniques.get("prune")
    for method in ("activation", "depth"):
        errors = tech.check(tech.resolve_defaults({"method": method}))
        assert errors and "data" in errors[0][1]
    assert tech.check(tech.resolve_defaults({"method": "depth", "layers": [1]})) == []
    assert tech.check({"method": "activation", "scope": "layer", "data": "x"})[0][0] == "scope"


def test_depth_keeps_the_most_important_layers(tmp_path, registries):
    """A layer made an identity (zeroed output projections) is the one depth removes."""
    from conftest import build_tiny_bert

    src = build_tiny_bert(tmp_path / "src", layers=3)
    handle = load_model(src)
    with torch.no_grad():
        block = surgery.layer_modules(handle.model)[1]
        for lin in (block.attention.output.dense, block.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()
        for ln in (block.attention.output.LayerNorm, block.output.LayerNorm):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    from squeezelang_plugins.prune.depth import block_importance

    scores = block_importance(handle, calib_context(), {"data": "calib", "samples": 16, "importance": "cosine"})
    assert min(range(3), key=lambda i: scores[i]) == 1


@pytest.mark.slow
def test_activation_prune_minilm(minilm_dir, registries, tmp_path):
    from squeezelang.models.forward import encode

    original = load_model(minilm_dir)
    handle, estimate, real, back = _stage(minilm_dir, registries, tmp_path / "out",
                                          method="activation", target="mlp", ratio=0.5,
                                          data="calib", samples=32)
    p0, p1 = _params(original.model), _params(back)
    size0 = artifact_bytes(minilm_dir)

    def latency(models, rounds=5):
        """Best time of a batch of 8 × 128 tokens, the models measured in alternation."""
        ids = torch.randint(1000, 2000, (8, 128))
        best = [float("inf")] * len(models)
        with torch.inference_mode():
            for _ in range(rounds):
                for i, model in enumerate(models):
                    start = time.perf_counter()
                    model(input_ids=ids)
                    best[i] = min(best[i], time.perf_counter() - start)
        return best

    torch.set_num_threads(2)
    t0, t1 = latency([original.model, back])
    cos = torch.nn.functional.cosine_similarity(encode(original, SENTENCES), encode(handle, SENTENCES))
    print(f"minilm activation mlp 0.5: params {p0} -> {p1} ({p1 / p0:.3f}), size {size0} -> {real} "
          f"({real / size0:.3f}), estimate error {(estimate.size_bytes() - real) / real:+.3%}, "
          f"latency {t0 * 1e3:.1f} -> {t1 * 1e3:.1f} ms ({t1 / t0:.3f}), "
          f"mean cos to original {float(cos.mean()):.3f}", file=sys.stderr)
    assert estimate.params() == p1 < p0
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert torch.allclose(_out(back), _out(handle.model), atol=1e-4)
    assert t1 < t0


# ---------------------------------------------------------------------------- shrink
@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("params", [{"layers": 2, "intermediate": 32},
                                    {"layers": 3, "heads": 2, "data": "calib", "samples": 16},
                                    {"hidden": 16, "intermediate": 48, "data": "calib"}])
def test_shrink(request, fixture, params, registries, tmp_path):
    from conftest import build_tiny_bert, build_tiny_gpt2

    build = build_tiny_bert if fixture == "tiny_bert_dir" else build_tiny_gpt2
    src = build(tmp_path / "src", layers=4)
    original = load_model(src)
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", technique="shrink",
                                          **params)
    new = surgery.sizes(handle.config)
    assert new["layers"] == params.get("layers", 4)
    assert new["inner"] == params.get("intermediate", surgery.sizes(original.config)["inner"])
    assert new["heads"] == params.get("heads", 4)
    assert new["hidden"] == params.get("hidden", 8 * new["heads"])
    assert estimate.params() == _params(back) < _params(original.model)
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert torch.allclose(_out(back), _out(handle.model), atol=1e-5)


def test_shrink_schema_and_checks(registries):
    from squeezelang_plugins.shrink import evenly_spaced

    tech = registries.techniques.get("shrink")
    assert tech.schema["additionalProperties"] is False and tech.example.startswith("stage ")
    assert tech.check({}) and tech.check({"layers": 2}) == []
    assert evenly_spaced(6, 3) == [0, 2, 5] and evenly_spaced(4, 4) == [0, 1, 2, 3]
    with pytest.raises(SqueezeError, match="multiple"):
        tech.estimate(meta_from_model(load_model_meta(), "embedding"), {"hidden": 30})


def load_model_meta():
    from transformers import BertConfig

    from squeezelang.models import hf

    return hf.from_config(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=64, vocab_size=100), "embedding", meta=True)


# ---------------------------------------------------------------------------- task_prune
def _taskcalib_context() -> Context:
    ctx = calib_context()
    pairs = [(SENTENCES[i], SENTENCES[(i + k) % len(SENTENCES)], float(5 - k)) for i in range(8)
             for k in (0, 1, 3)]
    ctx.data.add("sts", [{"a": a, "b": b, "score": s} for a, b, s in pairs])
    return ctx


@pytest.mark.parametrize("fixture,params", [
    ("tiny_bert_dir", {"target": "heads", "ratio": 0.5, "data": "sts", "score": "spearman"}),
    ("tiny_bert_dir", {"target": "layers", "ratio": 0.5, "data": "sts", "score": "spearman"}),
    ("tiny_gpt2_dir", {"target": "heads", "ratio": 0.25, "data": "calib", "score": "loss"}),
    ("tiny_gpt2_dir", {"target": "layers", "ratio": 0.5, "data": "calib", "score": "loss"}),
])
def test_task_prune(request, fixture, params, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src)
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", technique="task_prune",
                                          ctx=_taskcalib_context(), samples=16, **params)
    new, cur = surgery.sizes(handle.config), surgery.sizes(original.config)
    if params["target"] == "heads":
        assert new["heads"] == cur["heads"] - round(params["ratio"] * cur["heads"])
    else:
        assert new["layers"] == 1
    assert estimate.params() == _params(back) < _params(original.model)
    assert abs(estimate.size_bytes() - real) / real < 0.02
    assert torch.allclose(_out(back), _out(handle.model), atol=1e-5)


def test_task_prune_spearman_helper_and_checks(registries):
    from squeezelang_plugins.task_prune import _spearman

    assert _spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1)
    tech = registries.techniques.get("task_prune")
    assert tech.check(tech.defaults()) and tech.knob("ratio").compresses == "up"
