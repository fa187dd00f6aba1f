"""The formatter writes canonical text that parses back to the same recipe."""
from __future__ import annotations

import pytest

from lang_recipes import GPT_RECIPE, ODD_RECIPE, SPEC_EXAMPLE
from squeezelang.lang.ast import (
    Arg, Auto, Block, Bool, Call, Constraint, Ident, ListV, ModelDecl, Num, Original, OutputDecl,
    Param, Range, Recipe, StageDecl, Str,
)
from squeezelang.lang.fmt import format_recipe, format_value
from squeezelang.errors import RecipeErrors
from squeezelang.lang.parser import parse

MESSY = '''\
output "o"   constraints{size<=1MB,drop(q)<1%}
stage p{a=1 b=[ "x" ,"y",] c=f( 1 , k=2 )}   # trailing
data d=text("t")  recipe "r"   use "u"   metric q=spearman(d)  model=hf("m")
search{seed=0}
'''

RECIPES = [SPEC_EXAMPLE, GPT_RECIPE, ODD_RECIPE, MESSY, ""]


@pytest.mark.parametrize("text", RECIPES)
def test_round_trip(text):
    recipe = parse(text)
    assert parse(format_recipe(recipe)) == recipe


@pytest.mark.parametrize("text", RECIPES)
def test_idempotent(text):
    once = format_recipe(parse(text))
    assert format_recipe(parse(once)) == once


def test_canonical_layout():
    assert format_recipe(parse(MESSY)) == '''\
recipe "r"

use "u"

model = hf("m")

data d = text("t")

metric q = spearman(d)

stage p {
    a = 1
    b = ["x", "y"]
    c = f(1, k = 2)
}  # trailing

constraints {
    size <= 1MB
    drop(q) < 1%
}

search {
    seed = 0
}

output "o"
'''


def test_equality_ignores_spans():
    assert parse("stage p { a = 1 }") == parse("\n\n   stage    p {\n\n a=1 }")
    assert parse("stage p { a = 1 }") != parse("stage p { a = 2 }")


def test_strings_are_re_escaped():
    assert format_value(Str('a "b" \\ c')) == '"a \\"b\\" \\\\ c"'
    assert format_recipe(parse(ODD_RECIPE)).startswith('recipe "quote \\" and backslash \\\\ inside"')


@pytest.mark.parametrize("value, text", [
    (Num(0.35, None, "0.35"), "0.35"),
    (Num(0.35), "0.35"),
    (Num(300.0), "300"),
    (Num(-2.0), "-2"),
    (Num(1e-5), "1e-05"),
    (Num(20, "%"), "20%"),
    (Num(20, "%", "20%"), "20%"),
    (Num(1e-3, None, "1e-3"), "1e-3"),
    (Num(30, "min", "30"), "30min"),
    (Bool(True), "true"),
    (Original(), "original"),
    (Ident("calib"), "calib"),
    (Auto(), "auto"),
    (Auto(Range(Num(0.1), Num(0.6))), "auto(0.1 .. 0.6)"),
    (Range(Num(1), Num(5)), "1 .. 5"),
    (ListV((Str("a"), Str("b"))), '["a", "b"]'),
    (ListV(()), "[]"),
    (Call("hf", (Arg(None, Call("package", (Arg(None, Str("x")), Arg(None, Str("y"))))),
                 Arg("task", Str("embedding")))), 'hf(package("x", "y"), task = "embedding")'),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_hand_built_recipe_formats_and_parses():
    recipe = Recipe(
        name="lock",
        model=ModelDecl(Call("hf", (Arg(None, Str("m")),))),
        stages=(StageDecl("prune", "prune", (Param("ratio", Num(0.35, None, "0.35")),)),
                StageDecl("q", "quantize", (Param("bits", Num(8, None, "8")),), explicit_name=True)),
        constraints=(Constraint("size", "<=", Num(20, "%", "20")),),
        search=Block((Param("trials", Num(0, None, "0")),)),
        output=OutputDecl(Str("out"), Block(())),
    )
    text = format_recipe(recipe)
    assert "stage prune {\n    ratio = 0.35\n}" in text
    assert "stage q: quantize {" in text
    assert 'output "o' in text and text.endswith('output "out" {}\n')
    assert parse(text) == recipe


def test_stage_named_differently_is_written_explicitly():
    recipe = Recipe(stages=(StageDecl("a", "b", ()),))
    assert format_recipe(recipe) == "stage a: b {}\n"


@pytest.mark.parametrize("value", [Str("two\nlines"), Ident("not a name"), Num(float("nan"))])
def test_unwritable_values_raise_value_error(value):
    with pytest.raises(ValueError):
        format_value(value)


# ---------------------------------------------------------------- comments
# (recipe text with comments in one kind of position, its formatted text)
COMMENTED = [
    ("# header\n\nmodel = hf(\"m\")\n", "# header\n\nmodel = hf(\"m\")\n"),
    ("# about the model\nmodel = hf(\"m\")\n", "# about the model\nmodel = hf(\"m\")\n"),
    ('model = hf("m")   # why this model\n', 'model = hf("m")  # why this model\n'),
    ('stage x: prune { ratio = 0.5 }  # why\n', "stage x: prune {\n    ratio = 0.5\n}  # why\n"),
    ("stage p {  # the first try\n    a = 1\n}\n", "stage p {  # the first try\n    a = 1\n}\n"),
    ("stage p {\n    # before a\n    a = 1  # after a\n    # end of p\n}\n",
     "stage p {\n    # before a\n    a = 1  # after a\n    # end of p\n}\n"),
    ("stage p { a = 1  # after a\n  b = 2 }\n", "stage p {\n    a = 1  # after a\n    b = 2\n}\n"),
    ('data d = csv("x",  # the file\n    columns = ["a"])\n',
     '# the file\ndata d = csv("x", columns = ["a"])\n'),
    ("stage p {\n    include = [\n        \"a\",  # attention\n    ]\n}\n",
     "stage p {\n    # attention\n    include = [\"a\"]\n}\n"),
    ("constraints {\n    size <= 20%  # of the original\n    # quality last\n    q >= 1\n}\n",
     "constraints {\n    size <= 20%  # of the original\n    # quality last\n    q >= 1\n}\n"),
    ("constraints {\n    # none yet\n}\n", "constraints {\n    # none yet\n}\n"),
    ("search {}  # defaults\n", "search {}  # defaults\n"),
    ('output "o" {  # options\n}\n', 'output "o" {  # options\n}\n'),
    ('model = hf("m")\n# the end\n', 'model = hf("m")\n\n# the end\n'),
    ("# only a comment\n", "# only a comment\n"),
    # canonical order: each comment moves with its statement
    ('# the output\noutput "o"  # here\n# the name\nrecipe "r"  # short\n',
     '# the name\nrecipe "r"  # short\n\n# the output\noutput "o"  # here\n'),
    ('# top\n\n# stage b\nstage b {}\n# stage a\nstage a: prune {}\nmodel = hf("m")  # m\n',
     '# top\n\nmodel = hf("m")  # m\n\n# stage b\nstage b {}\n\n# stage a\nstage a: prune {}\n'),
    ('recipe "r"\r\n# crlf\r\nmodel = hf("m")  # crlf too\r\n',
     'recipe "r"\n\n# crlf\nmodel = hf("m")  # crlf too\n'),
]


@pytest.mark.parametrize("text, expected", COMMENTED, ids=range(len(COMMENTED)))
def test_comments_are_kept(text: str, expected: str):
    recipe = parse(text)
    formatted = format_recipe(recipe)
    assert formatted == expected
    assert parse(formatted) == recipe
    assert format_recipe(parse(formatted)) == formatted


def _corpus() -> list[str]:
    """Every recipe text of the tests and specs that parses."""
    from pathlib import Path

    from test_mistakes import MISTAKES

    root = Path(__file__).resolve().parents[2]
    texts = [p.read_text(encoding="utf-8") for p in sorted(root.glob("specs/*.squeeze"))]
    texts += RECIPES + [text for text, _ in COMMENTED]
    texts += [c.values[0] for c in MISTAKES if isinstance(c.values[0], str)]
    return [text for text in texts if _parses(text)]


def _parses(text: str) -> bool:
    try:
        parse(text)
    except RecipeErrors:
        return False
    return True


def _sprinkled(text: str) -> str:
    """The text with a comment at the end of every line and on a line of its own before each."""
    lines = text.split("\n")
    return "\n".join(f"# above {n}\n{line}  # after {n}" for n, line in enumerate(lines))


CORPUS = _corpus()


@pytest.mark.parametrize("text", CORPUS + [_sprinkled(t) for t in CORPUS], ids=range(2 * len(CORPUS)))
def test_no_comment_is_lost(text: str):
    recipe = parse(text)
    formatted = format_recipe(recipe)
    again = parse(formatted)
    assert again == recipe
    assert sorted(c.text for c in again.comments) == sorted(c.text.rstrip() for c in recipe.comments)
    assert format_recipe(again) == formatted


def test_comments_of_hand_built_nodes_go_to_the_end():
    """A recipe whose nodes were not read from text still keeps comments (at the end)."""
    from squeezelang.lang.ast import Comment, Span

    recipe = Recipe(name="r", comments=(Comment("# kept", Span(3, 1, 3, 7)),))
    assert format_recipe(recipe) == 'recipe "r"\n\n# kept\n'
