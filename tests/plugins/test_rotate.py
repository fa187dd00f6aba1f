"""The ``rotate`` technique: the float function kept, norms folded, sizes, reloads, refusals, and
4-bit quality on a model with outlier channels."""
from __future__ import annotations

import pytest
import torch

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.handle import ModelHandle
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from squeezelang_plugins.rotate.fuse import refusal
from squeezelang_plugins.rotate.hadamard import hadamard, hadamard_order, rotation

from conftest import SENTENCES, _gpt2_tokenizer, build_family_handle, build_tiny_llama

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
IDS = torch.randint(1, 90, (2, 24), generator=torch.Generator().manual_seed(0))


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(a, b, rel=1e-4):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def _rotate(handle, registries, **params):
    tech = registries.techniques.get("rotate")
    tech.apply_(handle, {**tech.defaults(), **params}, Context(quiet=True))
    return handle


def _llama(tie=False, outliers=1.0, seed=0, **extra):
    """A tiny random Llama causal LM with random norm weights (and biases); ``outliers`` multiplies
    three residual channels: their embedding columns and the matching weights of every norm."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, **extra)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        channels = [3, 17, 40]
        model.model.embed_tokens.weight[:, channels] *= outliers
        for layer in model.model.layers:
            layer.input_layernorm.weight[channels] *= outliers
            layer.post_attention_layernorm.weight[channels] *= outliers
    return ModelHandle(model=model, tokenizer=_gpt2_tokenizer(), task="causal-lm")


def _save_dir(handle, directory):
    handle.model.save_pretrained(directory)
    handle.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return _save_dir(_llama(tie=True), tmp_path_factory.mktemp("tied-llama"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


# ---------------------------------------------------------------------------- the matrices
@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 44, 64, 96, 112, 896])
def test_hadamard_matrices(n):
    """Sylvester, Paley I (20, 44), Paley II (28, 36) and Kronecker products (96 = 12·8, 896 = 28·32)."""
    h = hadamard(n)
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n, kind", [(64, "hadamard"), (96, "hadamard"), (100, "hadamard"),
                                     (64, "random")])
def test_rotation_is_orthogonal_and_seeded(n, kind):
    q, how = rotation(n, kind, seed=3)
    assert q.dtype == torch.float64
    assert torch.allclose(q.t() @ q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation(n, kind, seed=3)[0])
    assert not torch.equal(q, rotation(n, kind, seed=4)[0])
    if kind == "hadamard" and hadamard_order(n) is not None:
        assert "Hadamard" in how
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))  # every channel spread evenly
    else:
        assert how.startswith("random orthogonal")
    assert hadamard_order(100) is None and hadamard_order(52) is None


# ---------------------------------------------------------------------------- the float model kept
@pytest.mark.parametrize("name", ROTATABLE)
def test_rotate_keeps_the_logits_of_every_family(name, registries):
    handle = build_family_handle(name)
    fam = registries.families.for_config(handle.config)
    before = _out(handle.model)
    embedding = handle.model.model.embed_tokens.weight.detach().clone()
    _rotate(handle, registries, seed=5)
    after = _out(handle.model)
    assert _close(after, before)
    q, _ = rotation(fam.sizes(handle.config)["hidden"], "hadamard", 5)
    rotated = handle.model.model.embed_tokens.weight.detach().double()
    assert torch.allclose(rotated, embedding.double() @ q, atol=1e-6)  # E Q with the stage's Q
    for block in handle.model.model.layers:
        for norm in fam.norms:
            assert torch.equal(block.get_submodule(norm).weight, torch.ones(64))
    assert torch.equal(handle.model.model.norm.weight, torch.ones(64))
    assert handle.codecs == {} and handle.states == set() and handle.edits == []


@pytest.mark.parametrize("heads, kind", [(False, "hadamard"), (True, "random")])
def test_writer_biases_and_options(heads, kind, registries):
    """Output projections with biases (``b ← Qᵀ b``); without the per-head rotation the values are
    only rotated on the residual side; a random orthogonal matrix works as well."""
    handle = _llama(attention_bias=True, mlp_bias=True)
    v = handle.model.model.layers[0].self_attn.v_proj
    before, v_bias = _out(handle.model), v.bias.detach().clone()
    _rotate(handle, registries, heads=heads, kind=kind)
    assert _close(_out(handle.model), before)
    assert torch.equal(v.bias, v_bias) != heads  # the per-head rotation moves the value bias


def test_half_precision_differs_by_rounding_only(registries):
    handle = _llama()
    reference = _out(handle.model)
    handle.model.to(torch.bfloat16)
    rounded = _out(handle.model).float()
    _rotate(handle, registries)
    assert all(p.dtype == torch.bfloat16 for p in handle.model.parameters())
    rotated = _out(handle.model).float()
    # rotating adds about one more bfloat16 rounding of each weight: the same order of error
    assert float((rotated - reference).abs().max()) < 3 * float((rounded - reference).abs().max())


# ---------------------------------------------------------------------------- sizes, saving
def _estimate_and_save(src, registries, out_dir):
    handle = load_model(src)
    tech = registries.techniques.get("rotate")
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, tech.defaults())
    before = _out(handle.model)
    tech.apply_(handle, tech.defaults(), Context(quiet=True))
    save_model(handle, out_dir)
    return handle, before, estimate, artifact_bytes(out_dir)


def test_untied_model_saves_reloads_at_the_same_size(llama_dir, registries, tmp_path):
    handle, before, estimate, real = _estimate_and_save(llama_dir, registries, tmp_path / "out")
    assert real == artifact_bytes(llama_dir) == estimate.size_bytes()
    assert not (tmp_path / "out" / "squeeze.json").exists()  # a plain transformers checkpoint
    back = load_model(tmp_path / "out", registries)
    assert torch.equal(_out(back.model), _out(handle.model))
    assert _close(_out(squeezelang.load(tmp_path / "out")), before)


def test_tied_output_layer_is_untied_and_the_estimate_says_so(tied_llama_dir, registries, tmp_path):
    original = load_model(tied_llama_dir).model
    assert original.lm_head.weight is original.model.embed_tokens.weight
    handle, before, estimate, real = _estimate_and_save(tied_llama_dir, registries, tmp_path / "out")
    model = handle.model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert _close(_out(model), before)
    vocab_matrix = 97 * 64 * 4
    assert estimate.tensors["lm_head.weight"].shape == (97, 64)
    assert any("unties 'lm_head.weight'" in note for note in estimate.notes)
    # exact to the tensor bytes (config.json's "false" and header offsets: a few bytes)
    assert abs(estimate.size_bytes() - real) <= 8
    assert vocab_matrix <= real - artifact_bytes(tied_llama_dir) <= vocab_matrix + 120
    back = load_model(tmp_path / "out", registries).model
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    assert torch.equal(_out(back), _out(model))


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gemma_sandwich_norms_are_refused(name, registries):
    handle = build_family_handle(name)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    with pytest.raises(SqueezeError, match=f"rotate is not supported on model family '{name}'.*"
                                           "cannot absorb a rotation"):
        _rotate(handle, registries)
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())


def test_declared_refusals_match_the_structure(registries):
    """Every family whose structure cannot be rotated (``fuse.refusal``, read from its norms) also
    declares it in ``unsupported``, so ``squeeze check`` refuses it before anything runs."""
    for name in registries.families.names():
        fam = registries.families.get(name)
        assert (fam.refusal("rotate") is None) == (refusal(fam) is None), name
    assert registries.families.get("llama").refusal("rotate") is None


RECIPE = '''recipe "rotate"
model = hf("{model}", task = "{task}")
data calib = text("{data}")
{stages}
output "out" {{ format = "squeeze" }}
'''


def _recipe(tmp_path, model, stages, task="causal-lm"):
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES) + "\n")
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, task=task, data="calib.txt", stages=stages))
    return path


@pytest.mark.parametrize("fixture, task, family, reason", [
    ("tiny_gpt2_dir", "causal-lm", "gpt2", "LayerNorm's mean subtraction does not commute"),
    ("tiny_bert_dir", "embedding", "bert", "post-norm LayerNorm blocks"),
])
def test_layernorm_models_are_refused_by_check(request, fixture, task, family, reason, tmp_path):
    recipe = _recipe(tmp_path, request.getfixturevalue(fixture), "stage r: rotate { }", task)
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    [error] = info.value.errors
    assert error.message.startswith(f"stage 'r': rotate is not supported on model family "
                                    f"'{family}' yet: {reason}")
    assert (error.span.line, error.span.column) == (4, 10)


def test_other_tasks_are_refused_at_plan_time(llama_dir, registries):
    handle = load_model(llama_dir)
    meta = meta_from_model(handle.model.model, "embedding")
    meta.config = handle.model.config.to_dict()
    with pytest.raises(SqueezeError, match="rotate needs a causal-lm model: .*hidden states would "
                                           "come out rotated"):
        registries.techniques.get("rotate").estimate(meta, {})


@pytest.mark.parametrize("before", ['stage q: quantize { scheme = "int4" }',
                                    'stage p: prune { method = "magnitude", ratio = 0.5 }'])
def test_rotate_after_codes_or_zeros_is_refused(before, llama_dir, tmp_path):
    recipe = _recipe(tmp_path, llama_dir, f"{before}\nstage r: rotate {{ }}")
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    message = info.value.errors[0].message
    assert message.startswith("'rotate' cannot run on a ") and "model (stage '" in message


def test_encoded_weights_are_refused_before_anything_changes(llama_dir, registries):
    handle = load_model(llama_dir)
    handle.codecs["model.layers.0.mlp.up_proj.weight"] = {"sparse": True}
    before = _out(handle.model)
    with pytest.raises(SqueezeError, match="'model.layers.0.mlp.up_proj.weight' is already encoded"):
        _rotate(handle, registries)
    assert torch.equal(_out(handle.model), before)


# ---------------------------------------------------------------------------- with quantize
@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=pytest.mark.slow)])
def test_rotate_then_int4_end_to_end(method, tied_llama_dir, tmp_path):
    data = ", data = calib" if method == "gptq" else ""
    stages = ('stage r: rotate { }\n'
              f'stage q: quantize {{ scheme = "int4", method = "{method}", group_size = 32{data} }}')
    recipe = _recipe(tmp_path, tied_llama_dir, stages)
    planned = squeezelang.plan(recipe)
    assert [s.technique for s in planned.plan.stages] == ["rotate", "quantize"]
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    saved = result.report["metrics"]["size"]["final"]
    assert abs(saved - planned.prediction.final_size) <= 0.005 * saved
    back = load_model(tmp_path / "out")
    assert back.states == {"quantized"}
    assert back.codecs["lm_head.weight"]["quant"]["bits"] == 4  # untied, then quantized on its own
    assert torch.equal(_out(squeezelang.load(tmp_path / "out")), _out(back.model))


def test_rotation_lowers_the_int4_error_on_outlier_channels(registries):
    """Three residual channels 20× larger (embedding columns and norm weights): int4 round-to-
    nearest after ``rotate`` stays much closer to the float model than without it."""
    quantize = registries.techniques.get("quantize")
    params = {**quantize.defaults_for({"scheme": "int4"}), "scheme": "int4", "group_size": 16,
              "exclude": ["lm_head", "model.embed_tokens"]}
    reference = _out(_llama(outliers=20.0).model)
    errors = {}
    for rotated in (False, True):
        handle = _llama(outliers=20.0)
        if rotated:
            _rotate(handle, registries)
        quantize.apply_(handle, params, Context(quiet=True))
        out = _out(handle.model)
        errors[rotated] = float(((out - reference) ** 2).mean() / (reference ** 2).mean())
    assert errors[True] < 0.5 * errors[False], errors
