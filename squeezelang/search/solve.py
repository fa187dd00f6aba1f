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
the final run (time metrics side by side with the original, ``executor.measure.measure_paired``).
A trial that meets a time-type constraint (latency) by less than ``TIME_MARGIN`` of its bound is
*marginal*: the final run's own paired measurement could overturn it, so it is measured once more
alone and the worse of the two counts, and a strategy never stops on it. A trial whose latency was
measured while other workers ran is re-measured alone before its verdict counts.

The feasible trial that passes clearly with the smallest size wins (then a marginal one; ties: the
higher level); with none feasible, the one with the least ``violation``.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from squeezelang.errors import Infeasible
from squeezelang.hooks.registry import Registries
from squeezelang.search.judging import (BOTH, MARGINAL, OVER, PASS, UNDER, best_trial, checks, closest_trial,
                                         failing_prefixes, hangs_on_time, is_time, levels_of,
                                         marginal, measured_size, progress_line, status,
                                         time_margin, violation)
from squeezelang.planner.levels import (Levels, at_levels, has_size_constraints, knobs_of,
                                        predicted_ok, size_floor, solved_plan)
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from squeezelang.hooks.context import Context
    from squeezelang.executor.run import RunResult
    from squeezelang.models.handle import ModelHandle
    from squeezelang.search.workers import TrialJob, TrialOutcome


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
    """Runs and logs the trials of one plan (one pipeline) within the shared budget.

    ``cap`` bounds the trials this pipeline may log (a composed search shares its budget out).
    """

    def __init__(self, plan: Plan, registries: Registries, scratch: Path, handle: ModelHandle | None,
                 quiet: bool, ctx: Context, budget: _Budget, backend: Any,
                 pipeline: str | None = None, cap: int | None = None) -> None:
        self.plan, self.registries, self.scratch, self.ctx = plan, registries, scratch, ctx
        self.handle, self.quiet, self.budget, self.pipeline = handle, quiet, budget, pipeline
        self.backend, self.cap = backend, cap
        self.workers = max(1, plan.search.workers)

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.budget.log

    def left(self) -> int:
        """Trials this pipeline may still run."""
        left = self.budget.left()
        return left if self.cap is None else min(left, max(self.cap - len(self.mine()), 0))

    def budget_left(self) -> bool:
        return self.left() > 0

    def run(self, levels: Levels | float) -> str:
        """Run one trial; its status (``OVER`` when the budget cut it)."""
        return (self.run_many([levels]) or [OVER])[0]

    def run_many(self, batch: list[Levels | float]) -> list[str]:
        """Run up to the remaining trials of ``batch`` (in parallel where the search has workers);
        return each one's status (``PASS``, ``MARGINAL``, ``UNDER``, ``OVER`` or ``BOTH``)."""
        from squeezelang.search.workers import TrialJob

        batch = batch[:self.left()]
        if not batch:
            return []
        if self.budget.original is None and len(batch) > 1:  # measure the original once, alone
            return self.run_many(batch[:1]) + self.run_many(batch[1:])
        jobs, fixed_plans = [], []
        for levels in batch:
            fixed = at_levels(self.plan, self.registries, levels)
            fixed_plans.append(fixed)
            index = len(self.log) + len(jobs) + 1
            jobs.append(TrialJob(index, fixed, str(self.scratch / f"trial-{index:02d}"),
                                 self.budget.original, measure_stages=self.pipeline is not None))
        statuses = []
        for levels, fixed, job, outcome in zip(batch, fixed_plans, jobs, self.backend.run(jobs)):
            if self.budget.original is None and outcome.original:
                self.budget.original = dict(outcome.original)
            outcome, discarded = self._settle(job, outcome)
            entry = self._entry(levels, fixed, outcome, discarded)
            self.log.append(entry)
            statuses.append(entry["status"])
            if not self.quiet:
                print(progress_line(self.plan, entry, len(self.log), self.budget.trials), flush=True)
        return statuses

    def _entry(self, levels: Levels | float, fixed: Plan, outcome: TrialOutcome,
               discarded: list[dict[str, Any]]) -> dict[str, Any]:
        """The trial's log entry (``report.json``'s ``trials``)."""
        judged = checks(self.plan, outcome.original, outcome.metrics)
        entry = {
            "levels": levels if isinstance(levels, float) else
            {f"{s}.{k}": v for (s, k), v in levels.items()},
            "values": {s.name: {k: f.params[k] for k in s.autos}
                       for s, f in zip(self.plan.stages, fixed.stages) if s.autos},
            "predicted_size": predicted_ok(self.plan, self.registries, levels, self.ctx)[1],
            "size": measured_size(self.plan, outcome.metrics),
            "metrics": outcome.metrics,
            "original": outcome.original,
            "verdicts": outcome.verdicts,
            "feasible": outcome.ok,
            "status": status(self.plan, outcome),
            "marginal": marginal(self.plan, judged),
            "violation": violation(self.plan, outcome.original, outcome.metrics),
            "seconds": round(outcome.seconds, 2)}
        if self.pipeline is not None:
            entry["pipeline"] = self.pipeline
        if outcome.stages is not None:
            entry["stages"] = outcome.stages
        if discarded:
            entry["remeasured"] = discarded
        if outcome.error:
            entry["error"] = outcome.error
        return entry

    def _settle(self, job: TrialJob, outcome: TrialOutcome) -> tuple[TrialOutcome, list[dict[str, Any]]]:
        """The outcome to judge the trial by, and the time measurements set aside for it.

        A latency measured while other workers ran is not trusted: when the verdict hangs on it,
        the trial runs again alone in this process, side by side with the original as the final
        run measures. A marginal pass is measured once more and the worse of the two counts.
        """
        discarded = []
        if self.backend.workers > 1 and hangs_on_time(self.plan, outcome):
            alone = self._alone(job)
            discarded.append(self._time_record(outcome, "measured while other trials ran"))
            outcome = alone
        if status(self.plan, outcome) == MARGINAL:
            again = self._alone(job)
            worse, better = sorted((outcome, again), key=lambda o: time_margin(self.plan, o))
            discarded.append(self._time_record(better, "the better of two measurements"))
            outcome = worse
        return outcome, discarded

    def _alone(self, job: TrialJob) -> TrialOutcome:
        """Run ``job`` in this process while nothing else of the search runs."""
        from squeezelang.search.workers import run_trial

        return run_trial(job, self.registries, self.handle)

    def _time_record(self, outcome: TrialOutcome, why: str) -> dict[str, Any]:
        names = {c.metric for c in self.plan.constraints if is_time(self.plan, c)}
        return {"why": why, "metrics": {n: v for n, v in outcome.metrics.items() if n in names},
                "original": {n: v for n, v in (outcome.original or {}).items() if n in names}}

    def mine(self) -> list[dict[str, Any]]:
        return [t for t in self.log if t.get("pipeline") == self.pipeline]


def _bisect(trials: _Trials, floor: float) -> None:
    """Bisection on the common level between a setting not compressed enough or feasible (``lo``)
    and one too compressed (``hi``); with ``w`` workers, ``w`` points split the interval at once.

    It stops at once only when the most compressed end passes clearly (a marginal pass there has
    been measured twice, and nothing is more compressed), or misses what compression helps (size,
    latency), or when the least compressed end already breaks quality. When the least compressed
    end misses only size/latency bounds, the interior is searched for a setting between the two.
    A marginal pass moves ``lo`` up like any pass: toward more compression.
    """
    lo, hi = floor, 1.0
    if trials.run(hi) != OVER or not trials.budget_left() or trials.run(lo) in (OVER, BOTH):
        return
    while trials.budget_left() and hi - lo > 1e-3:
        w = min(trials.workers, trials.left())
        points = [lo + (hi - lo) * (i + 1) / (w + 1) for i in range(w)]
        for point, said in zip(points, trials.run_many(points)):
            if said == BOTH:
                return  # quality already lost and still too slow/large: no level between helps
            if said == OVER:
                hi = point
                break
            lo = point


def _grid(trials: _Trials, floor: float) -> None:
    """Evenly spaced common levels, most compressed first; stops at the first clear pass (the best
    there is below it) or at a level that misses a size/latency bound (less compression cannot
    help), but not at a marginal pass: a less compressed level may pass clearly."""
    n = max(trials.plan.search.trials, 1)
    levels = [1.0 - (1.0 - floor) * (i / max(n - 1, 1)) for i in range(n)]
    for i in range(0, n, trials.workers):
        if not trials.budget_left() or \
                {PASS, UNDER, BOTH} & set(trials.run_many(levels[i:i + trials.workers])):
            return


def _random(trials: _Trials, floor: float) -> None:
    rng = random.Random(trials.plan.search.seed)
    knobs = knobs_of(trials.plan)
    attempts = 0
    while trials.budget_left() and attempts < 50 * trials.plan.search.trials:
        batch: list[Levels | float] = []
        while len(batch) < min(trials.workers, trials.left()) and \
                attempts < 50 * trials.plan.search.trials:
            attempts += 1
            levels = {k: rng.uniform(0.0, 1.0) for k in knobs}
            if has_size_constraints(trials.plan) and \
                    not predicted_ok(trials.plan, trials.registries, levels, trials.ctx)[0]:
                continue  # ruled out by the estimates: no trial spent
            batch.append(levels)
        if batch:
            trials.run_many(batch)


def _fixed(trials: _Trials, floor: float) -> None:
    """A pipeline without knobs: one trial measures it."""
    trials.run(0.0)


#: The fewest trials a composed pipeline with knobs is given: its two ends and one level between.
MIN_SHARE = 3


@dataclass(frozen=True)
class _Candidate:
    """One plan the search tries: a composed pipeline (``label``) or the recipe's own stages."""

    label: str | None
    plan: Plan
    #: predicted at the most compressed setting (composed pipelines; None for the recipe's own)
    best_size: int | None = None


def _skip_note(candidate: _Candidate, ruled_out: list[tuple[str, ...]],
               log: list[dict[str, Any]]) -> str | None:
    """Why a composed pipeline need not be tried, or None: its first stages already broke a quality
    constraint, or even its most compressed setting cannot be smaller than a clear pass found."""
    labels = tuple(candidate.label.split(" + ")) if candidate.label else ()
    known = next((p for p in ruled_out if labels[:len(p)] == p), None)
    if known is not None:
        return (f"{candidate.label}: skipped without a trial, its first stages "
                f"({' + '.join(known)}) already broke a quality constraint")
    best = best_trial(log)
    if candidate.best_size is not None and best is not None and not best.get("marginal") and \
            candidate.best_size >= best["predicted_size"]:
        return (f"{candidate.label}: skipped without a trial, its smallest predicted size "
                f"({candidate.best_size:,} bytes) is no smaller than that of the best trial so far "
                f"({best['predicted_size']:,} bytes, {best.get('pipeline')})")
    return None


def _search(candidates: list[_Candidate], make_trials: Callable[[_Candidate], _Trials],
            strategy: str) -> list[str]:
    """Search every candidate in turn within the shared budget (a composed pipeline gets a fair
    share of what is left, at least ``MIN_SHARE``; what it leaves unused goes to the next ones);
    return the notes of those skipped."""
    ruled_out: list[tuple[str, ...]] = []
    skipped: list[str] = []
    for i, candidate in enumerate(candidates):
        trials = make_trials(candidate)
        if not trials.budget.left():
            break
        note = _skip_note(candidate, ruled_out, trials.log)
        if note is not None:
            skipped.append(note)
            continue
        if candidate.label is not None:
            trials.cap = max(MIN_SHARE, -(-trials.budget.left() // (len(candidates) - i)))
        if candidate.plan.has_auto:
            floor, _ = size_floor(candidate.plan, trials.registries, trials.ctx)
            STRATEGY_FUNCTIONS[strategy](trials, floor)
        else:
            _fixed(trials, 0.0)
        if candidate.label:
            ruled_out.extend(failing_prefixes(candidate.plan, tuple(candidate.label.split(" + ")),
                                               trials.mine()))
    return skipped


def solve(plan: Plan, registries: Registries, output: str | Path | None = None, force: bool = False,
          handle: ModelHandle | None = None, quiet: bool = False) -> RunResult:
    """Search within ``plan.search``'s budget, then run the best setting for real.

    With ``compose``, every pipeline the estimates allow is tried in rank order, each searched with
    the recipe's strategy on its share of the budget, and the smallest feasible result across them
    wins. Raises ``Infeasible`` before any trial when the estimates show that a size-type
    constraint cannot hold.
    """
    from squeezelang.executor.artifacts import check_output_dir
    from squeezelang.search.trial_log import TrialLog
    from squeezelang.executor.guards import input_paths
    from squeezelang.executor.run import execute
    from squeezelang.planner.compose import pipelines, refuse_if_unreachable, with_pipeline
    from squeezelang.planner.estimate import planning_context
    from squeezelang.executor.ranks import single_process
    from squeezelang.search.workers import open_backend

    single_process("a search (`auto` settings or `compose`)")
    out = Path(output or plan.output_dir).expanduser().resolve()
    check_output_dir(out, force, input_paths(plan, registries))
    ctx = planning_context(plan, registries)
    if plan.compose is not None:
        ranked = pipelines(plan, registries, ctx)
        refuse_if_unreachable(plan, ranked, _original_size(plan, registries, ctx))
        candidates = [_Candidate(p.label, with_pipeline(plan, p), p.best_size)
                      for p in ranked if p.feasible]
        composition = [p.to_json() for p in ranked]
    else:
        floor, impossible = size_floor(plan, registries, ctx)
        if impossible:
            raise Infeasible("; ".join(impossible))
        candidates, composition = [_Candidate(None, plan)], None
    budget = _Budget(plan.search.trials, plan.search.timeout)
    trial_log = TrialLog.open(out, plan, force, quiet)  # trials measured before an interrupt
    budget.started -= trial_log.seconds()  # the timeout counts the time they took before
    out.parent.mkdir(parents=True, exist_ok=True)
    # The process id lets a later run clean up after a killed search (artifacts.recover).
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.trials-{os.getpid()}-", dir=out.parent))
    by_label = {c.label: c.plan for c in candidates}
    backend = trial_log.wrap(open_backend(plan.search.backend, plan.search.workers, registries,
                                          handle, plan.search.address))
    try:
        skipped = _search(candidates, lambda c: _Trials(
            c.plan, registries, scratch, handle, quiet, ctx, budget, backend, c.label),
            plan.search.strategy)
    finally:
        backend.close()
        shutil.rmtree(scratch, ignore_errors=True)
    best = best_trial(budget.log)
    chosen = best or closest_trial(budget.log)
    if chosen is not None:
        chosen_label = chosen.get("pipeline")
        base = by_label[chosen_label]
        levels = levels_of(chosen)
    else:  # no trial ran (no budget): the first candidate at its size floor
        chosen_label, base = candidates[0].label, candidates[0].plan
        levels = size_floor(base, registries, ctx)[0] if base.has_auto else 0.0
    search_seconds = time.perf_counter() - budget.started
    final = solved_plan(base, at_levels(base, registries, levels))
    if composition is not None:
        composition = {"chosen": chosen_label, "considered": composition, "skipped": skipped}
    result = execute(final, registries, output=out, force=force, handle=handle, quiet=quiet,
                     trials=budget.log, search_seconds=search_seconds, composition=composition,
                     original_metrics=budget.original)
    if best is None:
        result.notes.append("no setting tried satisfied every constraint; the closest trial "
                            "(least summed violation, see the trials' 'violation') was run")
    return result


def _original_size(plan: Plan, registries: Registries, ctx: Context) -> int:
    from squeezelang.planner.estimate import predict

    return predict(replace(plan, stages=()), registries, ctx=ctx).original_size


STRATEGY_FUNCTIONS = {"bisect": _bisect, "grid": _grid, "random": _random}
