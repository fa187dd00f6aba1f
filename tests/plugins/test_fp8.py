"""``quantize`` ``scheme = "fp8"``: FP8 E4M3 weights of linear layers, stored as float8_e4m3fn
with float32 scales, estimated to the byte, reloaded exactly; refused where it does not apply."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models import codec
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

from conftest import build_tiny_llama

FP8 = "fp8_e4m3"
IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def _stage(src, registries, out_dir, dtype=None, **params):
    """Estimate, apply, save and reload one quantize stage on ``src`` (cast to ``dtype``)."""
    handle = load_model(src)
    if dtype is not None:
        handle.model.to(dtype)
    tech = registries.techniques.get("quantize")
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src) if dtype is None else 0
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out_dir)
    return handle, estimate, load_model(out_dir, registries)


def _stored(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _same_bits(a, b):
    """Equal values and dtype, bit for bit (a negative zero is not a zero)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.int16 if a.element_size() == 2 else torch.int32),
        b.view(torch.int16 if b.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_weights(request, fixture, granularity, registries, tmp_path):
    src = request.getfixturevalue(fixture)
    original = load_model(src).model
    out = tmp_path / "out"
    handle, estimate, back = _stage(src, registries, out, scheme="fp8", granularity=granularity)
    assert handle.states == {"quantized"} and handle.edits == []
    # linear layers only: no embedding, and GPT-2's head (tied to its embedding) stays in float
    kinds = {type(handle.model.get_submodule(k.rsplit(".", 1)[0])).__name__ for k in handle.codecs}
    assert kinds == ({"Conv1D"} if "gpt2" in fixture else {"Linear"})
    assert not any("embed" in k or k.endswith("wte.weight") for k in handle.codecs)
    if "gpt2" in fixture:
        assert "lm_head.weight" not in handle.codecs
    if "llama" in fixture:
        assert "lm_head.weight" in handle.codecs  # untied: a linear layer like the others
    for name, spec in handle.codecs.items():
        kind = type(handle.model.get_submodule(name.rsplit(".", 1)[0])).__name__
        axis = (1 if kind == "Conv1D" else 0) if granularity == "channel" else None
        assert spec == {"quant": {"bits": 8, "axis": axis, "format": FP8}}
        w = handle.model.get_parameter(name)
        assert w.dtype == torch.float32 and not torch.equal(w, original.get_parameter(name))

    # the file: float8_e4m3fn codes shaped like the weights, float32 scales, nothing else changed
    stored = _stored(out)
    for name in handle.codecs:
        codes, scales = stored[name + codec.CODES], stored[name + codec.SCALES]
        weight = handle.model.get_parameter(name)
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == weight.shape
        assert scales.dtype == torch.float32
        axis = handle.codecs[name]["quant"]["axis"]
        assert scales.shape == ((weight.shape[axis],) if axis is not None else (1,))
        assert float(codes.float().abs().max()) == 448.0  # the largest weight is E4M3's largest
        assert name not in stored
    assert all(t.dtype == torch.float32 for n, t in stored.items() if codec.CODES not in n)

    # the estimate: every stored tensor's bytes exactly, the whole artifact to the header bytes
    data = sum(t.numel() * t.element_size() for t in stored.values())
    assert data == sum(codec.stored_bytes(t.shape, t.dtype, t.codec)
                       for t in estimate.tensors.values())
    real = artifact_bytes(out)
    assert abs(estimate.size_bytes() - real) <= 0.005 * real
    # GPT-2's and BERT's embeddings are most of them, and stay in float
    assert real < (0.45 if "llama" in fixture else 0.75) * artifact_bytes(src)

    # reloaded bit for bit, and computing the same
    state, loaded = handle.model.state_dict(), back.model.state_dict()
    assert state.keys() == loaded.keys()
    for name, tensor in state.items():
        assert _same_bits(loaded[name], tensor), name
    assert back.codecs == handle.codecs
    before, after = _out(original), _out(handle.model)
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=0.1)
    assert torch.equal(_out(back.model), after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_half_precision_weights_stay_on_their_grid(tiny_llama_dir, registries, tmp_path, dtype,
                                                   granularity):
    """A half-precision weight holds ``code * scale`` rounded to its dtype: what loading gives."""
    out = tmp_path / "out"
    handle, estimate, back = _stage(tiny_llama_dir, registries, out, dtype=dtype, scheme="fp8",
                                    granularity=granularity)
    stored = _stored(out)
    for name in handle.codecs:
        assert handle.model.get_parameter(name).dtype == dtype
        assert stored[name + codec.CODES].dtype == torch.float8_e4m3fn
        assert stored[name + codec.SCALES].dtype == torch.float32
    assert stored["model.embed_tokens.weight"].dtype == dtype  # left as it was
    data = sum(t.numel() * t.element_size() for t in stored.values())
    assert data == sum(codec.stored_bytes(t.shape, t.dtype, t.codec)
                       for t in estimate.tensors.values())
    state, loaded = handle.model.state_dict(), back.model.state_dict()
    for name, tensor in state.items():
        assert _same_bits(loaded[name], tensor), name


@pytest.mark.parametrize("spec", [
    {"axis": 0}, {"axis": 1}, {"axis": None}, {"axis": 0, "group": 16},
], ids=["rows", "columns", "tensor", "groups"])
@pytest.mark.parametrize("zeros", [None, "sparse", "nm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_round_trip(spec, zeros, dtype):
    """The fp8 codec alone: with group-wise scales, and with pruned zeros (a bitmask, or N:M runs
    of 2:4), encode and decode give the fake-quantized tensor back bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(24, 48)
    w[3] *= 40
    w[5] = 0  # an all-zero channel
    if zeros == "nm":
        runs = w.reshape(-1, 4)
        runs.scatter_(1, runs.abs().argsort(1)[:, :2], 0)
    elif zeros == "sparse":
        w[w.abs() < 0.7] = 0
    q = codec.quantize_weight(w.to(dtype), 8, spec["axis"], spec.get("group"), FP8)
    assert q.dtype == dtype
    full = {"quant": {"bits": 8, **spec, "format": FP8}}
    if zeros:
        full[zeros] = True if zeros == "sparse" else [2, 4]
    stored = codec.encode("w", q, full)
    assert stored["w" + codec.CODES].dtype == torch.float8_e4m3fn
    assert set(stored) == set(codec.stored_names("w", full))
    assert _same_bits(codec.decode("w", stored, full, q.shape, dtype), q)
    density = float((q != 0).float().mean())
    size = codec.stored_bytes(q.shape, str(dtype), {**full, "density": density}
                              if zeros == "sparse" else full)
    assert size == sum(t.numel() * t.element_size() for t in stored.values())


def test_codec_refuses_what_is_not_on_its_grid():
    w = codec.quantize_weight(torch.randn(8, 16), 8, 0, code_format=FP8)
    spec = {"quant": {"bits": 8, "axis": 0, "format": FP8}}
    with pytest.raises(SqueezeError, match="not on its fp8_e4m3 quantization grid"):
        codec.encode("w", w + 1e-3, spec)
    with pytest.raises(SqueezeError, match="codec quant format must be one of"):
        codec.normalize({"quant": {"bits": 8, "format": "fp8_e5m2"}})
    with pytest.raises(SqueezeError, match="has 8-bit codes, not bits = 4"):
        codec.normalize({"quant": {"bits": 4, "format": FP8}})
    stored = codec.encode("w", w, spec)
    stored["w" + codec.CODES] = stored["w" + codec.CODES].view(torch.int8)
    with pytest.raises(SqueezeError, match="fp8_e4m3 codes stored as torch.int8"):
        codec.decode("w", stored, spec, w.shape, torch.float32)


def test_fp8_rounding_is_relative():
    """E4M3 rounds every value to within 1/16 of itself (3 mantissa bits) down to its smallest
    normal (2**-6 of the scale); below, to within half a subnormal step (2**-10 of the scale)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-4, 1, 256)
    for axis in (0, None):
        q = codec.quantize_weight(w, 8, axis, code_format=FP8)
        scales = codec.scales_of(q, 8, axis, code_format=FP8)
        scale = scales.reshape(-1, 1) if axis == 0 else scales
        normal = w.abs() >= 2 ** -6 * scale
        err = (q - w).abs()
        assert normal.any() and (~normal).any()
        assert bool((err[normal] <= w.abs()[normal] * 2 ** -4 * (1 + 1e-5)).all())
        assert bool((err[~normal] <= (2 ** -10 * scale * (1 + 1e-5)).expand_as(w)[~normal]).all())


def test_fp8_beats_int8_per_tensor_on_a_weight_with_outliers():
    """One scale per tensor: int8's even steps are set by the outliers and swamp the ordinary
    weights; E4M3's steps follow each value's magnitude. (On a plain Gaussian weight, without
    outliers, int8's 255 even levels are the more precise: fp8 is no free lunch.)"""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    plain = w.clone()
    w.view(-1)[torch.randperm(w.numel())[:20]] *= 50

    def error(t, code_format=None):
        return float((codec.quantize_weight(t, 8, None, code_format=code_format) - t).norm()
                     / t.norm())

    assert error(w, FP8) < 0.3 * error(w)
    assert error(plain) < error(plain, FP8)


@pytest.mark.parametrize("params, key, message", [
    ({"group_size": 32}, "group_size", "'group_size' applies to schemes \"int4\" and \"mixed\" "
                                       "only, not \"fp8\""),
    ({"bits": [4, 8]}, "bits", "'bits' applies to scheme \"mixed\" only, not \"fp8\""),
    ({"method": "gptq"}, "method", "method \"gptq\" needs scheme \"int4\" or \"mixed\", not "
                                   "\"fp8\""),
])
def test_options_that_do_not_apply(registries, params, key, message):
    tech = registries.techniques.get("quantize")
    assert tech.check({"scheme": "fp8", **params}) == [(key, message)]
    assert set(tech.defaults_for({"scheme": "fp8"})) == {"scheme", "granularity", "include",
                                                         "exclude"}
    assert tech.stores_for({"scheme": "fp8"}) == {"fp8"}
    assert tech.stores_for({"scheme": "fp8", "granularity": "tensor"}) == {"fp8", "per-tensor"}


@pytest.mark.parametrize("include, module", [
    (["model.embed_tokens"], "Embedding 'model.embed_tokens'"),
    (["model.layers.*", "*embed*"], "Embedding 'model.embed_tokens'"),
])
def test_embeddings_are_refused_not_ignored(tiny_llama_dir, registries, include, module):
    tech = registries.techniques.get("quantize")
    params = {**tech.defaults_for({"scheme": "fp8"}), "scheme": "fp8", "include": include}
    handle = load_model(tiny_llama_dir)
    message = (r"scheme \"fp8\" quantizes linear layers only .* and include "
               + re.escape(f"'{include[-1]}' selects {module}"))
    with pytest.raises(SqueezeError, match=message):
        tech.estimate(meta_from_model(handle.model, handle.task), params)
    with pytest.raises(SqueezeError, match=message):
        tech.apply_(handle, params, Context(quiet=True))
    assert handle.codecs == {}


def test_a_head_tied_to_its_embedding_is_the_only_choice(tiny_gpt2_dir, registries):
    tech = registries.techniques.get("quantize")
    handle = load_model(tiny_gpt2_dir)
    params = {**tech.defaults_for({"scheme": "fp8"}), "scheme": "fp8", "include": ["lm_head"]}
    logs = []
    ctx = Context(quiet=True)
    ctx.log = logs.append
    with pytest.raises(SqueezeError, match="found no linear layer to quantize"):
        tech.apply_(handle, params, ctx)
    assert logs == ["quantize: 'lm_head' shares its weight with Embedding 'transformer.wte', "
                    "which scheme \"fp8\" leaves in float: left in float"]


def test_int8_embeddings_then_fp8_linears(tiny_llama_dir, registries, tmp_path):
    """Two stages on disjoint layers: the embedding as int8, the linear layers as fp8."""
    tech = registries.techniques.get("quantize")
    handle = load_model(tiny_llama_dir)
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, tiny_llama_dir)
    first = {**tech.defaults_for({"scheme": "int8"}), "include": ["model.embed_tokens"]}
    second = {**tech.defaults_for({"scheme": "fp8"}), "scheme": "fp8"}
    estimate = tech.estimate(tech.estimate(meta, first), second)
    for params in (first, second):
        tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, tmp_path / "out")
    stored = _stored(tmp_path / "out")
    assert stored["model.embed_tokens.weight" + codec.CODES].dtype == torch.int8
    assert stored["model.layers.0.mlp.up_proj.weight" + codec.CODES].dtype == torch.float8_e4m3fn
    assert sum(t.numel() * t.element_size() for t in stored.values()) == sum(
        codec.stored_bytes(t.shape, t.dtype, t.codec) for t in estimate.tensors.values())
    back = load_model(tmp_path / "out", registries)
    assert torch.equal(_out(back.model), _out(handle.model))
    with pytest.raises(SqueezeError, match="already quantized by an earlier stage"):
        tech.apply_(handle, second, Context(quiet=True))


@pytest.mark.parametrize("prune", [{"method": "nm", "n": 2, "m": 4}, {"ratio": 0.5}],
                         ids=["2:4", "magnitude"])
def test_pruned_then_fp8(tiny_llama_dir, registries, tmp_path, prune):
    """2:4 (or unstructured) zeros, then FP8: the file holds the kept values' float8 codes only,
    as the estimate says, and the reload is exact."""
    handle = load_model(tiny_llama_dir)
    meta = meta_from_model(handle.model, handle.task)
    stages = [(registries.techniques.get("prune"), prune),
              (registries.techniques.get("quantize"), {"scheme": "fp8"})]
    for tech, params in stages:
        params = {**tech.defaults_for(params), **params}
        meta = tech.estimate(meta, params)
        tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, tmp_path / "out")
    stored = _stored(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    assert set(handle.codecs[name]) == {"quant", "nm" if "n" in prune else "sparse"}
    codes = stored[name + codec.CODES]
    assert codes.dtype == torch.float8_e4m3fn and codes.ndim == 1
    weight = handle.model.get_parameter(name)
    # 2:4 keeps two values of every four (zeros among them included); a bitmask, the nonzeros
    assert codes.numel() == (weight.numel() // 2 if "n" in prune else int((weight != 0).sum()))
    data = sum(t.numel() * t.element_size() for t in stored.values())
    predicted = sum(codec.stored_bytes(t.shape, t.dtype, t.codec) for t in meta.tensors.values())
    if "n" in prune:  # N:M: the kept count is known in advance
        assert data == predicted
    else:  # unstructured: estimated at the planned density
        assert abs(data - predicted) <= 0.01 * data
    back = load_model(tmp_path / "out", registries)
    for key, tensor in handle.model.state_dict().items():
        assert _same_bits(back.model.state_dict()[key], tensor), key


RECIPE = '''recipe "fp8"
model = hf("{model}", task = "causal-lm")
data calib = text("{data}")
metric ppl = perplexity(calib)
stage f: quantize {{ scheme = "fp8"{extra} }}
output "out" {{ format = "{format}"{options} }}
'''


def _check(tmp_path, model, data, fmt, extra="", options=""):
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, data=data, format=fmt, extra=extra, options=options))
    try:
        squeezelang.check(path)
    except RecipeErrors as exc:
        return [(e.span.line, e.message) for e in exc.errors]
    return []


def test_formats_say_what_they_hold(tmp_path, tiny_llama_dir, sentences_file):
    onnx = _check(tmp_path, tiny_llama_dir, sentences_file, "onnx")
    assert onnx == [(5, "stage 'f': output format 'onnx' cannot hold this: FP8 (E4M3) weights: "
                        "ONNX Runtime's CPU kernels have no float8 matrix product, and dequantized "
                        "they would be float32, four times larger; use format = "
                        "\"compressed-tensors\" (vLLM) or \"squeeze\"")]
    gguf = _check(tmp_path, tiny_llama_dir, sentences_file, "gguf")
    assert len(gguf) == 1 and gguf[0][0] == 5
    assert "FP8 (E4M3) codes have no GGUF type" in gguf[0][1]
    assert "type = \"F32\" (exact)" in gguf[0][1]
    assert _check(tmp_path, tiny_llama_dir, sentences_file, "gguf", options=', type = "F32"') == []
    assert _check(tmp_path, tiny_llama_dir, sentences_file, "squeeze") == []
    assert _check(tmp_path, tiny_llama_dir, sentences_file, "dense",
                  extra=', granularity = "tensor"') == []


def test_formats_refuse_fp8_codes_when_saving(tiny_llama_dir, registries, tmp_path):
    """Past ``squeeze check`` (the Python API): onnx and gguf's integer paths refuse float8 codes
    by tensor; gguf's F32 writes them dequantized, exactly."""
    pytest.importorskip("gguf")
    pytest.importorskip("onnx")
    import gguf

    handle = load_model(tiny_llama_dir)
    tech = registries.techniques.get("quantize")
    tech.apply_(handle, {**tech.defaults_for({"scheme": "fp8"}), "scheme": "fp8"},
                Context(quiet=True))
    formats = registries.output_formats
    with pytest.raises(SqueezeError, match="format onnx: '.*' holds fp8_e4m3 codes: FP8 \\(E4M3\\) "
                                           "weights: ONNX Runtime's CPU kernels"):
        formats.get("onnx").save(handle, tmp_path / "onnx", {})
    for kind in ("auto", "Q8_0"):
        with pytest.raises(SqueezeError, match="holds fp8_e4m3 codes: FP8 \\(E4M3\\) codes have "
                                               "no GGUF type"):
            formats.get("gguf").save(handle, tmp_path / kind, {"type": kind})
    formats.get("gguf").save(handle, tmp_path / "f32", {"type": "F32"})
    manifest = json.loads((tmp_path / "f32" / "gguf.json").read_text())["tensors"]
    assert manifest["blk.0.ffn_up.weight"]["source"] == "dequantized codes"
    reader = gguf.GGUFReader(str(tmp_path / "f32" / "model.gguf"))
    [up] = [t for t in reader.tensors if t.name == "blk.0.ffn_up.weight"]
    assert torch.equal(torch.from_numpy(up.data.copy()),
                       handle.model.model.layers[0].mlp.up_proj.weight.detach())


def test_quantized_weights_name_their_code_format(tiny_llama_dir, registries):
    """What an output format reads: float8 codes, flagged, so that an integer path refuses them."""
    from squeezelang.plugin import quantized_weights

    handle = load_model(tiny_llama_dir)
    tech = registries.techniques.get("quantize")
    tech.apply_(handle, {**tech.defaults_for({"scheme": "fp8"}), "scheme": "fp8"},
                Context(quiet=True))
    weights = quantized_weights(handle)
    assert len(weights) == 15
    for name, q in weights.items():
        assert q.code_format == FP8 and q.codes.dtype == torch.float8_e4m3fn
        assert torch.equal(q.dequantized(), handle.model.state_dict()[name])


def test_run_end_to_end(tmp_path, tiny_llama_dir):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=tiny_llama_dir, data="text.txt", format="squeeze",
                                    extra=', exclude = ["lm_head"]', options=""))
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    saved = result.report["metrics"]["size"]["final"]
    assert abs(saved - planned.prediction.final_size) <= 0.005 * saved
    assert saved < 0.6 * result.report["metrics"]["size"]["original"]  # embedding, head: float
    back = load_model(tmp_path / "out")
    assert back.codecs["model.layers.0.self_attn.q_proj.weight"]["quant"]["format"] == FP8
    assert "lm_head.weight" not in back.codecs
    assert torch.equal(_out(squeezelang.load(tmp_path / "out")), _out(back.model))
    ppl = result.report["metrics"]["ppl"]
    assert ppl["final"] != ppl["original"] and abs(ppl["final"] / ppl["original"] - 1) < 0.1
