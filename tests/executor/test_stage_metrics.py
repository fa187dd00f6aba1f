"""After each stage the run measures only what needs no forward pass (size, parameter counts) and
the metrics the recipe marks ``each_stage = true``; the saved artifact is always measured in full."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang
from squeezelang.errors import RecipeErrors

RECIPE = '''recipe "stages"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib{flag})
stage sparse: prune {{ ratio = 0.5 }}
stage int8: quantize {{ scheme = "int8" }}
constraints {{
    faithful >= 0.5
}}
'''


def write(tmp_path: Path, model: Path, sentences: Path, flag: str = "") -> Path:
    (tmp_path / "calib.txt").write_text(sentences.read_text())
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model, flag=flag))
    return recipe


def test_resolved_flags_follow_the_metric_unless_the_recipe_says(tmp_path, tiny_bert_dir,
                                                                 sentences_file):
    plan = squeezelang.plan(write(tmp_path, tiny_bert_dir, sentences_file)).plan
    flags = {m.name: (m.each_stage, m.each_stage_given) for m in plan.metrics}
    assert flags == {"faithful": (False, False), "size": (True, False),
                     "params": (True, False), "latency": (False, False)}
    marked = squeezelang.plan(write(tmp_path, tiny_bert_dir, sentences_file,
                                    ", each_stage = true")).plan
    assert marked.metric("faithful").each_stage and marked.metric("faithful").each_stage_given
    assert "each_stage" not in marked.metric("faithful").args  # the engine's, not the plugin's


def test_a_non_boolean_flag_is_an_error_at_its_column(tmp_path, tiny_bert_dir, sentences_file):
    recipe = write(tmp_path, tiny_bert_dir, sentences_file, ", each_stage = 3")
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    error = info.value.errors[0]
    line = recipe.read_text().splitlines()[error.span.line - 1]
    assert "each_stage must be true or false" in error.message
    assert line[error.span.column - 1:].startswith("3")


def test_stages_measure_only_cheap_metrics_by_default(tmp_path, tiny_bert_dir, sentences_file):
    result = squeezelang.run(write(tmp_path, tiny_bert_dir, sentences_file), quiet=True)
    for stage in result.report["stages"]:
        assert set(stage["metrics"]) == {"size", "params"}
    assert set(result.report["metrics"]) == {"faithful", "size", "params", "latency"}
    assert result.report["metrics"]["faithful"]["final"] is not None
    text = (result.output_dir / "report.md").read_text()
    assert "not measured after each stage (faithful, latency)" in text
    assert "each_stage" not in (result.output_dir / "recipe.lock.squeeze").read_text()


def test_a_marked_metric_is_measured_after_every_stage_and_locked(tmp_path, tiny_bert_dir,
                                                                 sentences_file):
    result = squeezelang.run(write(tmp_path, tiny_bert_dir, sentences_file,
                                   ", each_stage = true"), quiet=True)
    values = [stage["metrics"]["faithful"] for stage in result.report["stages"]]
    assert len(values) == 2 and all(0.0 < v <= 1.0 for v in values)
    assert all("latency" not in stage["metrics"] for stage in result.report["stages"])
    lock = (result.output_dir / "recipe.lock.squeeze").read_text()
    assert "each_stage = true" in lock
    again = squeezelang.plan(result.output_dir / "recipe.lock.squeeze").plan
    assert again.metric("faithful").each_stage
