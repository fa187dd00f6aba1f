"""The syntax of recipes apart from the grammar: statement keywords and their shapes, and the
messages for text the grammar rejects (a bad character, an unexpected token, an early end of file).

Both the parser and its error recovery (:mod:`squeezelang.lang.recovery`) use these; nothing here
builds AST nodes.
"""
from __future__ import annotations

import re

from lark import Token
from lark.exceptions import UnexpectedCharacters

from squeezelang.errors import RecipeError
from squeezelang.lang.ast import Span
from squeezelang.lang.diagnostics import did_you_mean
from squeezelang.lang.units import spelled_unit


# Statement keywords, in canonical order, with the one shape each may take.
STATEMENTS: dict[str, str] = {
    "recipe": "string", "use": "string", "model": "assign", "data": "decl", "metric": "decl",
    "stage": "stage", "compose": "block", "constraints": "block", "search": "block",
    "output": "string",
}
USAGE = {
    "recipe": 'recipe "name"',
    "use": 'use "distribution"',
    "model": 'model = SOURCE(…), e.g. model = hf("path", task = "embedding")',
    "data": 'data NAME = SOURCE(…), e.g. data calib = text("calib.txt")',
    "metric": "metric NAME = KIND(…), e.g. metric quality = spearman(sts)",
    "stage": "stage NAME: TECHNIQUE { key = value … } or stage TECHNIQUE { … }",
    "constraints": "constraints { SUBJECT OP BOUND … }",
    "compose": 'compose { allow = ["technique", …], data = NAME, stages = N }',
    "search": "search { key = value … }",
    "output": 'output "dir" or output "dir" { format = … }',
}
KEYWORDS = frozenset(STATEMENTS) | {"auto", "original", "drop", "of", "true", "false"}
NUMBER_TEXT = re.compile(r"(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(.*)", re.DOTALL)
_OPENERS = {"LBRACE": "RBRACE", "LPAREN": "RPAREN", "LBRACKET": "RBRACKET"}
_VALUE_START = {"STRING", "NUMBER", "LBRACKET", "MINUS", "IDENT"}
_DESCRIBE = {
    "IDENT": "a name", "STRING": "a string", "NUMBER": "a number", "LBRACE": "'{'",
    "RBRACE": "'}'", "LPAREN": "'('", "RPAREN": "')'", "LBRACKET": "'['", "RBRACKET": "']'",
    "EQUALS": "'='", "COLON": "':'", "CMP_OP": "a comparison (<=, <, >=, >, ==)", "MINUS": "'-'",
    "DOTDOT": "'..'", "COMMA": "','", "$END": "end of file",
}
COMPARISONS = "comparisons are <=, <, >=, >, =="
# Far deeper than any recipe needs, and shallow enough that building and checking the nested
# values cannot exhaust Python's recursion limit.
MAX_NESTING = 32


def tspan(tok: Token) -> Span:
    """Return the span of a token."""
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def shown(ch: str) -> str:
    """Write a character for a message: itself when printable, else its code point (U+000D)."""
    return ch if ch.isprintable() else f"U+{ord(ch):04X}"


# ---------------------------------------------------------------- syntax errors
def syntax_error(tok: Token, expected: set[str], text: str, tokens: list[Token]) -> RecipeError:
    """Explain why the parser, expecting one of ``expected``, could not take ``tok``.

    ``tokens`` are those of the statement being parsed, from its first token on; ``tok`` may be
    the end of file (``$END``).
    """
    if tok.type != "$END":
        return _unexpected_token(tok, expected, tokens)
    return _unexpected_end(expected, text, tokens)


def bad_character(exc: UnexpectedCharacters, text: str) -> tuple[RecipeError, int]:
    """Explain a character the lexer cannot read; also return how many characters to skip.

    The skip covers what a user meant as one thing, so that it is reported once: a string left
    open (to the end of its line, or on to its closing quote on the next line when a line break
    split it), a string in single quotes, a ``//`` comment.
    """
    pos = exc.pos_in_stream
    ch = text[pos]
    line, col = exc.line, exc.column
    span = Span(line, col, line, col + 1)
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    if ch == '"':
        width = max(end - pos, 1)
        return RecipeError("unterminated string", Span(line, col, line, col + width),
                           'close the string with " on the same line (write \\" for a quote inside)'), \
            width + _rest_of_string(text, end)
    following = text[pos + 1: pos + 2]
    hints = {
        "'": "strings use double quotes: \"…\"",
        "!": COMPARISONS,
        ";": "separate items with newlines or commas",
        "/": "comments start with #",
        "%": "a unit follows its number directly: 20%",
        ".": "write numbers with a leading digit (0.5); a range is written lo .. hi",
    }
    hint = hints.get(ch)
    if ch == "." and not following.isdigit():
        hint = "a range is written lo .. hi"
    skip = 1
    if ch == "'" and text.find("'", pos + 1, end) > 0:
        skip = text.find("'", pos + 1, end) + 1 - pos
    elif ch == "/" and following == "/":
        skip = end - pos
    return RecipeError(f"unexpected character '{shown(ch)}'", span, hint), skip


def _rest_of_string(text: str, end: int) -> int:
    """The length of the next line up to its first quote, when that quote is left open too."""
    if end >= len(text):
        return 0
    stop = text.find("\n", end + 1)
    following = text[end + 1: len(text) if stop < 0 else stop]
    if following.replace('\\"', "").count('"') % 2 == 0:
        return 0
    return following.index('"') + 2  # the line break, the text before the quote, the quote


def _unexpected_token(tok: Token, expected: set[str], tokens: list[Token]) -> RecipeError:
    before = [t for t in tokens if t.start_pos < tok.start_pos]
    prev = before[-1] if before else None
    block = _open_block(before)
    if block is None and prev is not None:
        unfinished = _unquoted_argument(before) or _unfinished_statement(prev, expected)
        if unfinished is not None:
            return unfinished
    block_kw = _block_keyword(before, block[2]) if block and block[0] == "LBRACE" else None
    inside = block[0] if block else None
    if tok.type == "STRING":
        shown = f"string {tok}"
    elif tok.type == "NUMBER":
        shown = f"number '{tok}'"
    else:
        shown = f"'{tok}'"
    message = f"unexpected {shown} — expected {_expected_phrase(expected, inside, block_kw)}"
    if block is None and prev is not None and prev.type == "COLON" and len(before) >= 3 \
            and str(before[-3]) == "stage":
        message = f"unexpected {shown} — expected the technique of stage '{before[-2]}'"
    hint = None
    adjacent = prev is not None and prev.end_pos == tok.start_pos
    if prev is not None and prev.type == "EQUALS" and tok.type == "CMP_OP":
        hint = f"write '{tok}=', not '={tok}'" if adjacent and str(tok) in ("<", ">") else COMPARISONS
    elif (prev is not None and adjacent and tok.type == "NUMBER" and prev.type == "COMMA"
          and before[-2:-1] and before[-2].type == "NUMBER" and before[-2].end_pos == prev.start_pos):
        hint = f"decimals are written with a point: {before[-2]}.{tok}"
    elif (block is None and tok.type in ("STRING", "NUMBER") and prev is not None
          and prev.type == "IDENT" and len(before) >= 2 and before[-2].type == "EQUALS"):
        hint = f"is a '(' missing? e.g. {prev}({tok})"
    elif tok.type == "LPAREN" and "LBRACE" in expected and "EQUALS" not in expected:
        hint = "settings go in braces: { key = value … }"
    elif inside == "LBRACE" and any(t.type == "IDENT" and str(t) in STATEMENTS and _starts_line(t, before)
                                    for t in (tok, prev) if t is not None):
        hint = f"is a '}}' missing? the block opened at line {block[1]} is not closed"
    elif (len(before) >= 2 and str(before[-2]) == "stage" and prev is not None
          and prev.type == "IDENT" and tok.type == "IDENT"):
        hint = f"name a stage with a colon: stage {prev}: {tok} {{ … }}"
    elif "EQUALS" in expected and tok.type in _VALUE_START | {"LPAREN"}:
        hint = "is an '=' missing?"
    elif "COLON" not in expected and tok.type == "COLON":
        hint = "only a stage takes a name and a colon: stage NAME: TECHNIQUE { … }"
    return RecipeError(message, tspan(tok), hint)


def _unexpected_end(expected: set[str], text: str, tokens: list[Token]) -> RecipeError:
    span = eof_span(text)
    block = _open_block(tokens)
    if block is not None:
        kind, line, _ = block
        what = {"LBRACE": "a '{' block", "LPAREN": "a '('", "LBRACKET": "a '[' list"}[kind]
        closer = {"LBRACE": "}", "LPAREN": ")", "LBRACKET": "]"}[kind]
        return RecipeError(f"unexpected end of file — {what} is not closed (opened at line {line})",
                           span, f"add the missing '{closer}'")
    if tokens:
        unfinished = _unquoted_argument(tokens) or _unfinished_statement(tokens[-1], expected)
        if unfinished is not None:
            return unfinished
    phrase = _expected_phrase(expected, None, None) if expected else "more input"
    return RecipeError(f"unexpected end of file — expected {phrase}", span)


def _unquoted_argument(before: list[Token]) -> RecipeError | None:
    """Explain ``use squeezelang`` or ``output out``: a name where the statement takes a string."""
    if len(before) < 2 or before[-1].type != "IDENT" or before[-2].type != "IDENT":
        return None
    keyword, word = str(before[-2]), before[-1]
    if STATEMENTS.get(keyword) != "string":
        return None
    if len(before) >= 3 and before[-3].type in ("IDENT", "EQUALS", "COLON"):
        return None  # the keyword is not the first word of a statement
    return RecipeError(f"'{keyword}' takes a string in double quotes, not the name '{word}'",
                       tspan(word), f'write it as {keyword} "{word}"')


def _unfinished_statement(prev: Token, expected: set[str]) -> RecipeError | None:
    """Explain an error right after a statement's first word: unknown or incomplete keyword."""
    if prev.type != "IDENT" or not {"EQUALS", "STRING", "LBRACE"} <= expected:
        return None
    keyword = str(prev)
    if keyword in STATEMENTS:
        return RecipeError(f"incomplete '{keyword}' statement", tspan(prev),
                           f"write it as {USAGE[keyword]}")
    return RecipeError(f"unknown statement '{keyword}'" + did_you_mean(keyword, STATEMENTS),
                       tspan(prev))


def _starts_line(tok: Token, before: list[Token]) -> bool:
    """Tell whether no other token precedes ``tok`` on its line."""
    earlier = [t for t in before if t.start_pos < tok.start_pos]
    return not earlier or earlier[-1].end_line < tok.line


def _open_block(tokens: list[Token]) -> tuple[str, int, int] | None:
    """Return (opener type, line, token index) of the innermost bracket still open, if any."""
    stack: list[tuple[str, int, int]] = []
    for index, tok in enumerate(tokens):
        if tok.type in _OPENERS:
            stack.append((tok.type, tok.line, index))
        elif stack and tok.type == _OPENERS[stack[-1][0]]:
            stack.pop()
    return stack[-1] if stack else None


def _block_keyword(tokens: list[Token], brace: int) -> str | None:
    """Guess the statement keyword that owns the ``{`` at index ``brace``."""
    if brace >= 2 and tokens[brace - 2].type == "COLON" and brace >= 4:
        return str(tokens[brace - 4])
    if brace >= 2 and (tokens[brace - 1].type == "STRING" or str(tokens[brace - 2]) == "stage"):
        return str(tokens[brace - 2])
    return str(tokens[brace - 1]) if brace >= 1 else None


def _expected_phrase(expected: set[str], inside: str | None, block_kw: str | None) -> str:
    """Say in words what the parser would have accepted."""
    if {"STRING", "NUMBER", "LBRACKET"} <= expected:
        return "a value"
    if {"EQUALS", "CMP_OP"} <= expected:
        return _DESCRIBE["CMP_OP"] if block_kw == "constraints" else "'='"
    if inside is None and "IDENT" in expected:
        return "a statement" + (" or end of file" if "$END" in expected else "")
    names = [t for t in _DESCRIBE if t in expected]
    if len(names) > 1:
        names = [t for t in names if t not in ("COMMA", "DOTDOT")] or names
    if inside == "LBRACE" and "IDENT" in names:
        names[names.index("IDENT")] = "IDENT_ITEM"
    words = [("another 'key = value'" if block_kw != "constraints" else "another comparison")
             if t == "IDENT_ITEM" else _DESCRIBE[t] for t in names]
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def too_deep(tokens: list[Token]) -> RecipeError | None:
    """Report brackets nested more than MAX_NESTING deep, at the first opener past the limit."""
    depth = 0
    for tok in tokens:
        if tok.type in _OPENERS:
            depth += 1
            if depth > MAX_NESTING:
                return RecipeError(f"brackets nested more than {MAX_NESTING} deep", tspan(tok),
                                   "a recipe value is a number, string, name, list or call; "
                                   "flatten it")
        elif tok.type in _OPENERS.values():
            depth = max(depth - 1, 0)
    return None


def join_split_units(tokens: list[Token]) -> tuple[list[Token], list[RecipeError]]:
    """Find ``12 MB``: a unit written apart from its number, which the lexer reads as a name.

    Each is reported, and the two tokens become the number ``12MB`` they were meant to be, so the
    parser does not add errors of its own about the stray name.
    """
    errors: list[RecipeError] = []
    out: list[Token] = []
    for index, tok in enumerate(tokens):
        unit = _split_unit(tokens, index - 1)
        if unit is None:
            out.append(tok)
            continue
        number = out.pop()
        errors.append(RecipeError(f"unexpected '{tok}' after the number {number}", tspan(tok),
                                  f"a unit must follow the number directly: {number}{unit}"))
        out.append(Token("NUMBER", f"{number}{unit}", number.start_pos, number.line, number.column,
                         tok.end_line, tok.end_column, tok.end_pos))
    return out, errors


def _split_unit(tokens: list[Token], index: int) -> str | None:
    """Return the unit that the name after the number ``tokens[index]`` spells, if it is one."""
    if index < 0:
        return None
    tok, nxt = tokens[index], tokens[index + 1]
    if tok.type != "NUMBER" or nxt.type != "IDENT" or nxt.line != tok.end_line:
        return None
    if NUMBER_TEXT.fullmatch(str(tok)).group(2):  # type: ignore[union-attr]
        return None
    after = tokens[index + 2] if index + 2 < len(tokens) else None
    if after is not None and after.type in ("EQUALS", "CMP_OP", "LPAREN", "COLON"):
        return None  # the name starts the next item: `steps = 300  s = 2`
    return spelled_unit(str(nxt))


def eof_span(text: str) -> Span:
    """Return the position just after the last non-blank character."""
    stripped = text.rstrip()
    if not stripped:
        return Span(1, 1, 1, 2)
    line = stripped.count("\n") + 1
    column = len(stripped) - (stripped.rfind("\n") + 1) + 1
    return Span(line, column, line, column + 1)

