"""``format = "gguf"``: the recipe's own codes in Q8_0/Q4_0 blocks, run by llama.cpp (or, without
it, read back and dequantized in torch), refusals before anything runs, and a whole run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.models.handle import ModelHandle
from squeezelang.models.load import load_model

from conftest import SENTENCES, _gpt2_tokenizer, build_family_handle, build_tiny_llama, calib_context

gguf = pytest.importorskip("gguf", reason="gguf is the optional 'gguf' extra")

from squeezelang_plugins.gguf_format import GgufFormat  # noqa: E402
from squeezelang_plugins.gguf_format.runtime import FALLBACK  # noqa: E402

F32 = {"type": "F32", "float_type": "F32"}
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional 'llama' extra")


def _tiny_llama(directory: Path) -> Path:
    """A tiny Llama whose every row length (hidden 32, MLP 64) fills whole blocks of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_dir) -> dict[str, Path]:
    from conftest import build_tiny_gpt2

    return {"gpt2": build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2")), "llama": llama_dir}


def _quantized(src: Path, registries, **params) -> ModelHandle:
    handle = load_model(src, task="causal-lm")
    tech = registries.techniques.get("quantize")
    tech.apply_(handle, {**tech.defaults_for(params), **params}, calib_context())
    return handle


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(s) for s in SENTENCES[:3]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _diff(a, b, mask) -> float:
    keep = mask.bool()
    return float((a[keep] - b[keep]).abs().max())


def _saved(handle, directory, **options):
    fmt = GgufFormat()
    files = fmt.save(handle, directory, {**fmt.defaults(), **options})
    return fmt, files


# ---------------------------------------------------------------------------- reading blocks back
def _reader_tensor(path: Path, name: str):
    return next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)


def _blocks(t) -> tuple[np.ndarray, np.ndarray]:
    """``(d, codes)`` of a Q8_0/Q4_0 tensor: float32 block scales ``[rows, blocks]`` and int codes
    ``[rows, cols]`` (Q4_0: nibble - 8), decoded here independently of the plugin."""
    cols, rows = (int(x) for x in t.shape)
    width = 34 if t.tensor_type.name == "Q8_0" else 18
    raw = np.asarray(t.data).view(np.uint8).reshape(rows, cols // 32, width)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if width == 34:
        codes = raw[..., 2:].copy().view(np.int8).astype(np.int32)
    else:
        packed = raw[..., 2:].astype(np.int32)
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1) - 8
    return d, codes.reshape(rows, cols)


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as a row order."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _scale_map(q) -> np.ndarray:
    """Each value's scale, in the weight's own layout (written out here, case by case)."""
    s, shape = q.scales.numpy(), tuple(q.codes.shape)
    if q.axis is None:
        return np.full(shape, float(s.reshape(-1)[0]), dtype=np.float32)
    if q.group is None:
        return np.broadcast_to(s.reshape(-1, 1) if q.axis == 0 else s.reshape(1, -1), shape)
    if q.axis == 0:  # [out, in], groups of inputs along each row
        return np.repeat(s, q.group, axis=1)[:, :shape[1]]
    return np.repeat(s, q.group, axis=1)[:, :shape[0]].T  # Conv1D [in, out]


def _expected(q, gguf_name: str, conv1d: bool, config) -> tuple[np.ndarray, np.ndarray]:
    """The codes and float16 block scales the GGUF must hold for a ``QuantizedWeight``."""
    codes, scale = q.codes.numpy().astype(np.int32), _scale_map(q)
    assert np.array_equal(codes.astype(np.float32) * scale, q.dequantized().numpy())
    if conv1d:
        codes, scale = codes.T, scale.T
    if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
        heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
        order = _rope_rows(codes.shape[0], heads)
        codes, scale = codes[order], scale[order]
    blocks = scale.reshape(codes.shape[0], -1, 32)
    assert (blocks == blocks[..., :1]).all()
    return codes, blocks[..., 0].astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------- exact codes
@pytest.mark.parametrize("family, params, qtype", [
    ("gpt2", {"scheme": "int8"}, "Q8_0"),
    ("llama", {"scheme": "int8", "granularity": "tensor"}, "Q8_0"),
    ("llama", {"scheme": "int4", "group_size": 32}, "Q4_0"),
    ("gpt2", {"scheme": "int4", "group_size": 64}, "Q4_0"),
    ("gpt2", {"scheme": "int8-dynamic"}, "Q8_0"),  # int8 kernels swapped in: the same codes
])
def test_quantized_weights_are_written_from_their_codes(models, registries, tmp_path, family,
                                                        params, qtype):
    from squeezelang.plugin import quantized_weights

    handle = _quantized(models[family], registries, **params)
    _saved(handle, tmp_path)
    manifest = json.loads((tmp_path / "gguf.json").read_text())
    names = {t["source"] for t in manifest["tensors"].values()}
    assert "reference" not in names  # nothing was quantized a second time
    weights = quantized_weights(handle)
    from squeezelang_plugins.gguf_format.tensors import name_map
    from squeezelang_plugins.gguf_format.names import ARCHS

    mapping = name_map(ARCHS[family], handle.model.config.num_hidden_layers
                       if family == "llama" else handle.model.config.n_layer)
    checked = 0
    for name, q in weights.items():
        gguf_name = mapping.get_name(name, try_suffixes=(".weight",))
        t = _reader_tensor(tmp_path / "model.gguf", gguf_name)
        assert t.tensor_type.name == qtype, gguf_name
        assert manifest["tensors"][gguf_name]["source"] == "codes"
        d, codes = _blocks(t)
        conv1d = family == "gpt2" and ".h." in name  # GPT-2's block weights are Conv1D [in, out]
        want_codes, want_d = _expected(q, gguf_name, conv1d, handle.model.config)
        assert np.array_equal(codes, want_codes), gguf_name
        assert np.array_equal(d, want_d), gguf_name
        checked += 1
    assert checked == len(weights) >= 8
    # float16 block scales: the only rounding, reported
    assert 0 < manifest["scale_rounding_max_relative"] <= 2 ** -11


# ---------------------------------------------------------------------------- llama.cpp runs it
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_float_weights_run_in_llama_cpp_like_torch(models, tmp_path, family):
    _llama_cpp()
    handle = load_model(models[family], task="causal-lm")
    fmt, files = _saved(handle, tmp_path, **F32)
    assert {"model.gguf", "config.json", "tokenizer.json", "gguf.json"} <= set(files)
    loaded = fmt.load(tmp_path, "causal-lm", F32, threads=2)
    assert loaded.model.runtime.startswith("llama.cpp")
    ids, mask = _batch(handle.tokenizer)
    ours, theirs = _logits(handle.model, ids, mask), _logits(loaded.model, ids, mask)
    scale = float(ours.abs().max())
    assert _diff(ours, theirs, mask) < 2e-3 * scale
    assert float(theirs[~mask.bool()].abs().max()) == 0.0  # padding positions are zero
    # counts: every weight once (GPT-2's tied head is llama.cpp's token embedding), float32 bytes
    params = sum(p.numel() for p in handle.model.parameters())
    assert loaded.model.counts.params == params
    assert loaded.model.counts.memory == 4 * params < (tmp_path / "model.gguf").stat().st_size


@pytest.mark.parametrize("params", [{"scheme": "int8"}, {"scheme": "int4", "group_size": 32}])
def test_quantized_model_runs_in_llama_cpp_like_in_memory(llama_dir, registries, tmp_path, params):
    _llama_cpp()
    original = load_model(llama_dir, task="causal-lm")
    handle = _quantized(llama_dir, registries, **params)
    fmt, _ = _saved(handle, tmp_path)
    loaded = fmt.load(tmp_path, "causal-lm", {}, threads=2)
    ids, mask = _batch(handle.tokenizer)
    ours = _logits(handle.model, ids, mask)
    gap = _diff(ours, _logits(loaded.model, ids, mask), mask)
    # llama.cpp rounds activations to 8 bits for quantized matmuls: a small gap, far below the
    # change quantization itself made (int4), and about the size of int8's own
    quantization = _diff(ours, _logits(original.model, ids, mask), mask)
    assert gap < 2e-2 * float(ours.abs().max())
    if params["scheme"] == "int4":
        assert gap < quantization / 5
    counts = loaded.model.counts
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert counts.memory == sum(int(t.n_bytes) for t in reader.tensors)
    assert counts.params == sum(p.numel() for p in handle.model.parameters())


def test_llama_cpp_tokenizes_the_character_vocabulary_like_transformers(llama_dir, tmp_path):
    llama_cpp = _llama_cpp()
    handle = load_model(llama_dir, task="causal-lm")
    _saved(handle, tmp_path, **F32)
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    text = "hello world, ok!\n<|endoftext|>x"
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == handle.tokenizer.encode(text)


def _byte_level_bpe(split: str | None):
    """A byte-level BPE tokenizer trained on ``SENTENCES`` (GPT-2's pre-tokenizer, or a split
    pattern before a regex-free byte-level step, as Llama 3's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_a_byte_level_bpe_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path, pre):
    from transformers import GPT2Config, GPT2LMHeadModel

    from squeezelang_plugins.gguf_format.tokenizer import PRE_TOKENIZERS, vocabulary

    split = None if pre == "gpt-2" else next(p for p, n in PRE_TOKENIZERS.items() if n == pre)
    tokenizer = _byte_level_bpe(split)
    vocab = vocabulary(tokenizer, len(tokenizer) + 2)  # a padded vocabulary
    assert (vocab["model"], vocab["pre"]) == ("gpt2", pre)
    assert len(vocab["merges"]) > 10 and vocab["types"][0] == 3  # <|endoftext|>: control
    assert vocab["tokens"][-2:] == [f"[PAD{len(tokenizer)}]", f"[PAD{len(tokenizer) + 1}]"]
    assert vocab["types"][-2:] == [5, 5]
    llama_cpp = _llama_cpp()
    config = GPT2Config(vocab_size=len(tokenizer) + 2, n_embd=32, n_layer=1, n_head=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    handle = ModelHandle(model=GPT2LMHeadModel(config).eval(), tokenizer=tokenizer,
                         task="causal-lm")
    _saved(handle, tmp_path, **F32)
    vocab_only = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), vocab_only=True,
                                 verbose=False)
    for text in ("the quick brown fox jumps", "a man's 123456 dogs  can't   swim\n\nok", "héllo ✓"):
        assert vocab_only.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_other_families_run_in_llama_cpp_like_torch(tmp_path, family):
    """The families the format writes besides llama and gpt2, each checked against torch."""
    _llama_cpp()
    handle = build_family_handle(family)
    fmt, _ = _saved(handle, tmp_path, **F32)
    loaded = fmt.load(tmp_path, "causal-lm", F32, threads=2)
    ids, mask = _batch(handle.tokenizer)
    ours = _logits(handle.model, ids, mask)
    assert _diff(ours, _logits(loaded.model, ids, mask), mask) < 4e-3 * float(ours.abs().max())


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path, rope):
    """Linear scaling as metadata, Llama 3's as a rope_freqs tensor: on 176 positions llama.cpp
    matches torch, closer than the same weights with unscaled rotary embeddings would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _llama_cpp()
    tokenizer = _gpt2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                         rope_parameters=rope)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    handle = ModelHandle(model=model, tokenizer=tokenizer, task="causal-lm")
    fmt, _ = _saved(handle, tmp_path, **F32)
    loaded = fmt.load(tmp_path, "causal-lm", F32, threads=2)
    ids = torch.tensor([tokenizer.encode(" ".join(SENTENCES))[:176]])
    mask = torch.ones_like(ids)
    ours = _logits(model, ids, mask)
    plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_parameters": {
        "rope_type": "default", "rope_theta": rope["rope_theta"]}})).eval()
    plain.load_state_dict(model.state_dict())
    gap = _diff(ours, _logits(loaded.model, ids, mask), mask)
    assert gap < 2e-3 * float(ours.abs().max())
    assert gap < _diff(ours, _logits(plain, ids, mask), mask) / 10


# ---------------------------------------------------------------------------- the peer path
def test_type_q4_0_quantizes_float_weights_as_llama_cpp_does(tmp_path):
    """A float model written with type "Q4_0": gguf-py's reference quantizer (llama.cpp's own
    arithmetic) on every 2-D weight whose rows fill blocks, the others in float_type."""
    handle = load_model(build_tiny_llama(tmp_path / "src"), task="causal-lm")  # MLP width 48
    _saved(handle, tmp_path / "out", type="Q4_0")
    manifest = json.loads((tmp_path / "out" / "gguf.json").read_text())["tensors"]
    assert manifest["blk.0.attn_q.weight"] == {"type": "Q4_0", "source": "reference",
                                               "shape": [32, 32]}
    assert manifest["blk.0.ffn_down.weight"]["type"] == "F16"  # rows of 48
    assert manifest["blk.0.attn_norm.weight"]["type"] == "F32"
    weight = handle.model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    stored = _reader_tensor(tmp_path / "out" / "model.gguf", "blk.0.ffn_up.weight")
    assert np.array_equal(np.asarray(stored.data).reshape(-1),
                          gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0).reshape(-1))


# ---------------------------------------------------------------------------- without llama.cpp
def test_without_llama_cpp_the_gguf_is_dequantized_and_run_in_torch(llama_dir, registries, tmp_path,
                                                                     monkeypatch):
    from squeezelang.plugin import quantized_weights

    handle = _quantized(llama_dir, registries, scheme="int4", group_size=32)
    fmt, _ = _saved(handle, tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    loaded = fmt.load(tmp_path, "causal-lm", {}, threads=2)
    assert loaded.model.runtime == FALLBACK
    # the same model with every scale rounded to float16, as the file holds it
    state = handle.model.state_dict()
    for name, q in quantized_weights(handle).items():
        half = type(q)(q.name, q.codes, q.scales.half().float(), q.bits, q.axis, q.group)
        state[name] = half.dequantized()
    expected = load_model(llama_dir, task="causal-lm").model
    expected.load_state_dict(state)
    ids, mask = _batch(handle.tokenizer)
    ours = _logits(expected, ids, mask)
    assert _diff(ours, _logits(loaded.model, ids, mask), mask) < 1e-5
    assert _diff(_logits(handle.model, ids, mask), ours, mask) > 0  # fp16 scales do change it


# ---------------------------------------------------------------------------- refusals
RECIPE = '''recipe "gguf"
model = hf("{model}", task = "{task}")
data text = text("{data}")
metric ppl = perplexity(text, each_stage = true)
{stages}
output "out" {{ format = "gguf"{options} }}
'''


def _recipe(tmp_path, model, stages, task="causal-lm", options=""):
    (tmp_path / "text.txt").write_text(TEXT * 4)
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, task=task, data=tmp_path / "text.txt",
                                  stages=stages, options=options))
    return path


@pytest.mark.parametrize("stages, options, message", [
    ('stage q: quantize { scheme = "int4", group_size = 16 }', "",
     "stage 'q': output format 'gguf' cannot hold this: group_size 16 does not fill GGUF's "
     "blocks of 32 values (use a multiple of 32)"),
    ('stage q: factorize { rank = 0.5 }', "",
     "stage 'q': output format 'gguf' cannot hold this: factorized (low-rank) layers are not an "
     "architecture llama.cpp runs"),
    ('stage q: quantize { scheme = "mixed", data = text }', "",
     "stage 'q': output format 'gguf' cannot hold this: 2/3/5/6-bit codes: GGUF's Q8_0 and Q4_0 "
     "hold 8- and 4-bit codes exactly, other widths are not written (use bits = [4, 8])"),
    ('stage q: quantize { scheme = "int8" }', ', type = "Q4_0"',
     "stage 'q': output format 'gguf' cannot hold this: type \"Q4_0\" would quantize its 8-bit "
     "codes a second time (use type \"auto\" or \"Q8_0\")"),
])
def test_check_refuses_at_the_stage(llama_dir, tmp_path, stages, options, message):
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(_recipe(tmp_path, llama_dir, stages, options=options))
    errors = info.value.errors
    assert [e.message for e in errors] == [message]
    assert (errors[0].span.line, errors[0].span.column) == (5, 10)  # the technique's name


def test_check_accepts_what_gguf_holds(llama_dir, tmp_path):
    stages = ('stage sparse: prune { ratio = 0.3 }\n'
              'stage q: quantize { scheme = "mixed", bits = [4, 8], group_size = 64, data = text }')
    plan = squeezelang.check(_recipe(tmp_path, llama_dir, stages))
    assert plan.output_options == {"type": "auto", "float_type": "F16"}


def test_check_refuses_what_is_not_a_decoder_or_has_partial_blocks(tmp_path, tiny_bert_dir):
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(_recipe(tmp_path, tiny_bert_dir, "", task="embedding"))
    assert "GGUF holds causal-lm decoders for llama.cpp, not a 'embedding' model" in \
        info.value.errors[0].message
    fmt, stages = GgufFormat(), [("q", frozenset({"int8", "bits:8"}))]
    config = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 64}
    assert fmt.check(fmt.defaults(), stages, "causal-lm", config) == [(
        "q", "Q8_0/Q4_0 blocks hold 32 values of a row and this model's hidden size is 48: "
             "choose type = \"F32\", \"F16\" or \"BF16\"")]
    assert fmt.check({**fmt.defaults(), "type": "F32"}, stages, "causal-lm", config) == []
    # an MLP width of 48: only its down projection reads it, found when saving (next test)
    assert fmt.check(fmt.defaults(), stages, "causal-lm", {**config, "hidden_size": 32,
                                                           "intermediate_size": 48}) == []


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias = True (llama.cpp's qwen3 has False)"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
     "its sliding window (4096) is shorter than its context (32768) and llama.cpp's llama "
     "attends to the whole context"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope type 'yarn' is not written yet (written: default, linear, llama3)"),
    ({"model_type": "gemma2", "tie_word_embeddings": False},
     "an untied output layer (llama.cpp's gemma2 reads the token embedding as its output layer)"),
    ({"model_type": "bert"}, "model type 'bert' is not one this format writes (it writes gemma2, "
                             "gemma3_text, gpt2, llama, mistral, phi3, qwen2, qwen3)"),
])
def test_check_refuses_what_llama_cpp_would_run_differently(config, reason):
    assert GgufFormat().check({"type": "auto", "float_type": "F16"}, [], "causal-lm", config) == \
        [(None, reason)]


def test_save_names_a_quantized_tensor_whose_rows_do_not_fill_blocks(registries, tmp_path):
    handle = _quantized(build_tiny_llama(tmp_path / "src"), registries, scheme="int4",
                        group_size=32)
    with pytest.raises(SqueezeError, match="model.layers.0.mlp.down_proj.weight': rows of 48"):
        _saved(handle, tmp_path / "out")


def test_importing_the_format_imports_no_runtime():
    code = ("import sys, squeezelang_plugins.gguf_format; "
            "print(sorted(m for m in ('torch', 'gguf', 'llama_cpp', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- a whole run
@pytest.mark.slow  # 2-12 s each, by how busy the machine is
@pytest.mark.parametrize("runtime", ["llama.cpp", FALLBACK])
def test_squeeze_run_writes_a_gguf_and_measures_it(llama_dir, tmp_path, runtime, monkeypatch):
    if runtime == FALLBACK:
        monkeypatch.setitem(sys.modules, "llama_cpp", None)
    else:
        _llama_cpp()
    stages = 'stage q4: quantize { scheme = "int4", method = "gptq", group_size = 32, data = text }'
    result = squeezelang.run(_recipe(tmp_path, llama_dir, stages), output=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["runtime"].startswith(runtime)
    assert report["output"]["format"] == "gguf"
    assert report["metrics"]["size"]["final"] == (tmp_path / "out" / "model.gguf").stat().st_size
    ppl = report["metrics"]["ppl"]
    after_stage = report["stages"][0]["metrics"]["ppl"]
    assert abs(ppl["final"] - after_stage) < 0.01 * after_stage  # the file runs as the stage left it
    assert result.report["output"]["files"] == sorted(report["output"]["files"])
