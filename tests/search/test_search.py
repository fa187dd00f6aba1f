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
                  "faithful >= 0.99995", f'search {{ strategy = "{strategy}", trials = 5, seed = 1 }}')
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


def test_impossible_size_is_refused_at_plan_time(tmp_path, tiny_bert_dir, sentences_file, capsys):
    from squeezelang.cli import main
    from squeezelang.errors import Infeasible

    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.5)", "size <= 1%")
    planned = squeezelang.plan(path)
    assert any("impossible" in n and "size <= 1%" in n for n in planned.prediction.notes)
    assert main(["plan", str(path)]) == 1
    assert "most compressed setting reaches" in capsys.readouterr().err
    with pytest.raises(Infeasible, match="size <= 1%"):
        squeezelang.run(path, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_feasible_trial_reports_closest(tmp_path, tiny_bert_dir, sentences_file):
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.5 .. 0.95)", "faithful >= 0.99999",
                  'search { trials = 3 }')
    result = squeezelang.run(path, output=tmp_path / "out")
    assert not result.ok
    trials = result.report["trials"]
    assert 1 <= len(trials) <= 3
    assert any("closest" in n for n in result.notes)
    # the trial run for real is the one of least violation, each trial's logged in the report
    assert all(t["violation"] > 0 for t in trials)
    closest = min(trials, key=lambda t: t["violation"])
    assert result.report["stages"][0]["params"]["ratio"] == closest["values"]["sparse"]["ratio"]


def test_parallel_workers_search_the_same_way(tmp_path, tiny_bert_dir, sentences_file):
    """Two worker processes split the bisection interval in two per round; the chosen setting is
    feasible, pushed at least as far as the serial search's, and verified by the final run alone."""
    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.95)", "faithful >= 0.99995",
                  'search { strategy = "bisect", trials = 6, workers = 2, backend = "process" }')
    result = squeezelang.run(path, output=tmp_path / "out")
    trials = result.report["trials"]
    assert result.ok and 3 <= len(trials) <= 6
    chosen = result.report["stages"][0]["params"]["ratio"]
    feasible = [t["values"]["sparse"]["ratio"] for t in trials if t["feasible"]]
    assert chosen == max(feasible)
    assert any(t["feasible"] for t in trials) and any(not t["feasible"] for t in trials)
    serial = squeezelang.run(recipe(tmp_path, tiny_bert_dir, sentences_file, "auto(0.05 .. 0.95)",
                                    "faithful >= 0.99995", 'search { strategy = "bisect", trials = 6 }'),
                             output=tmp_path / "serial")
    # the same function of the same data: a trial at the same ratio measures the same fidelity
    by_ratio = {t["values"]["sparse"]["ratio"]: t["metrics"]["faithful"] for t in serial.report["trials"]}
    for t in trials:
        r = t["values"]["sparse"]["ratio"]
        if r in by_ratio:
            assert t["metrics"]["faithful"] == pytest.approx(by_ratio[r], abs=1e-6)


def test_serial_backend_refuses_workers(tmp_path, tiny_bert_dir, sentences_file):
    from squeezelang.errors import RecipeErrors

    path = recipe(tmp_path, tiny_bert_dir, sentences_file, "auto", "faithful >= 0.9",
                  'search { workers = 2, backend = "serial", address = "ray://x:10001" }')
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(path)
    messages = [e.message for e in info.value.errors]
    assert messages == ['backend "serial" runs one trial at a time',
                        "'address' applies to backend \"ray\" only"]
