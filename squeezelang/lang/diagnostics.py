"""Render recipe errors the way compilers do: FILE:LINE:COL, the source line, a caret, a hint."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from squeezelang.errors import RecipeError, RecipeErrors

_GUTTER = "   "


def format_error(err: RecipeError, source: str, file: str | None) -> str:
    """Render one error with its location, the offending source line and a caret under the span."""
    name = err.file or file or "<recipe>"
    span = err.span
    if span is None or span.line <= 0:
        lines = [f"{name}: error: {err.message}"]
    else:
        lines = [f"{name}:{span.line}:{max(span.column, 1)}: error: {err.message}"]
        same_source = err.file is None or err.file == file
        # Lines are counted at \n only, as the parser counts them (not at \r, \f or \u2028).
        source_lines = source.split("\n")
        if same_source and span.line <= len(source_lines):
            text = source_lines[span.line - 1].removesuffix("\r")
            lines.extend(_excerpt(text, span.line, span.column, span.end_line, span.end_column))
    if err.hint:
        lines.append(f"{_GUTTER}hint: {err.hint}")
    return "\n".join(lines)


def format_errors(errs: RecipeErrors) -> str:
    """Render every error of a batch, separated by blank lines."""
    return "\n\n".join(format_error(err, errs.source, errs.file) for err in errs.errors)


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``name`` (a likely typo), or None when none is close."""
    pool = [c for c in candidates if c != name]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if close:
        return close[0]
    folded = [c for c in pool if c.lower() == name.lower()]
    return folded[0] if folded else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return `` — did you mean 'x'?`` for the closest candidate, or an empty string."""
    best = suggest(name, candidates)
    return f" — did you mean '{best}'?" if best else ""


def _excerpt(text: str, line: int, column: int, end_line: int, end_column: int) -> list[str]:
    """Return the source line and the caret line beneath it."""
    number = str(line)
    column = max(column, 1)
    if end_line == line and end_column > column:
        width = end_column - column
    else:
        width = len(text) - column + 1
    width = max(width, 1)
    # Keep tabs under tabs so the caret lines up however the terminal expands them.
    pad = "".join("\t" if ch == "\t" else " " for ch in text[: column - 1])
    pad += " " * max(0, column - 1 - len(text))
    return [
        f"{_GUTTER}{number} | {text}".rstrip(),
        f"{_GUTTER}{' ' * len(number)} | {pad}{'^' * width}",
    ]
