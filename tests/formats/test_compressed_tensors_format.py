"""Output format ``compressed-tensors``: the engine's codes packed as llm-compressor writes them,
loaded back by transformers (and by compressed-tensors itself), refusals at ``squeeze check``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError

from conftest import build_tiny_gpt2, build_tiny_llama, calib_context

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors", reason="the compressed-tensors extra is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FORMAT = "compressed-tensors"
IDS = torch.tensor([[5, 17, 33, 2, 41, 60, 8, 9, 70, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def _wide_llama(**kwargs):
    """LlamaConfig with an MLP width a multiple of 32 (conftest's 48 takes no group of 32)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**kwargs, "intermediate_size": 64})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama-wide"), config_cls=_wide_llama)


@pytest.fixture(scope="module")
def fmt(registries):
    return registries.output_formats.get(FORMAT)


def _quantized(registries, src, dtype=None, stages=({"scheme": "int4", "group_size": 32},)):
    """The model of ``src`` (cast to ``dtype``) after quantize stages with these parameters."""
    from squeezelang.models.load import load_model

    handle = load_model(src)
    if dtype is not None:
        handle.model.to(dtype)
    tech = registries.techniques.get("quantize")
    for params in stages:
        params = {**tech.defaults_for(params), **params}
        assert tech.check(params) == []
        tech.apply_(handle, params, calib_context())
    return handle


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def _stored(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _quant_config(directory):
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def _assert_codes_are_the_engines(handle, directory, scale_dtype=torch.float32):
    """Every packed layer unpacks to the engine's codes; its scales are the engine's in the
    model's dtype; a quantized weight left in float holds the engine's values."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from squeezelang.plugin import quantized_weights

    stored = _stored(directory)
    packed = 0
    for name, q in quantized_weights(handle).items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" not in stored:
            assert torch.equal(stored[name], handle.model.state_dict()[name])
            continue
        packed += 1
        assert stored[f"{module}.weight_packed"].dtype == torch.int32
        assert stored[f"{module}.weight_shape"].tolist() == list(q.codes.shape)
        codes = unpack_from_int32(stored[f"{module}.weight_packed"], q.bits, q.codes.shape)
        assert torch.equal(codes, q.codes.to(torch.int8)), module
        scale = stored[f"{module}.weight_scale"]
        assert scale.dtype == scale_dtype
        rows = q.codes.shape[0] if q.scales.numel() > 1 else 1  # per tensor: repeated per row
        want = q.scales.reshape(rows, -1).to(scale_dtype)
        assert torch.equal(scale, want.expand_as(scale)), module
    return packed


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int4_groups_are_packed_with_the_engines_codes(registries, fmt, llama_dir, tmp_path, method):
    from compressed_tensors.quantization import QuantizationConfig

    extra = {"data": "calib"} if method == "gptq" else {}
    handle = _quantized(registries, llama_dir, stages=(
        {"scheme": "int4", "group_size": 32, "method": method, **extra},))
    out = tmp_path / "out"
    files = fmt.save(handle, out, {})
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    quant = _quant_config(out)
    QuantizationConfig.model_validate(quant)
    assert (quant["quant_method"], quant["format"], quant["quantization_status"]) == \
        ("compressed-tensors", "pack-quantized", "compressed")
    assert list(quant["config_groups"]) == ["group_0"]
    group = quant["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy",
                                             "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    assert quant["ignore"] == []  # every linear layer, lm_head included, was quantized
    assert _assert_codes_are_the_engines(handle, out) == 2 * 7 + 1
    # the quantized embedding stays in float with its quantized values
    assert _stored(out)["model.embed_tokens.weight"].dtype == torch.float32

    back = fmt.load(out, "causal-lm", {}, 1)
    assert back.model.runtime == "transformers (compressed-tensors)"
    assert type(back.model.net).__name__ == "LlamaForCausalLM"
    diff = (_logits(back.model) - _logits(handle.model)).abs().max().item()
    assert diff <= 1e-6  # float32 scales: the very weights
    assert back.model.counts.params == sum(p.numel() for p in handle.model.parameters())
    assert back.model.counts.memory == sum(v.numel() * v.element_size()
                                           for v in _stored(out).values())


@pytest.mark.parametrize("params", [
    {"scheme": "int8"},
    {"scheme": "int8", "granularity": "tensor"},
    {"scheme": "int8-dynamic"},
], ids=["channel", "per-tensor", "int8-kernels"])
def test_int8_is_packed_per_channel(registries, fmt, llama_dir, tmp_path, params):
    handle = _quantized(registries, llama_dir, stages=({**params, "exclude": ["lm_head"]},))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    weights = _quant_config(out)["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (8, "channel", None)
    assert _quant_config(out)["ignore"] == ["lm_head"]
    assert _assert_codes_are_the_engines(handle, out) == 2 * 7
    scale = _stored(out)["model.layers.0.mlp.up_proj.weight_scale"]
    assert scale.shape == (64, 1)
    if params.get("granularity") == "tensor":  # one scale, repeated on every row
        assert len(torch.unique(scale)) == 1
    back = fmt.load(out, "causal-lm", {}, 1)
    assert type(back.model.net.model.layers[0].mlp.up_proj) is torch.nn.Linear
    if params["scheme"] == "int8-dynamic":  # the in-memory model runs int8 kernels: compare floats
        from squeezelang.plugin import from_config

        reference = from_config(handle.model.config, "causal-lm")
        reference.load_state_dict(handle.model.state_dict())
    else:
        reference = handle.model
    assert (_logits(back.model) - _logits(reference)).abs().max().item() <= 1e-6


def test_two_widths_are_two_config_groups(registries, fmt, llama_dir, tmp_path):
    handle = _quantized(registries, llama_dir, stages=(
        {"scheme": "int4", "group_size": 32, "include": ["*.self_attn.*"]},
        {"scheme": "int8", "include": ["*.mlp.*"]}))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    quant = _quant_config(out)
    groups = sorted(quant["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in groups] == \
        [(4, "group"), (8, "channel")]
    assert groups[0]["targets"] == [f"model.layers.{i}.self_attn.{p}_proj"
                                    for i in range(2) for p in "koqv"]
    assert groups[1]["targets"] == [f"model.layers.{i}.mlp.{p}_proj"
                                    for i in range(2) for p in ("down", "gate", "up")]
    assert quant["ignore"] == ["lm_head"]
    assert _assert_codes_are_the_engines(handle, out) == 14
    back = fmt.load(out, "causal-lm", {}, 1)
    assert (_logits(back.model) - _logits(handle.model)).abs().max().item() <= 1e-6


def test_a_head_tied_to_a_quantized_embedding_stays_in_float(registries, fmt, tmp_path):
    from transformers import LlamaConfig

    src = build_tiny_llama(tmp_path / "tied", config_cls=lambda **kw: LlamaConfig(
        **{**kw, "intermediate_size": 64, "tie_word_embeddings": True}))
    handle = _quantized(registries, src)
    assert "model.embed_tokens.weight" in handle.codecs
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    assert _quant_config(out)["ignore"] == ["lm_head"]
    assert "lm_head.weight" not in _stored(out)  # tied: stored once, as the embedding
    assert _assert_codes_are_the_engines(handle, out) == 14
    back = fmt.load(out, "causal-lm", {}, 1)
    assert torch.equal(_logits(back.model), _logits(handle.model))
    assert back.model.counts.params == sum(p.numel() for p in handle.model.parameters())


def test_compressed_tensors_decompresses_the_checkpoint_itself(registries, fmt, llama_dir,
                                                              tmp_path):
    """compressed-tensors' own model-free dequantizer reads the files into the engine's weights."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer)

    handle = _quantized(registries, llama_dir, stages=(
        {"scheme": "int4", "group_size": 32, "include": ["*.self_attn.*"]},
        {"scheme": "int8", "include": ["*.mlp.*"]}))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(_stored(out))
    state = handle.model.state_dict()
    assert set(dense) == set(state)
    for name, tensor in state.items():
        assert torch.equal(dense[name], tensor), name


def test_half_precision_scales_are_rounded_to_the_models_dtype(registries, fmt, llama_dir,
                                                               tmp_path):
    """As llm-compressor writes them and transformers and vLLM load them: bfloat16 scales. The
    weights then differ from the engine's by the rounding of the scale (and of the product)."""
    from squeezelang.plugin import quantized_weights

    handle = _quantized(registries, llama_dir, dtype=torch.bfloat16, stages=(
        {"scheme": "int4", "group_size": 32, "exclude": ["lm_head", "model.embed_tokens"]},))
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    assert _assert_codes_are_the_engines(handle, out, torch.bfloat16) == 14
    back = fmt.load(out, "causal-lm", {}, 1)
    loaded = back.model.net.state_dict()
    for name in quantized_weights(handle):
        mine, theirs = handle.model.state_dict()[name].float(), loaded[name].float()
        assert (theirs - mine).abs().max() <= 2 ** -7 * mine.abs().max()
    diff = (_logits(back.model) - _logits(handle.model)).abs().max().item()
    assert 0 < diff <= 0.02


def test_a_group_must_divide_the_inputs(registries, fmt, tmp_path):
    src = build_tiny_llama(tmp_path / "llama")  # MLP width 48
    handle = _quantized(registries, src, stages=({"scheme": "int4", "group_size": 32},))
    with pytest.raises(SqueezeError, match=r"group_size 32 does not divide the 48 inputs of "
                                           r"'model\.layers\.0\.mlp\.down_proj'"):
        fmt.save(handle, tmp_path / "out", {})


def test_gpt2_conv1d_is_refused_when_saved(registries, fmt, tmp_path):
    src = build_tiny_gpt2(tmp_path / "gpt2")
    handle = _quantized(registries, src, stages=({"scheme": "int8"},))
    with pytest.raises(SqueezeError, match=r"'transformer\.h\.0\.attn\.c_attn' is a Conv1D, not a "
                                           r"torch\.nn\.Linear"):
        fmt.save(handle, tmp_path / "out", {})


def test_nothing_quantized_is_a_plain_checkpoint(registries, fmt, llama_dir, tmp_path):
    from squeezelang.models.load import load_model

    handle = load_model(llama_dir)
    out = tmp_path / "out"
    fmt.save(handle, out, {})
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    back = fmt.load(out, "causal-lm", {}, 1)
    assert torch.equal(_logits(back.model), _logits(handle.model))


RECIPE = '''recipe "ct"
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


@pytest.mark.parametrize("stages, message", [
    ('stage c: share { method = "cluster", bits = 4 }',
     "stage 'c': output format 'compressed-tensors' cannot hold this: codebook (clustered) "
     "weights have no compressed-tensors layout; quantize the layers instead"),
    ('stage lr: factorize { rank = 0.5 }',
     "stage 'lr': output format 'compressed-tensors' cannot hold this: factorized (low-rank) "
     "layers are not a standard transformers architecture, and compressed-tensors stores plain "
     "linear layers"),
    ('stage m: quantize { scheme = "mixed", bits = [3, 4, 8], avg_bits = 4, group_size = 32, '
     'data = calib }',
     "stage 'm': output format 'compressed-tensors' cannot hold this: compressed-tensors packs "
     "4- or 8-bit codes for vLLM's kernels, not 3-bit ones: quantize with bits = [4, 8]"),
])
def test_check_refuses_at_the_stage(tmp_path, llama_dir, sentences_file, stages, message):
    assert _check(tmp_path, llama_dir, sentences_file, f"{stages}\n") == [(4, message)]


@pytest.mark.parametrize("stages", [
    'stage q: quantize { scheme = "int8-dynamic", granularity = "tensor" }',
    'stage m: quantize { scheme = "mixed", bits = [4, 8], avg_bits = 6, group_size = 32, '
    'data = calib }',
    'stage p: prune { ratio = 0.5 }\nstage q: quantize { scheme = "int4", group_size = 32 }',
    'stage p: prune { method = "nm", n = 2, m = 4 }',
])
def test_check_accepts(tmp_path, llama_dir, sentences_file, stages):
    assert _check(tmp_path, llama_dir, sentences_file, stages) == []


def test_check_refuses_quantized_conv1d(tmp_path, sentences_file):
    src = build_tiny_gpt2(tmp_path / "gpt2")
    stages = 'stage p: prune { ratio = 0.5 }\nstage q: quantize { scheme = "int8" }'
    [(line, message)] = _check(tmp_path, src, sentences_file, stages)
    assert line == 5
    assert "this model's projections are GPT-2 Conv1D ([in, out])" in message


def test_importing_the_format_imports_no_torch():
    code = ("import sys, squeezelang_plugins.compressed_tensors_format as f; "
            "f.CompressedTensorsFormat().check({}, [('q', frozenset({'bits:4'}))], 'causal-lm', "
            "{'model_type': 'gpt2'}); "
            "print(sorted(m for m in ('torch', 'transformers', 'compressed_tensors') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


def test_squeeze_run_measures_what_transformers_loads(tmp_path, llama_dir):
    (tmp_path / "text.txt").write_text(TEXT * 4)
    recipe = tmp_path / "ct.squeeze"
    recipe.write_text(f'''recipe "ct-run"
model = hf("{llama_dir}", task = "causal-lm")
data text = text("text.txt")
metric ppl = perplexity(text)
stage w4: quantize {{ scheme = "int4", group_size = 32, exclude = ["lm_head"] }}
output "out" {{ format = "compressed-tensors" }}
''')
    result = squeezelang.run(recipe, output=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["runtime"] == "transformers (compressed-tensors)"
    assert type(result.model).__name__ == "CompressedTensorsModel"
    quant = _quant_config(tmp_path / "out")
    assert quant["ignore"] == ["lm_head"]
    files = ("config.json", "model.safetensors")
    assert report["metrics"]["size"]["final"] == sum((tmp_path / "out" / f).stat().st_size
                                                     for f in files)
    assert report["metrics"]["size"]["final"] < report["metrics"]["size"]["original"]
    ppl = report["metrics"]["ppl"]
    assert ppl["final"] != ppl["original"] and abs(ppl["final"] / ppl["original"] - 1) < 0.5
