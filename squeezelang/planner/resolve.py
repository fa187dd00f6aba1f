"""Resolve a parsed recipe against the installed plugins into a ``Plan``, collecting every error.

This is what ``squeeze check`` runs: names, references, plugin parameter schemas, ``auto`` on knobs,
units against metric dimensions, data columns and stage order. It never imports torch.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from squeezelang.errors import RecipeError, RecipeErrors, SqueezeError
from squeezelang.hooks.metric import EACH_STAGE
from squeezelang.hooks.registry import Registries
from squeezelang.lang import ast
from squeezelang.lang.diagnostics import did_you_mean
from squeezelang.lang.units import dimension_of
from squeezelang.models.placement import SCHEMA as PLACEMENT
from squeezelang.planner.plan import (ComposePlan, ConstraintPlan, DataPlan, MetricPlan, ModelPlan,
                                      Plan, SearchPlan, StagePlan)
from squeezelang.planner.validate import missing_columns, schema_errors
from squeezelang.planner.values import number, to_python

STRATEGIES = ("bisect", "grid", "random")
BACKENDS = ("serial", "process", "ray")
SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "strategy": {"enum": list(STRATEGIES), "default": "bisect",
                     "description": "how auto knobs are searched"},
        "trials": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 12},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 1800.0,
                    "description": "a duration, e.g. 30min"},
        "seed": {"type": "integer", "minimum": 0, "default": 0},
        "workers": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 1,
                    "description": "trials run at once"},
        "backend": {"enum": list(BACKENDS), "default": "serial",
                    "description": "where trials run: serial (this process), process (worker "
                                   "processes on this machine) or ray (a Ray cluster)"},
        "address": {"type": "string", "description": "ray only: the cluster address "
                                                     "(default: start a local Ray instance)"},
    },
}
COMPOSE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "allow": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                  "description": "techniques the planner may use (default: every installed "
                                 "technique that says how it composes)"},
        "data": {"type": "string", "description": "the data set calibrated and distilling "
                                                  "stages read"},
        "stages": {"type": "integer", "minimum": 1, "maximum": 6, "default": 3,
                   "description": "the most stages a composed pipeline may have"},
    },
}
OPS = ("<=", "<", ">=", ">", "==")


def _spans(params: tuple[ast.Param, ...] | tuple[ast.Arg, ...]) -> dict[str, tuple[ast.Span, ast.Span]]:
    out = {}
    for p in params:
        key = p.key if isinstance(p, ast.Param) else p.name
        key_span = p.key_span if isinstance(p, ast.Param) else (p.name_span or p.span)
        if key is not None:
            out[key] = (key_span, _span_of(p.value))
    return out


def _span_of(value: ast.Value) -> ast.Span:
    return getattr(value, "span", ast.NOWHERE)


_BASE_UNITS = {"bytes": " bytes", "count": "", "time": " s"}


def _note_units(errors: list[RecipeError], params: tuple[ast.Param, ...]) -> None:
    """Say how a rejected number with a unit was read, so that ``ratio = 5MB`` explains itself."""
    for err in errors:
        for p in params:
            value = p.value
            if not isinstance(value, ast.Num) or value.span != err.span:
                continue
            dimension = dimension_of(value.unit) or ""
            if dimension in _BASE_UNITS:
                base = number(value)
                shown = f"{base:,}" if isinstance(base, int) else f"{base:g}"
                note = f"{value.text}{value.unit} is read as {shown}{_BASE_UNITS[dimension]}"
                err.hint = f"{err.hint}; {note}" if err.hint else note


def _cycle(ident: ast.Ident, kind: str, name: str) -> RecipeError:
    """The error for a reference from declaration ``name`` to itself or to a later one."""
    what = "data set" if kind == "data" else kind
    hint = f"a {what} can only refer to one declared before it"
    if ident.name == name:
        return RecipeError(f"{what} '{name}' refers to itself", ident.span, hint=hint)
    return RecipeError(f"{what} '{name}' refers to {what} '{ident.name}', which comes after it",
                       ident.span, hint=hint)


class _Resolver:
    def __init__(self, recipe: ast.Recipe, regs: Registries) -> None:
        self.recipe = recipe
        self.regs = regs
        self.errors: list[RecipeError] = []
        self.base_dir = Path(recipe.file).resolve().parent if recipe.file else Path.cwd()
        self.data_columns: dict[str, list[str] | None] = {}
        self.data_files: dict[str, str] = {}  # data set -> the file(s) it is read from
        self.task = "embedding"
        #: the model source and its arguments, once located (``family`` reads its config)
        self.model_source: tuple[Any, dict[str, Any]] | None = None
        # While a data set or stage is resolved: its kind and name, and the names of that kind it
        # cannot refer to (itself and those declared after it, which would make a cycle).
        self.declaring: tuple[str, str] | None = None
        self.not_yet: set[str] = set()

    def error(self, message: str, span: ast.Span | None, hint: str | None = None) -> None:
        self.errors.append(RecipeError(message, span, hint=hint))

    # ------------------------------------------------------------------ helpers
    def ident_resolver(self, allowed: tuple[str, ...] = ("data", "metric", "stage")):
        names = {"data": [d.name for d in self.recipe.data],
                 "metric": [m.name for m in self.recipe.metrics],
                 "stage": [s.name for s in self.recipe.stages]}

        def resolve(ident: ast.Ident) -> str:
            for kind in allowed:
                if ident.name in names[kind]:
                    if self.declaring is not None and self.declaring[0] == kind \
                            and ident.name in self.not_yet:
                        raise _cycle(ident, *self.declaring)
                    return ident.name
            pool = [n for k in allowed for n in names[k]]
            hint = did_you_mean(ident.name, pool).strip(" —")
            if not hint and allowed == ("data",):
                hint = f"declare it first, e.g. `data {ident.name} = text(\"…\")`"
            elif not hint:
                kinds = [{"data": "a data set"}.get(k, f"a {k}") for k in allowed]
                kinds_text = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
                hint = (f"a string is written in double quotes (\"{ident.name}\"); a name must be "
                        f"declared first as {kinds_text}")
            raise RecipeError(f"undefined name '{ident.name}'", ident.span, hint=hint)
        return resolve

    def declare(self, kind: str, decls: tuple[Any, ...], decl: Any | None) -> None:
        """Start resolving ``decl`` of ``decls`` (None: done with them); see ``declaring``."""
        if decl is None:
            self.declaring, self.not_yet = None, set()
            return
        index = next(i for i, d in enumerate(decls) if d is decl)
        self.declaring = (kind, decl.name)
        self.not_yet = {d.name for d in decls[index:]}

    def convert(self, value: ast.Value, path: bool = False, allowed=("data", "metric", "stage")) -> Any:
        try:
            return to_python(value, self.base_dir, self.ident_resolver(allowed), path=path)
        except RecipeError as exc:
            self.errors.append(exc)
            return None

    def convert_all(self, values: dict[str, ast.Value],
                    path_keys: Any = ()) -> tuple[dict[str, Any], set[str]]:
        """Convert each value; return those converted and the keys of those that failed.

        A failure is reported by ``convert``; the caller still checks the other keys against the
        schema (passing the failed keys on), so one run reports a bad name and a bad range together.
        """
        converted: dict[str, Any] = {}
        failed: set[str] = set()
        for key, value in values.items():
            before = len(self.errors)
            result = self.convert(value, path=key in path_keys)
            if len(self.errors) == before:
                converted[key] = result
            else:
                failed.add(key)
        return converted, failed

    def call_args(self, call: ast.Call, plugin: Any, owner: str,
                  engine: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Keyword dict of a source call (positionals mapped by the plugin); False if it failed.
        ``engine`` (name -> JSON Schema) adds arguments the engine takes besides the plugin's."""
        ok = True
        values: dict[str, Any] = {}
        positional = [a for a in call.args if a.name is None]
        names = list(getattr(plugin, "positional", ()))
        if len(positional) > len(names):
            self.error(f"{owner} takes {len(names)} positional argument(s), got {len(positional)}",
                       positional[len(names)].span)
            ok = False
        for arg, name in zip(positional, names):
            values[name] = arg.value
        for arg in call.args:
            if arg.name is not None:
                if arg.name in values:
                    self.error(f"argument '{arg.name}' given twice", arg.name_span or arg.span)
                    ok = False
                values[arg.name] = arg.value
        converted, failed = self.convert_all(values, getattr(plugin, "path_params", ()))
        spans = {a.name or n: (a.name_span or a.span, _span_of(a.value))
                 for a, n in zip(call.args, names + [None] * len(call.args))}
        spans.update(_spans(call.args))
        schema = plugin.schema if not engine else \
            {**plugin.schema, "properties": {**plugin.schema.get("properties", {}), **engine}}
        errs = schema_errors(schema, converted, owner, spans, call.span, failed)
        self.errors.extend(errs)
        return converted, ok and not errs and not failed

    # ------------------------------------------------------------------ statements
    def uses(self) -> tuple[str, ...]:
        out = []
        for use in self.recipe.uses:
            dist = use.distribution.value
            if not dist.strip():
                self.error("'use' needs the name of a plugin distribution", use.distribution.span,
                           hint='e.g. use "squeezelang-extra"')
                continue
            try:
                importlib.metadata.distribution(dist)
            except importlib.metadata.PackageNotFoundError:
                self.error(f"plugin distribution '{dist}' is not installed", use.distribution.span,
                           hint=f"install it with pip install {dist}; recipes never install plugins")
            out.append(dist)
        return tuple(out)

    def model(self) -> ModelPlan | None:
        decl = self.recipe.model
        if decl is None:
            self.error("the recipe has no model", ast.Span(1, 1, 1, 2),
                       hint='add e.g. model = hf("path/to/model", task = "embedding")')
            return None
        call = decl.source
        source = self.regs.model_sources.get(call.name)
        if source is None:
            self.error(f"unknown model source '{call.name}'", call.name_span,
                       hint=did_you_mean(call.name, self.regs.model_sources.names()).strip(" —")
                       or "model sources: " + ", ".join(self.regs.model_sources.names()))
            return None
        args, ok = self.call_args(call, source, f"model source '{call.name}'", PLACEMENT)
        placement = {key: args.pop(key, spec["default"]) for key, spec in PLACEMENT.items()}
        if ok:
            try:
                source.locate(args)
                self.model_source = (source, args)
            except SqueezeError as exc:
                first = call.args[0].value if call.args else call
                self.error(str(exc), _span_of(first))
        package = None
        first = call.args[0].value if call.args and call.args[0].name is None else None
        if isinstance(first, ast.Call) and first.name == "package":
            names = [v.value for v in first.positional if isinstance(v, ast.Str)] + ["", ""]
            package = (names[0], names[1])
        return ModelPlan(call.name, args, str(args.get("task", "embedding")), package,
                         device=str(placement["device"]), dtype=str(placement["dtype"]),
                         offload=bool(placement["offload"]))

    def unique(self, decls: Any, what: str, span_of: Any, hint: str = "") -> list[Any]:
        """``decls`` without repeated names; each repeat is an error pointing at the first."""
        out, seen = [], {}
        for decl in decls:
            if decl.name in seen:
                self.error(f"{what} '{decl.name}' is declared twice", span_of(decl),
                           hint=f"first declared on line {seen[decl.name]}{hint}")
                continue
            seen[decl.name] = decl.span.line
            out.append(decl)
        return out

    def data(self) -> tuple[DataPlan, ...]:
        out = []
        for decl in self.unique(self.recipe.data, "data set", lambda d: d.name_span):
            self.declare("data", self.recipe.data, decl)
            call = decl.source
            source = self.regs.data_sources.get(call.name)
            if source is None:
                self.error(f"unknown data source '{call.name}'", call.name_span,
                           hint=did_you_mean(call.name, self.regs.data_sources.names()).strip(" —")
                           or "data sources: " + ", ".join(self.regs.data_sources.names()))
                self.data_columns[decl.name] = None
                continue
            args, ok = self.call_args(call, source, f"data source '{call.name}'")
            columns = None
            if ok:
                try:
                    columns = list(source.columns(args))
                except SqueezeError as exc:
                    first = call.args[0].value if call.args else call
                    self.error(str(exc), _span_of(first))
            self.data_columns[decl.name] = columns
            self.data_files[decl.name] = ", ".join(
                str(args[k]) for k in getattr(source, "path_params", ()) if args.get(k))
            out.append(DataPlan(decl.name, call.name, args))
        self.declare("data", self.recipe.data, None)
        return tuple(out)

    def check_columns(self, data_name: str, spec: str, renames: dict[str, str], span: ast.Span,
                      who: str) -> None:
        available = self.data_columns.get(data_name)
        if not spec or available is None:
            return
        missing = missing_columns(spec, renames, available)
        if missing:
            cols = ", ".join(f"'{c}'" for c in missing)
            where = f" (read from {self.data_files[data_name]})" if self.data_files.get(data_name) else ""
            self.error(f"{who} needs column {cols}, which data set '{data_name}' does not have",
                       span, hint=f"'{data_name}' has columns {', '.join(available) or '(none)'}"
                                  f"{where}; rename with e.g. a = \"s1\" or declare the columns")

    def metrics(self) -> tuple[MetricPlan, ...]:
        out: list[MetricPlan] = []
        declared = self.unique(self.recipe.metrics, "metric", lambda d: d.name_span)
        for decl in declared:
            call = decl.kind
            metric = self.regs.metrics.get(call.name)
            if metric is None:
                self.error(f"unknown metric '{call.name}'", call.name_span,
                           hint=did_you_mean(call.name, self.regs.metrics.names()).strip(" —") or None)
                continue
            positional = [a for a in call.args if a.name is None]
            data_name = None
            if metric.needs_data:
                if not positional:
                    self.error(f"metric '{call.name}' needs a data set", call.span,
                               hint=f"e.g. {call.name}(my_data)")
                    continue
                first = positional[0].value
                if not isinstance(first, ast.Ident):
                    self.error(f"the first argument of '{call.name}' must name a declared data set",
                               _span_of(first))
                    continue
                data_name = self.convert(first, allowed=("data",))
                if data_name is None:
                    continue
            for extra in positional[(1 if metric.needs_data else 0):]:
                self.error(f"metric '{call.name}' takes no other positional argument", extra.span,
                           hint="name it: key = value")
            kwargs, failed = self.convert_all({a.name: a.value for a in call.args if a.name is not None})
            each_stage = self.each_stage(call, kwargs, metric)
            spans = _spans(call.args)
            errs = schema_errors(metric.schema, kwargs, f"metric '{call.name}'", spans, call.span,
                                 failed)
            self.errors.extend(errs)
            for key, message in metric.check(kwargs) if not errs and not failed else ():
                self.error(message, spans[key][1] if key in spans else call.span)
            if data_name:
                renames = {k: v for k, v in kwargs.items() if isinstance(v, str)}
                self.check_columns(data_name, metric.columns_for(kwargs), renames,
                                   _span_of(positional[0].value), f"metric '{call.name}'")
            out.append(MetricPlan(decl.name, call.name, data_name, kwargs, metric.dimension,
                                  metric.higher_is_better_for(kwargs),
                                  each_stage=bool(metric.each_stage if each_stage is None
                                                  else each_stage),
                                  each_stage_given=each_stage is not None))
        for metric in self.regs.metrics:
            if metric.implicit and metric.name not in {d.name for d in declared}:
                out.append(MetricPlan(metric.name, metric.name, None, {}, metric.dimension,
                                      metric.higher_is_better, implicit=True, each_stage=bool(metric.each_stage)))
        return tuple(out)

    def each_stage(self, call: ast.Call, kwargs: dict[str, Any], metric: Any) -> bool | None:
        """Pop the ``each_stage`` argument every metric takes (the engine's, not the plugin's):
        ``True``/``False`` as given, ``None`` when absent or not a boolean (reported)."""
        if EACH_STAGE not in kwargs:
            return None
        value = kwargs.pop(EACH_STAGE)
        if isinstance(value, bool):
            return value
        arg = next(a for a in call.args if a.name == EACH_STAGE)
        self.error(f"metric '{call.name}': {EACH_STAGE} must be true or false",
                   _span_of(arg.value), hint=f"{EACH_STAGE} = true measures '{call.name}' after "
                                             "every stage as well")
        return None

    def stages(self) -> tuple[StagePlan, ...]:
        out: list[StagePlan] = []
        states: dict[str, str] = {}  # state -> stage that produced it
        for decl in self.unique(self.recipe.stages, "stage", lambda d: d.span,
                                "; name stages: stage NAME: TECHNIQUE {…}"):
            self.declare("stage", self.recipe.stages, decl)
            tech = self.regs.techniques.get(decl.technique)
            if tech is None:
                self.error(f"unknown technique '{decl.technique}'", decl.technique_span,
                           hint=did_you_mean(decl.technique, self.regs.techniques.names()).strip(" —")
                           or "squeeze plugins lists the installed techniques")
                continue
            stage = self.stage(decl, tech)
            if stage is None:
                continue
            for state in sorted(tech.refuses & set(states)):
                self.error(f"'{decl.technique}' cannot run on a {state} model (stage '{states[state]}' "
                           f"made it {state})", decl.technique_span,
                           hint=f"move stage '{states[state]}' after stage '{decl.name}'")
            for state in tech.produces_for(dict(stage.params)):
                states.setdefault(state, decl.name)
            out.append(stage)
        self.declare("stage", self.recipe.stages, None)
        return tuple(out)

    def stage(self, decl: ast.StageDecl, tech: Any) -> StagePlan | None:
        """Resolve one stage's parameters against its technique: knobs, data, schema, checks."""
        owner = f"technique '{tech.name}'"
        spans = _spans(decl.params)
        n_errors = len(self.errors)
        values, autos, failed = self.stage_values(decl, tech, owner)
        errs = schema_errors(tech.schema, values, owner, spans, decl.span, failed)
        _note_units(errs, decl.params)
        self.errors.extend(errs)
        if len(self.errors) > n_errors:
            return None
        params = {**tech.defaults_for(values), **values}
        for key, message in tech.check(params):
            span = spans[key][1] if key in spans else decl.technique_span
            self.error(message, span)
        family = self.family()
        for need in tech.family_needs(params) if family is not None else ():
            refusal = family.refusal(need)
            if refusal is not None:
                self.error(f"stage '{decl.name}': {refusal}", decl.technique_span)
        return StagePlan(decl.name, tech.name, self.regs.techniques.owner(tech.name),
                         params.get("method"), params, autos, decl.span)

    def family(self) -> Any:
        """The model's family, from its config read without torch (``None``: unknown, or a source
        that cannot tell before loading); looked up once."""
        if not hasattr(self, "_family"):
            config = self.model_config()
            self._family = self.regs.families.for_config(config) if config else None
        return self._family

    def model_config(self) -> dict[str, Any] | None:
        """The model's ``config.json``, read once without torch (``None`` when the source cannot
        tell before loading, or the model is at fault: that is reported where it is declared)."""
        if not hasattr(self, "_config"):
            self._config = None
            if self.model_source is not None:
                source, args = self.model_source
                try:
                    self._config = source.config(args)
                except SqueezeError:
                    self._config = None
        return self._config

    def stage_values(self, decl: ast.StageDecl, tech: Any, owner: str
                     ) -> tuple[dict[str, Any], dict[str, tuple[float, float]], set[str]]:
        """The stage's values (an auto knob at the middle of its range), its auto ranges, and the
        keys whose values were rejected (already reported)."""
        values: dict[str, Any] = {}
        autos: dict[str, tuple[float, float]] = {}
        failed: set[str] = set()
        for p in decl.params:
            before = len(self.errors)
            if isinstance(p.value, ast.Auto):
                bounds = self.auto_bounds(p, tech, owner)
                if bounds is not None:
                    autos[p.key] = lo, hi = bounds
                    values[p.key] = (lo + hi) / 2 if not tech.knob(p.key).integer else int((lo + hi) // 2)
            elif p.key in tech.data_params:
                values[p.key] = self.data_param(p, tech.data_params[p.key], f"stage '{decl.name}'")
            else:
                values[p.key] = self.convert(p.value)
            if len(self.errors) > before or p.key not in values:
                failed.add(p.key)
                values.pop(p.key, None)
        return values, autos, failed

    def data_param(self, p: ast.Param, columns: str, who: str) -> str | None:
        """The data set that ``key = NAME`` names, checked for ``columns``; None when reported."""
        if not isinstance(p.value, ast.Ident):
            self.error(f"'{p.key}' must name a declared data set", _span_of(p.value))
            return None
        name = self.convert(p.value, allowed=("data",))
        if name is not None:
            self.check_columns(name, columns, {}, _span_of(p.value), who)
        return name

    def auto_bounds(self, p: ast.Param, tech: Any, owner: str) -> tuple[float, float] | None:
        """The range ``p = auto`` or ``auto(lo .. hi)`` may take; None (reported) if it cannot."""
        knob = tech.knob(p.key)
        if knob is None:
            knobs = ", ".join(k.name for k in tech.knobs)
            self.error(f"'{p.key}' cannot be auto: it is not a knob of {owner}", p.value.span,
                       hint=f"knobs of {tech.name}: {knobs}" if knobs else f"{tech.name} has no knobs")
            return None
        if p.value.range is None:
            return knob.lo, knob.hi
        rlo, rhi = (self.convert(p.value.range.lo), self.convert(p.value.range.hi))
        if not all(isinstance(v, (int, float)) for v in (rlo, rhi)):
            return None
        if not rlo < rhi:
            self.error(f"auto range {rlo:g} .. {rhi:g} of '{p.key}' is empty: its low end "
                       "must be below its high end", p.value.span,
                       hint=f"write auto({rhi:g} .. {rlo:g})" if rhi < rlo
                       else f"for a fixed value write {p.key} = {rlo:g}")
            return None
        if not knob.lo <= rlo < rhi <= knob.hi:
            self.error(f"auto range {rlo:g} .. {rhi:g} of '{p.key}' must lie within "
                       f"{knob.lo:g} .. {knob.hi:g}", p.value.span)
            return None
        return rlo, rhi

    def constraints(self, metrics: tuple[MetricPlan, ...]) -> tuple[ConstraintPlan, ...]:
        out = []
        by_name = {m.name: m for m in metrics}
        for c in self.recipe.constraints:
            metric = by_name.get(c.metric)
            if metric is None:
                self.error(f"constraint on undeclared metric '{c.metric}'", c.metric_span,
                           hint=did_you_mean(c.metric, list(by_name)).strip(" —")
                           or f"declare it: metric {c.metric} = …")
                continue
            if c.op not in OPS:
                self.error(f"unknown comparison '{c.op}'", c.span)
                continue
            unit = c.bound.unit
            dim = dimension_of(unit)
            relative = dim == "relative"
            if c.drop and unit == "x":
                self.error("a drop is bounded in the metric's units or in % of the original, not x",
                           c.bound.span)
                continue
            if dim not in (None, "relative") and dim != metric.dimension:
                from squeezelang.hooks.metric import DIMENSIONS
                allowed = ", ".join(DIMENSIONS.get(metric.dimension, ())) or "no unit"
                self.error(f"{c.metric} is measured in {metric.dimension if metric.dimension != 'score' else 'its own units'}"
                           f" or %, not {unit}", c.bound.span,
                           hint=f"use {allowed} or a % of the original" if allowed != "no unit"
                           else f"write a plain number, e.g. {c.subject} {c.op} {c.bound.value:g}")
                continue
            out.append(ConstraintPlan(c.metric, c.drop, c.op, float(number(c.bound)), relative,
                                      c.bound.text + (c.bound.unit or "") if c.bound.text else f"{c.bound.value:g}{unit or ''}",
                                      c.span))
        return tuple(out)

    def search(self) -> SearchPlan:
        block = self.recipe.search
        if block is None:
            return SearchPlan()
        values, failed = self.convert_all({p.key: p.value for p in block.params})
        timeout = block.param("timeout")
        if timeout is not None and isinstance(timeout.value, ast.Num) and timeout.value.unit \
                and dimension_of(timeout.value.unit) != "time":
            self.error(f"'timeout' is a duration, not {timeout.value.unit}", timeout.value.span,
                       hint="use ms, s, min or h, e.g. timeout = 30min")
            failed.add("timeout")
            values.pop("timeout", None)
        spans = _spans(block.params)
        errs = schema_errors(SEARCH_SCHEMA, values, "the search block", spans, block.span, failed)
        self.errors.extend(errs)
        if errs or failed:
            return SearchPlan()
        workers = values.get("workers", 1)
        values.setdefault("backend", "process" if workers > 1 else "serial")
        if values["backend"] == "serial" and workers > 1:
            self.error("backend \"serial\" runs one trial at a time", spans["backend"][1],
                       hint='use backend = "process" (this machine) or "ray" for workers > 1')
        if "address" in values and values["backend"] != "ray":
            self.error("'address' applies to backend \"ray\" only", spans["address"][0])
        return SearchPlan(**{k: (float(v) if k == "timeout" else v) for k, v in values.items()})

    def compose(self, constraints: tuple[ConstraintPlan, ...]) -> ComposePlan | None:
        block = self.recipe.compose
        if block is None:
            return None
        n_errors = len(self.errors)
        if self.recipe.stages:
            self.error("a recipe gives either stages or compose { … }, not both", block.span,
                       hint="drop the stages to let the planner choose them, or drop compose")
        if not self.recipe.constraints:
            self.error("compose needs constraints to aim at", block.span,
                       hint="add e.g. constraints { size <= 25%, drop(quality) <= 0.5 }")
        values: dict[str, Any] = {}
        failed: set[str] = set()
        for p in block.params:
            before = len(self.errors)
            if p.key == "data":
                values[p.key] = self.data_param(p, "text|a,b", "compose")
            else:
                values[p.key] = self.convert(p.value)
            if len(self.errors) > before:
                failed.add(p.key)
                del values[p.key]
        errs = schema_errors(COMPOSE_SCHEMA, values, "the compose block", _spans(block.params),
                             block.span, failed)
        self.errors.extend(errs)
        allow_param = block.param("allow")
        composable = [t.name for t in self.regs.techniques if t.candidates(self.task)]
        allow = composable
        if allow_param is not None:  # its items are names only once the schema says it is a list
            names = values.get("allow")
            well_formed = isinstance(names, list) and all(isinstance(n, str) for n in names)
            allow = self.allowed(allow_param, composable) if well_formed else []
        if len(self.errors) > n_errors:
            return None
        return ComposePlan(tuple(allow), values.get("data"), int(values.get("stages", 3)))

    def allowed(self, allow_param: ast.Param, composable: list[str]) -> list[str]:
        """The techniques of ``compose { allow = […] }``, each one checked."""
        allow: list[str] = []
        for item in allow_param.value.items:
            name = item.value
            tech = self.regs.techniques.get(name)
            if tech is None:
                self.error(f"unknown technique '{name}'", item.span,
                           hint=did_you_mean(name, self.regs.techniques.names()).strip(" —")
                           or "squeeze plugins lists the installed techniques")
            elif name not in composable:
                self.error(f"technique '{name}' cannot be composed: its plugin offers no "
                           "candidate settings", item.span,
                           hint="write it as an explicit stage instead; composable: "
                                + ", ".join(composable))
            elif name in allow:
                self.error(f"technique '{name}' is allowed twice", item.span)
            else:
                allow.append(name)
        return allow

    def output(self, name: str, stages: tuple[StagePlan, ...]) -> tuple[str, str, dict[str, Any]]:
        """The output directory, format and options (checked against the format's schema), and
        the format's own check of what the stages store."""
        decl = self.recipe.output
        path = str((self.base_dir / Path(decl.path.value if decl else f"out/{name}").expanduser()).resolve())
        params = decl.options.params if decl and decl.options else ()
        fmt_param = next((p for p in params if p.key == "format"), None)
        fmt_name = self.output_format(fmt_param)
        if fmt_name is None:
            return path, "squeeze", {}
        fmt = self.regs.output_formats.get(fmt_name)
        n_errors = len(self.errors)
        fallback = fmt_param.key_span if fmt_param is not None else (decl.span if decl else None)
        values = self.output_options(fmt, params, named=fmt_param is not None, fallback=fallback)
        if len(self.errors) > n_errors:
            return path, fmt_name, values
        options = {**fmt.defaults(), **values}
        where = _span_of(fmt_param.value) if fmt_param is not None else fallback
        self.format_check(fmt, options, stages, where)
        return path, fmt_name, options

    def output_format(self, param: ast.Param | None) -> str | None:
        """The name of the output format ``format = …`` gives (default ``squeeze``); ``None``
        (reported) when it names none that is installed."""
        if param is None:
            return "squeeze"
        value = self.convert(param.value)
        if value is None:  # reported by convert
            return None
        if not isinstance(value, str) or value not in self.regs.output_formats:
            what = f"unknown output format {value!r}" if isinstance(value, str) else \
                "the output format must be a string"
            self.error(what, _span_of(param.value),
                       hint="formats: " + ", ".join(self.regs.output_formats.names()))
            return None
        return value

    def output_options(self, fmt: Any, params: tuple[ast.Param, ...], named: bool,
                       fallback: ast.Span | None) -> dict[str, Any]:
        """The output block's options besides ``format``, each checked against ``fmt.schema``
        (an unknown key names the format when the recipe named one)."""
        known = ["format", *fmt.schema.get("properties", {})]
        others = []
        for p in params:
            if p.key not in known:
                self.error(f"unknown output option '{p.key}'" + (f" for format '{fmt.name}'" if named else ""),
                           p.key_span, hint=did_you_mean(p.key, known).strip(" —")
                           or "output takes: " + ", ".join(known))
            elif p.key != "format":
                others.append(p)
        values: dict[str, Any] = {}
        failed: set[str] = set()
        for p in others:
            before = len(self.errors)
            values[p.key] = self.convert(p.value)
            if len(self.errors) > before:
                failed.add(p.key)
                del values[p.key]
        self.errors.extend(schema_errors(fmt.schema, values, f"output format '{fmt.name}'",
                                         _spans(tuple(others)), fallback, failed))
        return values

    def format_check(self, fmt: Any, options: dict[str, Any], stages: tuple[StagePlan, ...],
                     where: ast.Span | None) -> None:
        """Report what the format cannot hold (``OutputFormat.check``) at the stage that stores
        it, else at ``where`` (the output statement's format)."""
        stored = [(s.name, frozenset(self.regs.techniques.get(s.technique).stores_for(dict(s.params))))
                  for s in stages]
        techniques = {d.name: d.technique_span for d in self.recipe.stages}
        for stage_name, message in fmt.check(dict(options), stored, self.task, self.model_config()):
            span = techniques.get(stage_name) if stage_name else None
            prefix = f"stage '{stage_name}': " if stage_name else ""
            self.error(f"{prefix}output format '{fmt.name}' cannot hold this: {message}", span or where)

    def run(self) -> Plan | None:
        recipe = self.recipe
        name = recipe.name or (Path(recipe.file).stem if recipe.file else "recipe")
        uses = self.uses()
        model = self.model()
        data = self.data()
        metrics = self.metrics()
        stages = self.stages()
        constraints = self.constraints(metrics)
        self.task = model.task if model is not None else "embedding"
        compose = self.compose(constraints)
        search = self.search()
        output_dir, output_format, output_options = self.output(name, stages)
        if self.errors or model is None:
            return None
        return Plan(name, str(Path(recipe.file).resolve()) if recipe.file else None, str(self.base_dir),
                    model, data, metrics, stages, constraints, search, output_dir, output_format, uses,
                    compose, output_options)


def resolve(recipe: ast.Recipe, registries: Registries | None = None) -> Plan:
    """The plan of ``recipe``; raise ``RecipeErrors`` with every problem found."""
    if registries is None:
        from squeezelang.hooks.manager import default_registries
        registries = default_registries()
    resolver = _Resolver(recipe, registries)
    plan = resolver.run()
    if plan is None:
        errors = sorted(resolver.errors, key=lambda e: ((e.span.line, e.span.column) if e.span else (0, 0)))
        for e in errors:
            e.file = recipe.file
        raise RecipeErrors(errors, recipe.source, recipe.file)
    return plan
