"""Parse recipe text into the AST of :mod:`squeezelang.lang.ast`.

The Lark grammar (``squeezelang.grammar/squeeze.lark``) is loaded lazily and cached. Every Lark
exception is turned into a :class:`~squeezelang.errors.RecipeError` here, so nothing from Lark escapes
this module. Statement keywords are plain identifiers in the grammar and checked by the transformer,
which reports every unknown keyword, duplicate statement, bad unit and bad escape in one pass.
Semantic checks (techniques, schemas, references, units against metrics) belong to the validator.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from squeezelang.errors import RecipeError, RecipeErrors
from squeezelang.lang.ast import (
    Arg, Auto, Block, Bool, Call, Constraint, DataDecl, Ident, ListV, MetricDecl, ModelDecl, Num,
    Original, OutputDecl, Param, Range, Recipe, Span, StageDecl, Str, UseDecl, Value,
)
from squeezelang.lang.diagnostics import did_you_mean
from squeezelang.lang.fmt import format_value
from squeezelang.lang.units import UNITS, spelled_unit, suggest_unit

__all__ = ["parse", "parse_file", "STATEMENTS", "KEYWORDS"]

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
# Repeatable statements and the Recipe field that collects them; every other statement is single.
_MANY = {"use": "uses", "data": "data", "metric": "metrics", "stage": "stages"}
KEYWORDS = frozenset(STATEMENTS) | {"auto", "original", "drop", "of", "true", "false"}
_VALUE_WORDS = {"true": True, "false": False}

_LONE_CR = re.compile(r"\r(?!\n)")
_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(.*)", re.DOTALL)
_PUNCT = {"LBRACE", "RBRACE", "LPAREN", "RPAREN", "LBRACKET", "RBRACKET", "EQUALS", "COLON",
          "COMMA", "DOTDOT", "MINUS", "CMP_OP"}
_OPENERS = {"LBRACE": "RBRACE", "LPAREN": "RPAREN", "LBRACKET": "RBRACKET"}
_VALUE_START = {"STRING", "NUMBER", "LBRACKET", "MINUS", "IDENT"}
_DESCRIBE = {
    "IDENT": "a name", "STRING": "a string", "NUMBER": "a number", "LBRACE": "'{'",
    "RBRACE": "'}'", "LPAREN": "'('", "RPAREN": "')'", "LBRACKET": "'['", "RBRACKET": "']'",
    "EQUALS": "'='", "COLON": "':'", "CMP_OP": "a comparison (<=, <, >=, >, ==)", "MINUS": "'-'",
    "DOTDOT": "'..'", "COMMA": "','", "$END": "end of file",
}
_COMPARISONS = "comparisons are <=, <, >=, >, =="
# Far deeper than any recipe needs, and shallow enough that building and checking the nested
# values cannot exhaust Python's recursion limit.
MAX_NESTING = 32
_AUTO_WHOLE = "auto must be a whole value"
_AUTO_HINT = "write key = auto or key = auto(lo .. hi)"


# ---------------------------------------------------------------- public API
def parse(text: str, file: str | None = None) -> Recipe:
    """Parse recipe text; raise RecipeErrors listing every problem found."""
    tokens = _lex(text)
    too_deep = _too_deep(tokens)
    if too_deep is not None:
        raise RecipeErrors([too_deep], source=text, file=file)
    split_units = _split_unit_errors(tokens)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        errors = split_units or [_syntax_error(exc, text, tokens)]
        raise RecipeErrors(errors, source=text, file=file) from None
    builder = _Builder()
    try:
        recipe = builder.transform(tree)
    except VisitError as exc:  # a bug in the builder: surface it as itself, not as a Lark error
        raise exc.orig_exc from None
    errors = split_units + builder.errors
    if errors:
        errors.sort(key=lambda e: (e.span.line, e.span.column) if e.span else (0, 0))
        raise RecipeErrors(errors, source=text, file=file)
    return replace(recipe, file=file, source=text)


def parse_file(path: str | Path) -> Recipe:
    """Read a UTF-8 recipe file and parse it."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RecipeErrors([RecipeError(f"cannot read recipe file: {reason}")], file=name) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _encoding_error(data, exc, name) from None
    # A file with old Mac line endings (a lone \r) would otherwise be one long line to the lexer.
    return parse(_LONE_CR.sub("\n", text), file=name)


# ---------------------------------------------------------------- grammar
_LARK_OPTIONS: dict[str, Any] = {"parser": "lalr", "lexer": "basic", "propagate_positions": True}


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    """The LALR parser of the grammar shipped in ``squeezelang.grammar``, made once per process.

    Building it from the grammar takes longer than anything else ``squeeze check`` does, so it is
    loaded from ``squeezelang.grammar.tables`` (generated by ``write_tables``) when those were made
    from this very grammar by this version of Lark, and built from the grammar otherwise.
    """
    import lark

    grammar = _grammar()
    try:
        from squeezelang.grammar import tables
    except ImportError:  # not generated yet
        return Lark(grammar, **_LARK_OPTIONS)
    if (tables.GRAMMAR_SHA256, tables.LARK_VERSION) != (_digest(grammar), lark.__version__):
        return Lark(grammar, **_LARK_OPTIONS)
    return Lark._load_from_dict(tables.DATA, tables.MEMO,
                                propagate_positions=_LARK_OPTIONS["propagate_positions"])


def _grammar() -> str:
    return resources.files("squeezelang.grammar").joinpath("squeeze.lark").read_text("utf-8")


def _digest(grammar: str) -> str:
    return hashlib.sha256(grammar.encode("utf-8")).hexdigest()


def tables_source() -> str:
    """The text of ``squeezelang.grammar.tables``: the parser built from the grammar, serialised as
    Python literals (no pickle), with the grammar's digest and the Lark version that made them."""
    import pprint

    import lark
    from lark.grammar import Rule
    from lark.lexer import TerminalDef

    grammar = _grammar()
    data, memo = Lark(grammar, **_LARK_OPTIONS).memo_serialize([TerminalDef, Rule])
    fmt = functools.partial(pprint.pformat, width=110, compact=True, sort_dicts=False)
    return (f'"""The LALR tables of ``squeeze.lark``, generated by ``python -m squeezelang.lang.parser``: '
            f'do not edit.\n\nLoading these is much faster than building the parser from the grammar; '
            f'``parser._lark`` uses them\nonly while ``GRAMMAR_SHA256`` and ``LARK_VERSION`` match the '
            f'grammar and the installed Lark.\n"""\n'
            f"GRAMMAR_SHA256 = {_digest(grammar)!r}\nLARK_VERSION = {lark.__version__!r}\n\n"
            f"DATA = {fmt(data)}\n\nMEMO = {fmt(memo)}\n")


def write_tables() -> Path:
    """(Re)write ``squeezelang.grammar.tables`` next to the grammar; run after editing the grammar."""
    path = Path(str(resources.files("squeezelang.grammar").joinpath("tables.py")))
    path.write_text(tables_source(), encoding="utf-8")
    return path


def _lex(text: str) -> list[Token]:
    """Return the tokens of ``text`` up to the first character that cannot be lexed."""
    tokens: list[Token] = []
    try:
        for tok in _lark().lex(text):
            tokens.append(tok)
    except UnexpectedInput:
        pass
    return tokens


# ---------------------------------------------------------------- spans
def _span(meta: Any) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _tspan(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _nodes(children: list[Any]) -> list[Any]:
    """Drop punctuation tokens and failed (None) children."""
    return [c for c in children if c is not None and not (isinstance(c, Token) and c.type in _PUNCT)]


def _idents(children: list[Any]) -> list[Token]:
    return [c for c in children if isinstance(c, Token) and c.type == "IDENT"]


@dataclass(frozen=True)
class _Items:
    """The contents of a ``{ … }`` block before its statement decides what they may be."""

    items: tuple[Param | Constraint, ...]
    span: Span


# ---------------------------------------------------------------- tree -> AST
@v_args(meta=True)
class _Builder(Transformer):
    """Build AST nodes bottom-up, one method per grammar rule, collecting errors as it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[RecipeError] = []

    def _error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.errors.append(RecipeError(message, span, hint))

    # -------------------------------------------------------- recipe
    def start(self, meta: Any, children: list[Any]) -> Recipe:
        first: dict[str, Span] = {}
        many: dict[str, list[Any]] = {field: [] for field in _MANY.values()}
        fields: dict[str, Any] = {}
        for keyword, node, kw_span, span in filter(None, children):
            if keyword in first:
                self._error(f"duplicate '{keyword}' statement", kw_span,
                            f"the first '{keyword}' is at line {first[keyword].line}")
            elif keyword in _MANY:
                many[_MANY[keyword]].append(node)
            else:
                first[keyword] = kw_span
                if keyword == "recipe":
                    fields.update(name=node.value, name_span=node.span)
                elif keyword == "constraints":
                    fields.update(constraints=node, constraints_span=span)
                else:
                    fields[keyword] = node
        return Recipe(**fields, **{field: tuple(nodes) for field, nodes in many.items()})

    def _keyword(self, tok: Token, shape: str, span: Span) -> str | None:
        """Check a statement keyword and that the statement has that keyword's shape."""
        keyword = str(tok)
        if keyword not in STATEMENTS:
            suggestion = did_you_mean(keyword, STATEMENTS)
            hint = None
            if shape == "assign" and not suggestion:
                hint = "settings (key = value) belong inside a stage, search or output block"
            self._error(f"unknown statement '{keyword}'" + suggestion, _tspan(tok), hint)
            return None
        if STATEMENTS[keyword] != shape:
            self._error(f"malformed '{keyword}' statement", span, f"write it as {USAGE[keyword]}")
            return None
        return keyword

    def _check_name(self, tok: Token, what: str) -> None:
        if str(tok) in KEYWORDS:
            self._error(f"'{tok}' is a keyword and cannot name {what}", _tspan(tok),
                        "choose another name")

    def stmt_string(self, meta: Any, children: list[Any]) -> tuple | None:
        span = _span(meta)
        keyword = self._keyword(children[0], "string", span)
        string = self._str(children[1])
        block = children[2] if len(children) > 2 else None
        if keyword is None:
            return None
        if keyword == "output":
            options = None
            if block is not None:
                options = Block(self._params(block, "an output block"), block.span)
            node: Any = OutputDecl(string, options, span)
        else:
            if block is not None:
                self._error(f"'{keyword}' takes no block", block.span,
                            f"write it as {USAGE[keyword]}")
            node = string if keyword == "recipe" else UseDecl(string, span)
        return keyword, node, _tspan(children[0]), span

    def stmt_assign(self, meta: Any, children: list[Any]) -> tuple | None:
        span = _span(meta)
        keyword = self._keyword(children[0], "assign", span)
        source = self._source(children[-1], keyword)
        if keyword is None or source is None:
            return None
        return keyword, ModelDecl(source, span), _tspan(children[0]), span

    def stmt_decl(self, meta: Any, children: list[Any]) -> tuple | None:
        span = _span(meta)
        keyword_tok, name_tok = _idents(children)[:2]
        keyword = self._keyword(keyword_tok, "decl", span)
        source = self._source(children[-1], keyword)
        if keyword is None or source is None:
            return None
        what = "a data set" if keyword == "data" else "a metric"
        self._check_name(name_tok, what)
        node_type = DataDecl if keyword == "data" else MetricDecl
        return keyword, node_type(str(name_tok), source, span, _tspan(name_tok)), _tspan(keyword_tok), span

    def _source(self, value: Value | None, keyword: str | None) -> Call | None:
        """Require a call (``hf(…)``, ``csv(…)``, ``spearman(…)``) as a statement's value."""
        if isinstance(value, Call):
            return value
        if value is not None and keyword is not None:
            what = "a metric kind call" if keyword == "metric" else "a source call"
            self._error(f"'{keyword}' needs {what}, not {_what(value)}", value.span,
                        f"write it as {USAGE[keyword]}")
        return None

    def stmt_stage(self, meta: Any, children: list[Any]) -> tuple | None:
        span = _span(meta)
        idents = _idents(children)
        keyword = self._keyword(idents[0], "stage", span)
        block = children[-1]
        if keyword is None or block is None:
            return None
        explicit = len(idents) == 3
        name_tok, tech_tok = (idents[1], idents[2]) if explicit else (idents[1], idents[1])
        if explicit:
            self._check_name(name_tok, "a stage")
        params = self._params(block, "a stage block")
        node = StageDecl(str(name_tok), str(tech_tok), params, span, _tspan(tech_tok), explicit)
        return keyword, node, _tspan(idents[0]), span

    def stmt_block(self, meta: Any, children: list[Any]) -> tuple | None:
        span = _span(meta)
        keyword = self._keyword(children[0], "block", span)
        block = children[1]
        if keyword is None or block is None:
            return None
        if keyword == "constraints":
            node: Any = self._constraints(block)
        else:
            node = Block(self._params(block, f"a {keyword} block"), span)
        return keyword, node, _tspan(children[0]), span

    # -------------------------------------------------------- blocks
    def block(self, meta: Any, children: list[Any]) -> _Items:
        return _Items(tuple(_nodes(children)), _span(meta))

    def _params(self, block: _Items, where: str) -> tuple[Param, ...]:
        """Keep the ``key = value`` items of a block; report comparisons and repeated keys."""
        params: list[Param] = []
        seen: dict[str, Span] = {}
        for item in block.items:
            if isinstance(item, Constraint):
                self._error(f"a comparison cannot appear in {where}", item.span,
                            "settings are written key = value; comparisons go in constraints { … }")
                continue
            if item.key in seen:
                self._error(f"duplicate key '{item.key}'", item.key_span,
                            f"'{item.key}' is first set at line {seen[item.key].line}")
                continue
            seen[item.key] = item.key_span
            params.append(item)
        return tuple(params)

    def _constraints(self, block: _Items) -> tuple[Constraint, ...]:
        constraints: list[Constraint] = []
        for item in block.items:
            if isinstance(item, Param):
                self._error(f"expected a comparison in constraints, not '{item.key} = …'",
                            item.span, f"{_COMPARISONS}, e.g. {item.key} <= {_fmt_hint(item.value)}")
                continue
            constraints.append(item)
        return tuple(constraints)

    def param(self, meta: Any, children: list[Any]) -> Param | None:
        key, value = children[0], children[-1]
        if value is None:
            return None
        return Param(str(key), value, _span(meta), _tspan(key))

    def constraint(self, meta: Any, children: list[Any]) -> Constraint | None:
        idents = _idents(children)
        op = next(c for c in children if isinstance(c, Token) and c.type == "CMP_OP")
        bound = children[-1]
        ok = True
        if len(idents) == 2:
            func, metric = idents
            if str(func) != "drop":
                self._error(f"unknown constraint subject '{func}(…)'" + did_you_mean(str(func), ["drop"]),
                            _tspan(func), "a subject is a metric name or drop(metric)")
                ok = False
        else:
            metric = idents[0]
        if bound is None:
            return None
        if not isinstance(bound, Num):
            self._error(f"a constraint bound must be a number, not {_what(bound)}", bound.span,
                        "e.g. 20%, 0.5x, 12MB, 50ms or 0.97")
            ok = False
        if not ok:
            return None
        return Constraint(str(metric), str(op), bound, len(idents) == 2, _span(meta), _tspan(metric))

    # -------------------------------------------------------- values
    def range(self, meta: Any, children: list[Any]) -> Range | None:
        if any(c is None for c in children):
            return None
        lo, hi = _nodes(children)
        ok = True
        for bound in (lo, hi):
            if not isinstance(bound, Num):
                self._error(f"a range's bounds must be numbers, not {_what(bound)}", bound.span,
                            "write lo .. hi, e.g. 0.1 .. 0.6")
                ok = False
        return Range(lo, hi, _span(meta)) if ok else None

    def string(self, meta: Any, children: list[Any]) -> Str:
        return self._str(children[0])

    def _str(self, tok: Token) -> Str:
        """Unescape a STRING token, reporting every escape other than \\" and \\\\."""
        out: list[str] = []
        body = str(tok)[1:-1]
        control_seen = False
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                nxt = body[i + 1]
                if nxt in "\"\\":
                    out.append(nxt)
                else:
                    col = tok.column + 1 + i
                    self._error(f"unknown escape '\\{_shown(nxt)}' in string",
                                Span(tok.line, col, tok.line, col + 2),
                                'only \\" and \\\\ are escapes; write other characters as they are')
                    out.append("\\" + nxt)
                i += 2
            else:
                if _is_control(ch) and not control_seen:
                    control_seen = True
                    col = tok.column + 1 + i
                    self._error(f"control character {_shown(ch)} in string",
                                Span(tok.line, col, tok.line, col + 1),
                                "a string holds one line of printable text (tabs are fine)")
                out.append(ch)
                i += 1
        return Str("".join(out), _tspan(tok))

    def number(self, meta: Any, children: list[Any]) -> Num:
        tok = children[-1]
        negative = len(children) == 2
        digits, unit = _NUMBER.fullmatch(str(tok)).groups()  # type: ignore[union-attr]
        text = ("-" if negative else "") + digits
        if unit and unit not in UNITS:
            best = suggest_unit(unit)
            hint = None if best else "units: " + " ".join(UNITS)
            self._error(f"unknown unit '{unit}'" + (f" — did you mean '{best}'?" if best else ""),
                        _tspan(tok), hint)
        elif not math.isfinite(float(digits) * UNITS.get(unit, (None, 1.0))[1]):
            self._error(f"number '{tok}' is too large", _tspan(tok),
                        "numbers must be below about 1.8e308 in base units")
        return Num(float(text), unit or None, text, _span(meta))

    def name(self, meta: Any, children: list[Any]) -> Value:
        word = str(children[0])
        span = _span(meta)
        if word in _VALUE_WORDS:
            return Bool(_VALUE_WORDS[word], span)
        if word == "original":
            return Original(span)
        if word == "auto":
            return Auto(None, span)
        return Ident(word, span)

    def list(self, meta: Any, children: list[Any]) -> ListV:
        items = _nodes(children)
        self._no_auto(items)
        return ListV(tuple(items), _span(meta))

    def call(self, meta: Any, children: list[Any]) -> Auto | Call:
        name_tok = children[0]
        span = _span(meta)
        failed = any(c is None for c in children)
        args = [a if isinstance(a, Arg) else Arg(None, a, a.span) for a in _nodes(children[1:])]
        if str(name_tok) == "auto":
            if len(args) == 1 and args[0].name is None and isinstance(args[0].value, Range):
                return Auto(args[0].value, span)
            if not failed:  # a bad range inside has been reported already
                self._error("auto takes one range: auto(lo .. hi)", span, _AUTO_HINT)
            return Auto(None, span)
        self._no_auto([a.value for a in args], f"auto cannot be an argument of {name_tok}(…)",
                      "auto may only stand for a technique's knob: stage NAME: TECHNIQUE { key = auto }")
        seen: set[str] = set()
        keyword_seen = False
        for arg in args:
            if arg.name is None and keyword_seen:
                self._error("a positional argument cannot follow a keyword argument", arg.span,
                            "put positional arguments first")
            elif arg.name is not None:
                keyword_seen = True
                if arg.name in seen:
                    self._error(f"duplicate argument '{arg.name}'", arg.name_span)
                seen.add(arg.name)
        return Call(str(name_tok), tuple(args), span, _tspan(name_tok))

    def kwarg(self, meta: Any, children: list[Any]) -> Arg | None:
        key, value = children[0], children[-1]
        if value is None:
            return None
        return Arg(str(key), value, _span(meta), _tspan(key))

    def _no_auto(self, values: list[Value], message: str = _AUTO_WHOLE,
                 hint: str = _AUTO_HINT) -> None:
        for value in values:
            if isinstance(value, Auto):
                self._error(message, value.span, hint)


def _is_control(ch: str) -> bool:
    """Tell whether a character has no place in a string: C0 controls except tab, DEL, C1."""
    return (ch < " " and ch != "\t") or "\x7f" <= ch <= "\x9f"


def _shown(ch: str) -> str:
    """Write a character for a message: itself when printable, else its code point (U+000D)."""
    return ch if ch.isprintable() else f"U+{ord(ch):04X}"


def _what(value: Value) -> str:
    """Name the kind of a value for an error message."""
    return {
        Str: "a string", Num: "a number", Bool: "a boolean", Ident: "a name", Original: "'original'",
        Range: "a range", Auto: "auto", ListV: "a list", Call: "a call",
    }.get(type(value), "this value")


def _fmt_hint(value: Value) -> str:
    """Write a value for a hint, or an ellipsis when it cannot be written."""
    try:
        return format_value(value)
    except ValueError:
        return "…"


# ---------------------------------------------------------------- syntax errors
def _syntax_error(exc: UnexpectedInput, text: str, tokens: list[Token]) -> RecipeError:
    """Turn a Lark exception into one RecipeError with a human message and, where it helps, a hint."""
    if isinstance(exc, UnexpectedCharacters):
        return _bad_character(exc, text)
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        return _unexpected_token(exc.token, set(exc.expected), tokens)
    expected = set(getattr(exc, "expected", ()) or ())
    return _unexpected_end(expected, text, tokens)


def _bad_character(exc: UnexpectedCharacters, text: str) -> RecipeError:
    pos = exc.pos_in_stream
    ch = text[pos]
    line, col = exc.line, exc.column
    span = Span(line, col, line, col + 1)
    if ch == '"':
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        return RecipeError("unterminated string", Span(line, col, line, col + max(end - pos, 1)),
                           'close the string with " on the same line (write \\" for a quote inside)')
    following = text[pos + 1: pos + 2]
    hints = {
        "'": "strings use double quotes: \"…\"",
        "!": _COMPARISONS,
        ";": "separate items with newlines or commas",
        "/": "comments start with #",
        "%": "a unit follows its number directly: 20%",
        ".": "write numbers with a leading digit (0.5); a range is written lo .. hi",
    }
    hint = hints.get(ch)
    if ch == "." and not following.isdigit():
        hint = "a range is written lo .. hi"
    return RecipeError(f"unexpected character '{_shown(ch)}'", span, hint)


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
        hint = f"write '{tok}=', not '={tok}'" if adjacent and str(tok) in ("<", ">") else _COMPARISONS
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
    return RecipeError(message, _tspan(tok), hint)


def _unexpected_end(expected: set[str], text: str, tokens: list[Token]) -> RecipeError:
    span = _eof_span(text)
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
                       _tspan(word), f'write it as {keyword} "{word}"')


def _unfinished_statement(prev: Token, expected: set[str]) -> RecipeError | None:
    """Explain an error right after a statement's first word: unknown or incomplete keyword."""
    if prev.type != "IDENT" or not {"EQUALS", "STRING", "LBRACE"} <= expected:
        return None
    keyword = str(prev)
    if keyword in STATEMENTS:
        return RecipeError(f"incomplete '{keyword}' statement", _tspan(prev),
                           f"write it as {USAGE[keyword]}")
    return RecipeError(f"unknown statement '{keyword}'" + did_you_mean(keyword, STATEMENTS),
                       _tspan(prev))


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


def _too_deep(tokens: list[Token]) -> RecipeError | None:
    """Report brackets nested more than MAX_NESTING deep, at the first opener past the limit."""
    depth = 0
    for tok in tokens:
        if tok.type in _OPENERS:
            depth += 1
            if depth > MAX_NESTING:
                return RecipeError(f"brackets nested more than {MAX_NESTING} deep", _tspan(tok),
                                   "a recipe value is a number, string, name, list or call; "
                                   "flatten it")
        elif tok.type in _OPENERS.values():
            depth = max(depth - 1, 0)
    return None


def _split_unit_errors(tokens: list[Token]) -> list[RecipeError]:
    """Find ``12 MB``: a unit written apart from its number, which the lexer reads as a name."""
    errors: list[RecipeError] = []
    for index, tok in enumerate(tokens[:-1]):
        nxt = tokens[index + 1]
        if tok.type != "NUMBER" or nxt.type != "IDENT" or nxt.line != tok.end_line:
            continue
        if _NUMBER.fullmatch(str(tok)).group(2):  # type: ignore[union-attr]
            continue
        unit = spelled_unit(str(nxt))
        if unit is None:
            continue
        after = tokens[index + 2] if index + 2 < len(tokens) else None
        if after is not None and after.type in ("EQUALS", "CMP_OP", "LPAREN", "COLON"):
            continue  # the name starts the next item: `steps = 300  s = 2`
        errors.append(RecipeError(f"unexpected '{nxt}' after the number {tok}", _tspan(nxt),
                                  f"a unit must follow the number directly: {tok}{unit}"))
    return errors


def _eof_span(text: str) -> Span:
    """Return the position just after the last non-blank character."""
    stripped = text.rstrip()
    if not stripped:
        return Span(1, 1, 1, 2)
    line = stripped.count("\n") + 1
    column = len(stripped) - (stripped.rfind("\n") + 1) + 1
    return Span(line, column, line, column + 1)


def _encoding_error(data: bytes, exc: UnicodeDecodeError, file: str) -> RecipeErrors:
    """Locate the first byte that is not UTF-8 and report it as a recipe error."""
    start = exc.start
    before = _LONE_CR.sub("\n", data[:start].decode("utf-8"))
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    source = _LONE_CR.sub("\n", data.decode("utf-8", errors="replace"))
    error = RecipeError(f"invalid UTF-8 byte 0x{data[start]:02x}",
                        Span(line, column, line, column + 1), "save the recipe as UTF-8")
    return RecipeErrors([error], source=source, file=file)


if __name__ == "__main__":
    print(f"wrote {write_tables()}")
