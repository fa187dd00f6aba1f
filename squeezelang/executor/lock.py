"""Write ``recipe.lock.squeeze``: the plan as a recipe with every default and ``auto`` made explicit.

The lock is itself a valid recipe: running it reproduces the run without search. Paths are written
relative to the lock file's directory (the output directory), so the lock keeps working when run
from anywhere; a model named by ``package(…)`` stays that way.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from squeezelang.hooks.metric import EACH_STAGE
from squeezelang.hooks.registry import Registries
from squeezelang.lang import ast
from squeezelang.models.placement import SCHEMA as PLACEMENT
from squeezelang.planner.plan import Plan


def _num(value: float | int) -> ast.Num:
    if isinstance(value, bool):
        raise TypeError("bool is not a number")
    if isinstance(value, int):
        return ast.Num(float(value), None, str(value))
    return ast.Num(float(value), None, repr(float(value)))


def _value(value: Any, data_names: set[str] | None = None) -> ast.Value:
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, (int, float)):
        return _num(value)
    if isinstance(value, str):
        if value == "original":
            return ast.Original()
        if data_names and value in data_names:
            return ast.Ident(value)
        return ast.Str(value)
    if isinstance(value, (list, tuple)):
        return ast.ListV(tuple(_value(v) for v in value))
    raise TypeError(f"cannot write {value!r} in a recipe")


def _rel(path: str, base: Path) -> str:
    return os.path.relpath(path, base)


def lock_recipe(plan: Plan, registries: Registries, lock_dir: Path) -> ast.Recipe:
    """The explicit recipe of ``plan`` as an AST, with paths relative to ``lock_dir``."""
    model_args: list[ast.Arg] = []
    for key, value in plan.model.args.items():
        if key == "path":
            if plan.model.package:
                module, sub = plan.model.package
                call = ast.Call("package", tuple(ast.Arg(None, ast.Str(v)) for v in (module, sub) if v))
                model_args.insert(0, ast.Arg(None, call))
            else:
                model_args.insert(0, ast.Arg(None, ast.Str(_rel(value, lock_dir))))
        else:
            model_args.append(ast.Arg(key, _value(value)))
    for key, default in ((k, v["default"]) for k, v in PLACEMENT.items()):
        if getattr(plan.model, key) != default:  # where it ran, when not the default
            model_args.append(ast.Arg(key, _value(getattr(plan.model, key))))
    data = []
    for d in plan.data:
        source = registries.data_sources.get(d.source)
        args = []
        for key, value in d.args.items():
            if key in getattr(source, "path_params", ("path",)) and isinstance(value, str):
                value = _rel(value, lock_dir)
            arg = ast.Arg(None if key == "path" else key, _value(value))
            args.insert(0, arg) if key == "path" else args.append(arg)
        data.append(ast.DataDecl(d.name, ast.Call(d.source, tuple(args))))
    names = {d.name for d in plan.data}
    metrics = []
    for m in plan.metrics:
        if m.implicit:
            continue
        args = ([ast.Arg(None, ast.Ident(m.data))] if m.data else []) + [
            ast.Arg(k, _value(v)) for k, v in m.args.items()]
        if m.each_stage_given:
            args.append(ast.Arg(EACH_STAGE, _value(m.each_stage)))
        metrics.append(ast.MetricDecl(m.name, ast.Call(m.kind, tuple(args))))
    stages = []
    for s in plan.stages:
        tech = registries.techniques.get(s.technique)
        data_keys = set(getattr(tech, "data_params", {}))
        params = tuple(ast.Param(k, _value(v, names if k in data_keys else None))
                       for k, v in s.params.items() if v is not None)
        stages.append(ast.StageDecl(s.name, s.technique, params, explicit_name=True))
    constraints = []
    for c in plan.constraints:
        match = re.fullmatch(r"(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)([A-Za-z%]*)", c.text)
        number, unit = (match.group(1), match.group(2) or None) if match else (repr(c.bound), None)
        constraints.append(ast.Constraint(c.metric, c.op, ast.Num(float(number), unit, number), c.drop))
    search = ast.Block((ast.Param("strategy", ast.Str(plan.search.strategy)),
                        ast.Param("trials", _num(plan.search.trials)),
                        ast.Param("timeout", ast.Num(plan.search.timeout, "s", f"{plan.search.timeout:g}")),
                        ast.Param("seed", _num(plan.search.seed))))
    options = tuple(ast.Param(k, _value(v)) for k, v in plan.output_options.items() if v is not None)
    output = ast.OutputDecl(ast.Str("."), ast.Block((ast.Param("format", ast.Str(plan.output_format)),)
                                                    + options))
    return ast.Recipe(name=plan.name, uses=tuple(ast.UseDecl(ast.Str(u)) for u in plan.uses),
                      model=ast.ModelDecl(ast.Call(plan.model.source, tuple(model_args))),
                      data=tuple(data), metrics=tuple(metrics), stages=tuple(stages),
                      constraints=tuple(constraints), search=search, output=output)


def lock_text(plan: Plan, registries: Registries, lock_dir: Path) -> str:
    from squeezelang.lang.fmt import format_recipe

    header = ("# recipe.lock.squeeze — written by squeeze run: every default and auto made explicit.\n"
              "# Re-run without search: squeeze run recipe.lock.squeeze -o OTHER_DIR\n")
    return header + format_recipe(lock_recipe(plan, registries, lock_dir))
