"""Run a plan: load, measure the original, apply stages with checkpoints, save, verify, report."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.errors import ExecutionError, SqueezeError
from squeezelang.executor.artifacts import check_output_dir, publish, staging_dir
from squeezelang.executor.checkpoint import WorkDir, fingerprint
from squeezelang.executor.context import Context, DataStore
from squeezelang.executor.measure import measure_all
from squeezelang.hooks.registry import Registries
from squeezelang.planner.constraints import Verdict, evaluate
from squeezelang.planner.plan import Plan, StagePlan

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


@dataclass
class RunResult:
    """What ``squeezelang.run`` returns: the report, the verdicts, and the saved-then-reloaded model."""

    plan: Plan
    report: dict[str, Any]
    verdicts: list[Verdict]
    handle: ModelHandle | None
    output_dir: Path
    resumed_after: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.met for v in self.verdicts)

    @property
    def model(self) -> Any:
        return self.handle.model if self.handle is not None else None

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.met]


def data_store(plan: Plan, registries: Registries) -> DataStore:
    store = DataStore()
    for d in plan.data:
        source = registries.data_sources.get(d.source)
        store.add(d.name, (lambda s=source, a=dict(d.args): s.load(a)))
    return store


def load_original(plan: Plan, registries: Registries) -> ModelHandle:
    source = registries.model_sources.get(plan.model.source)
    return source.load(dict(plan.model.args))


def verify(plan: Plan, original: dict[str, float], final: dict[str, float]) -> list[Verdict]:
    """Every constraint of ``plan`` on measured values."""
    return [evaluate(c, plan.metric(c.metric), original[c.metric], final[c.metric])
            for c in plan.constraints]


def apply_stage(stage: StagePlan, handle: ModelHandle, registries: Registries, ctx: Context,
                seed: int) -> None:
    """Run one stage's technique on ``handle``, turning any failure into an ``ExecutionError``."""
    import torch

    tech = registries.techniques.get(stage.technique)
    torch.manual_seed(seed)
    ctx.stage = stage.name
    try:
        tech.apply_(handle, dict(stage.params), ctx)
    except SqueezeError as exc:
        raise ExecutionError(str(exc), stage=stage.name, plugin=stage.plugin) from exc
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise ExecutionError(f"technique '{stage.technique}' failed: {type(exc).__name__}: {exc}",
                             stage=stage.name, plugin=stage.plugin) from exc
    finally:
        ctx.stage = None
    handle.states |= set(tech.produces_for(dict(stage.params)))


def execute(plan: Plan, registries: Registries, output: str | Path | None = None,
            force: bool = False, handle: ModelHandle | None = None, quiet: bool = False,
            threads: int = 2, trials: list[dict[str, Any]] | None = None,
            search_seconds: float | None = None) -> RunResult:
    """Run ``plan`` to completion and publish the artifacts; see the module docstring."""
    from squeezelang.executor.report import build_report, write_reports
    from squeezelang.models.load import load_model

    out = Path(output or plan.output_dir).resolve()
    check_output_dir(out, force)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    work = WorkDir(out)
    state = work.open(fingerprint(plan.to_json()), force)
    ctx = Context(data=data_store(plan, registries), seed=plan.search.seed, threads=threads, quiet=quiet)
    in_memory = handle is not None
    ctx.original_loader = (lambda: _copy_handle(handle)) if in_memory else \
        (lambda: load_original(plan, registries))

    t = time.perf_counter()
    if in_memory:
        original = ctx.original()
    else:
        original = ctx.original()
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    if state.original_metrics is None:
        orig_dir = original.source_dir
        tmp = None
        if orig_dir is None:  # an in-memory model: measure its size on a saved copy
            from squeezelang.models.save import save_model
            tmp = staging_dir(out)
            save_model(original, tmp)
            orig_dir = tmp
        try:
            state.original_metrics = measure_all(plan, registries, original, ctx, orig_dir, "original")
        finally:
            if tmp is not None:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
        work.save(state)
    timings["measure_original"] = time.perf_counter() - t

    done = {c["stage"]: c for c in state.completed}
    resumed_after = None
    current: ModelHandle | None = None
    stage_records: list[dict[str, Any]] = []
    for index, stage in enumerate(plan.stages):
        if stage.name in done and current is None and all(s.name in done for s in plan.stages[:index]):
            record = done[stage.name]
            stage_records.append(record)
            resumed_after = stage.name
            continue
        if current is None:
            if resumed_after is not None:
                ckpt = work.path / done[resumed_after]["dir"]
                if not quiet:
                    n = len(stage_records)
                    print(f"resuming after stage '{resumed_after}' ({n} of {len(plan.stages)} stages "
                          f"done, checkpoint {ckpt})", flush=True)
                current = load_model(ckpt, registries, task=plan.model.task)
            else:
                current = _copy_handle(original) if in_memory else load_original(plan, registries)
        t = time.perf_counter()
        if not quiet:
            print(f"stage {index + 1}/{len(plan.stages)} '{stage.name}': {stage.technique}"
                  + (f" ({stage.method})" if stage.method else ""), flush=True)
        apply_stage(stage, current, registries, ctx, plan.search.seed + index)
        seconds = time.perf_counter() - t
        ckpt_name = work.checkpoint(current, index, stage.name)
        t = time.perf_counter()
        metrics = measure_all(plan, registries, current, ctx, work.path / ckpt_name,
                              f"stage '{stage.name}'")
        record = {"stage": stage.name, "dir": ckpt_name, "metrics": metrics, "seconds": seconds,
                  "measure_seconds": time.perf_counter() - t}
        state.completed.append(record)
        work.save(state)
        stage_records.append(record)
    if current is None:  # every stage was already done, or there are none
        if resumed_after is not None:
            current = load_model(work.path / done[resumed_after]["dir"], registries, task=plan.model.task)
        else:
            current = _copy_handle(original) if in_memory else load_original(plan, registries)

    # Save the final artifact into a staging directory, reload it, and verify on what was saved.
    t = time.perf_counter()
    staged = staging_dir(out)
    try:
        fmt = registries.output_formats.get(plan.output_format)
        try:
            files = fmt.save(current, staged)
        except SqueezeError:
            raise
        except Exception as exc:
            raise ExecutionError(f"output format '{plan.output_format}' failed: {type(exc).__name__}: {exc}",
                                 plugin=registries.output_formats.owner(plan.output_format)) from exc
        timings["save"] = time.perf_counter() - t
        t = time.perf_counter()
        reloaded = load_model(staged, registries, task=plan.model.task)
        timings["reload"] = time.perf_counter() - t
        t = time.perf_counter()
        final = measure_all(plan, registries, reloaded, ctx, staged, "saved")
        timings["measure_final"] = time.perf_counter() - t
        verdicts = verify(plan, state.original_metrics, final)
        timings["total"] = time.perf_counter() - started
        if search_seconds is not None:
            timings["search"] = search_seconds
        report = build_report(plan, registries, state.original_metrics, stage_records, final, verdicts,
                              files, timings, trials or [], resumed_after)
        write_reports(staged, plan, report, registries, out)
        publish(staged, out)
    except BaseException:
        import shutil
        shutil.rmtree(staged, ignore_errors=True)
        raise
    work.remove()
    reloaded.source_dir = out
    return RunResult(plan, report, verdicts, reloaded, out, resumed_after)


def _copy_handle(handle: ModelHandle) -> ModelHandle:
    import copy

    from squeezelang.models.handle import ModelHandle as Handle

    return Handle(copy.deepcopy(handle.model), handle.tokenizer, handle.task, handle.source_dir,
                  copy.deepcopy(handle.codecs), copy.deepcopy(handle.edits), set(handle.states),
                  handle.tokenizer_changed)
