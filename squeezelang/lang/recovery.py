"""Lex and parse recipe text past its mistakes, so that one check reports every independent one.

The lexer reports a character it cannot read, stands a ``BAD`` token in for it and goes on; it
also keeps the comments, which the grammar ignores, for the formatter. The LALR parser is then fed
one token at a time (Lark's interactive parser). Before each statement and each block item it
keeps a copy of itself; on an unexpected token it reports the error, goes back to the copy taken
before the broken item or statement, skips to where the next one starts (an item's ``key =``, the
block's closing ``}``, a statement keyword at the start of a line) and parses on from there. The
broken part is left out of the tree, so it cannot cause errors of its own further on.
"""
from __future__ import annotations

import functools
from copy import copy
from dataclasses import dataclass, field

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedToken
from lark.lexer import BasicLexer, LexerThread
from lark.parsers.lalr_interactive_parser import InteractiveParser

from squeezelang.errors import RecipeError
from squeezelang.lang.syntax import STATEMENTS, bad_character, syntax_error

BAD = "BAD"  # the token type of text the lexer could not read; no grammar rule takes it
_OPENERS = {"LBRACE", "LPAREN", "LBRACKET"}
_CLOSERS = {"RBRACE", "RPAREN", "RBRACKET"}


@dataclass
class Scan:
    """The tokens of a text, its comments, and the errors of the characters that are neither."""

    tokens: list[Token] = field(default_factory=list)
    comments: list[Token] = field(default_factory=list)
    errors: list[RecipeError] = field(default_factory=list)


@functools.lru_cache(maxsize=4)
def _lexer(lark: Lark) -> BasicLexer:
    """The lexer of ``lark`` that yields comments instead of ignoring them."""
    conf = copy(lark.lexer_conf)
    conf.ignore = tuple(name for name in conf.ignore if name != "COMMENT")
    return BasicLexer(conf)


def scan(lark: Lark, text: str) -> Scan:
    """Split ``text`` into tokens and comments, reporting and skipping what cannot be read."""
    out = Scan()
    thread = LexerThread.from_text(_lexer(lark), text)
    while True:
        try:
            for tok in thread.lex(None):
                (out.comments if tok.type == "COMMENT" else out.tokens).append(tok)
            return out
        except UnexpectedCharacters as exc:
            error, skip = bad_character(exc, text)
            out.errors.append(error)
            counter = thread.state.line_ctr
            start, line, column = counter.char_pos, counter.line, counter.column
            counter.feed(text[start:start + skip])
            out.tokens.append(Token(BAD, text[start:counter.char_pos], start, line, column,
                                    counter.line, counter.column, counter.char_pos))


def parse_tokens(lark: Lark, tokens: list[Token], text: str) -> tuple[Tree | None, list[RecipeError]]:
    """Parse ``tokens`` into a tree of what is well formed, and an error for each thing that is not."""
    parse = _Parse(lark.parse_interactive(), tokens, text)
    return parse.run(), parse.errors


@dataclass
class _Checkpoint:
    """The parser as it was before token ``index``: the start of a statement or of a block item."""

    parser: InteractiveParser
    index: int
    brackets: tuple[str, ...]


class _Parse:
    """One recovering parse of a token list."""

    def __init__(self, parser: InteractiveParser, tokens: list[Token], text: str) -> None:
        self.parser = parser
        self.tokens = tokens
        self.text = text
        self.errors: list[RecipeError] = []
        # The brackets open before the next token, innermost last. The parser's own view (which
        # tokens it takes next) cannot tell the top level or a block from elsewhere: LALR states
        # are shared between contexts.
        self.brackets: tuple[str, ...] = ()
        self.statement = _Checkpoint(_snapshot(parser), 0, ())
        self.item: _Checkpoint | None = None  # inside a block: before its current item
        self.begin = 0  # index of the first token of the statement being parsed
        self.resumed = -1  # the last index parsing resumed at; it only moves forward

    def run(self) -> Tree | None:
        """Feed every token, recovering from each error; return the tree, None if there is none."""
        index = 0
        while index < len(self.tokens):
            self._checkpoint(index)
            try:
                self.parser.feed_token(self.tokens[index])
            except UnexpectedToken as exc:
                index = self._recover(index, set(exc.expected))
                continue
            self._bracket(self.tokens[index])
            index += 1
        return self._end()

    def _checkpoint(self, index: int) -> None:
        """Keep a copy of the parser when token ``index`` starts a statement or a block item."""
        tok = self.tokens[index]
        choices = self.parser.choices()
        if not (tok.type == "IDENT" or tok.type not in choices):
            return
        if not self.brackets and "$END" in choices:
            self.statement = self._copy(index)
            self.item = None
            if tok.type == "IDENT":
                self.begin = index
        elif self.brackets[-1:] == ("LBRACE",) and "RBRACE" in choices:
            self.item = self._copy(index)

    def _copy(self, index: int) -> _Checkpoint:
        """A checkpoint of the parser as it is now, before token ``index``."""
        return _Checkpoint(_snapshot(self.parser), index, self.brackets)

    def _bracket(self, tok: Token) -> None:
        """Follow the brackets opened and closed by a token the parser took."""
        if tok.type in _OPENERS:
            self.brackets += (tok.type,)
        elif tok.type in _CLOSERS:
            self.brackets = self.brackets[:-1]
            if tok.type == "RBRACE":  # blocks do not nest: this one is closed
                self.item = None

    def _recover(self, index: int, expected: set[str]) -> int:
        """Report the unexpected token at ``index``; return where parsing goes on."""
        tok = self.tokens[index]
        if tok.type != BAD:  # a character the lexer could not read is reported already
            self.errors.append(syntax_error(tok, expected, self.text, self.tokens[self.begin:]))
        resume = self._resume_in_block(index) if self.item is not None else None
        if resume is None:
            resume = self._resume_statement(index)
        return resume

    def _resume_in_block(self, index: int) -> int | None:
        """Go back to the broken item's start, then on at the next item or the block's end.

        A statement keyword at the start of a line ends the search: the block was left open, so
        the whole statement is dropped (by ``_resume_statement``).
        """
        item = self.item
        assert item is not None
        depth = 0
        for j in range(item.index, len(self.tokens)):
            tok = self.tokens[j]
            later = j > item.index and j > self.resumed
            if later and tok.type == "RBRACE" and j >= index:
                return self._restore(item, j)
            if j > self.statement.index and j > self.resumed and self._starts_statement(j, depth, False):
                return None
            if later and depth == 0 and self._starts_item(j):
                return self._restore(item, j)
            depth = _depth(depth, tok)
        return None

    def _resume_statement(self, index: int) -> int:
        """Go back to the broken statement's start, then on at the next statement (or the end)."""
        depth = 0
        start = self.statement.index
        for j in range(start, len(self.tokens)):
            if j > start and j > self.resumed and self._starts_statement(j, depth, True):
                return self._restore(self.statement, j)
            depth = _depth(depth, self.tokens[j])
        return self._restore(self.statement, len(self.tokens))

    def _restore(self, checkpoint: _Checkpoint, index: int) -> int:
        """Put the parser back to ``checkpoint`` to go on at token ``index``."""
        self.parser = _snapshot(checkpoint.parser)
        self.brackets = checkpoint.brackets
        if checkpoint is self.statement:
            self.item = None
        self.resumed = index
        return index

    def _starts_statement(self, j: int, depth: int, top: bool) -> bool:
        """Tell whether token ``j``, first on its line, looks like the first word of a statement.

        A statement keyword followed by what only a statement has next (a name, a string, a
        block) is one anywhere; at the top level, outside brackets, so is any ``word =``.
        """
        tok = self.tokens[j]
        if tok.type != "IDENT" or (j > 0 and self.tokens[j - 1].end_line >= tok.line):
            return False
        nxt = self.tokens[j + 1].type if j + 1 < len(self.tokens) else "$END"
        if str(tok) in STATEMENTS and nxt in ("IDENT", "STRING", "LBRACE"):
            return True
        return top and depth == 0 and nxt in ("EQUALS", "IDENT", "STRING", "LBRACE")

    def _starts_item(self, j: int) -> bool:
        """Tell whether token ``j`` starts a block item: ``key =``, ``metric <=`` or ``drop(``."""
        tok = self.tokens[j]
        nxt = self.tokens[j + 1].type if j + 1 < len(self.tokens) else "$END"
        return tok.type == "IDENT" and (nxt in ("EQUALS", "CMP_OP")
                                        or (str(tok) == "drop" and nxt == "LPAREN"))

    def _end(self) -> Tree | None:
        """Feed the end of the text; an unfinished last statement is reported and dropped."""
        last = self.tokens[-1] if self.tokens else None
        try:
            return self.parser.feed_eof(last)
        except UnexpectedToken as exc:
            if self.resumed < len(self.tokens):  # not already reported by a recovery
                end = Token("$END", "")
                self.errors.append(syntax_error(end, set(exc.expected), self.text,
                                                self.tokens[self.begin:]))
        self.parser = _snapshot(self.statement.parser)
        try:
            return self.parser.feed_eof(last)
        except UnexpectedToken:
            return None


def _snapshot(parser: InteractiveParser) -> InteractiveParser:
    """Copy a parser so that feeding either leaves the other as it was.

    Lark's own copy either shares the trees on the value stack, whose child lists a later
    reduction may extend in place (it does so to build ``statement*``), or deep-copies every tree
    parsed so far; copying the lists of the trees on the stack is enough, and cheap.
    """
    copied = parser.copy(deepcopy_values=False)
    stack = copied.parser_state.value_stack
    stack[:] = [Tree(v.data, list(v.children), v.meta) if isinstance(v, Tree) else v for v in stack]
    return copied


def _depth(depth: int, tok: Token) -> int:
    """Return the bracket depth after ``tok``."""
    if tok.type in _OPENERS:
        return depth + 1
    if tok.type in _CLOSERS:
        return max(depth - 1, 0)
    return depth
