"""The ``vocab_trim`` technique: fewer rows, the same outputs on kept text, a standard reloadable model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from conftest import SENTENCES

# Recombinations of the data's words: every token is kept.
IN_VOCAB = ["the man sits on the guitar", "a dog reads the song", "the child is very old"]
OUT_OF_VOCAB = "xylophone zebra qqq"


def _ctx(texts=SENTENCES):
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    return ctx


def _params(tech, **params):
    return {**tech.defaults(), "data": "calib", **params}


def _hidden(handle, texts):
    with torch.no_grad():
        out = handle.model(**handle.tokenizer(texts, padding=True, return_tensors="pt"))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _trim(src, registries, out_dir, ctx=None, **params):
    """Trim ``src``; return (original, trimmed handle, estimate before, estimate after, saved size)."""
    tech = registries.techniques.get("vocab_trim")
    original, handle = load_model(src), load_model(src)
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    ctx = ctx or _ctx()
    blind = tech.estimate(meta, _params(tech, **params))
    ctx.model_dir = Path(src)  # as the planner sets it: the estimate reads the tokenizer and data
    informed = tech.estimate_with(meta, _params(tech, **params), ctx)
    tech.apply_(handle, _params(tech, **params), ctx)
    save_model(handle, out_dir)
    return original, handle, blind, informed, artifact_bytes(out_dir)


def test_tiny_bert_same_outputs_smaller_vocab(tiny_bert_dir, registries, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "out"
    original, handle, blind, informed, real = _trim(tiny_bert_dir, registries, out)
    n = len(handle.tokenizer)
    assert n < len(original.tokenizer) and handle.model.config.vocab_size == n
    assert handle.model.get_input_embeddings().weight.shape[0] == n
    assert handle.tokenizer_changed
    for text in SENTENCES + IN_VOCAB:
        assert torch.allclose(_hidden(handle, [text]), _hidden(original, [text]), atol=1e-5), text
    assert torch.allclose(_hidden(handle, IN_VOCAB), _hidden(original, IN_VOCAB), atol=1e-5)
    # outside the kept vocabulary: the unknown token, never a crash
    ids = handle.tokenizer(OUT_OF_VOCAB)["input_ids"]
    assert handle.tokenizer.unk_token_id in ids
    assert _hidden(handle, [OUT_OF_VOCAB]).shape[-1] == 32
    # size: smaller; the blind estimate is an upper bound with a note, the informed one is exact
    assert real < artifact_bytes(tiny_bert_dir)
    assert blind.notes and blind.size_bytes() >= real
    assert abs(informed.size_bytes() - real) / real < 0.02
    # plain transformers loads the directory, tokenizer included
    assert not (out / "squeeze.json").exists()
    tok, model = AutoTokenizer.from_pretrained(out), AutoModel.from_pretrained(out).eval()
    assert len(tok) == n and tok(IN_VOCAB[0])["input_ids"] == handle.tokenizer(IN_VOCAB[0])["input_ids"]
    with torch.no_grad():
        again = model(**tok(IN_VOCAB, padding=True, return_tensors="pt")).last_hidden_state
    assert torch.allclose(again, _hidden(original, IN_VOCAB), atol=1e-5)
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    back = load_model(out)
    assert torch.equal(_hidden(back, IN_VOCAB), _hidden(handle, IN_VOCAB))


def test_tiny_gpt2_wordlevel_logits_of_kept_tokens(tiny_gpt2_dir, registries, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    original, handle, _, informed, real = _trim(tiny_gpt2_dir, registries, out)
    kept = [original.tokenizer.convert_tokens_to_ids(t)
            for t in handle.tokenizer.convert_ids_to_tokens(list(range(len(handle.tokenizer))))]
    assert len(kept) < len(original.tokenizer)
    text = "the cat sits on the mat"
    assert torch.allclose(_hidden(handle, [text]), _hidden(original, [text])[..., kept], atol=1e-5)
    assert handle.model.lm_head.weight is handle.model.transformer.wte.weight  # still tied
    assert handle.tokenizer("QZX!")["input_ids"] == [handle.tokenizer.unk_token_id] * 4
    assert abs(informed.size_bytes() - real) / real < 0.02
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        again = model(**tok([text], return_tensors="pt")).logits
    assert torch.allclose(again, _hidden(handle, [text]), atol=1e-6)


def test_masked_lm_untied_head_and_bias(tmp_path, registries):
    from transformers import BertConfig, BertForMaskedLM

    from conftest import _bert_tokenizer

    src = tmp_path / "mlm"
    src.mkdir()
    tokenizer = _bert_tokenizer(src)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        tie_word_embeddings=False)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    original, handle, _, _, _ = _trim(src, registries, tmp_path / "out")
    kept = [original.tokenizer.convert_tokens_to_ids(t)
            for t in handle.tokenizer.convert_ids_to_tokens(list(range(len(handle.tokenizer))))]
    assert handle.model.cls.predictions.decoder.weight.shape[0] == len(kept)
    assert handle.model.cls.predictions.bias.shape[0] == len(kept)
    assert torch.allclose(_hidden(handle, IN_VOCAB), _hidden(original, IN_VOCAB)[..., kept], atol=1e-5)
    back = load_model(tmp_path / "out")
    assert torch.equal(_hidden(back, IN_VOCAB), _hidden(handle, IN_VOCAB))


def test_keep_and_keep_frequent(tiny_bert_dir, registries, tmp_path):
    tech = registries.techniques.get("vocab_trim")
    base = load_model(tiny_bert_dir)
    tech.apply_(base, _params(tech), _ctx())
    more = load_model(tiny_bert_dir)
    tech.apply_(more, _params(tech, keep=["mountain", "hello world"], keep_frequent=10), _ctx())
    vocab = more.tokenizer.get_vocab()
    assert len(more.tokenizer) > len(base.tokenizer)
    assert {"mountain", "hello", "world"} <= set(vocab) - set(base.tokenizer.get_vocab())
    original = load_model(tiny_bert_dir).tokenizer
    assert all(original.convert_ids_to_tokens(i) in vocab for i in range(10))


def test_pruned_model_keeps_its_codecs(tiny_bert_dir, registries, tmp_path):
    handle, ctx = load_model(tiny_bert_dir), _ctx()
    prune, trim = registries.techniques.get("prune"), registries.techniques.get("vocab_trim")
    prune.apply_(handle, {**prune.defaults(), "ratio": 0.5}, ctx)
    trim.apply_(handle, _params(trim), ctx)
    save_model(handle, tmp_path / "out")
    back = load_model(tmp_path / "out", registries)
    assert len(back.tokenizer) == len(handle.tokenizer)
    assert torch.equal(_hidden(back, IN_VOCAB), _hidden(handle, IN_VOCAB))


def test_bpe_that_could_lose_text_is_refused(tmp_path, registries):
    """Neither byte-level nor byte fallback nor an unknown token: a dropped character would vanish."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    from squeezelang.models.handle import ModelHandle

    handle = ModelHandle(model=model.eval(), tokenizer=tok, task="causal-lm")
    tech = registries.techniques.get("vocab_trim")
    with pytest.raises(SqueezeError, match="BPE tokenizer is neither byte-level nor falls back to "
                                           "bytes and has no unknown token"):
        tech.apply_(handle, _params(tech), _ctx(["ab a"]))
    assert model.config.vocab_size == 4  # nothing changed


def test_bpe_with_an_unknown_token(tmp_path, registries):
    """A character-level BPE with an unknown token: kept text splits as before, the rest is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from squeezelang.models.handle import ModelHandle

    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c"), ("b", "c")],
                                   unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    handle = ModelHandle(model=model.eval(), tokenizer=tok, task="causal-lm")
    tech = registries.techniques.get("vocab_trim")
    tech.apply_(handle, _params(tech), _ctx(["abc"]))
    assert handle.tokenizer.get_vocab() == {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5}
    assert handle.tokenizer("abc ab bc")["input_ids"] == [5, 4, 2, 3]  # "bc" is gone, its parts are kept
    assert handle.tokenizer("abd")["input_ids"] == [4, 0]


def test_schema(registries):
    tech = registries.techniques.get("vocab_trim")
    assert tech.data_params == {"data": "text|a,b"}
    assert tech.defaults() == {"keep_frequent": 0, "keep": []}
    assert "quantized" in tech.refuses


@pytest.mark.slow
def test_vocab_trim_minilm(minilm_dir, registries, tmp_path):
    from squeezelang.models.forward import encode

    texts = (Path(__file__).resolve().parents[2] / "specs" / "data" / "calib.txt").read_text(
        encoding="utf-8").splitlines()
    original, handle, _, informed, real = _trim(minilm_dir, registries, tmp_path / "out",
                                                ctx=_ctx(texts), keep_frequent=2000)
    before, rows = artifact_bytes(minilm_dir), handle.model.get_input_embeddings().weight.shape[0]
    print(f"minilm vocab_trim: vocab 30522 -> {rows}, size {before} -> {real} "
          f"({real / before:.1%}), estimate {informed.size_bytes()}", file=sys.stderr)
    assert original.model.get_input_embeddings().weight.shape[0] == 30522
    assert 2000 < rows < 5000
    assert real < 0.6 * before
    assert abs(informed.size_bytes() - real) / real < 0.02
    cos = torch.nn.functional.cosine_similarity(encode(handle, texts), encode(original, texts))
    assert float(cos.min()) > 0.9999
    back = load_model(tmp_path / "out")
    assert torch.allclose(encode(back, texts), encode(handle, texts), atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text"])
def test_decoder_families_keep_their_embedding_module(name, registries, tmp_path):
    """Gemma's token embedding scales its rows by sqrt(hidden) in forward: trimming resizes the
    module in place, so the trimmed model computes what its reloaded copy does."""
    from conftest import build_family_handle

    built = build_family_handle(name)
    src = tmp_path / "src"
    save_model(built, src)
    kind = type(built.model.get_input_embeddings())
    original, handle, _, _, _ = _trim(src, registries, tmp_path / "out")
    assert type(handle.model.get_input_embeddings()) is kind
    ids = handle.tokenizer(["the cat sits on the mat"], return_tensors="pt")["input_ids"]
    back = load_model(tmp_path / "out")
    with torch.no_grad():
        mine, theirs = handle.model(input_ids=ids).logits, back.model(input_ids=ids).logits
        kept = [original.tokenizer.convert_tokens_to_ids(t)
                for t in handle.tokenizer.convert_ids_to_tokens(list(range(len(handle.tokenizer))))]
        before = original.model(input_ids=torch.tensor([[kept[i] for i in ids[0].tolist()]])).logits
    assert torch.equal(mine, theirs)
    assert torch.allclose(mine, before[..., kept], atol=1e-5)
