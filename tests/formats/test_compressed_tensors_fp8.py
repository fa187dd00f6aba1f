"""Output format ``compressed-tensors`` with ``quantize`` ``scheme = "fp8"``: the engine's float8
codes written ``float-quantized`` as llm-compressor's FP8 schemes write them (weight-only), loaded
back by transformers and by compressed-tensors itself into the engine's very weights."""
from __future__ import annotations

import json

import pytest

import squeezelang
from squeezelang.errors import RecipeErrors

from conftest import build_tiny_gpt2

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors", reason="the compressed-tensors extra is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# the compressed-tensors format tests' own helpers (a tiny Llama whose MLP width fits int4 groups,
# its logits, the stored tensors and the quantization_config), shared rather than copied
from test_compressed_tensors_format import (FORMAT, IDS, _logits, _quant_config,  # noqa: E402,F401
                                            _stored, _wide_llama, fmt, llama_dir)
from test_compressed_tensors_format import _quantized as _quantized_by  # noqa: E402


def _quantized(registries, src, dtype=None, stages=({"scheme": "fp8"},)):
    """The model of ``src`` after fp8 (by default) quantize stages."""
    return _quantized_by(registries, src, dtype, stages)


def _assert_float8_codes_are_the_engines(handle, directory, scale_dtype=torch.float32):
    """Every quantized linear layer is stored as the engine's float8 codes (byte for byte) and
    its scales in ``scale_dtype``; returns how many."""
    from squeezelang.plugin import quantized_weights

    stored = _stored(directory)
    count = 0
    for name, q in quantized_weights(handle).items():
        module = name.removesuffix(".weight")
        assert f"{module}.weight_packed" not in stored and f"{module}.weight_shape" not in stored
        codes = stored[name]
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.view(torch.uint8), q.codes.view(torch.uint8)), module
        scale = stored[f"{module}.weight_scale"]
        assert scale.dtype == scale_dtype
        shape = (1,) if q.axis is None else (q.codes.shape[0], 1)
        assert scale.shape == shape
        assert torch.equal(scale, q.scales.reshape(shape).to(scale_dtype)), module
        count += 1
    return count


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_is_float_quantized_with_the_engines_codes(registries, fmt, llama_dir, tmp_path,
                                                       granularity):
    from compressed_tensors.quantization import QuantizationConfig

    from squeezelang.models.save import save_model

    handle = _quantized(registries, llama_dir, stages=({"scheme": "fp8",
                                                        "granularity": granularity},))
    out = tmp_path / "out"
    files = fmt.save(handle, out, {})
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    quant = _quant_config(out)
    QuantizationConfig.model_validate(quant)
    assert (quant["quant_method"], quant["format"], quant["quantization_status"]) == \
        ("compressed-tensors", "float-quantized", "compressed")
    assert list(quant["config_groups"]) == ["group_0"]
    group = quant["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "float-quantized"
    assert group["input_activations"] is None and group["output_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy",
                                             "group_size", "dynamic")} == \
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": granularity,
         "group_size": None, "dynamic": False}
    assert quant["ignore"] == []  # every linear layer, lm_head included
    assert _assert_float8_codes_are_the_engines(handle, out) == 2 * 7 + 1
    assert _stored(out)["model.embed_tokens.weight"].dtype == torch.float32  # fp8: Linears only

    # transformers loads what squeezelang.load loads from the squeeze artifact
    back = fmt.load(out, "causal-lm", {}, 1)
    assert back.model.runtime == "transformers (compressed-tensors)"
    assert type(back.model.net.model.layers[0].mlp.up_proj) is torch.nn.Linear
    save_model(handle, tmp_path / "squeeze")
    own = squeezelang.load(tmp_path / "squeeze")
    assert torch.equal(_logits(back.model), _logits(own))
    assert torch.equal(_logits(own), _logits(handle.model))
    loaded = back.model.net.state_dict()
    for name, tensor in handle.model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert back.model.counts.params == sum(p.numel() for p in handle.model.parameters())
    assert back.model.counts.memory == sum(v.numel() * v.element_size()
                                           for v in _stored(out).values())


def test_compressed_tensors_decompresses_the_checkpoint_itself(registries, fmt, llama_dir,
                                                              tmp_path):
    """compressed-tensors' own model-free dequantizer reads fp8 beside int4 into the engine's
    weights (two formats: the config says mixed-precision)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer)

    handle = _quantized(registries, llama_dir, stages=(
        {"scheme": "int4", "group_size": 32, "include": ["*.self_attn.*"]},
        {"scheme": "fp8", "granularity": "tensor", "include": ["*.mlp.*"]}))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    quant = _quant_config(out)
    assert quant["format"] == "mixed-precision"
    groups = sorted(quant["config_groups"].values(), key=lambda g: g["weights"]["type"])
    assert [(g["format"], g["weights"]["type"], g["weights"]["strategy"]) for g in groups] == \
        [("float-quantized", "float", "tensor"), ("pack-quantized", "int", "group")]
    assert groups[0]["targets"] == [f"model.layers.{i}.mlp.{p}_proj"
                                    for i in range(2) for p in ("down", "gate", "up")]
    assert quant["ignore"] == ["lm_head"]
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(_stored(out))
    state = handle.model.state_dict()
    assert set(dense) == set(state)
    for name, tensor in state.items():
        assert torch.equal(dense[name], tensor), name
    back = fmt.load(out, "causal-lm", {}, 1)
    assert torch.equal(_logits(back.model), _logits(handle.model))


def test_half_precision_scales_are_rounded_to_the_models_dtype(registries, fmt, llama_dir,
                                                               tmp_path):
    """bfloat16 scales, as llm-compressor writes them: the weights differ from the engine's by
    the rounding of the scale (and of the product), the float8 codes not at all."""
    from squeezelang.plugin import quantized_weights

    handle = _quantized(registries, llama_dir, dtype=torch.bfloat16,
                        stages=({"scheme": "fp8", "exclude": ["lm_head"]},))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    assert _assert_float8_codes_are_the_engines(handle, out, torch.bfloat16) == 14
    back = fmt.load(out, "causal-lm", {}, 1)
    loaded = back.model.net.state_dict()
    for name in quantized_weights(handle):
        mine, theirs = handle.model.state_dict()[name].float(), loaded[name].float()
        assert (theirs - mine).abs().max() <= 2 ** -7 * mine.abs().max()
    diff = (_logits(back.model) - _logits(handle.model)).abs().max().item()
    assert diff <= 0.02


RECIPE = '''recipe "ct-fp8"
model = hf("{model}", task = "causal-lm")
data calib = text("{data}")
{stages}
output "out" {{ format = "compressed-tensors" }}
'''


def _check(tmp_path, model, data, stages):
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, data=data, stages=stages))
    try:
        squeezelang.check(path)
    except RecipeErrors as exc:
        return [(e.span.line, e.message) for e in exc.errors]
    return []


@pytest.mark.parametrize("stages", [
    'stage f: quantize { scheme = "fp8" }',
    'stage f: quantize { scheme = "fp8", granularity = "tensor", exclude = ["lm_head"] }',
    'stage p: prune { method = "nm", n = 2, m = 4 }\nstage f: quantize { scheme = "fp8" }',
])
def test_check_accepts_fp8(tmp_path, llama_dir, sentences_file, stages):
    assert _check(tmp_path, llama_dir, sentences_file, stages) == []


def test_check_refuses_fp8_conv1d(tmp_path, sentences_file):
    src = build_tiny_gpt2(tmp_path / "gpt2")
    stages = 'stage f: quantize { scheme = "fp8" }'
    [(line, message)] = _check(tmp_path, src, sentences_file, stages)
    assert line == 4
    assert "this model's projections are GPT-2 Conv1D ([in, out])" in message


@pytest.mark.slow  # a whole run, about 20 s
def test_squeeze_run_measures_what_transformers_loads(tmp_path, llama_dir):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    recipe = tmp_path / "ct.squeeze"
    recipe.write_text(f'''recipe "ct-fp8-run"
model = hf("{llama_dir}", task = "causal-lm")
data text = text("text.txt")
metric ppl = perplexity(text)
stage f: quantize {{ scheme = "fp8" }}
output "out" {{ format = "compressed-tensors" }}
''')
    result = squeezelang.run(recipe, output=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["runtime"] == "transformers (compressed-tensors)"
    assert _quant_config(tmp_path / "out")["format"] == "float-quantized"
    assert report["metrics"]["size"]["final"] < 0.6 * report["metrics"]["size"]["original"]
    ppl = report["metrics"]["ppl"]
    assert ppl["final"] != ppl["original"] and abs(ppl["final"] / ppl["original"] - 1) < 0.1
    assert result.ok
