"""``vocab_trim`` on byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style): the merge closure keeps
every text tokenizable and every kept text split as before; Unigram tokenizers are refused."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model, measured_overhead
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from squeezelang_plugins.vocab_count import direct_kept_ids
from squeezelang_plugins.vocab_trim import kept_ids
from conftest import SENTENCES, SHARED_DATA

#: Text no small English tokenizer was trained on: accents, Greek, CJK, emoji, tabs, odd spacing.
UNSEEN = ["Ωμέγα naïve café — 日本語のテキスト 😀🎉👍🏽",
          "\ttabs\tand  double  spaces \n",
          "ZZZ qqq xylophone 12345 !!! ??? ~~~", "ℕ ⊂ ℤ, ∀x∈ℝ: x² ≥ 0", "\x00\x7f\u200b\ufeff"]
SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|eot|>"]


def _byte_bpe(texts: list[str], vocab_size: int, bos: bool = False):
    """A byte-level BPE trained on ``texts``, wrapped for transformers; with ``bos``, Llama 3's
    template (``<|begin_of_text|>`` before every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if bos:
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                          special_tokens=[("<|begin_of_text|>", 1)])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>" if bos else "<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def _fallback_bpe(texts: list[str], vocab_size: int):
    """A SentencePiece-style BPE with byte fallback (Llama 2, Gemma): ``▁`` for spaces, no
    pre-tokenizer, ``<0x00>`` … ``<0xFF>`` for characters outside a small alphabet."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=40,
                                                           show_progress=False))
    learnt = json.loads(trained.to_str())["model"]
    head = ["<unk>", *SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    vocab = {t: i for i, t in enumerate(head)}
    vocab.update({t: len(head) + i for i, t in enumerate(sorted(learnt["vocab"], key=learnt["vocab"].get))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learnt["merges"]],
                                   unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = trained.normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", *SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>", clean_up_tokenization_spaces=False)


def _save(directory: Path, tokenizer, family: str, tokenizer_class: str | None = None) -> Path:
    """A tiny causal LM of ``family`` over ``tokenizer``, saved with both into ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    eot, bot, eos = (tokenizer.convert_tokens_to_ids(t) for t in SPECIALS)
    torch.manual_seed(0)
    n = len(tokenizer)
    if family == "gpt2":  # tied head, ids as ints
        model = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=eot, eos_token_id=eot))
    elif family == "llama":  # untied head, a list of end ids and a missing pad id, as Llama 3
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=n, tie_word_embeddings=False, bos_token_id=bot,
            eos_token_id=[eot, eos], pad_token_id=None, max_position_embeddings=256))
    else:  # Qwen2: tied, no bos, embedding rows padded beyond the tokenizer
        model = Qwen2ForCausalLM(Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=n + 13, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=eot, max_position_embeddings=256))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if tokenizer_class:
        path = directory / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}), encoding="utf-8")
    return directory


def _ctx(texts, model_dir: Path | None = None) -> Context:
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    ctx.model_dir = model_dir
    return ctx


def _logits(handle, texts):
    with torch.no_grad():
        return [handle.model(**handle.tokenizer([t], return_tensors="pt")).logits[0] for t in texts]


def _kept(original, handle) -> list[int]:
    """The original id of every trimmed id, in order."""
    tokens = handle.tokenizer.convert_ids_to_tokens(list(range(len(handle.tokenizer))))
    return original.tokenizer.convert_tokens_to_ids(tokens)


def _trim(src: Path, texts: list[str], registries, out: Path, **params):
    """Trim the model in ``src`` to the tokens of ``texts``; (original, trimmed, estimate, kept)."""
    tech = registries.techniques.get("vocab_trim")
    params = {**tech.defaults(), "data": "calib", **params}
    original, handle = load_model(src), load_model(src)
    meta = meta_from_model(handle.model, handle.task)
    meta.overhead_bytes = measured_overhead(meta, src)
    informed = tech.estimate_with(meta, params, _ctx(texts, src))
    tech.apply_(handle, params, _ctx(texts))
    save_model(handle, out)
    return original, handle, informed, _kept(original, handle)


def _check(src: Path, data: list[str], others: list[str], registries, out: Path, **params):
    """Every property of a correct trim, on the model in ``src`` trimmed to ``data``'s tokens;
    ``others`` are texts outside the data. Returns how many of ``others`` were kept-only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, handle, informed, kept = _trim(src, data, registries, out, **params)
    old, new = original.tokenizer, handle.tokenizer
    n = len(new)
    assert n < len(old) and handle.model.config.vocab_size == n == len(kept)
    assert handle.model.get_input_embeddings().weight.shape[0] == n
    assert handle.model.get_output_embeddings().weight.shape[0] == n
    assert set(SPECIALS) <= set(new.get_vocab())
    remap = {o: i for i, o in enumerate(kept)}
    kept_only = []
    for text in data + others + UNSEEN:
        ids = new(text)["input_ids"]
        assert new.decode(ids, skip_special_tokens=True) == text, text
        before = old(text)["input_ids"]
        if all(i in remap for i in before):
            assert ids == [remap[i] for i in before], text
            kept_only.append(text)
        else:
            assert text not in data
    assert all(t in kept_only for t in data)
    # the logits of kept text: the original's, restricted to the kept ids
    sample = kept_only[:: max(1, len(kept_only) // 12)][:12]
    for text, a, b in zip(sample, _logits(handle, sample), _logits(original, sample)):
        assert torch.allclose(a, b[:, kept], atol=1e-5), text
    # the model's special ids are renumbered; a list stays a list
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value, before = getattr(handle.model.config, key), getattr(original.model.config, key)
        expect = [remap[i] for i in before] if isinstance(before, list) else \
            (remap[before] if before is not None else None)
        assert value == expect, key
        assert getattr(handle.model.generation_config, key) == expect, key
    # the plan's exact estimate is the kept count, and the saved size
    assert informed.config["vocab_size"] == n
    real = artifact_bytes(out)
    assert abs(informed.size_bytes() - real) / real < 0.02
    assert informed.params() == meta_from_model(handle.model, handle.task).params()
    # plain transformers loads the output; greedy generation matches the original's restricted to
    # the kept ids (the original may not pick a dropped token, so the comparison is meaningful)
    assert not (out / "squeeze.json").exists()
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(tok) == n
    dropped = [i for i in range(original.model.get_input_embeddings().weight.shape[0]) if i not in remap]
    end = original.model.config.eos_token_id
    end = end if isinstance(end, int) else end[0]
    for text in sample[:4]:
        assert tok(text)["input_ids"] == new(text)["input_ids"]
        with torch.no_grad():
            again = model(**tok([text], return_tensors="pt")).logits[0]
        assert torch.allclose(again, _logits(handle, [text])[0], atol=1e-6)
        ids = tok([text], return_tensors="pt")
        with torch.no_grad():
            mine = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=remap[end])
            theirs = original.model.generate(**old([text], return_tensors="pt"), max_new_tokens=8,
                                             do_sample=False, suppress_tokens=dropped, pad_token_id=end)
        assert tok.decode(mine[0]) == old.decode(theirs[0]), text
    back = load_model(out)
    assert torch.equal(_logits(back, sample[:2])[0], _logits(handle, sample[:2])[0])
    return len(kept_only)


# ---------------------------------------------------------------------------- built-in sentences
EXTRA = ["The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
         "A man, a plan, a canal: Panama.", "Numbers like 42 and 1999 appear too.",
         "She sells sea shells by the sea shore.", "It's a truth universally acknowledged..."]


@pytest.fixture(scope="module")
def sentence_corpus() -> list[str]:
    rng = random.Random(0)
    words = " ".join(SENTENCES + EXTRA).split()
    return SENTENCES + EXTRA + [" ".join(rng.choices(words, k=8)) for _ in range(200)]


def _recombined(texts: list[str], count: int, seed: int = 1) -> list[str]:
    """Texts of the data's words (each after a space, as within the data): all kept tokens."""
    rng = random.Random(seed)
    words = sorted({w for t in texts for w in t.split()[1:]})
    return [texts[0].split()[0] + " " + " ".join(rng.choices(words, k=6)) for _ in range(count)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_byte_level_bpe_on_sentences(family, sentence_corpus, registries, tmp_path):
    tokenizer = _byte_bpe(sentence_corpus, 420, bos=family == "llama")
    src = _save(tmp_path / "src", tokenizer, family, "Qwen2Tokenizer" if family == "qwen2" else None)
    data = SENTENCES[:8]
    others = SENTENCES[8:] + EXTRA + _recombined(data, 20)
    kept_only = _check(src, data, others, registries, tmp_path / "out")
    assert kept_only >= len(data) + 20  # every recombination of the data's words is kept text


def test_byte_fallback_bpe_on_sentences(sentence_corpus, registries, tmp_path):
    tokenizer = _fallback_bpe(sentence_corpus, 600)
    assert tokenizer.convert_ids_to_tokens(tokenizer("é")["input_ids"])[-2:] == ["<0xC3>", "<0xA9>"]
    src = _save(tmp_path / "src", tokenizer, "llama")
    data = SENTENCES[:8]
    # with no pre-tokenizer, merges span words: recombined words are not all kept text here
    _check(src, data, SENTENCES[8:] + EXTRA + _recombined(data, 20), registries, tmp_path / "out")
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert {f"<0x{b:02X}>" for b in range(256)} | {"<unk>"} <= set(vocab)


def test_merge_closure_and_order(sentence_corpus, tmp_path):
    """Every kept merge result has kept parts; kept merges are the original's, in order."""
    from squeezelang_plugins.vocab_trim import trimmed_tokenizer

    tokenizer = _byte_bpe(sentence_corpus, 420)
    ids = kept_ids(tokenizer, ["the cat sits"], keep=["playing"])
    new = trimmed_tokenizer(tokenizer, ids, tmp_path / "tok")
    old_doc = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    new_doc = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = new_doc["vocab"]
    assert len(vocab) == len(new) and len(vocab) < len(old_doc["vocab"])
    from tokenizers import pre_tokenizers

    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    merges = [tuple(m) for m in new_doc["merges"]]
    assert merges == [tuple(m) for m in old_doc["merges"] if "".join(m) in vocab]
    assert all(a in vocab and b in vocab for a, b in merges)
    assert {"".join(m) for m in merges} == {t for t in vocab if len(t) > 1 and t not in SPECIALS}
    assert new.convert_ids_to_tokens(new("playing")["input_ids"]) == \
        tokenizer.convert_ids_to_tokens(tokenizer("playing")["input_ids"])


def test_ignore_merges(sentence_corpus, tmp_path):
    """Llama 3's ``ignore_merges``: a word in the vocabulary is taken whole, kept or not."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from squeezelang_plugins.vocab_trim import trimmed_tokenizer

    doc = json.loads(_byte_bpe(sentence_corpus, 420).backend_tokenizer.to_str())
    doc["model"]["ignore_merges"] = True
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(doc)),
                                        eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    data = SENTENCES[:5]
    ids = kept_ids(tokenizer, data)
    new = trimmed_tokenizer(tokenizer, ids, tmp_path / "tok")
    assert json.loads(new.backend_tokenizer.to_str())["model"]["ignore_merges"] is True
    for text in data + _recombined(data, 10) + UNSEEN + EXTRA:
        before, after = tokenizer(text)["input_ids"], new(text)["input_ids"]
        assert new.decode(after) == text
        if all(i in ids for i in before):
            assert after == [ids.index(i) for i in before]


def test_the_count_equals_the_stage_and_a_rebuilding_class_goes_through_transformers(
        sentence_corpus, tmp_path):
    tokenizer = _byte_bpe(sentence_corpus, 420, bos=True)
    generic = _save(tmp_path / "generic", tokenizer, "llama")
    rebuilt = _save(tmp_path / "rebuilt", tokenizer, "qwen2", "Qwen2Tokenizer")
    texts = SENTENCES + UNSEEN
    for keep_frequent, keep in [(0, []), (300, ["zebra", "Ωμέγα"])]:
        direct = direct_kept_ids(generic, texts, keep_frequent, keep)
        handle = load_model(generic)
        assert direct == kept_ids(handle.tokenizer, texts, keep_frequent, keep, handle.model.config,
                                  handle.model.generation_config)
    assert direct_kept_ids(rebuilt, texts, 0, []) is None


# ---------------------------------------------------------------------------- tiny shakespeare
@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data of the dev checkout and CI)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_byte_level_bpe_on_tiny_shakespeare(family, shakespeare, registries, tmp_path):
    tokenizer = _byte_bpe(shakespeare, 1000, bos=family == "llama")
    src = _save(tmp_path / "src", tokenizer, family)
    data, others = shakespeare[:400], shakespeare[20000:20300]
    kept_only = _check(src, data, others, registries, tmp_path / "out")
    assert kept_only > len(data) + 30  # many unseen lines are kept text too


def test_the_plan_predicts_the_stage(shakespeare, registries, tmp_path):
    """``squeeze plan`` of a recipe (its own planning context, the disk cache) predicts the
    parameters the stage leaves."""
    import squeezelang

    src = _save(tmp_path / "src", _byte_bpe(shakespeare, 1000), "gpt2")
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(shakespeare[:300]) + "\n", encoding="utf-8")
    recipe = (f'recipe "bpe-trim"\nmodel = hf("{src}")\ndata calib = text("{data}")\n'
              'stage trim: vocab_trim { data = calib, keep_frequent = 300 }\n')
    planned = squeezelang.plan(recipe).prediction.stages[-1]
    tech, handle = registries.techniques.get("vocab_trim"), load_model(src)
    tech.apply_(handle, {**tech.defaults(), "data": "calib", "keep_frequent": 300},
                _ctx(shakespeare[:300]))
    assert 300 < handle.model.config.vocab_size < 1000
    assert planned.params_count == meta_from_model(handle.model, handle.task).params()


# ---------------------------------------------------------------------------- refused
def test_unigram_is_refused_at_plan_and_run_time(registries, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<|endoftext|>", 0.0)] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz▁"] \
        + [("▁the", -1.0), ("▁cat", -1.5)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="<|endoftext|>")
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=1)
                     ).save_pretrained(src)
    tokenizer.save_pretrained(src)
    tech = registries.techniques.get("vocab_trim")
    handle = load_model(src)
    meta = meta_from_model(handle.model, handle.task)
    params = {**tech.defaults(), "data": "calib"}
    with pytest.raises(SqueezeError, match="cannot trim a Unigram"):
        tech.estimate_with(meta, params, _ctx(["the cat"], src))
    with pytest.raises(SqueezeError, match="cannot trim a Unigram"):
        tech.apply_(handle, params, _ctx(["the cat"]))
    assert handle.model.config.vocab_size == len(tokenizer)  # nothing changed
