"""Judge search trials: constraint verdicts, how far a setting is from feasible, which one wins.

- ``violation``: 0 when every constraint is met, else the unmet ones' distances past their bounds,
  each as a fraction of the metric's value at the bound, summed (the "closest" trial has the least).
- ``status``: pass, marginal (a time constraint met by less than ``TIME_MARGIN`` of its bound —
  the final run's own paired measurement could overturn it), under (only constraints that more
  compression helps were missed), over (quality missed, or the trial failed) or both.
- ``best``: the feasible trial to run for real (clear passes first, then the smallest);
  ``closest``: with none feasible, the least violation.
- ``progress_line``: one trial as the terminal shows it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.planner.plan import ConstraintPlan, Plan

if TYPE_CHECKING:
    from squeezelang.planner.constraints import Verdict
    from squeezelang.planner.levels import Levels
    from squeezelang.search.workers import TrialOutcome


#: A time-type constraint met by less than this fraction of its bound passes only *marginally*:
#: latency ratios of one setting, each from a paired measurement (``PAIRED_ROUNDS`` alternating
#: calls), were seen to differ by more than this from one run to the next on a loaded machine.
TIME_MARGIN = 0.10


#: What a trial says about its setting: every constraint met (time ones clearly); met, a time one
#: marginally; only constraints that more compression helps missed (size, latency: compress more);
#: only quality constraints missed, or the trial failed (compress less); both kinds missed.
PASS, MARGINAL, UNDER, OVER, BOTH = "pass", "marginal", "under", "over", "both"


def checks(plan: Plan, original: dict[str, float] | None,
           measured: dict[str, float] | None) -> list[tuple[ConstraintPlan, Verdict]]:
    """Each constraint of ``plan`` with its verdict on ``measured`` (those it has values for)."""
    from squeezelang.planner.constraints import evaluate

    original, measured = original or {}, measured or {}
    return [(c, evaluate(c, plan.metric(c.metric), original[c.metric], measured[c.metric]))
            for c in plan.constraints if c.metric in original and c.metric in measured]


def violation(plan: Plan, original: dict[str, float] | None,
              measured: dict[str, float] | None) -> float | None:
    """How far a measured setting is from meeting every constraint: 0 when it meets them all.

    Each unmet constraint adds how far its value lies beyond the bound, divided by the metric's
    value *at* the bound, so that constraints in different units add up as fractions of their
    targets: ``latency <= 50%`` measured at 63% adds 0.13 / 0.50 = 0.26, ``size <= 10 MB`` at
    12 MB adds 0.2. For ``drop(m)`` the value at the bound is the original's minus the allowed
    drop: a drop of 1.2 points where 0.5 is allowed, on an original of 82, adds 0.7 / 81.5 (the
    tolerance itself, often 0, would not do as a scale). ``None`` when nothing was measured.
    """
    judged = checks(plan, original, measured)
    if not judged:
        return None
    total = 0.0
    for c, v in judged:
        if v.met:
            continue
        at_bound = v.bound
        if c.drop:
            o = (original or {})[c.metric]
            at_bound = o - v.bound if plan.metric(c.metric).higher_is_better else o + v.bound
        total += abs(v.margin) / (abs(at_bound) or 1.0)
    return total


def is_time(plan: Plan, c: ConstraintPlan) -> bool:
    metric = plan.metric(c.metric)
    return metric is not None and metric.dimension == "time"


def helped_by_compression(plan: Plan, c: ConstraintPlan) -> bool:
    """Whether compressing more moves the constraint's metric toward its bound (size, latency…)."""
    metric = plan.metric(c.metric)
    return metric is not None and metric.dimension != "score" and not c.drop


def marginal(plan: Plan, judged: list[tuple[ConstraintPlan, Verdict]]) -> list[str]:
    """The time-type constraints met by less than ``TIME_MARGIN`` of their bound."""
    return [v.constraint for c, v in judged
            if v.met and is_time(plan, c) and v.margin < TIME_MARGIN * abs(v.bound)]


def status(plan: Plan, outcome: TrialOutcome) -> str:
    """``PASS``, ``MARGINAL``, ``UNDER``, ``OVER`` or ``BOTH`` for one trial's outcome."""
    judged = checks(plan, outcome.original, outcome.metrics)
    if outcome.error or not judged:
        return OVER  # a failed trial: treated as too compressed, so the search backs off
    if outcome.ok:
        return MARGINAL if marginal(plan, judged) else PASS
    helped = [helped_by_compression(plan, c) for c, v in judged if not v.met]
    return UNDER if all(helped) else OVER if not any(helped) else BOTH


def time_margin(plan: Plan, outcome: TrialOutcome) -> float:
    """The smallest margin of the outcome's time constraints, as a fraction of their bounds."""
    return min((v.margin / (abs(v.bound) or 1.0) for c, v in checks(plan, outcome.original,
                                                                     outcome.metrics)
                if is_time(plan, c)), default=float("inf"))


def hangs_on_time(plan: Plan, outcome: TrialOutcome) -> bool:
    """Whether the outcome's feasibility is decided by its time constraints (the others met)."""
    judged = checks(plan, outcome.original, outcome.metrics)
    return not outcome.error and any(is_time(plan, c) for c, _ in judged) and \
        all(v.met for c, v in judged if not is_time(plan, c))


def progress_line(plan: Plan, entry: dict[str, Any], number: int, total: int) -> str:
    """One trial for the terminal: ``trial 3 of 12: sparse.ratio=0.4 -> size 12.30 MB (13.4%),
    quality 85.10 (drop 0.60), latency 4.81 ms (48.0%) — infeasible (latency <= 45%)``."""
    from squeezelang.lang.units import fmt_value

    knobs = ", ".join(f"{stage}.{k}={v:g}" for stage, vals in entry["values"].items()
                      for k, v in vals.items())
    what = ": ".join(x for x in (entry.get("pipeline"), knobs) if x) or "fixed stages"
    original = entry.get("original") or {}
    shown = []
    for m in plan.metrics:
        if m.name not in entry["metrics"]:
            continue
        value, before = entry["metrics"][m.name], original.get(m.name)
        if before is None:
            relative = ""
        elif m.dimension == "score":
            relative = f" (drop {fmt_value(before - value if m.higher_is_better else value - before, 'score')})"
        else:
            relative = f" ({value / before:.1%})" if before else ""
        shown.append(f"{m.name} {fmt_value(value, m.dimension)}{relative}")
    if entry.get("error"):
        verdict = "failed: " + entry["error"]
    elif entry["feasible"]:
        verdict = "feasible" + (f" (within {TIME_MARGIN:.0%} of the bound: "
                                f"{', '.join(entry['marginal'])})" if entry.get("marginal") else "")
    else:
        verdict = "infeasible (" + ", ".join(c for c, met in entry["verdicts"].items() if not met) + ")"
    return f"trial {number} of {total}: {what} -> {', '.join(shown) or 'nothing measured'} — {verdict}"


def failing_prefixes(plan: Plan, labels: tuple[str, ...],
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


def best_trial(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The feasible trial to run for real: one that passes clearly before a marginal one, then the
    smallest (``size``: measured, else predicted), then the most compressed."""
    feasible = [t for t in log if t["feasible"]]
    if not feasible:
        return None
    return min(feasible, key=lambda t: (bool(t.get("marginal")), size_of(t),
                                        -mean_level(t["levels"])))


def closest_trial(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With no feasible trial, the one of least ``violation`` (then the smallest)."""
    measured = [t for t in log if t.get("violation") is not None]
    if not measured:
        return None
    return min(measured, key=lambda t: (t["violation"], size_of(t)))


def size_of(entry: dict[str, Any]) -> float:
    return entry.get("size") or entry["predicted_size"]


def measured_size(plan: Plan, metrics: dict[str, float]) -> float | None:
    """The saved artifact's size, where the plan measures it (the implicit ``size`` metric)."""
    metric = next((m for m in plan.metrics if m.kind == "size"), None)
    return metrics.get(metric.name) if metric is not None else None


def mean_level(levels: Any) -> float:
    return levels if isinstance(levels, float) else sum(levels.values()) / max(len(levels), 1)


def levels_of(entry: dict[str, Any]) -> Levels | float:
    raw = entry["levels"]
    return raw if isinstance(raw, float) else {tuple(k.split(".", 1)): v for k, v in raw.items()}