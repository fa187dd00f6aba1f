"""``quantize`` method ``awq``: activation-aware scales folded where the family allows, clipping
searched per group, the standard int4 group codec on disk."""
from __future__ import annotations

import csv
import sys

import pytest
import torch

import squeezelang
from squeezelang.errors import PluginError, RecipeErrors, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.hooks.family import ModelFamily
from squeezelang.models.forward import outputs_for_fidelity
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.scale_pairs import fold_scales_, scale_pairs
from squeezelang.models.select import kind_of, output_axis
from squeezelang.models.size import artifact_bytes

from conftest import (FAMILY_CONFIGS, SENTENCES, build_family_handle, build_tiny_bert,
                      build_tiny_gpt2, build_tiny_llama, calib_context)

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
#: Texts the quality test measures on (the calibration texts are ``SENTENCES``).
HELD_OUT = ["the green tree is near the blue river", "a small bird sings on the old house",
            "people read books in the city park", "the lazy cat sleeps under the red car"]
MODELS = ["bert", "gpt2", "llama", "llama-gqa"]


def _mha_llama_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(**{**kwargs, "num_key_value_heads": kwargs["num_attention_heads"]})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny models by name: Llama with 4 key/value heads, and with 2 (grouped-query)."""
    root = tmp_path_factory.mktemp("awq-models")
    return {"bert": build_tiny_bert(root / "bert"), "gpt2": build_tiny_gpt2(root / "gpt2"),
            "llama": build_tiny_llama(root / "llama", config_cls=_mha_llama_config),
            "llama-gqa": build_tiny_llama(root / "llama-gqa")}


def _ctx(texts=SENTENCES) -> Context:
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    return ctx


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _params(tech, **params):
    return {**tech.defaults_for(params), **params}


# ---------------------------------------------------------------------------- folding
def _fold_random_(model) -> list:
    """Fold random scales (0.25 .. 4.25) at every pair; return the pairs."""
    pairs = scale_pairs(model)
    g = torch.Generator().manual_seed(0)
    for pair in pairs:
        reader = model.get_submodule(pair.consumers[0])
        inputs = reader.weight.shape[1 - output_axis(kind_of(reader))]
        fold_scales_(model, pair, torch.rand(pair.channels(inputs), generator=g) * 4 + 0.25)
    return pairs


@pytest.mark.parametrize("name", MODELS)
def test_folding_alone_keeps_the_float_model(name, model_dirs):
    model = load_model(model_dirs[name]).model
    before = _out(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    pairs = _fold_random_(model)
    assert torch.allclose(_out(model), before, atol=1e-5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    producers = {p.producer.rsplit(".", 1)[-1] for p in pairs}
    if name == "bert":  # post-norm: its LayerNorms feed the residual too, only values fold
        assert producers == {"value"} and not any("LayerNorm" in n for n in changed)
    elif name == "gpt2":  # pre-norm, plain MLP: the norms and the fused qkv's values
        assert producers == {"ln_1", "ln_2", "c_attn"}
    else:
        assert producers == {"input_layernorm", "post_attention_layernorm", "v_proj", "up_proj"}
        assert "model.layers.1.input_layernorm.weight" in changed


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_folding_alone_keeps_every_decoder_family(family):
    """Gemma's ``x · (1 + w)`` norms, Phi-3's fused qkv and gate_up, GQA everywhere."""
    model = build_family_handle(family).model
    before = _out(model)
    pairs = _fold_random_(model)
    assert len(pairs) == 4 * model.config.num_hidden_layers
    assert torch.allclose(_out(model), before, atol=1e-5)


def test_input_norms_must_name_a_norm_and_a_sublayer():
    base = dict(name="x", model_types=("x",), blocks="h", q="q", k="k", v="v", o="o",
                mlp_in=("up",), mlp_out="down", layers_key="n", hidden_key="d", heads_key="h",
                inner_key="i", norms=("ln",), embeddings=("emb",))
    ModelFamily(**base, input_norms=(("ln", "mlp"),)).validate_definition()
    for wrong in ((("ln2", "mlp"),), (("ln", "ffn"),)):
        with pytest.raises(PluginError, match="input_norms"):
            ModelFamily(**base, input_norms=wrong).validate_definition()


# ---------------------------------------------------------------------------- the stage
def _stage(src, registries, out_dir, handle=None, **params):
    """Apply one quantize stage: (handle, estimated size, saved size, reloaded handle)."""
    handle = handle or load_model(src)
    tech = registries.techniques.get("quantize")
    params = _params(tech, **params)
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, _ctx())
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


@pytest.mark.parametrize("name", MODELS)
def test_awq_saves_the_int4_codec_exactly(name, model_dirs, registries, tmp_path):
    src = model_dirs[name]
    original = load_model(src).model
    handle, estimate, real, back = _stage(src, registries, tmp_path / "awq", scheme="int4",
                                          method="awq", data="calib", group_size=16)
    _, _, rtn_size, _ = _stage(src, registries, tmp_path / "rtn", scheme="int4", group_size=16)
    assert real == rtn_size  # the same codec, byte for byte the size of rtn's file
    assert abs(estimate - real) / real < 0.002  # (as close as rtn's estimate)
    linear = next(n for n, m in handle.model.named_modules() if kind_of(m) in ("Linear", "Conv1D")
                  and ".0." in n)
    assert handle.codecs[f"{linear}.weight"] == {
        "quant": {"bits": 4, "axis": output_axis(kind_of(handle.model.get_submodule(linear))),
                  "group": 16}}
    assert not torch.equal(_out(handle.model), _out(original))
    assert torch.equal(_out(back.model), _out(handle.model))
    assert back.codecs == handle.codecs


RECIPE = '''
model = hf("{model}", task = "{task}")
data calib = text("{calib}")
stage q: quantize {{ scheme = "int4", method = "awq", data = calib, group_size = 16 }}
'''


@pytest.mark.parametrize("name", MODELS)
def test_awq_recipe_runs_and_reloads(name, model_dirs, registries, sentences_file, tmp_path):
    task = "embedding" if name == "bert" else "causal-lm"
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model_dirs[name], task=task, calib=sentences_file))
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    saved = result.report["metrics"]["size"]["final"]
    assert abs(planned.prediction.final_size - saved) / saved < 0.002  # json headers aside, exact
    log = " ".join(result.report["stages"][0]["log"])
    assert "quantize awq: scales folded at" in log and "groups clipped" in log
    # the reloaded artifact is the model the stage left in memory (the stage is deterministic)
    handle, _, _, _ = _stage(model_dirs[name], registries, tmp_path / "again", scheme="int4",
                             method="awq", data="calib", group_size=16)
    model = squeezelang.load(tmp_path / "out")
    assert torch.equal(_out(model), _out(handle.model))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_awq_on_every_decoder_family(family, registries, tmp_path):
    handle = build_family_handle(family)
    before = _out(handle.model)
    tech = registries.techniques.get("quantize")
    tech.apply_(handle, _params(tech, scheme="int4", method="awq", data="calib", group_size=16),
                calib_context())
    save_model(handle, tmp_path)
    back = load_model(tmp_path, registries)
    assert torch.equal(_out(back.model), _out(handle.model))
    assert torch.nn.functional.cosine_similarity(_out(handle.model).flatten(),
                                                 before.flatten(), dim=0) > 0.9


def test_awq_with_mixed_widths(model_dirs, registries, tmp_path):
    handle, estimate, real, back = _stage(model_dirs["llama-gqa"], registries, tmp_path / "m",
                                          scheme="mixed", method="awq", data="calib",
                                          group_size=16, avg_bits=4)
    assert real <= estimate
    assert torch.equal(_out(back.model), _out(handle.model))


def test_scales_skip_what_an_earlier_stage_quantized(model_dirs, registries, tmp_path):
    """v_proj int8 first: the norm before q/k/v cannot scale v's inputs, nor o's pair fold into v;
    an excluded up_proj stays float but still absorbs the MLP norm's scales and gives down its."""
    src = model_dirs["llama-gqa"]
    handle, _, _, _ = _stage(src, registries, tmp_path / "a", scheme="int8",
                             include=["*.v_proj"])
    v = {n: p.clone() for n, p in handle.model.named_parameters() if "v_proj" in n}
    up = handle.model.get_parameter("model.layers.0.mlp.up_proj.weight").clone()
    ctx = _ctx()
    ctx.stage = "q"
    tech = registries.techniques.get("quantize")
    tech.apply_(handle, _params(tech, scheme="int4", method="awq", data="calib", group_size=16,
                                exclude=["*.v_proj", "*.up_proj"]), ctx)
    log = " ".join(ctx.logs["q"])
    assert "no scales at 4 place(s)" in log and "already quantized" in log, log
    assert all(torch.equal(p, v[n]) for n, p in handle.model.named_parameters() if n in v)
    scaled = handle.model.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight" not in handle.codecs and not torch.equal(scaled, up)
    save_model(handle, tmp_path / "b")  # refuses a weight moved off its grid
    back = load_model(tmp_path / "b", registries)
    assert torch.equal(_out(back.model), _out(handle.model))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("stage, message", [
    ('stage s: quantize { scheme = "int4", method = "awq" }',
     'method "awq" needs calibration data'),
    ('stage s: quantize { scheme = "int8", method = "awq", data = calib }',
     'method "awq" needs scheme "int4" or "mixed", not "int8"'),
    ('stage s: quantize { scheme = "int4", method = "rtn", samples = 8 }',
     '\'samples\' applies to methods "gptq" and "awq" only'),
])
def test_check_errors(stage, message, model_dirs, sentences_file):
    recipe = f'model = hf("{model_dirs["bert"]}", task = "embedding")\n' \
             f'data calib = text("{sentences_file}")\n{stage}\n'
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    assert any(message in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


def test_apply_refuses_what_check_refuses(model_dirs, registries):
    tech = registries.techniques.get("quantize")
    with pytest.raises(SqueezeError, match='method "awq" needs calibration data'):
        tech.apply_(load_model(model_dirs["bert"]), {"scheme": "int4", "method": "awq"}, _ctx())
    with pytest.raises(SqueezeError, match='method "awq" needs scheme "int4" or "mixed"'):
        tech.apply_(load_model(model_dirs["bert"]), {"scheme": "int8", "method": "awq",
                                                     "data": "calib"}, _ctx())


# ---------------------------------------------------------------------------- quality
def _with_outliers(src):
    """The tiny Llama with a few hidden channels 30x louder after every pre-attention and
    pre-MLP norm: the inputs of q/k/v and gate/up get outlier channels, as real LLMs' do."""
    handle = load_model(src)
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[3, 11, 20]] *= 30
    return handle


def _lm_error(handle, reference) -> float:
    out = outputs_for_fidelity(handle, HELD_OUT)
    return float((out - reference).pow(2).sum() / reference.pow(2).sum())


def test_awq_beats_rtn_on_outlier_channels(model_dirs, registries, tmp_path):
    src = model_dirs["llama-gqa"]
    reference = outputs_for_fidelity(_with_outliers(src), HELD_OUT)
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        extra = {"data": "calib"} if method != "rtn" else {}
        handle, _, _, _ = _stage(src, registries, tmp_path / method, handle=_with_outliers(src),
                                 scheme="int4", method=method, group_size=16,
                                 exclude=["*embed_tokens", "lm_head"], **extra)
        errors[method] = _lm_error(handle, reference)
    # measured: rtn 0.18, gptq 0.036, awq 0.019 (scales alone 0.033, clipping alone 0.024)
    assert errors["awq"] < 0.5 * errors["rtn"] and errors["awq"] < errors["gptq"], errors


@pytest.mark.slow
def test_awq_minilm_against_rtn_and_gptq(minilm_dir, shared_data, registries, tmp_path):
    """Calibrated on 128 STS-B train sentences, measured on every 10th STS-B dev pair (300
    sentences of every genre). Measured: rtn 0.9383, gptq 0.9631, awq 0.9664. (On texts like
    the calibration ones GPTQ fits closer: the first 128 dev sentences, captions like the first
    train ones, give gptq 0.9887, awq 0.9781.)"""
    with open(shared_data / "stsb-en-dev.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))[::10]
    texts = [r[0] for r in rows] + [r[1] for r in rows]
    with open(shared_data / "stsb-en-train.csv", encoding="utf-8") as f:
        calib = [row[0] for row in csv.reader(f)][:128]
    reference = outputs_for_fidelity(load_model(minilm_dir), texts)
    scores, sizes = {}, {}
    for method in ("rtn", "gptq", "awq"):
        handle = load_model(minilm_dir)
        tech = registries.techniques.get("quantize")
        params = _params(tech, scheme="int4", method=method, exclude=["embeddings.*"],
                         **({"data": "calib"} if method != "rtn" else {}))
        tech.apply_(handle, params, _ctx(calib))
        save_model(handle, tmp_path / method)
        sizes[method] = artifact_bytes(tmp_path / method)
        out = outputs_for_fidelity(handle, texts)
        scores[method] = float(torch.nn.functional.cosine_similarity(out, reference).mean())
        print(f"minilm int4 {method}: cosine {scores[method]:.4f}", file=sys.stderr)
    assert sizes["rtn"] == sizes["gptq"] == sizes["awq"]
    assert scores["awq"] > scores["rtn"] + 0.02
    assert scores["awq"] > scores["gptq"] - 0.001, scores
