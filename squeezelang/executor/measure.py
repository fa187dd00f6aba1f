"""Measure every metric of a plan on a model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from squeezelang.errors import ExecutionError, SqueezeError
from squeezelang.executor.context import Context
from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


def measure_all(plan: Plan, registries: Registries, handle: ModelHandle, ctx: Context,
                artifact_dir: Path | None, label: str) -> dict[str, float]:
    """Every metric of ``plan`` on ``handle``; file metrics read ``artifact_dir``."""
    results: dict[str, float] = {}
    previous_dir, previous_stage = ctx.artifact_dir, ctx.stage
    ctx.artifact_dir, ctx.stage = artifact_dir, None
    try:
        for m in ctx.progress(plan.metrics, desc=f"measuring {label}"):
            metric = registries.metrics.get(m.kind)
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
            results[m.name] = float(value)
    finally:
        ctx.artifact_dir, ctx.stage = previous_dir, previous_stage
    return results


def _origin(ctx: Context, data: str | None, message: str) -> str:
    """`` (data set 'd' is FILE)`` when the metric read a data set whose file the message omits."""
    origin = ctx.data.origins.get(data) if data else None
    return f" (data set '{data}' is {origin})" if origin and origin not in message else ""
