"""Write a Recipe back as canonical recipe text (``squeeze fmt`` and ``recipe.lock.squeeze``).

Statements come out in a fixed order (recipe, use, model, data, metric, stage, compose,
constraints, search, output), blocks hold one item per line indented by four spaces, and numbers keep the text and unit
they were written with.

Comments (``Recipe.comments``) are kept and move with what they belong to: a comment on a line of
its own goes before the statement or block item that follows it (or, with nothing after it, at the
end of the block or of the file); one after code stays at the end of that line. A comment inside a
value written over several lines goes before its statement or item; one after a block's ``{``
stays there. Comments at the top of the file followed by a blank line stay at the top.

``parse(format_recipe(r)) == r`` for any recipe ``r`` that ``parse`` returned, every comment is
written once, and formatting is idempotent. ASTs built by hand work too; a number without
``text`` is written from its value.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from squeezelang.lang.ast import (
    Auto, Bool, Call, Comment, Constraint, Ident, ListV, Num, Original, Param, Range, Recipe, Span,
    StageDecl, Str, Value,
)

INDENT = "    "
_NUMBER_TEXT = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class _Node:
    """A statement or block item on its way out: its text, where it was read, its comments."""

    text: str
    span: Span | None  # None: not read from source text, so no comment belongs to it
    items: list[_Node] | None = None  # a block's items; None for a node without a block
    before: list[str] = field(default_factory=list)
    after: str | None = None
    head: str | None = None  # after the block's '{'
    end: list[str] = field(default_factory=list)  # before the block's '}'


def format_recipe(recipe: Recipe) -> str:
    """Return the canonical text of a recipe, with its comments, ending with a newline."""
    groups = _groups(recipe)
    header, footer = _attach(list(recipe.comments), [node for group in groups for node in group])
    parts = ["\n".join(header)] if header else []
    parts.extend("\n".join(line for node in group for line in _lines(node, "")) for group in groups)
    if footer:
        parts.append("\n".join(footer))
    return "\n\n".join(parts) + "\n"


def _groups(recipe: Recipe) -> list[list[_Node]]:
    """The statements of a recipe in canonical order, in groups set apart by blank lines."""
    groups: list[list[_Node]] = []
    if recipe.name is not None:
        groups.append([_Node(f"recipe {_string(recipe.name)}", recipe.name_span)])
    if recipe.uses:
        groups.append([_Node(f"use {format_value(use.distribution)}", use.span) for use in recipe.uses])
    if recipe.model is not None:
        groups.append([_Node(f"model = {format_value(recipe.model.source)}", recipe.model.span)])
    if recipe.data:
        groups.append([_Node(f"data {_name(d.name)} = {format_value(d.source)}", d.span)
                       for d in recipe.data])
    if recipe.metrics:
        groups.append([_Node(f"metric {_name(m.name)} = {format_value(m.kind)}", m.span)
                       for m in recipe.metrics])
    groups.extend([_stage(stage)] for stage in recipe.stages)
    if recipe.compose is not None:
        groups.append([_Node("compose", recipe.compose.span, _params(recipe.compose.params))])
    if recipe.constraints or recipe.constraints_span is not None:
        items = [_Node(_constraint(c), c.span) for c in recipe.constraints]
        groups.append([_Node("constraints", recipe.constraints_span, items)])
    if recipe.search is not None:
        groups.append([_Node("search", recipe.search.span, _params(recipe.search.params))])
    if recipe.output is not None:
        options = recipe.output.options
        items = None if options is None else _params(options.params)
        groups.append([_Node(f"output {format_value(recipe.output.path)}", recipe.output.span, items)])
    return groups


def _lines(node: _Node, indent: str) -> list[str]:
    """The lines of one node and its comments, indented by ``indent``."""
    lines = [indent + text for text in node.before]
    tail = f"  {node.after}" if node.after else ""
    if node.items is None:
        return lines + [f"{indent}{node.text}{tail}"]
    if not (node.items or node.head or node.end):
        return lines + [f"{indent}{node.text} {{}}{tail}"]
    lines.append(f"{indent}{node.text} {{" + (f"  {node.head}" if node.head else ""))
    for item in node.items:
        lines.extend(_lines(item, indent + INDENT))
    lines.extend(indent + INDENT + text for text in node.end)
    return lines + [f"{indent}}}{tail}"]


# ---------------------------------------------------------------- comments
def _attach(comments: list[Comment], nodes: list[_Node]) -> tuple[list[str], list[str]]:
    """Give each comment to the node it belongs to; return those of the file's top and end."""
    placed = sorted((n for n in nodes if _read(n.span)), key=lambda n: _start(n.span))
    comments = sorted((c for c in comments if _read(c.span)), key=lambda c: _start(c.span))
    header = _header(comments, placed)
    footer = [c.text.rstrip() for c in comments[len(header):] if not _place(c, placed, None)]
    return header, footer


def _header(comments: list[Comment], placed: list[_Node]) -> list[str]:
    """The comments above the first statement up to the last one followed by a blank line."""
    if not placed:
        return []
    first = placed[0].span.line  # type: ignore[union-attr]
    lead = [c for c in comments if c.span.line < first]
    lines = [c.span.line for c in lead] + [first]
    gaps = [k for k in range(len(lead)) if lines[k + 1] > lines[k] + 1]
    return [c.text.rstrip() for c in lead[:gaps[-1] + 1]] if gaps else []


def _place(comment: Comment, nodes: list[_Node], owner: _Node | None) -> bool:
    """Attach ``comment`` to one of ``nodes`` (in source order) or to the block ``owner``.

    Return False when it comes after every node of the top level (``owner`` None).
    """
    text, where = comment.text.rstrip(), _start(comment.span)
    inside = next((n for n in nodes if _start(n.span) <= where < _end(n.span)), None)
    if inside is not None:
        if inside.items is None or not _place(comment, _read_items(inside), inside):
            inside.before.append(text)
        return True
    ended = [n for n in nodes if _end(n.span) <= where and n.span.end_line == comment.span.line]
    if ended:
        max(ended, key=lambda n: _end(n.span)).after = text
        return True
    if owner is not None and comment.span.line == owner.span.line and owner.head is None:
        owner.head = text
        return True
    following = next((n for n in nodes if _start(n.span) > where), None)
    if following is not None:
        following.before.append(text)
    elif owner is not None:
        owner.end.append(text)
    return following is not None or owner is not None


def _read_items(node: _Node) -> list[_Node]:
    return [item for item in node.items or () if _read(item.span)]


def _read(span: Span | None) -> bool:
    """Tell whether a span is a place in source text (hand-built nodes have line 0)."""
    return span is not None and span.line > 0


def _start(span: Span) -> tuple[int, int]:
    return span.line, span.column


def _end(span: Span) -> tuple[int, int]:
    return span.end_line, span.end_column


# ---------------------------------------------------------------- values
def format_value(value: Value) -> str:
    """Return the recipe text of one value."""
    if isinstance(value, Str):
        return _string(value.value)
    if isinstance(value, Num):
        return _number(value)
    if isinstance(value, Bool):
        return "true" if value.value else "false"
    if isinstance(value, Ident):
        return _name(value.name)
    if isinstance(value, Original):
        return "original"
    if isinstance(value, Auto):
        return "auto" if value.range is None else f"auto({format_value(value.range)})"
    if isinstance(value, Range):
        return f"{format_value(value.lo)} .. {format_value(value.hi)}"
    if isinstance(value, ListV):
        return "[" + ", ".join(format_value(item) for item in value.items) + "]"
    if isinstance(value, Call):
        args = (format_value(a.value) if a.name is None else f"{_name(a.name)} = {format_value(a.value)}"
                for a in value.args)
        return f"{_name(value.name)}({', '.join(args)})"
    raise ValueError(f"cannot format {value!r} as a recipe value")


def _stage(stage: StageDecl) -> _Node:
    if stage.explicit_name or stage.name != stage.technique:
        head = f"stage {_name(stage.name)}: {_name(stage.technique)}"
    else:
        head = f"stage {_name(stage.technique)}"
    return _Node(head, stage.span, _params(stage.params))


def _params(params: tuple[Param, ...]) -> list[_Node]:
    return [_Node(f"{_name(p.key)} = {format_value(p.value)}", p.span) for p in params]


def _constraint(c: Constraint) -> str:
    subject = f"drop({_name(c.metric)})" if c.drop else _name(c.metric)
    return f"{subject} {c.op} {format_value(c.bound)}"


def _string(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"cannot write a string with a line break in a recipe: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _name(name: str) -> str:
    if not _IDENT.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid recipe name")
    return name


def _number(num: Num) -> str:
    unit = num.unit or ""
    text = num.text
    if unit and text.endswith(unit):
        text = text[: -len(unit)]
    if not _NUMBER_TEXT.fullmatch(text):
        text = _number_text(float(num.value))
    return text + unit


def _number_text(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot write {value} in a recipe")
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)
