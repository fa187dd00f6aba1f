"""Solving auto knobs: analytic size floor, measured trials, budgets, verdicts and the lock file."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang


def recipe(tmp_path: Path, model: Path, sentences: Path, ratio: str, constraints: str,
           search: str = "") -> Path:
    (tmp_path / "calib.txt").write_text(sentences.read_text())
    path = tmp_path / "r.squeeze"
    path.write_text(f'''
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = {ratio} }}
constraints {{ {constraints} }}
{search}
''')
    return path


@pytest.mark.parametrize("strategy", ["bisect", "grid", "random"])
def test_strategies_find_a_feasible_setting_within_budget(tmp_path, tiny_bert_dir, sentences_file, strategy):
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.95)",
                  "faithful >= 0.9", f'search {{ strategy = "{strategy}", trials = 5, seed = 1 }}')
    result = squeezelang.run(path, output=tmp_path / "out")
    trials = result.report["trials"]
    assert 1 <= len(trials) <= 5
    assert result.ok
    chosen = result.report["stages"][0]["params"]["ratio"]
    feasible = [t["values"]["sparse"]["ratio"] for t in trials if t["feasible"]]
    assert chosen == max(feasible)  # pushed as far as quality allows among the trials
    assert all(not t["feasible"] for t in trials if t["values"]["sparse"]["ratio"] > chosen)
    lock = (tmp_path / "out" / "recipe.lock.squeeze").read_text()
    assert "= auto" not in lock and f"ratio = {chosen}" in lock


def test_size_constraint_sets_the_floor(tmp_path, tiny_bert_dir, sentences_file):
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.95)", "size <= 70%",
                  'search { strategy = "bisect", trials = 3 }')
    result = squeezelang.run(path, output=tmp_path / "out")
    assert result.ok
    # no quality constraint: the most compressed end is feasible at once
    assert result.report["trials"][0]["values"]["sparse"]["ratio"] == pytest.approx(0.95)


def test_impossible_size_is_refused_at_plan_time(tmp_path, tiny_bert_dir, sentences_file):
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.5)", "size <= 1%")
    planned = squeezelang.plan(path)
    assert any("impossible" in n and "size <= 1%" in n for n in planned.prediction.notes)
    result = squeezelang.run(path, output=tmp_path / "out")
    assert not result.ok and result.report["trials"] == []
    assert any("most compressed setting" in n for n in result.notes)


def test_no_feasible_trial_reports_closest(tmp_path, tiny_bert_dir, sentences_file):
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.5 .. 0.95)", "faithful >= 0.99999",
                  'search { trials = 3 }')
    result = squeezelang.run(path, output=tmp_path / "out")
    assert not result.ok
    assert 1 <= len(result.report["trials"]) <= 3
    assert any("closest" in n for n in result.notes)
