"""Quality metrics evaluate a bounded number of tokens or rows (``max_tokens``, ``max_rows``), and
the report says when the bound cut the data."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang
from squeezelang.models.load import load_model
from squeezelang.plugin import lm_loss, lm_loss_counted

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "a stitch in time saves nine",
         "all that glitters is not gold, " * 4]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path, registries):
    return load_model(tiny_gpt2_dir, registries, task="causal-lm")


def test_lm_loss_scores_at_most_max_tokens_in_text_order(gpt2):
    whole = lm_loss_counted(gpt2, TEXTS, max_length=16)
    assert whole.scored == whole.available > 40
    cut = lm_loss_counted(gpt2, TEXTS, max_length=16, max_tokens=20)
    assert (cut.scored, cut.available) == (20, whole.available)
    assert cut.loss != pytest.approx(whole.loss)
    # the first 20 tokens of the first text, scored with the same windows
    first = lm_loss_counted(gpt2, TEXTS[:1], max_length=16, max_tokens=20)
    assert first.loss == pytest.approx(cut.loss)
    assert lm_loss(gpt2, TEXTS, max_length=16, max_tokens=10 ** 9) == pytest.approx(whole.loss)


RECIPE = '''model = hf("{model}", task = "{task}")
data d = text("texts.txt")
metric q = {metric}
stage int8: quantize {{ scheme = "int8" }}
'''


def run(tmp_path: Path, model: Path, task: str, metric: str):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS * 4) + "\n")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model, task=task, metric=metric))
    return squeezelang.run(recipe, quiet=True).report


def test_a_bounded_perplexity_says_so_in_the_report(tmp_path, tiny_gpt2_dir):
    report = run(tmp_path, tiny_gpt2_dir, "causal-lm", "perplexity(d, max_tokens = 30)")
    (note,) = report["metrics"]["q"]["notes"]
    assert note.startswith("scored the first 30 of the ") and "data set 'd'" in note
    assert "max_tokens = 30" in (Path(report["output"]["dir"]) / "report.md").read_text()


def test_a_bounded_row_metric_says_so_and_an_unbounded_one_says_nothing(tmp_path, tiny_bert_dir):
    report = run(tmp_path, tiny_bert_dir, "embedding", "fidelity(d, max_rows = 5)")
    (note,) = report["metrics"]["q"]["notes"]
    assert note == "evaluated the first 5 of the 12 texts of data set 'd' (max_rows = 5)"
    (tmp_path / "again").mkdir()
    whole = run(tmp_path / "again", tiny_bert_dir, "embedding", "fidelity(d)")
    assert "notes" not in whole["metrics"]["q"]
