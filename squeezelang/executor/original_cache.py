"""The original model's metrics, kept across runs: a second run of a recipe, or another recipe on the
same model, does not measure the original again.

A metric's value on the original depends on the model's files, the task it is loaded for, the
metric's kind and arguments, the rows of the data set it reads, the run's seed, and the code that
computes it. Each metric is cached under a key that hashes all of those (``cache_key`` adds the
versions of squeezelang, torch and transformers; a metric's ``packages``, those of the harness it
runs) in ``$SQUEEZE_CACHE_DIR/original/<key>.json``
(see ``models.meta_cache``; ``SQUEEZE_CACHE_DIR=off`` turns it off). A changed byte in any of them
is another key, so a cached value is always that of a measurement of the same thing.

Not cached: times (``paired`` metrics such as ``latency``, which the end of every run measures again
side by side with the artifact), metrics measured on files (``on_artifact``: ``size``, cheap), and
an in-memory model (no files to key it by).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from squeezelang.executor.measure import measure_all
from squeezelang.hooks.context import Context
from squeezelang.hooks.registry import Registries
from squeezelang.hooks.schema import schema_defaults
from squeezelang.planner.plan import MetricPlan, Plan

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle

NAMESPACE = "original"


def model_digest(directory: Path) -> str:
    """A hash of every file under ``directory`` (relative paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _data_digest(ctx: Context, name: str | None) -> str:
    if name is None:
        return ""
    rows = ctx.data.rows(name)
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def cacheable(metric: MetricPlan, registries: Registries) -> bool:
    plugin = registries.metrics.get(metric.kind)
    return not getattr(plugin, "paired", False) and not getattr(plugin, "on_artifact", False)


def package_versions(packages: tuple[str, ...]) -> str:
    """``name==version`` of each installed distribution (``name==absent`` if it is not)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ",".join(f"{name}=={installed(name)}" for name in packages)


def metric_key(plan: Plan, metric: MetricPlan, model: str, ctx: Context,
               defaults: dict[str, object] | None = None, packages: tuple[str, ...] = ()) -> str:
    """The cache key of ``metric``; its arguments count with the schema's ``defaults`` filled,
    so that a changed default (an evaluation bound, say) is another key, and with the versions of
    the metric's ``packages``."""
    from squeezelang.models.meta_cache import cache_key

    return cache_key(NAMESPACE, model, plan.model.task, metric.kind,
                     json.dumps({**(defaults or {}), **metric.args}, sort_keys=True, default=str),
                     _data_digest(ctx, metric.data), str(ctx.seed), package_versions(packages))


def measure_original(plan: Plan, registries: Registries, original: ModelHandle, ctx: Context,
                     artifact_dir: Path | None) -> dict[str, float]:
    """Every metric of ``plan`` on the original: cached values where the cache has them (see the
    module docstring), the others measured (and the cacheable ones stored)."""
    from squeezelang.models.meta_cache import cache_dir, cached_json

    source, root = original.source_dir, cache_dir()
    if source is None or root is None:
        return measure_all(plan, registries, original, ctx, artifact_dir, "original")
    model = model_digest(source)
    plugins = {m.name: registries.metrics.get(m.kind) for m in plan.metrics}
    keys = {m.name: metric_key(plan, m, model, ctx, schema_defaults(plugins[m.name].schema),
                               tuple(plugins[m.name].packages))
            for m in plan.metrics if cacheable(m, registries)}
    found: dict[str, float] = {}
    for name, key in keys.items():
        value = _read(root / NAMESPACE / f"{key}.json")
        if value is not None:
            found[name] = value
    missing = tuple(m for m in plan.metrics if m.name not in found)
    measured = measure_all(replace(plan, metrics=missing), registries, original, ctx, artifact_dir,
                           "original") if missing else {}
    for name, value in measured.items():
        if name in keys:
            cached_json(NAMESPACE, keys[name], lambda value=value: value)
    if found and not ctx.quiet:
        print(f"original: {', '.join(sorted(found))} read from the cache (the same model files, "
              "data and code measured them before)", flush=True)
    return {m.name: found[m.name] if m.name in found else measured[m.name] for m in plan.metrics}


def _read(entry: Path) -> float | None:
    try:
        value = json.loads(entry.read_text(encoding="utf-8"))["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
