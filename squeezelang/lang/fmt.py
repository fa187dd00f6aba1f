"""Write a Recipe back as canonical recipe text (``squeeze fmt`` and ``recipe.lock.squeeze``).

Statements come out in a fixed order (recipe, use, model, data, metric, stage, compose,
constraints, search, output), blocks hold one item per line indented by four spaces, and numbers keep the text and unit
they were written with. Comments are not part of the AST, so they are not preserved.

``parse(format_recipe(r)) == r`` for any recipe ``r`` that ``parse`` returned, and formatting is
idempotent. ASTs built by hand work too; a number without ``text`` is written from its value.
"""
from __future__ import annotations

import math
import re

from squeezelang.lang.ast import (
    Auto, Bool, Call, Constraint, Ident, ListV, Num, Original, Param, Range, Recipe,
    StageDecl, Str, Value,
)

INDENT = "    "
_NUMBER_TEXT = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def format_recipe(recipe: Recipe) -> str:
    """Return the canonical text of a recipe, ending with a newline."""
    groups: list[list[str]] = []
    if recipe.name is not None:
        groups.append([f"recipe {_string(recipe.name)}"])
    if recipe.uses:
        groups.append([f"use {format_value(use.distribution)}" for use in recipe.uses])
    if recipe.model is not None:
        groups.append([f"model = {format_value(recipe.model.source)}"])
    if recipe.data:
        groups.append([f"data {_name(d.name)} = {format_value(d.source)}" for d in recipe.data])
    if recipe.metrics:
        groups.append([f"metric {_name(m.name)} = {format_value(m.kind)}" for m in recipe.metrics])
    groups.extend([_stage(stage)] for stage in recipe.stages)
    if recipe.compose is not None:
        groups.append([_block("compose", _params(recipe.compose.params))])
    if recipe.constraints:
        groups.append([_block("constraints", [_constraint(c) for c in recipe.constraints])])
    if recipe.search is not None:
        groups.append([_block("search", _params(recipe.search.params))])
    if recipe.output is not None:
        head = f"output {format_value(recipe.output.path)}"
        options = recipe.output.options
        groups.append([head if options is None else _block(head, _params(options.params))])
    return "\n\n".join("\n".join(group) for group in groups) + "\n"


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


def _stage(stage: StageDecl) -> str:
    if stage.explicit_name or stage.name != stage.technique:
        head = f"stage {_name(stage.name)}: {_name(stage.technique)}"
    else:
        head = f"stage {_name(stage.technique)}"
    return _block(head, _params(stage.params))


def _block(head: str, items: list[str]) -> str:
    if not items:
        return f"{head} {{}}"
    body = "\n".join(INDENT + item for item in items)
    return f"{head} {{\n{body}\n}}"


def _params(params: tuple[Param, ...]) -> list[str]:
    return [f"{_name(p.key)} = {format_value(p.value)}" for p in params]


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
