"""Constraints-only recipes: ``compose { … }`` picks the stages; the lock file records the choice."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang
from squeezelang.cli import main
from squeezelang.errors import Infeasible, RecipeErrors


def write(tmp_path: Path, model: Path, sentences: Path, compose: str, constraints: str,
          search: str = "search { trials = 6 }") -> Path:
    (tmp_path / "calib.txt").write_text(sentences.read_text())
    path = tmp_path / "r.squeeze"
    path.write_text(f'''recipe "auto"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
{compose}
constraints {{ {constraints} }}
{search}
''')
    return path


def errors_of(path: Path) -> list[tuple[int, int, str]]:
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(path)
    return [(e.span.line, e.span.column, e.message) for e in info.value.errors]


def test_compose_is_checked_with_positions(tmp_path, tiny_bert_dir, sentences_file):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantise", "shrink"], data = calib, stages = 0 }', "size <= 50%")
    errs = errors_of(path)
    # every problem of the block in one check: the names and the range together, not in waves
    assert (5, 66, "'stages' must be between 1 and 6") in errs
    assert (5, 20, "unknown technique 'quantise'") in errs
    assert any(col == 32 and "'shrink' cannot be composed" in msg for _, col, msg in errs)
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantise", "shrink"], data = calib }', "size <= 50%")
    errs = errors_of(path)
    assert (5, 20, "unknown technique 'quantise'") in errs
    assert any(line == 5 and col == 32 and "'shrink' cannot be composed" in msg
               for line, col, msg in errs)


def test_compose_refuses_stages_and_needs_constraints(tmp_path, tiny_bert_dir, sentences_file):
    path = tmp_path / "r.squeeze"
    path.write_text(f'''model = hf("{tiny_bert_dir}", task = "embedding")
stage q: quantize {{ }}
compose {{ allow = ["quantize"] }}
''')
    messages = [m for _, _, m in errors_of(path)]
    assert "a recipe gives either stages or compose { … }, not both" in messages
    assert "compose needs constraints to aim at" in messages


def test_plan_ranks_pipelines_and_solves_size_analytically(tmp_path, tiny_bert_dir, sentences_file):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantize", "prune", "vocab_trim"], data = calib, stages = 2 }',
                 "size <= 30%, faithful >= 0.9")
    from squeezelang.hooks.manager import default_registries
    from squeezelang.planner.compose import pipelines
    from squeezelang.planner.estimate import planning_context

    plan = squeezelang.check(path)
    regs = default_registries()
    ranked = pipelines(plan, regs, planning_context(plan, regs))
    reachable = [p for p in ranked if p.feasible]
    assert reachable and len(reachable) < len(ranked)  # some are ruled out by the estimates
    assert [p.risk for p in reachable] == sorted(p.risk for p in reachable)
    for p in ranked:
        techniques = [s.technique for s in p.stages]
        assert len(set(techniques)) == len(techniques)
        assert "quantize" not in techniques[:-1]  # nothing runs after quantization
        if not p.feasible:
            assert p.unreachable == ("size <= 30%",)
            assert p.best_size > 0
    # the prune candidate's ratio is auto and the plan shows its solved floor
    assert main(["plan", str(path)]) == 0


def test_impossible_compose_is_refused_at_plan_time(tmp_path, tiny_bert_dir, sentences_file, capsys):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantize", "prune"], stages = 2 }', "size <= 1%")
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert "size <= 1%" in err and "smallest predicted is" in err and "MB" in err
    with pytest.raises(Infeasible):
        squeezelang.run(path, output=tmp_path / "out")
    assert main(["run", str(path), "-o", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_compose_run_meets_constraints_and_lock_records_the_choice(tmp_path, tiny_bert_dir,
                                                                  sentences_file):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantize", "prune"], stages = 2 }',
                 "size <= 30%, faithful >= 0.9", "search { trials = 8, seed = 0 }")
    result = squeezelang.run(path, output=tmp_path / "out")
    report = result.report
    assert result.ok
    assert report["composition"]["chosen"] in {p["pipeline"] for p in report["composition"]["considered"]}
    assert 1 <= len(report["trials"]) <= 8
    assert all(t["pipeline"] for t in report["trials"])
    # not the first pipeline that passes: every reachable one is tried or skipped with a reason
    # (or the budget ran out), and the smallest clear pass among them is chosen
    tried = {t["pipeline"] for t in report["trials"]}
    skipped = {note.split(":")[0] for note in report["composition"]["skipped"]}
    reachable = {p["pipeline"] for p in report["composition"]["considered"] if not p["unreachable"]}
    assert reachable <= tried | skipped or len(report["trials"]) == 8
    feasible = [t for t in report["trials"] if t["feasible"]]
    assert report["metrics"]["size"]["final"] == min(t["size"] for t in feasible)
    chosen = [s["technique"] for s in report["stages"]]
    assert report["composition"]["chosen"].startswith(chosen[0]) or chosen
    lock = (tmp_path / "out" / "recipe.lock.squeeze").read_text()
    assert "compose" not in lock and "= auto" not in lock
    for name in chosen:
        assert f": {name} {{" in lock
    again = squeezelang.run(tmp_path / "out" / "recipe.lock.squeeze", output=tmp_path / "again")
    assert again.report["trials"] == []
    assert again.report["metrics"]["size"]["final"] == report["metrics"]["size"]["final"]
    assert again.report["metrics"]["faithful"]["final"] == pytest.approx(
        report["metrics"]["faithful"]["final"], abs=1e-5)


def test_latency_constraint_composes_only_faster_pipelines(tmp_path, tiny_bert_dir, sentences_file):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["quantize", "prune", "vocab_trim"], data = calib }',
                 "latency <= 90%")
    from squeezelang.hooks.manager import default_registries
    from squeezelang.planner.compose import pipelines
    from squeezelang.planner.estimate import planning_context

    plan = squeezelang.check(path)
    regs = default_registries()
    labels = [p.label for p in pipelines(plan, regs, planning_context(plan, regs))]
    faster = ("int8-dynamic", "activation-mlp", "depth")
    assert labels and all(any(f in label for f in faster) for label in labels)
    assert "depth" in labels  # whole layers dropped: a structured, faster candidate


def test_same_recipe_and_seed_make_the_same_choices(tmp_path, tiny_bert_dir, sentences_file):
    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["prune", "quantize"], stages = 2 }',
                 "size <= 60%, faithful >= 0.9999",
                 'search { strategy = "random", trials = 4, seed = 3 }')
    first = squeezelang.run(path, output=tmp_path / "a").report
    second = squeezelang.run(path, output=tmp_path / "b").report
    assert [(t.get("pipeline"), t["values"]) for t in first["trials"]] == \
        [(t.get("pipeline"), t["values"]) for t in second["trials"]]
    assert first["composition"]["chosen"] == second["composition"]["chosen"]
    assert [s["params"] for s in first["stages"]] == [s["params"] for s in second["stages"]]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_failing_knobless_prefix_rules_out_every_pipeline_that_starts_with_it(
        tmp_path, tiny_bert_dir, sentences_file):
    from squeezelang.search.judging import failing_prefixes

    path = write(tmp_path, tiny_bert_dir, sentences_file,
                 'compose { allow = ["vocab_trim", "prune", "quantize"], data = calib }',
                 "faithful >= 0.99")
    plan = squeezelang.check(path)
    from dataclasses import replace

    from squeezelang.hooks.manager import default_registries
    from squeezelang.planner.compose import pipelines, with_pipeline
    from squeezelang.planner.estimate import planning_context

    regs = default_registries()
    ranked = pipelines(plan, regs, planning_context(plan, regs))
    pipe = next(p for p in ranked if p.labels == ("vocab_trim", "magnitude", "int8"))
    fixed = with_pipeline(plan, pipe)
    fixed = replace(fixed, stages=tuple(replace(s, autos={}) if s.technique != "prune" else s
                                        for s in fixed.stages))
    original = {"faithful": 1.0}
    bad_first = {"original": original, "stages": {"vocab_trim": {"faithful": 0.95},
                                                  "prune": {"faithful": 0.9}, "quantize": {"faithful": 0.9}}}
    fine_first = {"original": original, "stages": {"vocab_trim": {"faithful": 0.999},
                                                   "prune": {"faithful": 0.9}, "quantize": {"faithful": 0.9}}}
    assert failing_prefixes(fixed, pipe.labels, [bad_first]) == [("vocab_trim",)]
    # the prune stage has a knob: a smaller ratio might pass, so nothing is concluded from it
    assert failing_prefixes(fixed, pipe.labels, [fine_first]) == []
