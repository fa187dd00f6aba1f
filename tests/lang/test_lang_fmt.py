"""The formatter writes canonical text that parses back to the same recipe."""
from __future__ import annotations

import pytest

from lang_recipes import GPT_RECIPE, ODD_RECIPE, SPEC_EXAMPLE
from squeezelang.lang.ast import (
    Arg, Auto, Block, Bool, Call, Constraint, Ident, ListV, ModelDecl, Num, Original, OutputDecl,
    Param, Range, Recipe, StageDecl, Str,
)
from squeezelang.lang.fmt import format_recipe, format_value
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
}

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
