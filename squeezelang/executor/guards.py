"""Checks that keep a run safe: inputs read and refused before any work, weights kept finite,
artifacts kept inside their directory.

``execute`` reads every data set before it loads the model (a bad data file is named before anything
expensive runs), notes texts that the model's context truncates, refuses a stage that leaves NaN or
Inf in the weights, and refuses an output format that writes outside the artifact directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from squeezelang.errors import ExecutionError, SqueezeError

if TYPE_CHECKING:
    from squeezelang.hooks.context import Context
    from squeezelang.hooks.registry import Registries
    from squeezelang.models.handle import ModelHandle
    from squeezelang.planner.plan import Plan, StagePlan


def input_paths(plan: Plan, registries: Registries) -> list[str]:
    """The files and directories a run reads: the recipe, the model directory, the data files."""
    out = [plan.recipe_file] if plan.recipe_file else []
    sources = [(plan.model.args, registries.model_sources.get(plan.model.source))]
    sources += [(d.args, registries.data_sources.get(d.source)) for d in plan.data]
    for args, source in sources:
        out += [args[k] for k in getattr(source, "path_params", ()) if isinstance(args.get(k), str)]
    return out


def read_inputs(ctx: Context) -> None:
    """Read every data set now, so that a bad data file is named before the model is even loaded."""
    for name in ctx.data.names():
        try:
            ctx.data.rows(name)
        except ExecutionError:
            raise
        except SqueezeError as exc:
            raise ExecutionError(f"data set '{name}': {exc}") from exc


def overlong_notes(ctx: Context, handle: ModelHandle) -> list[str]:
    """Say which data sets hold texts longer than the model's context: those are truncated to it.

    Every forward pass truncates to the context (``perplexity`` scores long texts in sliding windows
    instead); the note makes the truncation visible rather than silent.
    """
    from squeezelang.models.forward import max_positions

    limit = max_positions(handle.model)
    if not limit or handle.tokenizer is None:
        return []
    notes = []
    for name in ctx.data.names():
        # A token covers at least one byte (plus a few special tokens), so only texts this long
        # can exceed the limit: the others are not tokenized at all.
        texts = [v for row in ctx.data.rows(name) for v in row.values()
                 if isinstance(v, str) and len(v.encode("utf-8")) + 8 > limit]
        if not texts:
            continue
        ids = handle.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        n = sum(len(i) > limit for i in ids)
        if n:
            where = f" ({ctx.data.origins[name]})" if name in ctx.data.origins else ""
            notes.append(f"data set '{name}'{where}: {n} text{'s' if n != 1 else ''} longer than "
                         f"the model's limit of {limit} tokens, truncated to it (perplexity scores "
                         "long texts whole, in sliding windows)")
    return notes


def check_finite(handle: ModelHandle, stage: StagePlan) -> None:
    """Refuse a stage that left NaN or Inf in the weights: every later step would carry it."""
    from squeezelang.models.load import nonfinite

    for name, tensor in handle.model.named_parameters():
        problem = nonfinite(tensor.detach())
        if problem:
            raise ExecutionError(f"technique '{stage.technique}' left weight '{name}' holding "
                                 f"{problem}", stage=stage.name, plugin=stage.plugin)


def check_artifact(staged: Path, files: list[str], fmt: str, plugin: str | None) -> None:
    """Refuse an artifact whose files, or symlinks in it, reach outside its directory."""
    from squeezelang.executor.artifacts import confined

    try:
        for name in files:
            confined(staged, name)
        for path in staged.rglob("*"):
            if path.is_symlink():
                confined(staged, path.relative_to(staged).as_posix())
    except SqueezeError as exc:
        raise ExecutionError(f"output format '{fmt}' wrote outside the artifact: {exc}",
                             plugin=plugin) from None
