"""Syntax-level mistakes are reported at the right place, with a clear message and, often, a hint."""
from __future__ import annotations

import pytest

from squeezelang.errors import RecipeError, RecipeErrors
from squeezelang.lang.ast import Span
from squeezelang.lang.diagnostics import did_you_mean, format_error, format_errors, suggest
from squeezelang.lang.parser import parse

DIAGNOSTICS = [
    # (source, line, column, message substring)
    ('modle = hf("x")', 1, 1, "unknown statement 'modle' — did you mean 'model'?"),
    ('recipe "a"\nrecipe "b"', 2, 1, "duplicate 'recipe' statement"),
    ('model = hf("a")\n\nmodel = hf("b")', 3, 1, "duplicate 'model' statement"),
    ("search {}\nsearch {}", 2, 1, "duplicate 'search' statement"),
    ("stage p: prune { ratio = }", 1, 26, "unexpected '}' — expected a value"),
    ('recipe "abc\nmodel = hf("x")', 1, 8, "unterminated string"),
    ("stage p: prune {\n    ratio = 0.5\n", 2, 16,
     "unexpected end of file — a '{' block is not closed (opened at line 1)"),
    ('model = hf("x"', 1, 15, "a '(' is not closed (opened at line 1)"),
    ('stage p { a = [1, 2 }', 1, 21, "unexpected '}'"),
    ("constraints { size <= 12 MB }", 1, 26, "unexpected 'MB' after the number 12"),
    ("search { timeout = 30 min }", 1, 23, "unexpected 'min' after the number 30"),
    ("constraints { size <= 12mb }", 1, 23, "unknown unit 'mb' — did you mean 'MB'?"),
    ("search { timeout = 30mins }", 1, 20, "unknown unit 'mins' — did you mean 'min'?"),
    ('recipe "a\\nb"', 1, 10, "unknown escape '\\n'"),
    ('use "ok"\nuse "tab\\there"', 2, 9, "unknown escape '\\t'"),
    ("stage p: prune { ratio = [auto] }", 1, 27, "auto must be a whole value"),
    ("stage p: prune { ratio = auto(1) }", 1, 26, "auto takes one range"),
    ("stage p: prune { ratio = auto .. 2 }", 1, 26, "a range's bounds must be numbers"),
    ('stage p { r = "a" .. 2 }', 1, 15, "a range's bounds must be numbers, not a string"),
    ("constraints { size = 20% }", 1, 15, "expected a comparison in constraints"),
    ("constraints { size =< 20% }", 1, 21, "unexpected '<' — expected a value"),
    ("constraints { size != 20% }", 1, 20, "unexpected character '!'"),
    ("constraints { dorp(q) <= 1 }", 1, 15,
     "unknown constraint subject 'dorp(…)' — did you mean 'drop'?"),
    ("constraints { size <= auto }", 1, 23, "a constraint bound must be a number, not auto"),
    ('constraints { size <= "small" }', 1, 23, "a constraint bound must be a number, not a string"),
    ("constraints { size <= }", 1, 23, "unexpected '}' — expected a value"),
    ("constraints { size 20% }", 1, 20, "expected a comparison"),
    ("stage trim vocab_trim { }", 1, 12, "unexpected 'vocab_trim'"),
    ('data sts csv("x")', 1, 10, "unexpected 'csv'"),
    ('model = "x"', 1, 9, "'model' needs a source call, not a string"),
    ("data d = calib", 1, 10, "'data' needs a source call, not a name"),
    ("stage p: prune { ratio = 0.5, ratio = 0.6 }", 1, 31, "duplicate key 'ratio'"),
    ("metric m = f(a = 1, a = 2)", 1, 21, "duplicate argument 'a'"),
    ('model = hf(task = "x", "p")', 1, 24, "a positional argument cannot follow a keyword argument"),
    ("stage p: prune { size <= 3 }", 1, 18, "a comparison cannot appear in a stage block"),
    ("recipe 'x'", 1, 8, "unexpected character '''"),
    ("stage p { a = .5 }", 1, 15, "unexpected character '.'"),
    ("stage p { a = 1 }\n}", 2, 1, "unexpected '}' — expected a statement"),
    ("stage a: b { x = 1\nstage c: d { y = 2 }", 2, 7, "unexpected 'c'"),
    ("stage {}", 1, 1, "malformed 'stage' statement"),
    ("model", 1, 1, "incomplete 'model' statement"),
    ('recipe = "x"', 1, 1, "malformed 'recipe' statement"),
    ('recipe "x" { a = 1 }', 1, 12, "'recipe' takes no block"),
    ('data auto = text("x")', 1, 6, "'auto' is a keyword and cannot name a data set"),
    ("stage original: prune {}", 1, 7, "'original' is a keyword and cannot name a stage"),
    ("ratio = 0.5", 1, 1, "unknown statement 'ratio'"),
    ("stage p { a = 1 .. }", 1, 20, "unexpected '}' — expected a value"),
    ("stage p { a = (1) }", 1, 15, "unexpected '('"),
    ("stage p { a = 1 = 2 }", 1, 17, "unexpected '='"),
    ("stage p { a = - }", 1, 17, "unexpected '}' — expected a number"),
    ("stage p { a = 1; b = 2 }", 1, 16, "unexpected character ';'"),
    ('output "o" { format = "x" size <= 3 }', 1, 27, "a comparison cannot appear in an output block"),
    ("constraints { size <= 20% ]", 1, 27, "unexpected ']'"),
]


@pytest.mark.parametrize("source, line, column, message", DIAGNOSTICS,
                         ids=[case[0][:40] for case in DIAGNOSTICS])
def test_diagnostic(source, line, column, message):
    with pytest.raises(RecipeErrors) as info:
        parse(source)
    errors = info.value.errors
    assert errors, "no error reported"
    first = errors[0]
    assert message in first.message, [e.message for e in errors]
    assert (first.span.line, first.span.column) == (line, column)
    assert info.value.source == source


@pytest.mark.parametrize("source, hint", [
    ("constraints { size <= 12 MB }", "a unit must follow the number directly: 12MB"),
    ('recipe "a"\nrecipe "b"', "the first 'recipe' is at line 1"),
    ("stage trim vocab_trim { }", "stage trim: vocab_trim"),
    ("stage a: b { x = 1\nstage c: d { y = 2 }", "is a '}' missing? the block opened at line 1"),
    ('data sts csv("x")', "is an '=' missing?"),
    ("constraints { size =< 20% }", "<="),
    ("constraints { size = 20% }", "size <= 20%"),
    ("recipe 'x'", "double quotes"),
    ("stage {}", "stage NAME: TECHNIQUE"),
])
def test_hints(source, hint):
    with pytest.raises(RecipeErrors) as info:
        parse(source)
    assert hint in (info.value.errors[0].hint or "")


def test_format_error_exact():
    source = "stage p {\n    ratio = 12mb\n}\n"
    with pytest.raises(RecipeErrors) as info:
        parse(source, file="r.squeeze")
    assert format_errors(info.value) == (
        "r.squeeze:2:13: error: unknown unit 'mb' — did you mean 'MB'?\n"
        "   2 |     ratio = 12mb\n"
        "     |             ^^^^"
    )


def test_format_error_with_hint_and_wide_line_number():
    source = "\n" * 11 + "constraints { size <= 12 MB }\n"
    with pytest.raises(RecipeErrors) as info:
        parse(source)
    assert format_errors(info.value) == (
        "<recipe>:12:26: error: unexpected 'MB' after the number 12\n"
        "   12 | constraints { size <= 12 MB }\n"
        "      |                          ^^\n"
        "   hint: a unit must follow the number directly: 12MB"
    )


def test_format_errors_separates_with_blank_lines():
    errs = RecipeErrors([RecipeError("one", Span(1, 1, 1, 2)), RecipeError("two", Span(2, 3, 2, 3))],
                        source="ab\ncd", file="f")
    assert format_errors(errs) == (
        "f:1:1: error: one\n   1 | ab\n     | ^\n\n"
        "f:2:3: error: two\n   2 | cd\n     |   ^"
    )


def test_format_error_without_span():
    err = RecipeError("cannot read recipe file: gone", None, "check the path")
    assert format_error(err, "", None) == (
        "<recipe>: error: cannot read recipe file: gone\n   hint: check the path")
    assert format_error(RecipeError("x", Span(0, 0, 0, 0)), "abc", "f") == "f: error: x"


def test_format_error_multiline_span_underlines_to_end_of_line():
    err = RecipeError("m", Span(1, 3, 3, 2))
    assert format_error(err, "abcdef\nx\ny", None).splitlines()[2] == "     |   ^^^^"


def test_format_error_keeps_tabs_under_tabs():
    err = RecipeError("m", Span(1, 3, 1, 4))
    assert format_error(err, "\t\tx", None).splitlines()[2] == "     | \t\t^"


def test_format_error_prefers_the_errors_own_file():
    err = RecipeError("m", Span(1, 1, 1, 2), file="other.squeeze")
    assert format_error(err, "abc", "main.squeeze") == "other.squeeze:1:1: error: m"


def test_eof_error_points_after_the_last_character():
    with pytest.raises(RecipeErrors) as info:
        parse("stage p {\n  a = 1   \n\n\n")
    assert info.value.errors[0].span == Span(2, 8, 2, 9)


def test_suggest_and_did_you_mean():
    assert suggest("modle", ["model", "data"]) == "model"
    assert suggest("zzz", ["model", "data"]) is None
    assert suggest("Model", ["model"]) == "model"
    assert did_you_mean("serach", ["search", "stage"]) == " — did you mean 'search'?"
    assert did_you_mean("qqq", ["search"]) == ""
