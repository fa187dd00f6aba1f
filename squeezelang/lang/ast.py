"""The recipe AST: frozen dataclasses, each carrying the span of source it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Span:
    """Where a node sits in its source: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


NOWHERE = Span(0, 0, 0, 0)


@dataclass(frozen=True)
class Comment:
    """A ``# …`` comment as written (without its line break) and where it sits."""

    text: str
    span: Span = NOWHERE


# ---------------------------------------------------------------- values
@dataclass(frozen=True)
class Str:
    value: str
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Num:
    """A number with an optional unit exactly as written (``20%``, ``12MB``, ``30min``)."""

    value: float
    unit: str | None = None
    text: str = ""  # the number as written, so fmt keeps ``1e-3`` as ``1e-3``
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def is_int(self) -> bool:
        return self.unit is None and float(self.value).is_integer() and not any(
            c in self.text for c in ".eE")


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Ident:
    """A reference to a declared name (data, metric, stage)."""

    name: str
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Original:
    """The keyword ``original``: the model as loaded, before any stage."""

    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Range:
    lo: Value
    hi: Value
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Auto:
    """``auto`` or ``auto(lo .. hi)``: a value the planner solves."""

    range: Range | None = None
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class ListV:
    items: tuple[Value, ...]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Arg:
    """One argument of a call: positional when ``name`` is None."""

    name: str | None
    value: Value
    span: Span = field(default=NOWHERE, compare=False)
    name_span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Call:
    """``name(arg, key = value, …)`` — sources, metric kinds, ``package(...)``."""

    name: str
    args: tuple[Arg, ...]
    span: Span = field(default=NOWHERE, compare=False)
    name_span: Span = field(default=NOWHERE, compare=False)

    @property
    def positional(self) -> tuple[Value, ...]:
        return tuple(a.value for a in self.args if a.name is None)

    def keyword(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)


Value = Union[Str, Num, Bool, Ident, Original, Range, Auto, ListV, Call]


# ---------------------------------------------------------------- block items
@dataclass(frozen=True)
class Param:
    """``key = value`` inside a stage, search or output block."""

    key: str
    value: Value
    span: Span = field(default=NOWHERE, compare=False)
    key_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Constraint:
    """``SUBJECT OP BOUND``; ``drop`` is True for ``drop(metric)``."""

    metric: str
    op: str
    bound: Num
    drop: bool = False
    span: Span = field(default=NOWHERE, compare=False)
    metric_span: Span = field(default=NOWHERE, compare=False)

    @property
    def subject(self) -> str:
        return f"drop({self.metric})" if self.drop else self.metric


# ---------------------------------------------------------------- statements
@dataclass(frozen=True)
class ModelDecl:
    source: Call
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class DataDecl:
    name: str
    source: Call
    span: Span = field(default=NOWHERE, compare=False)
    name_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class MetricDecl:
    name: str
    kind: Call
    span: Span = field(default=NOWHERE, compare=False)
    name_span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class StageDecl:
    """``stage NAME: TECHNIQUE { … }``; ``name`` defaults to the technique name."""

    name: str
    technique: str
    params: tuple[Param, ...]
    span: Span = field(default=NOWHERE, compare=False)
    technique_span: Span = field(default=NOWHERE, compare=False)
    explicit_name: bool = False

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)


@dataclass(frozen=True)
class Block:
    """``search { … }`` and the optional block of ``output``."""

    params: tuple[Param, ...]
    span: Span = field(default=NOWHERE, compare=False)

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)


@dataclass(frozen=True)
class OutputDecl:
    path: Str
    options: Block | None = None
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class UseDecl:
    distribution: Str
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. ``file`` is the path it was read from (None for a string)."""

    name: str | None = None
    uses: tuple[UseDecl, ...] = ()
    model: ModelDecl | None = None
    data: tuple[DataDecl, ...] = ()
    metrics: tuple[MetricDecl, ...] = ()
    stages: tuple[StageDecl, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    #: ``compose { allow = […], data = NAME, stages = N }``: the planner picks the stages.
    compose: Block | None = None
    search: Block | None = None
    output: OutputDecl | None = None
    name_span: Span | None = field(default=None, compare=False)
    constraints_span: Span | None = field(default=None, compare=False)
    file: str | None = field(default=None, compare=False)
    source: str = field(default="", compare=False, repr=False)
    #: The comments of the source text, in order; ``squeeze fmt`` keeps them with their statements.
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)

    def data_named(self, name: str) -> DataDecl | None:
        return next((d for d in self.data if d.name == name), None)

    def metric_named(self, name: str) -> MetricDecl | None:
        return next((m for m in self.metrics if m.name == name), None)
