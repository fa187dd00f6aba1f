"""Solve ``auto`` knobs: size-type constraints analytically, quality constraints by measured trials.

Rule of the language: each auto knob is pushed as far toward compression as the quality constraints
allow, and at least as far as the size/speed constraints require. The knobs move together along one
compression level ``t`` in [0, 1] (0 = each knob at its least compressing end, 1 = its most); the
estimates give the smallest ``t`` that meets the size-type constraints, then bisection over measured
trials finds the largest ``t`` that keeps every constraint. Every trial is logged in the report.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan, StagePlan

if TYPE_CHECKING:
    from squeezelang.executor.run import RunResult
    from squeezelang.models.handle import ModelHandle

SIZE_KINDS = ("size", "params")


def at_level(plan: Plan, registries: Registries, t: float) -> Plan:
    """The plan with every auto knob set for compression level ``t`` (and no autos left)."""
    stages = []
    for s in plan.stages:
        params = dict(s.params)
        tech = registries.techniques.get(s.technique)
        for key, (lo, hi) in s.autos.items():
            knob = tech.knob(key)
            frac = t if knob.compresses == "up" else 1.0 - t
            value = lo + (hi - lo) * frac
            params[key] = int(round(value)) if knob.integer else round(value, 6)
        stages.append(replace(s, params=params, autos={}))
    return replace(plan, stages=tuple(stages))


def _solved(plan: Plan, fixed: Plan) -> Plan:
    """``fixed``'s values, with ``plan``'s autos kept so the report shows what was solved."""
    return replace(fixed, stages=tuple(replace(f, autos=s.autos) for s, f in zip(plan.stages, fixed.stages)))


def size_floor(plan: Plan, registries: Registries, steps: int = 30) -> tuple[float, list[str]]:
    """The smallest level whose *predicted* size/params meet the size-type constraints."""
    from squeezelang.planner.estimate import predict

    def ok(t: float) -> bool:
        pred = predict(at_level(plan, registries, t), registries)
        return all(v.met for v in pred.constraints)

    if not any(plan.metric(c.metric) and plan.metric(c.metric).kind in SIZE_KINDS for c in plan.constraints):
        return 0.0, []
    if not ok(1.0):
        pred = predict(at_level(plan, registries, 1.0), registries)
        return 1.0, [f"{v.constraint}: the most compressed setting is predicted at {v.value:,.0f} "
                     f"(bound {v.bound:,.0f})" for v in pred.constraints if not v.met]
    if ok(0.0):
        return 0.0, []
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi, []


def solve(plan: Plan, registries: Registries, output: str | Path | None = None, force: bool = False,
          handle: ModelHandle | None = None, quiet: bool = False) -> RunResult:
    """Search the auto knobs within ``plan.search``'s budget, then run the best setting for real."""
    from squeezelang.executor.artifacts import check_output_dir
    from squeezelang.executor.run import execute

    out = Path(output or plan.output_dir).resolve()
    check_output_dir(out, force)
    floor, impossible = size_floor(plan, registries)
    trials: list[dict[str, Any]] = []
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".squeeze-trials-", dir=out.parent if out.parent.exists() else None))

    def trial(t: float) -> bool:
        fixed = at_level(plan, registries, t)
        trial_out = scratch / f"trial-{len(trials) + 1:02d}"
        t0 = time.perf_counter()
        result = execute(fixed, registries, output=trial_out, force=True, handle=handle, quiet=True)
        trials.append({
            "level": round(t, 6),
            "values": {s.name: {k: f.params[k] for k in s.autos} for s, f in zip(plan.stages, fixed.stages)},
            "metrics": {k: v["final"] for k, v in result.report["metrics"].items()},
            "verdicts": {v.constraint: v.met for v in result.verdicts},
            "feasible": result.ok, "seconds": round(time.perf_counter() - t0, 2)})
        if not quiet:
            print(f"trial {len(trials)}: level {t:.3f} {trials[-1]['values']} -> "
                  f"{'feasible' if result.ok else 'infeasible'}", flush=True)
        shutil.rmtree(trial_out, ignore_errors=True)
        return result.ok

    best = None
    try:
        if not impossible:
            lo, hi = floor, 1.0
            if trial(hi):
                best = hi
            elif plan.search.trials > 1 and trial(lo):
                best = lo
                while len(trials) < plan.search.trials and hi - lo > 1e-3 and \
                        time.perf_counter() - started < plan.search.timeout:
                    mid = (lo + hi) / 2
                    if trial(mid):
                        lo = best = mid
                    else:
                        hi = mid
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    chosen = best if best is not None else (floor if not trials else
                                             max(trials, key=lambda r: sum(r["verdicts"].values()))["level"])
    final = _solved(plan, at_level(plan, registries, chosen))
    result = execute(final, registries, output=out, force=force, handle=handle, quiet=quiet, trials=trials)
    result.notes.extend(impossible)
    if best is None:
        result.notes.append("no setting in range satisfied every constraint; the closest trial was run")
    return result
