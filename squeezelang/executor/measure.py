"""Measure every metric of a plan on a model."""
from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from squeezelang.errors import ExecutionError, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


#: Prefix of ``Context.logs`` keys while a metric measures (no stage name contains a space).
NOTES_KEY = "metric "


def measure_all(plan: Plan, registries: Registries, handle: ModelHandle, ctx: Context,
                artifact_dir: Path | None, label: str,
                artifact_files: tuple[str, ...] | None = None) -> dict[str, float]:
    """Every metric of ``plan`` on ``handle``; file metrics read ``artifact_dir`` (the files
    matching ``artifact_files``, an output format's ``model_files``; default: a model directory)."""
    results: dict[str, float] = {}
    previous = ctx.artifact_dir, ctx.artifact_files, ctx.stage
    ctx.artifact_dir, ctx.artifact_files, ctx.stage = artifact_dir, artifact_files, None
    try:
        for m in ctx.progress(plan.metrics, desc=f"measuring {label}"):
            metric = registries.metrics.get(m.kind)
            ctx.stage = NOTES_KEY + m.name  # what the metric logs is kept as its notes
            try:
                value = metric.measure(handle, ctx, m.data, dict(m.args))
            except SqueezeError as exc:
                raise ExecutionError(f"measuring metric '{m.name}' ({m.kind}) on the {label} model: "
                                     f"{exc}{_origin(ctx, m.data, str(exc))}",
                                     plugin=registries.metrics.owner(m.kind)) from exc
            except Exception as exc:
                raise ExecutionError(f"metric '{m.name}' ({m.kind}, plugin "
                                     f"'{registries.metrics.owner(m.kind)}') failed on the {label} "
                                     f"model: {type(exc).__name__}: {exc}"
                                     f"{_origin(ctx, m.data, str(exc))}") from exc
            finally:
                ctx.stage = None
                ctx.metric_notes[m.name] = ctx.logs.pop(NOTES_KEY + m.name, [])
            results[m.name] = float(value)
    finally:
        ctx.artifact_dir, ctx.artifact_files, ctx.stage = previous
    return results


#: Calls per model in a paired measurement (their median is taken).
PAIRED_ROUNDS = 3


def measure_paired(plan: Plan, registries: Registries, original: ModelHandle, final: ModelHandle,
                   ctx: Context, original_dir: Path | None, final_dir: Path | None,
                   final_files: tuple[str, ...] | None = None) -> dict[str, tuple[float, float]]:
    """``(original, final)`` of every ``paired`` metric (latency), measured side by side: the two
    models' calls alternate, ``PAIRED_ROUNDS`` each, in an order that swaps every round, and each
    gets the median of its calls. A load that comes and goes during the minutes a run takes then
    falls on both, and the ratio a constraint judges is taken under one load."""
    paired = [m for m in plan.metrics if getattr(registries.metrics.get(m.kind), "paired", False)]
    if not paired:
        return {}
    sides = {"original": (original, original_dir, None), "saved": (final, final_dir, final_files)}
    values: dict[str, dict[str, list[float]]] = {m.name: {"original": [], "saved": []} for m in paired}
    only = replace(plan, metrics=tuple(paired))
    order = ["original", "saved"]
    for _ in range(PAIRED_ROUNDS):
        for label in order:
            handle, directory, files = sides[label]
            for name, value in measure_all(only, registries, handle, ctx, directory, label,
                                           files).items():
                values[name][label].append(value)
        order.reverse()
    return {name: (statistics.median(v["original"]), statistics.median(v["saved"]))
            for name, v in values.items()}


def _origin(ctx: Context, data: str | None, message: str) -> str:
    """`` (data set 'd' is FILE)`` when the metric read a data set whose file the message omits."""
    origin = ctx.data.origins.get(data) if data else None
    return f" (data set '{data}' is {origin})" if origin and origin not in message else ""
