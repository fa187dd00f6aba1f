"""Parsing goes on past a syntax error: one check reports every broken statement, and nothing else.

Each case gives a recipe with several independent mistakes and every error expected, in order:
``(line, column, message fragment)``. The broken statement or block item is left out, so no error
follows from another; a recipe with one mistake still gets exactly one error (see
``test_mistakes.py``, which also checks that the first error is the one reported before).
"""
from __future__ import annotations

import pytest

from squeezelang.errors import RecipeErrors
from squeezelang.lang.diagnostics import format_errors
from squeezelang.lang.parser import parse
from test_lang_diagnostics import DIAGNOSTICS

SEVERAL = [
    # two broken statements, and good ones around them
    ('model = hf("m")\nstage p { a = = 1 }\ndata d = text("x")\nstage q { c = [1, 2 }\n',
     [(2, 15, "unexpected '=' — expected a value"), (4, 21, "unexpected '}' — expected a value")]),
    # a broken item: the block goes on after it, its other items are checked
    ('stage p {\n    a = = 1\n    b = 12mb\n    c = (2)\n}\n',
     [(2, 9, "unexpected '='"), (3, 9, "unknown unit 'mb'"), (4, 9, "unexpected '('")]),
    # items separated by commas on one line
    ('search { trials = , seed = 1, seed = 2 }',
     [(1, 19, "unexpected ','"), (1, 31, "duplicate key 'seed'")]),
    # a block left open ends at the next statement; the statements after it are checked
    ('stage a: b { x = 1\nstage c: d { y = 2 }\nmodle = hf("m")\ndata sts csv("x")\n',
     [(2, 7, "unexpected 'c' — expected '='"), (3, 1, "unknown statement 'modle'"),
      (4, 10, "unexpected 'csv'")]),
    # bad characters: each reported once, their statements or items left out
    ("recipe 'x'\nconstraints { size != 20%, latency <= 5ms; }\nstage p { a = .5 }\n",
     [(1, 8, "unexpected character '''"), (2, 20, "unexpected character '!'"),
      (2, 42, "unexpected character ';'"), (3, 15, "unexpected character '.'")]),
    # a string broken over two lines is one error; the recipe goes on after it
    ('recipe "a\nb"\nmodel = hf "m"\nsearch { seed = 1 .. }\n',
     [(1, 8, "unterminated string"), (3, 12, "unexpected string \"m\""),
      (4, 22, "unexpected '}' — expected a value")]),
    # a unit apart from its number is one error, not also a stray name
    ("constraints { size <= 12 MB\n latency <= 5 ms }\nstage p { a = 1 = 2 }",
     [(1, 26, "unexpected 'MB' after the number 12"), (2, 15, "unexpected 'ms' after the number 5"),
      (3, 17, "unexpected '='")]),
    # the end of the file inside the last statement, after an earlier error
    ('output out\nstage p: prune {\n    ratio = 0.5\n',
     [(1, 8, "'output' takes a string in double quotes"),
      (3, 16, "unexpected end of file — a '{' block is not closed (opened at line 2)")]),
    # a stray closing brace between statements
    ('stage p { a = 1 }\n}\nuse squeezelang\n',
     [(2, 1, "unexpected '}' — expected a statement"), (3, 5, "'use' takes a string")]),
]


@pytest.mark.parametrize("source, expected", SEVERAL, ids=[c[0][:40] for c in SEVERAL])
def test_several_syntax_errors_in_one_run(source: str, expected: list[tuple[int, int, str]]):
    with pytest.raises(RecipeErrors) as info:
        parse(source, file="r.squeeze")
    errs = info.value.errors
    assert [(e.span.line, e.span.column) for e in errs] == [(line, col) for line, col, _ in expected], \
        [e.message for e in errs]
    for err, (line, column, fragment) in zip(errs, expected):
        assert fragment in err.message, err.message
        assert f"r.squeeze:{line}:{column}: error: {err.message}" in format_errors(info.value)


def test_recovery_keeps_well_formed_statements():
    """A statement after a broken one is parsed: its own mistakes show, its good parts do not."""
    with pytest.raises(RecipeErrors) as info:
        parse('stage p { a = = 1 }\nstage p { b = 2 }\nstage p { c = 3 }\n')
    messages = [e.message for e in info.value.errors]
    assert messages == ["unexpected '=' — expected a value"]  # no duplicate stage: names are checked later


@pytest.mark.parametrize("source", [
    "}" * 50, "{" * 20, "stage " * 30, '"' * 9, "= " * 40 + "\n" + "stage p {" * 10, "a = [" * 30,
    "constraints { " + "size <= 1 " * 20, "#" + "\n}" * 10,
])
def test_pathological_input_ends_with_errors(source: str):
    with pytest.raises(RecipeErrors) as info:
        parse(source)
    assert info.value.errors and all(e.span is not None and e.span.line >= 1 for e in info.value.errors)


@pytest.mark.parametrize("source", [case[0] for case in DIAGNOSTICS], ids=range(len(DIAGNOSTICS)))
def test_one_mistake_is_one_error(source: str):
    with pytest.raises(RecipeErrors) as info:
        parse(source)
    assert len(info.value.errors) == 1, [e.message for e in info.value.errors]
