"""Compose stages from the allowed techniques when a recipe gives ``compose { … }`` instead.

Each technique plugin offers *candidates* (``Technique.candidates``): settings it can be used with,
a place in a pipeline (``order``), a prior of the quality it costs (``risk``) and knobs left to the
search. A pipeline is at most ``stages`` candidates, one per technique, in ``order``:

- candidates that read data get the compose block's ``data``, and are left out without it;
- a healing candidate (``distill``) only follows a candidate with a knob (a lossy structural stage);
- a technique never follows a stage whose state it refuses (nothing runs on a quantized model);
- with a latency constraint, a pipeline needs a candidate that ``speeds_up``.

Every pipeline is estimated at its most compressed setting without loading weights: those that
cannot meet the size-type constraints are ruled out there and then, and when none is left the plan
is refused (``Infeasible``) with the smallest size any of them reaches. The others are ranked by
summed risk, then fewer stages, then smaller predicted size; the search tries every one in that
order within its budget and keeps the smallest feasible result (``search.solve``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from squeezelang.errors import Infeasible
from squeezelang.hooks.registry import Registries
from squeezelang.hooks.technique import Candidate
from squeezelang.planner.plan import Plan, StagePlan

if TYPE_CHECKING:
    from squeezelang.hooks.context import Context


@dataclass(frozen=True)
class Pipeline:
    """One composition: its stages (knobs still auto) and what the estimates say of it."""

    stages: tuple[StagePlan, ...]
    labels: tuple[str, ...]
    risk: float
    #: predicted at the most compressed setting of every knob
    best_size: int
    best_params: int
    #: size-type constraints the estimates say cannot hold, as text (empty: reachable)
    unreachable: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " + ".join(self.labels) or "(no stage)"

    @property
    def feasible(self) -> bool:
        return not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.label, "risk": round(self.risk, 3), "best_size": self.best_size,
                "best_params": self.best_params, "unreachable": list(self.unreachable),
                "stages": [{"name": s.name, "technique": s.technique, "params": s.params,
                            "autos": {k: list(v) for k, v in s.autos.items()}} for s in self.stages]}


def _stage(technique: Any, cand: Candidate, data: str | None, plugin: str) -> StagePlan | None:
    """The candidate as a stage (defaults filled), or None when the plugin's own checks refuse it."""
    from squeezelang.planner.validate import schema_errors

    values = dict(cand.params)
    if cand.needs_data:
        values["data"] = data
    autos = {}
    for key in cand.autos:
        knob = technique.knob(key)
        if knob is None:
            return None
        autos[key] = (knob.lo, knob.hi)
        values.setdefault(key, (knob.lo + knob.hi) / 2)
    if schema_errors(technique.schema, values, technique.name, {}, None):
        return None
    params = {**technique.defaults_for(values), **values}
    if technique.check(params):
        return None
    return StagePlan(technique.name, technique.name, plugin, params.get("method"), params, autos)


def _offers(plan: Plan, registries: Registries) -> list[tuple[Any, Candidate, StagePlan]]:
    compose = plan.compose
    assert compose is not None
    offers = []
    for name in compose.allow:
        tech = registries.techniques.get(name)
        for cand in tech.candidates(plan.model.task):
            if cand.needs_data and compose.data is None:
                continue
            stage = _stage(tech, cand, compose.data, registries.techniques.owner(name))
            if stage is not None:
                offers.append((tech, cand, stage))
    return offers


def _valid(chain: tuple[tuple[Any, Candidate, StagePlan], ...], needs_speed: bool) -> bool:
    techniques = [t.name for t, _, _ in chain]
    if len(set(techniques)) != len(techniques):
        return False
    states: set[str] = set()
    lossy = False
    for tech, cand, stage in chain:
        if tech.refuses & states:
            return False
        if cand.heals and not lossy:
            return False
        lossy = lossy or bool(cand.autos)
        states |= set(tech.produces_for(dict(stage.params)))
    return not needs_speed or any(c.speeds_up for _, c, _ in chain)


def _holds(plan: Plan, registries: Registries,
           chain: tuple[tuple[Any, Candidate, StagePlan], ...]) -> bool:
    """Whether the output format can hold what the chain's stages store (``OutputFormat.check``)."""
    fmt = registries.output_formats.get(plan.output_format)
    stored = [(stage.name, frozenset(tech.stores_for(dict(stage.params)))) for tech, _, stage in chain]
    return not fmt.check(dict(plan.output_options), stored, plan.model.task, None)


def pipelines(plan: Plan, registries: Registries, ctx: Context) -> list[Pipeline]:
    """Every valid composition, estimated and ranked (reachable ones first, best first)."""
    from squeezelang.planner.estimate import model_meta, most_compressed, run_estimates, size_verdicts
    from squeezelang.models.size import artifact_bytes

    compose = plan.compose
    assert compose is not None
    offers = sorted(_offers(plan, registries), key=lambda o: (o[1].order, o[1].risk))
    needs_speed = any(plan.metric(c.metric) is not None and plan.metric(c.metric).kind == "latency"
                      for c in plan.constraints)
    meta, directory = model_meta(plan, registries, ctx)
    size0 = artifact_bytes(directory) if directory is not None and directory.is_dir() else 0
    size0 = size0 or meta.size_bytes()
    params0 = meta.params()
    out = []
    for n in range(1, compose.stages + 1):
        for chain in itertools.combinations(offers, n):
            if not _valid(chain, needs_speed) or not _holds(plan, registries, chain):
                continue
            stages = tuple(stage for _, _, stage in chain)
            extreme = [most_compressed(s, registries) for s in stages]
            after = run_estimates(meta.copy(), tuple(extreme), registries, ctx)[-1][1]
            size, params = after.size_bytes(), after.params()
            verdicts = size_verdicts(plan, size0, params0, size, params)
            out.append(Pipeline(stages, tuple(c.label for _, c, _ in chain),
                                sum(c.risk for _, c, _ in chain), size, params,
                                tuple(v.constraint for v in verdicts if not v.met)))
    out.sort(key=lambda p: (not p.feasible, p.risk, len(p.stages), p.best_size))
    return out


def refuse_if_unreachable(plan: Plan, ranked: list[Pipeline], original_size: int) -> None:
    """Raise ``Infeasible`` when no composition can meet the size-type constraints."""
    if any(p.feasible for p in ranked):
        return
    if not ranked:
        raise Infeasible("compose: no pipeline can be built from the allowed techniques "
                         f"({', '.join(plan.compose.allow)}) under these constraints")
    best = min(ranked, key=lambda p: p.best_size)
    share = f" ({best.best_size / original_size:.1%} of the original)" if original_size else ""
    raise Infeasible(
        f"{'; '.join(best.unreachable)}: no composition of {', '.join(plan.compose.allow)} in at most "
        f"{plan.compose.stages} stage(s) reaches it; the smallest predicted is "
        f"{best.best_size / 1e6:,.2f} MB{share}, {best.best_params:,} params, with {best.label} "
        "at its most compressed")


def with_pipeline(plan: Plan, pipeline: Pipeline) -> Plan:
    """``plan`` with the pipeline's stages in place of ``compose`` (the lock writes these)."""
    return replace(plan, stages=pipeline.stages, compose=None)
