"""Predict each stage's effect on parameter count and saved size without loading weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeezelang.errors import PlanError, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.hooks.family import families_in_use
from squeezelang.hooks.registry import Registries
from squeezelang.models.meta import ModelMeta
from squeezelang.planner.constraints import Verdict, evaluate
from squeezelang.planner.plan import Plan, StagePlan


@dataclass
class StagePrediction:
    stage: str
    technique: str
    method: str | None
    params: dict[str, Any]
    params_count: int
    size_bytes: int


@dataclass
class Prediction:
    original_params: int
    original_size: int  # measured on the input directory's files when it has them
    original_size_predicted: int
    stages: list[StagePrediction] = field(default_factory=list)
    constraints: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def final_size(self) -> int:
        return self.stages[-1].size_bytes if self.stages else self.original_size_predicted

    @property
    def final_params(self) -> int:
        return self.stages[-1].params_count if self.stages else self.original_params

    def to_json(self) -> dict[str, Any]:
        return {
            "original": {"params": self.original_params, "size": self.original_size,
                         "size_predicted": self.original_size_predicted},
            "stages": [vars(s) for s in self.stages],
            "final": {"params": self.final_params, "size": self.final_size},
            "constraints": [v.to_json() for v in self.constraints],
            "notes": self.notes,
        }


def planning_context(plan: Plan, registries: Registries) -> Context:
    """What estimates may read: the recipe's data sets (loaded on use) and the model directory."""
    from squeezelang.planner.data import data_store

    source = registries.model_sources.get(plan.model.source)
    directory = source.locate(dict(plan.model.args)) if source is not None else None
    return Context(data=data_store(plan, registries), seed=plan.search.seed, quiet=True,
                   model_dir=directory)


def model_meta(plan: Plan, registries: Registries, ctx: Context | None = None) -> tuple[ModelMeta, Path | None]:
    """The original model's meta-data (built once per planning context) and its directory."""
    if ctx is not None and "original_meta" in ctx.cache:
        meta, directory = ctx.cache["original_meta"]
        return meta.copy(), directory
    meta, directory = _model_meta(plan, registries)
    if ctx is not None:
        ctx.cache["original_meta"] = (meta.copy(), directory)
    return meta, directory


def _model_meta(plan: Plan, registries: Registries) -> tuple[ModelMeta, Path | None]:
    source = registries.model_sources.get(plan.model.source)
    if source is None:
        raise PlanError(f"model source '{plan.model.source}' is not installed")
    try:
        with families_in_use(registries):  # the layout of a --plugin family too
            return source.meta(plan.model.args), source.locate(plan.model.args)
    except SqueezeError:
        raise
    except Exception as exc:
        raise PlanError(f"cannot read the model's meta-data: {type(exc).__name__}: {exc}") from exc


def run_estimates(meta: ModelMeta, stages: tuple[StagePlan, ...] | list[StagePlan],
                  registries: Registries, ctx: Context | None = None) -> list[tuple[StagePlan, ModelMeta]]:
    """Meta-data after each stage, by chaining the techniques' ``estimate_with``."""
    ctx = ctx if ctx is not None else Context(quiet=True)
    out = []
    for stage in stages:
        tech = registries.techniques.get(stage.technique)
        try:
            with families_in_use(registries):  # techniques look families up in the run's plugins
                meta = tech.estimate_with(meta.copy(), dict(stage.params), ctx)
        except NotImplementedError:
            raise PlanError(f"stage '{stage.name}': technique '{stage.technique}' cannot estimate "
                            "its effect") from None
        meta.states |= set(tech.produces_for(dict(stage.params)))
        out.append((stage, meta))
    return out


def predict(plan: Plan, registries: Registries, stages: list[StagePlan] | None = None,
            ctx: Context | None = None) -> Prediction:
    """Predicted params and size after each stage, and the size-type constraints checked on them.

    Pass the same ``ctx`` (``planning_context``) to repeated calls: the model's meta-data and
    whatever the estimates read from data are then computed once.
    """
    from squeezelang.models.size import artifact_bytes

    ctx = ctx if ctx is not None else planning_context(plan, registries)
    meta, directory = model_meta(plan, registries, ctx)
    measured = artifact_bytes(directory) if directory is not None and directory.is_dir() else 0
    pred = Prediction(meta.params(), measured or meta.size_bytes(), meta.size_bytes())
    for stage, after in run_estimates(meta, tuple(stages or plan.stages), registries, ctx):
        pred.stages.append(StagePrediction(stage.name, stage.technique, stage.method, dict(stage.params),
                                           after.params(), after.size_bytes()))
        pred.notes.extend(n for n in after.notes if n not in pred.notes)
    pred.constraints = size_verdicts(plan, pred.original_size, pred.original_params,
                                      pred.final_size, pred.final_params)
    if plan.has_auto and stages is None:
        extreme = [most_compressed(s, registries) for s in plan.stages]
        best = run_estimates(meta, tuple(extreme), registries, ctx)[-1][1]
        for v in size_verdicts(plan, pred.original_size, pred.original_params,
                                best.size_bytes(), best.params()):
            if not v.met:
                pred.notes.append(f"impossible: {v.constraint} cannot hold for any auto value; "
                                  f"the most compressed setting reaches {v.metric} = {v.value:,.0f} "
                                  f"(bound {v.bound:,.0f})")
    return pred


def size_verdicts(plan: Plan, size0: float, params0: float, size: float, params: float) -> list[Verdict]:
    originals = {"size": size0, "params": params0}
    finals = {"size": size, "params": params}
    out = []
    for c in plan.constraints:
        metric = plan.metric(c.metric)
        if metric is not None and metric.kind in finals:
            out.append(evaluate(c, metric, originals[metric.kind], finals[metric.kind]))
    return out


def most_compressed(stage: StagePlan, registries: Registries) -> StagePlan:
    """The stage with every auto knob at the end of its range that compresses most."""
    if not stage.autos:
        return stage
    tech = registries.techniques.get(stage.technique)
    params = dict(stage.params)
    for key, (lo, hi) in stage.autos.items():
        knob = tech.knob(key)
        params[key] = hi if knob.compresses == "up" else lo
    return StagePlan(stage.name, stage.technique, stage.plugin, stage.method, params, {}, stage.span)
