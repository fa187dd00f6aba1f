"""``quantize`` scheme ``w8a8``: int8 weights, static 8-bit activations, SmoothQuant, reloads."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import squeezelang
from conftest import (FAMILY_CONFIGS, SENTENCES, build_family_handle, build_tiny_llama,
                      calib_context)
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.models.layers import W8A8Linear, activation_grid
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
W8A8 = {"scheme": "w8a8", "data": "calib"}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _params(tech, **params):
    params = {**W8A8, **params}
    return {**tech.defaults_for(params), **params}


def _stage(handle, overhead_of, registries, out_dir, **params):
    """Estimate, apply, save and reload a w8a8 stage on ``handle`` (``overhead_of``: a saved
    directory of the model, for the estimate's fixed bytes); ``(estimate, back)``."""
    tech = registries.techniques.get("quantize")
    params = _params(tech, **params)
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, overhead_of)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, calib_context())
    save_model(handle, out_dir)
    return estimate, load_model(out_dir, registries)


def _check_saved(handle, estimate, back, out_dir):
    """The estimate predicts the saved tensors and bytes; the reload computes the same."""
    saved = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    assert set(estimate.tensors) == set(saved.tensors)
    assert estimate.modeled_bytes() == saved.modeled_bytes()
    real = artifact_bytes(out_dir)
    # what remains is the safetensors header's offsets, counted at each tensor's own size
    assert abs(estimate.size_bytes() - real) <= 8 * len(saved.tensors)
    swapped = [n for n, m in handle.model.named_modules() if isinstance(m, W8A8Linear)]
    assert handle.edits == [{"technique": "quantize", "scheme": "w8a8", "modules": swapped}]
    assert [n for n, m in back.model.named_modules() if isinstance(m, W8A8Linear)] == swapped
    for name in swapped:
        mine, theirs = handle.model.get_submodule(name), back.model.get_submodule(name)
        assert theirs.input_scale.dtype == torch.float32
        assert theirs.input_zero_point.dtype == torch.uint8
        assert float(theirs.input_scale) == float(mine.input_scale) > 0
        assert int(theirs.input_zero_point) == int(mine.input_zero_point)
    assert back.codecs == handle.codecs
    return swapped


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir", "tiny_llama_dir"])
def test_w8a8_saves_and_reloads(request, fixture, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    handle = load_model(src)
    estimate, back = _stage(handle, src, registries, tmp_path / "out")
    swapped = _check_saved(handle, estimate, back, tmp_path / "out")
    linears = [n for n, m in original.named_modules()
               if type(m).__name__ in ("Linear", "Conv1D")]
    if "gpt2" in fixture:  # the head shares the embedding's weight: int8 codes, run in float
        assert swapped == [n for n in linears if n != "lm_head"]
    else:
        assert swapped == linears
    assert handle.states == {"quantized"}
    assert all(handle.codecs[f"{n}.weight"] == {"quant": {"bits": 8, "axis": 1 if "gpt2" in fixture
                                                          else 0}} for n in swapped)
    embedding = next(n for n, m in original.named_modules() if isinstance(m, torch.nn.Embedding))
    assert f"{embedding}.weight" in handle.codecs  # embeddings: int8 codes, as int8-dynamic's
    assert artifact_bytes(tmp_path / "out") < 0.45 * artifact_bytes(src)
    before, after = _out(original), _out(handle.model)
    assert not torch.equal(after, before)
    assert float((after - before).abs().max() / before.abs().max()) < 0.1
    assert torch.equal(_out(back.model), after)


def test_per_tensor_weight_scales(tiny_bert_dir, registries, tmp_path):
    handle = load_model(tiny_bert_dir)
    estimate, back = _stage(handle, tiny_bert_dir, registries, tmp_path / "out",
                            granularity="tensor")
    swapped = _check_saved(handle, estimate, back, tmp_path / "out")
    assert all(handle.codecs[f"{n}.weight"]["quant"]["axis"] is None for n in swapped)
    assert torch.equal(_out(back.model), _out(handle.model))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_llama_style_families(family, registries, tmp_path):
    handle = build_family_handle(family)
    original = copy.deepcopy(handle.model)
    save_model(handle, tmp_path / "src")
    estimate, back = _stage(handle, tmp_path / "src", registries, tmp_path / "out")
    swapped = _check_saved(handle, estimate, back, tmp_path / "out")
    tied = {id(p) for p in original.get_input_embeddings().parameters()}
    assert swapped == [n for n, m in original.named_modules()  # a tied head runs in float
                       if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied]
    assert len(swapped) >= 4 * 3  # every block's projections (fused or not)
    batch = handle.tokenizer(SENTENCES[:3], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        before, after = original(**batch).logits[real], handle.model(**batch).logits[real]
        assert torch.equal(back.model(**batch).logits[real], after)
    assert 0 < float((after - before).norm() / before.norm()) < 0.1  # int8-dynamic: 0.02-0.05


def test_run_end_to_end(tmp_path, tiny_llama_dir, sentences_file):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "w8a8"
model = hf("{tiny_llama_dir}", task = "causal-lm")
data calib = text("{sentences_file}")
stage q: quantize {{ scheme = "w8a8", data = calib, smoothing = 0.6 }}
output "out" {{ format = "squeeze" }}
''')
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    saved = result.report["metrics"]["size"]["final"]
    # the planner's estimate from config.json: off by the safetensors header's offsets only, a few
    # bytes a tensor, and a tiny model has two scalars a layer beside ~1 kB of weights
    assert abs(saved - planned.prediction.final_size) <= 0.01 * saved
    back = squeezelang.load(tmp_path / "out")
    assert isinstance(back.model.layers[0].mlp.down_proj, W8A8Linear)
    lock = (tmp_path / "out" / "recipe.lock.squeeze").read_text()
    assert "smoothing = 0.6" in lock and "percentile = 100" in lock


# ---------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("transposed", [False, True])
def test_the_layer_computes_what_an_integer_kernel_computes(transposed):
    from transformers.pytorch_utils import Conv1D

    from squeezelang.models.codec import quantize_weight_, scales_of

    torch.manual_seed(0)
    layer = Conv1D(24, 40) if transposed else torch.nn.Linear(40, 24)
    with torch.no_grad():
        layer.bias.normal_()
        quantize_weight_(layer.weight.data, 8, 1 if transposed else 0)
    x = torch.randn(3, 5, 40) * 2 + 0.5
    scale, zero = activation_grid(float(x.min()), float(x.max()))
    w8a8 = W8A8Linear.from_linear(layer, scale, zero)
    assert w8a8.weight is layer.weight  # shared, not copied
    weight = layer.weight.t() if transposed else layer.weight  # [out, in]
    w_scale = scales_of(weight, 8, 0)
    codes = torch.round(weight / w_scale[:, None]).to(torch.int32)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255).to(torch.int32)
    assert torch.equal(w8a8.quantized_input(x).to(torch.int32), q)
    accumulated = (q - zero) @ codes.t()  # int32, exact
    expected = accumulated.float() * (scale * w_scale) + layer.bias
    got = w8a8(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, layer(x), rtol=1e-4, atol=1e-4)  # the input is rounded


def test_activation_grids_hold_zero():
    scale, zero = activation_grid(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == 64
    assert activation_grid(0.5, 2.0) == (pytest.approx(2 / 255), 0)  # widened down to zero
    assert activation_grid(-2.0, -0.5)[1] == 255
    assert activation_grid(0.0, 0.0) == (1.0, 0)


# ---------------------------------------------------------------------------- SmoothQuant
def _outlier_model(name):
    """A tiny Llama (or GPT-2) whose norms blow up three channels, as LLM activations have."""
    if name == "llama":
        handle = build_family_handle("llama")
        norms = [n for layer in handle.model.model.layers
                 for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        handle = build_family_handle("llama")  # for its tokenizer
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(handle.tokenizer), n_embd=64, n_layer=3, n_head=4,
                            n_positions=64)
        handle.model = GPT2LMHeadModel(config).eval()
        norms = [n for block in handle.model.transformer.h for n in (block.ln_1, block.ln_2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight[[3, 17, 40]] *= 40.0
    return handle


def _error(model, reference, batch):
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
    real = batch["attention_mask"].bool()
    return float((got - want)[real].pow(2).mean() / want[real].pow(2).mean())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_smoothing_keeps_the_float_model_and_evens_the_channels(name):
    from squeezelang.plugin import input_ranges

    from squeezelang_plugins.quantize import w8a8

    handle = _outlier_model(name)
    reference = copy.deepcopy(handle.model)
    batch = handle.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    layers = [(n, m) for n, m in handle.model.named_modules()
              if type(m).__name__ in ("Linear", "Conv1D") and n != "lm_head"]
    first = layers[0]
    before = input_ranges(handle, SENTENCES, [first])[first[0]].channel_max
    smoothed = w8a8.smooth_(handle, layers, SENTENCES, 0.5, set(), calib_context())
    after = input_ranges(handle, SENTENCES, [first])[first[0]].channel_max
    assert first[0] in smoothed
    assert after.max() / after.median() < 0.5 * before.max() / before.median()
    with torch.no_grad():
        got, want = handle.model(**batch).logits, reference(**batch).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_smoothquant_lowers_the_error_of_outlier_activations(name, registries):
    reference = _outlier_model(name)
    batch = reference.tokenizer(SENTENCES, return_tensors="pt", padding=True)
    tech = registries.techniques.get("quantize")
    errors = {}
    for smoothing in (0.0, 0.5):
        handle = _outlier_model(name)
        tech.apply_(handle, _params(tech, smoothing=smoothing), calib_context())
        errors[smoothing] = _error(handle.model, reference.model, batch)
    assert errors[0.5] < 0.5 * errors[0.0], errors


def test_the_log_names_the_layers_without_migration(tiny_bert_dir, registries):
    """A post-norm encoder: only the values (before the attention output) can absorb scales."""
    tech = registries.techniques.get("quantize")
    logs = {}
    for smoothing in (0.5, 0.0):
        ctx = calib_context()
        ctx.stage = "q"
        tech.apply_(load_model(tiny_bert_dir), _params(tech, smoothing=smoothing), ctx)
        logs[smoothing] = " / ".join(ctx.logs["q"])
    assert "folded scales at 2 places" in logs[0.5]
    assert ("11 of 13 layers quantized without SmoothQuant migration (no producer of their input "
            "can absorb a scale): encoder.layer.*.attention.self.query x2") in logs[0.5]
    assert "encoder.layer.*.intermediate.dense x2" in logs[0.5]
    assert "attention.output.dense" not in logs[0.5].split("without SmoothQuant migration")[1]
    assert "smoothing = 0, no SmoothQuant migration" in logs[0.0]
    assert "without SmoothQuant migration" not in logs[0.0]


def test_a_lower_percentile_clips_the_ranges(tiny_bert_dir, registries):
    tech = registries.techniques.get("quantize")
    scales = {}
    for percentile in (100, 99):
        handle = load_model(tiny_bert_dir)
        tech.apply_(handle, _params(tech, percentile=percentile), calib_context())
        scales[percentile] = torch.stack([m.input_scale for m in handle.model.modules()
                                          if isinstance(m, W8A8Linear)])
    assert (scales[99] <= scales[100]).all() and (scales[99] < 0.9 * scales[100]).any()


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("params, key, message", [
    ({"scheme": "w8a8"}, "data", "scheme \"w8a8\" calibrates its static activation scales"),
    ({"scheme": "int8", "smoothing": 0.5}, "smoothing",
     "'smoothing' applies to scheme \"w8a8\" only, not \"int8\""),
    ({"scheme": "int8-dynamic", "percentile": 99.9}, "percentile",
     "'percentile' applies to scheme \"w8a8\" only"),
    ({"scheme": "int8", "data": "calib"}, "data", "'data' applies to schemes \"int4\" (methods "
                                                  "gptq, awq), \"mixed\" and \"w8a8\" only"),
    ({**W8A8, "method": "gptq"}, "method", "method \"gptq\" needs scheme \"int4\" or \"mixed\""),
    ({**W8A8, "group_size": 32}, "group_size", "'group_size' applies to schemes"),
])
def test_params_are_checked(registries, params, key, message):
    problems = registries.techniques.get("quantize").check(params)
    assert [k for k, _ in problems] == [key] and message in problems[0][1]


def test_squeeze_check_points_at_the_stage(tmp_path, tiny_bert_dir):
    recipe = tmp_path / "r.squeeze"
    text = f'''recipe "w8a8"
model = hf("{tiny_bert_dir}", task = "embedding")
stage q: quantize {{ scheme = "w8a8"{{}} }}
'''
    for extra, message in ((", smoothing = 2", "'smoothing' must be between 0 and 1"),
                           ("", "scheme \"w8a8\" calibrates its static activation scales (and "
                                "SmoothQuant's) on data = <a data set>")):
        recipe.write_text(text.replace("{}", extra))
        with pytest.raises(RecipeErrors) as info:
            squeezelang.check(recipe)
        [error] = info.value.errors
        assert error.span.line == 3 and message in error.message


def test_apply_needs_data_and_float32(tiny_llama_dir, registries):
    tech = registries.techniques.get("quantize")
    handle = load_model(tiny_llama_dir)
    with pytest.raises(SqueezeError, match="calibrates its static activation scales"):
        tech.apply_(handle, {**tech.defaults_for({"scheme": "w8a8"}), "scheme": "w8a8"},
                    calib_context())
    handle.model = handle.model.to(torch.bfloat16)
    with pytest.raises(SqueezeError, match="scheme \"w8a8\" runs float32 int8 kernels, and "
                                           "'model.layers.0.self_attn.q_proj' is bfloat16"):
        tech.apply_(handle, _params(tech), calib_context())
    assert not handle.codecs and not handle.edits  # refused before anything changed


@pytest.mark.parametrize("fmt, reason", [("gguf", "have no GGUF form"),
                                         ("compressed-tensors", "are not written in this format")])
def test_formats_without_static_activations_refuse_at_check_time(fmt, reason, tiny_llama_dir,
                                                                 tmp_path):
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES), encoding="utf-8")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'model = hf("{tiny_llama_dir}", task = "causal-lm")\n'
                      'data calib = text("calib.txt")\n'
                      'stage q: quantize { scheme = "w8a8", data = calib }\n'
                      f'output "out" {{ format = "{fmt}" }}\n', encoding="utf-8")
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    [error] = info.value.errors
    assert error.span.line == 3 and reason in error.message
