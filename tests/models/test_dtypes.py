"""Half-precision checkpoints (bfloat16, float16) keep their dtype through load, stages, save and
reload; their size, estimates and reloaded outputs are exact as for float32 ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import _gpt2_tokenizer
from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models import codec, hf
from squeezelang.models.load import load_model, read_weights
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from squeezelang_plugins.sources import HfSource

FAMILIES = ("gpt2", "llama")
HALF = ("bfloat16", "float16")
IDS = torch.tensor([[5, 17, 33, 2, 64, 80, 9, 41]])
#: (stage name, technique, params); int4 groups of 16 on the tiny models' 32-wide layers.
STAGES = {
    "none": [],
    "prune": [("prune", {"method": "magnitude", "ratio": 0.5})],
    "int8": [("quantize", {"scheme": "int8"})],
    "int8-tensor": [("quantize", {"scheme": "int8", "granularity": "tensor"})],
    "int4": [("quantize", {"scheme": "int4", "group_size": 16})],
    "depth": [("prune", {"method": "depth", "layers": [1]})],  # surgery builds the model anew
    "cluster": [("share", {"method": "cluster", "bits": 4})],
    "svd": [("factorize", {"rank": 0.25})],
    "prune+int4": [("prune", {"method": "magnitude", "ratio": 0.5}),
                   ("quantize", {"scheme": "int4", "group_size": 16})],
}


def build_tiny(directory: Path, family: str, dtype: str) -> Path:
    """A tiny causal LM of ``family`` saved in ``dtype`` (``save_pretrained``: the config names it)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))
    model.to(getattr(torch, dtype)).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def half_dirs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("half")
    return {(f, d): build_tiny(root / f"{f}-{d}", f, d) for f in FAMILIES for d in HALF}


def _header_dtypes(directory: Path) -> dict[str, str]:
    return hf.safetensors_dtypes(directory / "model.safetensors")


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _run(src: Path, registries, stages, out: Path):
    """Load through the ``hf`` source, estimate and apply ``stages``, save; return the handle,
    the estimate of the saved size and the reloaded handle."""
    source = HfSource()
    args = {"path": str(src), "task": "causal-lm"}
    handle = source.load(args)
    meta = source.meta(args)
    for technique, params in stages:
        tech = registries.techniques.get(technique)
        params = {**tech.defaults(), **params}
        meta = tech.estimate(meta, params)
        tech.apply_(handle, params, Context(quiet=True))
    save_model(handle, out)
    return handle, meta.size_bytes(), load_model(out, registries)


def test_the_source_loads_and_describes_the_checkpoint_dtype(half_dirs):
    for (family, dtype), src in half_dirs.items():
        assert set(_header_dtypes(src).values()) == {dtype}
        args = {"path": str(src), "task": "causal-lm"}
        model = HfSource().load(args).model
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}, family
        meta = HfSource().meta(args)
        assert {t.dtype for t in meta.tensors.values()} == {dtype}, family
        assert meta.size_bytes() == artifact_bytes(src)


@pytest.mark.parametrize("key", [None, "torch_dtype"])
def test_a_config_without_dtype_is_described_from_the_weights(half_dirs, tmp_path, key):
    """transformers' "auto" loads such a checkpoint in its weights' dtype; the estimate follows."""
    src = tmp_path / "m"
    shutil.copytree(half_dirs[("llama", "bfloat16")], src)
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    if key:
        config[key] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    assert hf.checkpoint_dtype(src) == "bfloat16"
    args = {"path": str(src), "task": "causal-lm"}
    assert HfSource().load(args).model.dtype == torch.bfloat16
    meta = HfSource().meta(args)
    assert {t.dtype for t in meta.tensors.values()} == {"bfloat16"}
    assert meta.size_bytes() == artifact_bytes(src)


def test_checkpoint_dtype_of_a_float32_model(tiny_gpt2_dir, tmp_path):
    assert hf.checkpoint_dtype(tiny_gpt2_dir) == "float32"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(SqueezeError, match="model.safetensors"):
        hf.checkpoint_dtype(broken)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_through_a_stage(half_dirs, registries, tmp_path, family, dtype, stage):
    src = half_dirs[(family, dtype)]
    handle, estimate, back = _run(src, registries, STAGES[stage], tmp_path / "out")
    out = tmp_path / "out"
    real, original = artifact_bytes(out), artifact_bytes(src)
    torch_dtype = getattr(torch, dtype)

    # in memory and after reload: every parameter keeps the checkpoint's dtype
    assert {p.dtype for p in handle.model.parameters()} == {torch_dtype}
    assert {p.dtype for p in back.model.parameters()} == {torch_dtype}
    # on disk: dense tensors and sparse values in the checkpoint's dtype; codes, masks, scales
    stored = _header_dtypes(out)
    for name, stored_dtype in stored.items():
        suffix = next((s for s in codec.SUFFIXES if name.endswith(s)), None)
        expected = {None: dtype, codec.VALUES: dtype, codec.SCALES: "float32",
                    codec.CODEBOOK: "float32", codec.MASK: "U8", codec.INDEX: "U8"}.get(suffix)
        if suffix == codec.CODES:
            expected = "I8" if "int8" in stage else "U8"
        if stage == "cluster" and suffix == codec.CODES:
            expected = "U8"  # 4-bit indices, packed
        assert stored_dtype == expected, (name, stored_dtype)
    quantized = {k for k, v in handle.codecs.items() if "quant" in (v or {})}
    if "int" in stage:  # norms, biases and positions are not quantized, and stay half precision
        dense = [n for n in stored if not any(n.endswith(s) for s in codec.SUFFIXES)]
        assert dense and all(n not in quantized for n in dense)
        assert any("norm" in n or "ln_" in n for n in dense)

    # size: a run without stages is the original, byte for byte in the weights
    if stage == "none":
        assert (out / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
        assert abs(real - original) <= 0.01 * original
    else:
        assert real < original
    assert abs(estimate - real) <= 0.01 * real, (estimate, real)

    # metrics in memory = metrics after reload: the in-memory values are the stored ones
    mine, theirs = handle.model.state_dict(), back.model.state_dict()
    assert set(mine) == set(theirs)
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name
    assert torch.equal(_out(back.model), _out(handle.model))
    if stage == "depth":  # a random tiny block barely moves a half-precision residual stream
        assert len(back.model.base_model.state_dict()) < len(
            HfSource().load({"path": str(src), "task": "causal-lm"}).model.base_model.state_dict())
    elif stage != "none":
        original_out = _out(HfSource().load({"path": str(src), "task": "causal-lm"}).model)
        assert not torch.equal(_out(handle.model), original_out)
        assert torch.isfinite(_out(handle.model)).all()


def test_embeddings_left_out_of_int8_stay_in_the_checkpoint_dtype(half_dirs, registries, tmp_path):
    src = half_dirs[("llama", "bfloat16")]
    stages = [("quantize", {"scheme": "int8", "exclude": ["*embed_tokens", "lm_head"]})]
    handle, estimate, back = _run(src, registries, stages, tmp_path / "out")
    stored = _header_dtypes(tmp_path / "out")
    assert stored["model.embed_tokens.weight"] == stored["lm_head.weight"] == "bfloat16"
    assert stored["model.layers.0.mlp.up_proj.weight" + codec.CODES] == "I8"
    weights = read_weights(tmp_path / "out")
    assert torch.equal(weights["model.embed_tokens.weight"],
                       HfSource().load({"path": str(src), "task": "causal-lm"}).model
                       .model.embed_tokens.weight)
    assert abs(estimate - artifact_bytes(tmp_path / "out")) <= 0.01 * estimate
    assert torch.equal(_out(back.model), _out(handle.model))


# ---------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,axis,group", [(8, 0, None), (8, 1, None), (8, None, None),
                                             (4, 0, 16), (4, 1, 16), (3, 0, 7), (2, 0, None)])
def test_half_precision_weights_round_trip_exactly(dtype, bits, axis, group):
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(24, 40, generator=g) * 10.0 ** (seed % 7 - 3)).to(dtype)
        if seed % 5 == 0:
            w[3] = 0  # an all-zero channel
        fq = codec.quantize_weight(w, bits, axis, group)
        assert fq.dtype == dtype
        assert torch.equal(codec.quantize_weight(fq, bits, axis, group), fq)  # idempotent
        for spec in ({"quant": {"bits": bits, "axis": axis, "group": group}},
                     {"sparse": True, "quant": {"bits": bits, "axis": axis, "group": group}}):
            stored = codec.encode("w", fq, spec)
            assert stored["w" + codec.SCALES].dtype == torch.float32
            back = codec.decode("w", stored, spec, fq.shape, fq.dtype)
            assert back.dtype == dtype and torch.equal(back, fq)
        # the rounding is still to the nearest level (half a step, plus half-precision rounding)
        step = codec.scales_of(w.float(), bits, axis, group).max()
        assert (fq.float() - w.float()).abs().max() <= step * 0.51 + w.float().abs().max() * 2 ** -7


def test_gptq_values_are_put_on_a_half_precision_grid():
    from squeezelang.models.linear_stats import gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 48, generator=g).to(torch.bfloat16)
    x = torch.randn(200, 48, generator=g)
    q = gptq_quantize(w.float(), x.t() @ x, 4, 16)
    snapped = codec.on_grid(q, torch.bfloat16, 4, 0, 16)
    assert snapped.dtype == torch.bfloat16
    spec = {"quant": {"bits": 4, "axis": 0, "group": 16}}
    assert torch.equal(codec.decode("w", codec.encode("w", snapped, spec), spec, w.shape, w.dtype),
                       snapped)
    assert (snapped.float() - q).abs().max() <= q.abs().max() * 2 ** -7
    assert torch.equal(codec.on_grid(q, torch.float32, 4, 0, 16), q)  # float32: as it was


def test_dense_and_clustered_half_precision_tensors_keep_their_dtype():
    w = torch.randn(8, 8).to(torch.bfloat16)
    assert codec.encode("w", w, None)["w"].dtype == torch.bfloat16
    values = torch.tensor([-0.5, 0.25, 1.5]).to(torch.float16)
    c = values[torch.randint(0, 3, (6, 5))]
    spec = {"cluster": {"bits": 2}}
    stored = codec.encode("c", c, spec)
    assert torch.equal(codec.decode("c", stored, spec, c.shape, c.dtype), c)
    with pytest.raises(SqueezeError, match="floating"):
        codec.quantize_weight(torch.ones(4, 4, dtype=torch.int32))


def test_int8_kernels_are_refused_for_half_precision(half_dirs, registries, tmp_path):
    src = half_dirs[("gpt2", "bfloat16")]
    with pytest.raises(SqueezeError, match="int8-dynamic.*bfloat16.*scheme \"int8\""):
        _run(src, registries, [("quantize", {"scheme": "int8-dynamic"})], tmp_path / "out")


def test_a_packed_save_names_the_weights_dtype_in_its_config(tmp_path):
    """A model cast with ``.to`` keeps ``config.dtype`` unset; the saved config names the dtype,
    so the reloaded model is built in it (and equals the one in memory, dtype included)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from squeezelang.models.handle import ModelHandle

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4,
                                       n_positions=64)).eval().to(torch.float16)
    codec.quantize_weight_(model.transformer.h[0].mlp.c_fc.weight.data, 8, 1)
    handle = ModelHandle(model, None, "causal-lm",
                         codecs={"transformer.h.0.mlp.c_fc.weight": {"quant": {"bits": 8, "axis": 1}}})
    save_model(handle, tmp_path / "out")
    assert hf.read_config(tmp_path / "out")["dtype"] == "float16"
    back = load_model(tmp_path / "out").model
    assert back.dtype == torch.float16
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
