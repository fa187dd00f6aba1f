"""Task-aware forward helpers: pooled embeddings, logits, LM loss and fidelity outputs."""
from __future__ import annotations

import math

import pytest
import torch

from squeezelang.errors import ExecutionError
from squeezelang.models import hf
from squeezelang.models.forward import encode, lm_loss, logits, outputs_for_fidelity
from squeezelang.models.handle import ModelHandle

TEXTS = ["a man is playing a guitar", "the cat sits", "a dog runs in the park near the river",
         "hello", "the quick brown fox jumps over the lazy dog"]


def handle_of(directory, task):
    return ModelHandle(hf.load_pretrained(directory, task), hf.load_tokenizer(directory), task,
                       source_dir=directory)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return handle_of(tiny_bert_dir, "embedding")


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return handle_of(tiny_gpt2_dir, "causal-lm")


def test_encode_is_mean_pooling_and_independent_of_batching(bert):
    out = encode(bert, TEXTS, batch_size=2)
    assert out.shape == (len(TEXTS), bert.config.hidden_size) and out.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        inputs = bert.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = bert.model(**inputs).last_hidden_state[0].mean(0)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encode(bert, TEXTS, batch_size=32), out, atol=1e-5, rtol=1e-4)


def test_encode_pairs_and_truncation(bert):
    pair = encode(bert, TEXTS[:2], pair=TEXTS[2:4])
    assert pair.shape == (2, bert.config.hidden_size)
    long = ["the cat " * 200]
    assert torch.isfinite(encode(bert, long, max_length=1000)).all()  # clamped to the model's 64


def test_encode_other_tasks(tiny_bert_dir, gpt2):
    mlm = handle_of(tiny_bert_dir, "masked-lm")
    assert encode(mlm, TEXTS).shape == (len(TEXTS), mlm.config.hidden_size)
    assert encode(gpt2, TEXTS).shape == (len(TEXTS), gpt2.config.n_embd)


def test_logits_of_an_lm_are_per_token(gpt2):
    out = logits(gpt2, TEXTS, batch_size=2)
    tokens = sum(len(gpt2.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert out.shape == (tokens, gpt2.config.vocab_size)
    inputs = gpt2.tokenizer(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        expected = gpt2.model(**inputs).logits[0]
    start = len(gpt2.tokenizer(TEXTS[0])["input_ids"])
    torch.testing.assert_close(out[start:start + expected.shape[0]], expected, atol=1e-4, rtol=1e-4)
    assert outputs_for_fidelity(gpt2, TEXTS).shape == out.shape


def test_embedding_model_has_no_logits(bert):
    with pytest.raises(ExecutionError, match="no logits"):
        logits(bert, TEXTS)
    assert outputs_for_fidelity(bert, TEXTS).shape == (len(TEXTS), bert.config.hidden_size)


def test_lm_loss_matches_the_model_loss(gpt2):
    text = TEXTS[2]
    ids = torch.tensor([[gpt2.tokenizer.bos_token_id] + gpt2.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = gpt2.model(input_ids=ids, labels=ids).loss.item()
    assert lm_loss(gpt2, [text]) == pytest.approx(expected, rel=1e-5)


def test_lm_loss_is_token_weighted_and_windows_cover_every_token(gpt2):
    full = lm_loss(gpt2, TEXTS)
    assert math.isfinite(full)
    # random init: close to uniform over the vocabulary
    assert abs(full - math.log(gpt2.config.vocab_size)) < 1.0
    long = " ".join(TEXTS) * 3  # longer than the model's 64 positions
    windowed = lm_loss(gpt2, [long], max_length=16, stride=8)
    assert math.isfinite(windowed) and abs(windowed - full) < 1.0
    with pytest.raises(ExecutionError, match="stride"):
        lm_loss(gpt2, [long], max_length=16, stride=32)


def test_lm_loss_needs_a_causal_lm(bert):
    with pytest.raises(ExecutionError, match="causal-lm"):
        lm_loss(bert, TEXTS)


def test_lm_loss_window_longer_than_the_text_is_one_pass(gpt2):
    plain = lm_loss(gpt2, TEXTS)
    assert lm_loss(gpt2, TEXTS, max_length=64, stride=3) == pytest.approx(plain, rel=1e-6)
    # stride = window still scores every token (windows overlap by one token of context)
    assert math.isfinite(lm_loss(gpt2, [" ".join(TEXTS)], max_length=8, stride=8))
