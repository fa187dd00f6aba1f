"""Solve ``auto`` knobs: size-type constraints analytically, quality constraints by measured trials.

Rule of the language: each auto knob is pushed as far toward compression as the quality constraints
allow, and at least as far as the size/speed constraints require.

Knob settings are described by a compression *level* ``t`` in [0, 1] per knob (0 = the knob's least
compressing end, 1 = its most). The estimates give the smallest common level that meets the
size-type constraints (``size_floor``); measured trials then search above it:

- ``bisect``: all knobs move together; bisection finds the highest level whose trial meets every
  constraint (fewest trials for one monotone knob).
- ``grid``: evenly spaced common levels from the floor to 1, most compressed first.
- ``random``: each knob drawn independently (seeded) — the multi-knob strategy; draws that the
  estimates already rule out are skipped without a trial.

Each trial runs the stages for real, saves and reloads the artifact and measures it, exactly like
the final run. The feasible trial with the smallest predicted size wins (ties: the higher level).
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from squeezelang.executor.context import Context
    from squeezelang.executor.run import RunResult
    from squeezelang.models.handle import ModelHandle

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


# Kept for callers that think in one common level.
def at_level(plan: Plan, registries: Registries, t: float) -> Plan:
    return at_levels(plan, registries, float(t))


def _solved(plan: Plan, fixed: Plan) -> Plan:
    """``fixed``'s values, with ``plan``'s autos kept so the report shows what was solved."""
    return replace(fixed, stages=tuple(replace(f, autos=s.autos) for s, f in zip(plan.stages, fixed.stages)))


def _has_size_constraints(plan: Plan) -> bool:
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

    if not _has_size_constraints(plan):
        return 0.0, []
    if not predicted_ok(plan, registries, 1.0, ctx)[0]:
        pred = predict(at_levels(plan, registries, 1.0), registries, ctx=ctx)
        return 1.0, [f"{v.constraint}: the most compressed setting is predicted at {v.value:,.0f} "
                     f"(bound {v.bound:,.0f})" for v in pred.constraints if not v.met]
    if predicted_ok(plan, registries, 0.0, ctx)[0]:
        return 0.0, []
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if predicted_ok(plan, registries, mid, ctx)[0] else (mid, hi)
    return hi, []


class _Trials:
    """Runs and logs trials within the search budget."""

    def __init__(self, plan: Plan, registries: Registries, scratch: Path, handle: ModelHandle | None,
                 quiet: bool, ctx: Context) -> None:
        self.plan, self.registries, self.scratch, self.ctx = plan, registries, scratch, ctx
        self.handle, self.quiet = handle, quiet
        self.log: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def budget_left(self) -> bool:
        return (len(self.log) < self.plan.search.trials
                and time.perf_counter() - self.started < self.plan.search.timeout)

    def run(self, levels: Levels | float) -> bool:
        from squeezelang.executor.run import execute

        fixed = at_levels(self.plan, self.registries, levels)
        _, predicted = predicted_ok(self.plan, self.registries, levels, self.ctx)
        out = self.scratch / f"trial-{len(self.log) + 1:02d}"
        t0 = time.perf_counter()
        result = execute(fixed, self.registries, output=out, force=True, handle=self.handle, quiet=True)
        shutil.rmtree(out, ignore_errors=True)
        self.log.append({
            "levels": levels if isinstance(levels, float) else {f"{s}.{k}": v for (s, k), v in levels.items()},
            "values": {s.name: {k: f.params[k] for k in s.autos}
                       for s, f in zip(self.plan.stages, fixed.stages) if s.autos},
            "predicted_size": predicted,
            "metrics": {k: v["final"] for k, v in result.report["metrics"].items()},
            "verdicts": {v.constraint: v.met for v in result.verdicts},
            "feasible": result.ok, "seconds": round(time.perf_counter() - t0, 2)})
        if not self.quiet:
            print(f"trial {len(self.log)}: {self.log[-1]['values']} -> "
                  f"{'feasible' if result.ok else 'infeasible'}", flush=True)
        return result.ok

    def best(self) -> dict[str, Any] | None:
        feasible = [t for t in self.log if t["feasible"]]
        if not feasible:
            return None
        return min(feasible, key=lambda t: (t["predicted_size"], -_mean_level(t["levels"])))


def _mean_level(levels: Any) -> float:
    return levels if isinstance(levels, float) else sum(levels.values()) / max(len(levels), 1)


def _bisect(trials: _Trials, floor: float) -> None:
    lo, hi = floor, 1.0
    if trials.run(hi) or not trials.budget_left() or not trials.run(lo):
        return
    while trials.budget_left() and hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if trials.run(mid) else (lo, mid)


def _grid(trials: _Trials, floor: float) -> None:
    n = max(trials.plan.search.trials, 1)
    for i in range(n):
        level = 1.0 - (1.0 - floor) * (i / max(n - 1, 1))
        if not trials.budget_left() or trials.run(level):
            return  # levels go from most to least compressed: the first feasible one is the best


def _random(trials: _Trials, floor: float) -> None:
    rng = random.Random(trials.plan.search.seed)
    knobs = knobs_of(trials.plan)
    attempts = 0
    while trials.budget_left() and attempts < 50 * trials.plan.search.trials:
        attempts += 1
        levels = {k: rng.uniform(0.0, 1.0) for k in knobs}
        if _has_size_constraints(trials.plan) and \
                not predicted_ok(trials.plan, trials.registries, levels, trials.ctx)[0]:
            continue  # ruled out by the estimates: no trial spent
        trials.run(levels)


STRATEGY_FUNCTIONS = {"bisect": _bisect, "grid": _grid, "random": _random}


def solve(plan: Plan, registries: Registries, output: str | Path | None = None, force: bool = False,
          handle: ModelHandle | None = None, quiet: bool = False) -> RunResult:
    """Search the auto knobs within ``plan.search``'s budget, then run the best setting for real."""
    from squeezelang.executor.artifacts import check_output_dir
    from squeezelang.executor.run import execute

    from squeezelang.planner.estimate import planning_context

    out = Path(output or plan.output_dir).resolve()
    check_output_dir(out, force)
    ctx = planning_context(plan, registries)
    floor, impossible = size_floor(plan, registries, ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.trials-", dir=out.parent))
    trials = _Trials(plan, registries, scratch, handle, quiet, ctx)
    try:
        if not impossible:
            STRATEGY_FUNCTIONS[plan.search.strategy](trials, floor)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = trials.best()
    if best is not None:
        levels = best["levels"] if isinstance(best["levels"], float) else {
            tuple(k.split(".", 1)): v for k, v in best["levels"].items()}
    elif trials.log:  # none feasible: run the closest (most constraints met, then most compressed)
        closest = max(trials.log, key=lambda t: (sum(t["verdicts"].values()), -t["predicted_size"]))
        levels = closest["levels"] if isinstance(closest["levels"], float) else {
            tuple(k.split(".", 1)): v for k, v in closest["levels"].items()}
    else:
        levels = floor
    search_seconds = time.perf_counter() - trials.started
    final = _solved(plan, at_levels(plan, registries, levels))
    result = execute(final, registries, output=out, force=force, handle=handle, quiet=quiet,
                     trials=trials.log, search_seconds=search_seconds)
    result.notes.extend(impossible)
    if best is None:
        result.notes.append("no setting in range satisfied every constraint; the closest trial was run")
    return result
