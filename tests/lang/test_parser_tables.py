"""The generated parser tables (``squeezelang.grammar.tables``) are current and parse like the grammar.

``squeeze check`` loads the LALR parser from these tables instead of building it from the grammar
(the slowest part of a check). They must have been made from the grammar as it is now; after
editing ``grammar/squeeze.lark``, regenerate them with ``python -m squeezelang.lang.parser``.
"""
from __future__ import annotations

from pathlib import Path

import lark
import pytest
from lark import Lark

from squeezelang.errors import RecipeErrors
from squeezelang.grammar import tables
from squeezelang.lang import parser
from lang_recipes import GPT_RECIPE, ODD_RECIPE, SPEC_EXAMPLE
from test_lang_diagnostics import DIAGNOSTICS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [SPEC_EXAMPLE, GPT_RECIPE, ODD_RECIPE] + [p.read_text()
                                                    for p in sorted((ROOT / "specs").glob("*.squeeze"))]
REGENERATE = "the grammar changed: regenerate the tables with `python -m squeezelang.lang.parser`"


@pytest.fixture(scope="module")
def built() -> Lark:
    """The parser built from the grammar, as it would be without the tables."""
    return Lark(parser._grammar(), **parser._LARK_OPTIONS)


def test_the_tables_are_made_from_this_grammar_and_lark():
    assert tables.GRAMMAR_SHA256 == parser._digest(parser._grammar()), REGENERATE
    assert tables.LARK_VERSION == lark.__version__, REGENERATE


def test_the_parser_comes_from_the_tables():
    assert parser._lark().source_path == "<deserialized>"


@pytest.mark.parametrize("text", RECIPES, ids=range(len(RECIPES)))
def test_same_tokens_and_trees_as_the_grammar(built: Lark, text: str):
    loaded = parser._lark()
    assert [(t.type, t.value, t.line, t.column) for t in loaded.lex(text)] == \
        [(t.type, t.value, t.line, t.column) for t in built.lex(text)]
    mine, theirs = loaded.parse(text), built.parse(text)
    assert mine == theirs
    spans = [(t.meta.line, t.meta.column, t.meta.end_line, t.meta.end_column)
             for t in mine.iter_subtrees() if not t.meta.empty]
    assert spans == [(t.meta.line, t.meta.column, t.meta.end_line, t.meta.end_column)
                     for t in theirs.iter_subtrees() if not t.meta.empty]


@pytest.mark.parametrize("source", [case[0] for case in DIAGNOSTICS], ids=range(len(DIAGNOSTICS)))
def test_same_syntax_errors_as_the_grammar(built: Lark, source: str, monkeypatch):
    def errors() -> list[tuple[str, int, int]]:
        with pytest.raises(RecipeErrors) as info:
            parser.parse(source)
        return [(e.message, e.span.line if e.span else 0, e.span.column if e.span else 0)
                for e in info.value.errors]

    from_tables = errors()
    monkeypatch.setattr(parser, "_lark", lambda: built)
    assert from_tables == errors()
