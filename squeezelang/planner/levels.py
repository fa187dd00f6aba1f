"""Compression levels: ``auto`` knobs as one number each, and the size floor the estimates give.

A knob's setting is a *level* ``t`` in [0, 1] (0 = its least compressing end, 1 = its most), so
knobs of different units and directions move together. ``size_floor`` bisects the common level on
the estimates alone (no weights) until the size-type constraints (``size``, ``params``) hold;
``squeeze plan`` prints each knob's value there (``solved_floor``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from squeezelang.errors import Infeasible
from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from squeezelang.hooks.context import Context


SIZE_KINDS = ("size", "params")


Levels = dict[tuple[str, str], float]  # (stage, knob) -> level in [0, 1]


def knobs_of(plan: Plan) -> list[tuple[str, str]]:
    return [(s.name, k) for s in plan.stages for k in s.autos]


def at_levels(plan: Plan, registries: Registries, levels: Levels | float) -> Plan:
    """The plan with each auto knob set from its level (a float sets every knob to the same one)."""
    stages = []
    for s in plan.stages:
        params = dict(s.params)
        tech = registries.techniques.get(s.technique)
        for key, (lo, hi) in s.autos.items():
            knob = tech.knob(key)
            t = levels if isinstance(levels, float) else levels[(s.name, key)]
            frac = t if knob.compresses == "up" else 1.0 - t
            value = lo + (hi - lo) * frac
            params[key] = int(round(value)) if knob.integer else round(value, 6)
        stages.append(replace(s, params=params, autos={}))
    return replace(plan, stages=tuple(stages))


def solved_plan(plan: Plan, fixed: Plan) -> Plan:
    """``fixed``'s values, with ``plan``'s autos kept so the report shows what was solved."""
    return replace(fixed, stages=tuple(replace(f, autos=s.autos) for s, f in zip(plan.stages, fixed.stages)))


def has_size_constraints(plan: Plan) -> bool:
    return any(plan.metric(c.metric) and plan.metric(c.metric).kind in SIZE_KINDS for c in plan.constraints)


def predicted_ok(plan: Plan, registries: Registries, levels: Levels | float,
                 ctx: Context) -> tuple[bool, int]:
    """Whether the estimates meet the size-type constraints at ``levels``, and the predicted size."""
    from squeezelang.planner.estimate import predict

    pred = predict(at_levels(plan, registries, levels), registries, ctx=ctx)
    return all(v.met for v in pred.constraints), pred.final_size


def size_floor(plan: Plan, registries: Registries, ctx: Context, steps: int = 30) -> tuple[float, list[str]]:
    """The smallest common level whose *predicted* size/params meet the size-type constraints."""
    from squeezelang.planner.estimate import predict

    if not has_size_constraints(plan):
        return 0.0, []
    if not predicted_ok(plan, registries, 1.0, ctx)[0]:
        from squeezelang.lang.units import fmt_value

        pred = predict(at_levels(plan, registries, 1.0), registries, ctx=ctx)
        out = []
        for v in pred.constraints:
            if not v.met:
                dim = "bytes" if plan.metric(v.metric).kind == "size" else "count"
                original = pred.original_size if dim == "bytes" else pred.original_params
                share = f" ({v.value / original:.1%} of the original)" if original else ""
                out.append(f"{v.constraint}: the most compressed setting reaches "
                           f"{fmt_value(v.value, dim)}{share}, above the bound {fmt_value(v.bound, dim)}")
        return 1.0, out
    if predicted_ok(plan, registries, 0.0, ctx)[0]:
        return 0.0, []
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if predicted_ok(plan, registries, mid, ctx)[0] else (mid, hi)
    return hi, []


def solved_floor(plan: Plan, registries: Registries, ctx: Context) -> dict[tuple[str, str], float]:
    """Each auto knob's value at the size floor: the least compression the size-type constraints
    allow, solved from the estimates (empty without size-type constraints). Raises ``Infeasible``
    when even the most compressed setting misses them."""
    if not has_size_constraints(plan):
        return {}
    floor, impossible = size_floor(plan, registries, ctx)
    if impossible:
        raise Infeasible("; ".join(impossible))
    fixed = at_levels(plan, registries, floor)
    return {(s.name, k): f.params[k] for s, f in zip(plan.stages, fixed.stages) for k in s.autos}

#: How far past a size-type bound the estimate of fixed settings must land before a run is refused
#: (a fraction of the bound): estimates that assume something without weights may be a little off.
REFUSE_MARGIN = 0.02


def refuse_fixed_unreachable(plan: Plan, registries: Registries, ctx: Context) -> None:
    """Raise ``Infeasible`` when the recipe has no ``auto`` and its fixed settings are predicted to
    miss a size-type constraint by more than ``REFUSE_MARGIN``, naming the predicted figure and the
    bound, so that nothing is loaded or run for a result known to fail. Only for output formats
    whose size the estimates predict (``OutputFormat.predicts_size``)."""
    from squeezelang.lang.units import fmt_value
    from squeezelang.planner.estimate import predict

    fmt = registries.output_formats.get(plan.output_format)
    if plan.needs_search or not has_size_constraints(plan) or not getattr(fmt, "predicts_size", False):
        return
    pred = predict(plan, registries, ctx=ctx)
    missed = []
    for v in pred.constraints:
        if v.met or abs(v.margin) <= REFUSE_MARGIN * abs(v.bound):
            continue
        dim = "bytes" if plan.metric(v.metric).kind == "size" else "count"
        original = pred.original_size if dim == "bytes" else pred.original_params
        share = f" ({v.value / original:.1%} of the original)" if original else ""
        missed.append(f"{v.constraint}: the stages as written are predicted to reach "
                      f"{fmt_value(v.value, dim)}{share}, the bound is {fmt_value(v.bound, dim)}")
    if missed:
        raise Infeasible("; ".join(missed) + ". Nothing was run: compress harder, or let the "
                         "engine choose with auto(lo .. hi)")
