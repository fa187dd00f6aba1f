"""``vocab_count.direct_kept_ids`` (the planner's count, from the tokenizer files alone) keeps the
same ids as ``vocab_trim.kept_ids`` on the tokenizer transformers loads, and gives way to it where
the files hold what it does not model."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from squeezelang_plugins.vocab_count import direct_kept_ids
from squeezelang_plugins.vocab_trim import kept_ids
from conftest import SENTENCES, SHARED_DATA

CASES = [(0, []), (7, []), (50, ["zebra", "the", "unseenword"])]


def _through_transformers(directory: Path, texts, keep_frequent, keep):
    from transformers import AutoConfig

    from squeezelang.models.hf import load_tokenizer, read_config

    return kept_ids(load_tokenizer(directory), texts, keep_frequent, keep,
                    AutoConfig.for_model(**read_config(directory)))


@pytest.mark.parametrize("keep_frequent,keep", CASES)
@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_the_same_ids_as_through_transformers(model, keep_frequent, keep, request):
    directory = request.getfixturevalue(model)
    texts = SENTENCES + ["Unseen WORDS, with punctuation!", "x" * 300]
    direct = direct_kept_ids(directory, texts, keep_frequent, keep)
    assert direct is not None
    assert direct == _through_transformers(directory, texts, keep_frequent, keep)


def test_the_same_ids_for_minilm_on_sts_train(minilm_dir):
    path = SHARED_DATA / "stsb-en-train.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data)")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    texts = [text for row in rows[1:] for text in row[:2]]  # long ones too: nothing truncates
    direct = direct_kept_ids(minilm_dir, texts, 20000, [])
    assert direct is not None and len(direct) > 20000
    assert direct == _through_transformers(minilm_dir, texts, 20000, [])


def _edited(source: Path, tmp_path: Path, name: str, edit) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    data = json.loads((directory / name).read_text())
    edit(data)
    (directory / name).write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("name,edit", [
    ("config.json", lambda c: c.update(model_type="t5")),
    ("tokenizer_config.json", lambda c: c.setdefault("added_tokens_decoder", {}).update(
        {"9999": {"content": "<new>", "special": True}})),
    ("tokenizer_config.json", lambda c: c.update(cls_token="<not in the vocabulary>")),
    ("tokenizer.json", lambda c: c["model"].update(type="Unigram")),
], ids=["unknown family", "added elsewhere", "unknown special", "Unigram"])
def test_what_it_does_not_model_goes_through_transformers(name, edit, tiny_bert_dir, tmp_path):
    directory = _edited(tiny_bert_dir, tmp_path, name, edit)
    assert direct_kept_ids(directory, SENTENCES, 0, []) is None


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "config.json"])
def test_a_malformed_file_goes_through_transformers(name, tiny_bert_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, directory)
    (directory / name).write_text("{not json", encoding="utf-8")
    assert direct_kept_ids(directory, SENTENCES, 0, []) is None
