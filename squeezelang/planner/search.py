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

import os
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.errors import Infeasible
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
        from squeezelang.executor.report import fmt_value

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
    if not _has_size_constraints(plan):
        return {}
    floor, impossible = size_floor(plan, registries, ctx)
    if impossible:
        raise Infeasible("; ".join(impossible))
    fixed = at_levels(plan, registries, floor)
    return {(s.name, k): f.params[k] for s, f in zip(plan.stages, fixed.stages) for k in s.autos}


class _Budget:
    """The search's budget and log, shared by every pipeline tried (``trials`` and ``timeout``)."""

    def __init__(self, trials: int, timeout: float) -> None:
        self.trials, self.timeout = trials, timeout
        self.log: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        #: the original model's metrics, measured by the first trial and reused by the others
        self.original: dict[str, float] | None = None

    def left(self) -> int:
        if time.perf_counter() - self.started >= self.timeout:
            return 0
        return max(self.trials - len(self.log), 0)


class _Trials:
    """Runs and logs the trials of one plan (one pipeline) within the shared budget."""

    def __init__(self, plan: Plan, registries: Registries, scratch: Path, handle: ModelHandle | None,
                 quiet: bool, ctx: Context, budget: _Budget, backend: Any,
                 pipeline: str | None = None) -> None:
        self.plan, self.registries, self.scratch, self.ctx = plan, registries, scratch, ctx
        self.handle, self.quiet, self.budget, self.pipeline = handle, quiet, budget, pipeline
        self.backend = backend
        self.workers = max(1, plan.search.workers)

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.budget.log

    def budget_left(self) -> bool:
        return self.budget.left() > 0

    def run(self, levels: Levels | float) -> bool:
        return self.run_many([levels])[0]

    def run_many(self, batch: list[Levels | float]) -> list[bool]:
        """Run up to the budget's remaining trials of ``batch`` (in parallel where the search has
        workers); return whether each was feasible (False for those the budget cut)."""
        from squeezelang.planner.workers import TrialJob

        batch = batch[:self.budget.left()]
        if not batch:
            return []
        if self.budget.original is None and len(batch) > 1:  # measure the original once, alone
            return self.run_many(batch[:1]) + self.run_many(batch[1:])
        jobs, fixed_plans, predicted = [], [], []
        for levels in batch:
            fixed = at_levels(self.plan, self.registries, levels)
            fixed_plans.append(fixed)
            predicted.append(predicted_ok(self.plan, self.registries, levels, self.ctx)[1])
            index = len(self.log) + len(jobs) + 1
            jobs.append(TrialJob(index, fixed, str(self.scratch / f"trial-{index:02d}"),
                                 self.budget.original, measure_stages=self.pipeline is not None))
        outcomes = self.backend.run(jobs)
        results = []
        for levels, fixed, pred, outcome in zip(batch, fixed_plans, predicted, outcomes):
            if self.budget.original is None and outcome.original:
                self.budget.original = dict(outcome.original)
            entry = {
                "levels": levels if isinstance(levels, float) else
                {f"{s}.{k}": v for (s, k), v in levels.items()},
                "values": {s.name: {k: f.params[k] for k in s.autos}
                           for s, f in zip(self.plan.stages, fixed.stages) if s.autos},
                "predicted_size": pred,
                "metrics": outcome.metrics,
                "verdicts": outcome.verdicts,
                "feasible": outcome.ok, "seconds": round(outcome.seconds, 2)}
            if self.pipeline is not None:
                entry["pipeline"] = self.pipeline
            if outcome.stages is not None:
                entry["stages"] = outcome.stages
                entry["original"] = outcome.original
            if outcome.error:
                entry["error"] = outcome.error
            self.log.append(entry)
            results.append(outcome.ok)
            if not self.quiet:
                what = f"{self.pipeline} " if self.pipeline else ""
                verdict = "failed: " + outcome.error if outcome.error else \
                    "feasible" if outcome.ok else "infeasible"
                print(f"trial {len(self.log)}: {what}{entry['values'] or ''} -> {verdict}", flush=True)
        return results

    def mine(self) -> list[dict[str, Any]]:
        return [t for t in self.log if t.get("pipeline") == self.pipeline]

    def feasible(self) -> list[dict[str, Any]]:
        return [t for t in self.mine() if t["feasible"]]


def _failing_prefixes(plan: Plan, labels: tuple[str, ...],
                      entries: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Leading stages without knobs after which a trial already broke a quality constraint.

    Quality only falls further as lossy stages follow, so no pipeline that starts with the same
    knob-less stages can meet the constraint (a healing stage only ever follows a knob). A stage
    with a knob ends the prefix: a smaller value might have passed.
    """
    from squeezelang.planner.constraints import evaluate

    quality = [c for c in plan.constraints
               if plan.metric(c.metric) is not None and plan.metric(c.metric).dimension == "score"]
    out = []
    for entry in entries:
        original, after = entry.get("original") or {}, entry.get("stages") or {}
        for i, stage in enumerate(plan.stages):
            if stage.autos or stage.name not in after:
                break
            measured = after[stage.name]
            if any(c.metric in measured and c.metric in original and not evaluate(
                    c, plan.metric(c.metric), original[c.metric], measured[c.metric]).met
                   for c in quality):
                out.append(labels[:i + 1])
                break
    return out


def _best(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    feasible = [t for t in log if t["feasible"]]
    if not feasible:
        return None
    return min(feasible, key=lambda t: (t["predicted_size"], -_mean_level(t["levels"])))


def _mean_level(levels: Any) -> float:
    return levels if isinstance(levels, float) else sum(levels.values()) / max(len(levels), 1)


def _levels_of(entry: dict[str, Any]) -> Levels | float:
    raw = entry["levels"]
    return raw if isinstance(raw, float) else {tuple(k.split(".", 1)): v for k, v in raw.items()}


def _bisect(trials: _Trials, floor: float) -> None:
    """Bisection on the common level, assuming feasibility falls as compression rises; with ``w``
    workers, ``w`` points split the interval at once (fewer rounds, more trials)."""
    lo, hi = floor, 1.0
    if trials.run(hi) or not trials.budget_left() or not trials.run(lo):
        return  # the most compressed end is feasible, or even the least compressed is not
    while trials.budget_left() and hi - lo > 1e-3:
        w = min(trials.workers, trials.budget.left())
        points = [lo + (hi - lo) * (i + 1) / (w + 1) for i in range(w)]
        for point, ok in zip(points, trials.run_many(points)):
            if not ok:
                hi = point
                break
            lo = point


def _grid(trials: _Trials, floor: float) -> None:
    n = max(trials.plan.search.trials, 1)
    levels = [1.0 - (1.0 - floor) * (i / max(n - 1, 1)) for i in range(n)]
    for i in range(0, n, trials.workers):
        if not trials.budget_left() or any(trials.run_many(levels[i:i + trials.workers])):
            return  # levels go from most to least compressed: the first feasible one is the best


def _random(trials: _Trials, floor: float) -> None:
    rng = random.Random(trials.plan.search.seed)
    knobs = knobs_of(trials.plan)
    attempts = 0
    while trials.budget_left() and attempts < 50 * trials.plan.search.trials:
        batch: list[Levels | float] = []
        while len(batch) < min(trials.workers, trials.budget.left()) and \
                attempts < 50 * trials.plan.search.trials:
            attempts += 1
            levels = {k: rng.uniform(0.0, 1.0) for k in knobs}
            if _has_size_constraints(trials.plan) and \
                    not predicted_ok(trials.plan, trials.registries, levels, trials.ctx)[0]:
                continue  # ruled out by the estimates: no trial spent
            batch.append(levels)
        if batch:
            trials.run_many(batch)


def _fixed(trials: _Trials, floor: float) -> None:
    """A pipeline without knobs: one trial measures it."""
    trials.run(0.0)


def solve(plan: Plan, registries: Registries, output: str | Path | None = None, force: bool = False,
          handle: ModelHandle | None = None, quiet: bool = False) -> RunResult:
    """Search within ``plan.search``'s budget, then run the best setting for real.

    With ``compose``, the pipelines the estimates allow are tried in rank order, each searched with
    the recipe's strategy, until one has a feasible trial. Raises ``Infeasible`` before any trial
    when the estimates show that a size-type constraint cannot hold.
    """
    from squeezelang.executor.artifacts import check_output_dir
    from squeezelang.executor.guards import input_paths
    from squeezelang.executor.run import execute
    from squeezelang.planner.compose import pipelines, refuse_if_unreachable, with_pipeline
    from squeezelang.planner.estimate import planning_context
    from squeezelang.planner.workers import open_backend

    out = Path(output or plan.output_dir).resolve()
    check_output_dir(out, force, input_paths(plan, registries))
    ctx = planning_context(plan, registries)
    if plan.compose is not None:
        ranked = pipelines(plan, registries, ctx)
        refuse_if_unreachable(plan, ranked, _original_size(plan, registries, ctx))
        candidates = [(p.label, with_pipeline(plan, p)) for p in ranked if p.feasible]
        composition = [p.to_json() for p in ranked]
    else:
        floor, impossible = size_floor(plan, registries, ctx)
        if impossible:
            raise Infeasible("; ".join(impossible))
        candidates, composition = [(None, plan)], None
    budget = _Budget(plan.search.trials, plan.search.timeout)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The process id lets a later run clean up after a killed search (artifacts.recover).
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.trials-{os.getpid()}-", dir=out.parent))
    by_label = dict(candidates)
    backend = open_backend(plan.search.backend, plan.search.workers, registries, handle,
                           plan.search.address)
    chosen_label: str | None = None
    ruled_out: list[tuple[str, ...]] = []
    skipped: list[str] = []
    try:
        for label, candidate in candidates:
            if not budget.left():
                break
            labels = tuple(label.split(" + ")) if label else ()
            known = next((p for p in ruled_out if labels[:len(p)] == p), None)
            if known is not None:
                skipped.append(f"{label}: skipped without a trial, its first stages "
                               f"({' + '.join(known)}) already broke a quality constraint")
                continue
            trials = _Trials(candidate, registries, scratch, handle, quiet, ctx, budget, backend, label)
            if candidate.has_auto:
                floor, _ = size_floor(candidate, registries, ctx)
                STRATEGY_FUNCTIONS[plan.search.strategy](trials, floor)
            else:
                _fixed(trials, 0.0)
            if trials.feasible():
                break
            if label:
                ruled_out.extend(_failing_prefixes(candidate, labels, trials.mine()))
    finally:
        backend.close()
        shutil.rmtree(scratch, ignore_errors=True)
    best = _best(budget.log)
    chosen = best
    if chosen is None and budget.log:  # none feasible: the closest (most constraints met, then smallest)
        chosen = max(budget.log, key=lambda t: (sum(t["verdicts"].values()), -t["predicted_size"]))
    if chosen is not None:
        chosen_label = chosen.get("pipeline")
        base = by_label[chosen_label]
        levels = _levels_of(chosen)
    else:  # no trial ran (no budget): the first candidate at its size floor
        chosen_label, base = candidates[0]
        levels = size_floor(base, registries, ctx)[0] if base.has_auto else 0.0
    search_seconds = time.perf_counter() - budget.started
    final = _solved(base, at_levels(base, registries, levels))
    if composition is not None:
        composition = {"chosen": chosen_label, "considered": composition, "skipped": skipped}
    result = execute(final, registries, output=out, force=force, handle=handle, quiet=quiet,
                     trials=budget.log, search_seconds=search_seconds, composition=composition,
                     original_metrics=budget.original)
    if best is None:
        result.notes.append("no setting tried satisfied every constraint; the closest trial was run")
    return result


def _original_size(plan: Plan, registries: Registries, ctx: Context) -> int:
    from squeezelang.planner.estimate import predict

    return predict(replace(plan, stages=()), registries, ctx=ctx).original_size


STRATEGY_FUNCTIONS = {"bisect": _bisect, "grid": _grid, "random": _random}
