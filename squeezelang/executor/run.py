"""Run a plan: load, measure the original, apply stages with checkpoints, save, verify, report."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.errors import ExecutionError, OutputError, SqueezeError
from squeezelang.executor.artifacts import check_output_dir, discard_staging, publish, staging_dir
from squeezelang.executor import ranks
from squeezelang.executor.checkpoint import WorkDir, fingerprint
from squeezelang.hooks.context import Context
from squeezelang.executor.guards import (check_artifact, check_finite, input_paths,
                                         overlong_notes, read_inputs)
from squeezelang.executor.measure import PAIRED_ROUNDS, measure_all, measure_paired
from squeezelang.executor.original_cache import measure_original
from squeezelang.executor.usage import PhaseMemory, resources
from squeezelang.hooks.registry import Registries
from squeezelang.hooks.sources import OutputFormat
from squeezelang.planner.data import data_store
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
    #: Under torchrun, this process's rank: on ranks other than 0 the stages ran but nothing was
    #: saved or measured (``report`` is empty, ``handle`` the model as the stages left it).
    rank: int = 0

    @property
    def ok(self) -> bool:
        return all(v.met for v in self.verdicts)

    @property
    def model(self) -> Any:
        return self.handle.model if self.handle is not None else None

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.met]


def load_original(plan: Plan, registries: Registries) -> ModelHandle:
    """The recipe's model as its source loads it, on the run's device and in its dtype."""
    source = registries.model_sources.get(plan.model.source)
    if plan.model.offload:  # the weights stay in the source's files (``models.offload``)
        from squeezelang.models.load import load_model

        directory = source.locate(dict(plan.model.args))
        return placed(load_model(directory, registries, task=plan.model.task, offload=True), plan)
    return placed(source.load(dict(plan.model.args)), plan)


#: Past this many bytes of weights, the loaded original is handed over to the first stage instead
#: of loading a second copy (and loaded again, where needed, once the stages are done).
HANDOVER_BYTES = 2**30


def weight_bytes(handle: ModelHandle) -> int:
    """Bytes of the model's parameters in memory."""
    return sum(p.numel() * p.element_size() for p in handle.model.parameters())


def placed(handle: ModelHandle, plan: Plan, dtype: bool = True) -> ModelHandle:
    """``handle`` on the run's device (``plan.model.device``) and, with ``dtype``, in its dtype."""
    from squeezelang.models.placement import place_, resolve_device

    return place_(handle, resolve_device(plan.model.device), plan.model.dtype if dtype else "auto")


def verify(plan: Plan, original: dict[str, float], final: dict[str, float]) -> list[Verdict]:
    """Every constraint of ``plan`` on measured values."""
    return [evaluate(c, plan.metric(c.metric), original[c.metric], final[c.metric])
            for c in plan.constraints]


def apply_stage(stage: StagePlan, handle: ModelHandle, registries: Registries, ctx: Context,
                seed: int) -> None:
    """Run one stage's technique on ``handle``, turning any failure into an ``ExecutionError``."""
    import torch

    from squeezelang.hooks.family import families_in_use

    from squeezelang.models.offload import is_offloaded, materialize_, offload_again_

    tech = registries.techniques.get(stage.technique)
    torch.manual_seed(seed)
    ctx.stage = stage.name
    whole = is_offloaded(handle.model) and not tech.blockwise_for(dict(stage.params))
    try:
        if whole:
            ctx.log(f"offload: '{stage.technique}' needs the whole model: loaded into memory "
                    "for this stage")
            materialize_(handle.model)
        with families_in_use(registries):  # a --plugin family is the one surgery finds
            tech.apply_(handle, dict(stage.params), ctx)
        if whole:
            offload_again_(handle.model)
    except SqueezeError as exc:
        raise ExecutionError(str(exc), stage=stage.name, plugin=stage.plugin) from exc
    except MemoryError as exc:
        raise ExecutionError(f"technique '{stage.technique}' ran out of memory"
                             + (f": {exc}" if str(exc) else ""),
                             stage=stage.name, plugin=stage.plugin) from exc
    except Exception as exc:
        raise ExecutionError(f"technique '{stage.technique}' failed: {type(exc).__name__}: {exc}",
                             stage=stage.name, plugin=stage.plugin) from exc
    finally:
        ctx.stage = None
    check_finite(handle, stage)
    handle.states |= set(tech.produces_for(dict(stage.params)))


def execute(plan: Plan, registries: Registries, output: str | Path | None = None,
            force: bool = False, handle: ModelHandle | None = None, quiet: bool = False,
            threads: int = 2, trials: list[dict[str, Any]] | None = None,
            search_seconds: float | None = None, original_metrics: dict[str, float] | None = None,
            stage_metrics: str = "each_stage", composition: dict[str, Any] | None = None) -> RunResult:
    """Run ``plan`` to completion and publish the artifacts; see the module docstring.

    After each stage, ``stage_metrics`` says what is measured: ``"each_stage"`` the metrics whose
    ``each_stage`` holds (size and parameter counts, and those the recipe marks), ``"all"`` every
    metric (a search that composes pipelines judges each stage), ``"none"`` nothing (a trial needs
    only the saved artifact's metrics). A search passes ``original_metrics`` measured once for all
    its trials (the original model does not change between them). Its final run passes
    ``search_seconds``, which the report's total includes.
    """
    from squeezelang.executor.report import build_report, write_reports

    world = ranks.join()  # under torchrun: every rank runs the stages, rank 0 alone writes
    quiet = quiet or not world.main
    out = Path(output or plan.output_dir).expanduser().resolve()
    # A search's final run: the search checked the output and said what --force replaces.
    if world.main:
        check_output_dir(out, force, input_paths(plan, registries), announce=search_seconds is None)
    if str(out) != plan.output_dir:  # -o DIR: the report and the result name where artifacts are
        plan = replace(plan, output_dir=str(out))
    timings: dict[str, float] = {}
    memory = PhaseMemory()  # the peak and resident memory as each timed phase ends
    started = time.perf_counter()
    work = ranks.work_dir(out, world)
    state = work.open(fingerprint(plan.to_json()), force)
    fresh = state.original_metrics is None and not state.completed
    ctx = Context(data=data_store(plan, registries), seed=plan.search.seed, threads=threads, quiet=quiet)
    in_memory = handle is not None
    ctx.original_loader = (lambda: placed(_copy_handle(handle), plan)) if in_memory else \
        (lambda: load_original(plan, registries))

    # Inputs first: the data files, then the model (its weights checked as they load), then the
    # original's metrics. A bad input fails here, before any stage, and leaves no work directory.
    try:
        t = time.perf_counter()
        read_inputs(ctx)
        original = ctx.original()
        timings["load"] = time.perf_counter() - t
        memory.mark("load")
        notes = overlong_notes(ctx, original)

        t = time.perf_counter()
        if state.original_metrics is None and original_metrics is not None:
            state.original_metrics = dict(original_metrics)
            work.save(state)
        if state.original_metrics is None and world.main:
            orig_dir = original.source_dir
            tmp = None
            if orig_dir is None:  # an in-memory model: measure its size on a saved copy
                from squeezelang.models.save import save_model
                tmp = staging_dir(out)
                save_model(original, tmp)
                orig_dir = tmp
            try:
                state.original_metrics = measure_original(plan, registries, original, ctx, orig_dir)
            finally:
                if tmp is not None:
                    import shutil
                    shutil.rmtree(tmp, ignore_errors=True)
            work.save(state)
        timings["measure_original"] = time.perf_counter() - t
        memory.mark("measure_original")
        # A large model is not held twice: the first stage takes the loaded original over, and
        # ``ctx.original()`` loads it again only where a stage (a teacher) or the end needs it.
        handover = not in_memory and weight_bytes(original) > HANDOVER_BYTES
        spare = ctx.release_original() if handover else None
        original = None if handover else original
    except Exception:
        if fresh:
            work.remove()
        raise

    after_stage = replace(plan, metrics=tuple(
        m for m in plan.metrics
        if stage_metrics == "all" or (stage_metrics == "each_stage" and m.each_stage)))
    done = {c["stage"]: c for c in state.completed}
    resumed_after = None
    current: ModelHandle | None = None
    stage_records: list[dict[str, Any]] = []

    def first_model() -> ModelHandle:
        """The model the first stage to run starts from: the last kept checkpoint, else a copy of
        the original (or the original itself, handed over); never two of them in memory."""
        nonlocal spare
        taken, spare = spare, None
        if resumed_after is not None:
            return _resume(work, done[resumed_after], len(stage_records), plan, registries, quiet)
        return _copy_handle(original) if in_memory else taken or load_original(plan, registries)

    for index, stage in enumerate(plan.stages):
        if stage.name in done and current is None and all(s.name in done for s in plan.stages[:index]):
            record = done[stage.name]
            stage_records.append(record)
            resumed_after = stage.name
            continue
        if current is None:
            # Stages from here on run again: their old records (and checkpoints) no longer count.
            state.completed = list(stage_records)
            work.save(state)
            current = first_model()
        t = time.perf_counter()
        if not quiet:
            print(f"stage {index + 1}/{len(plan.stages)} '{stage.name}': {stage.technique}"
                  + (f" ({stage.method})" if stage.method else ""), flush=True)
        apply_stage(stage, current, registries, ctx, plan.search.seed + index)
        if handover:  # a teacher the stage loaded is not kept through the next stages
            ctx.release_original()
        seconds = time.perf_counter() - t
        memory.mark(f"stage:{stage.name}")
        try:
            ckpt_name = work.checkpoint(current, index, stage.name)
        except (SqueezeError, OSError) as exc:
            raise ExecutionError(f"cannot checkpoint the model: {_describe(exc)}", stage=stage.name) from exc
        t = time.perf_counter()
        metrics = measure_all(after_stage, registries, current, ctx, work.path / ckpt_name,
                              f"stage '{stage.name}'") if after_stage.metrics and world.main else {}
        record = {"stage": stage.name, "dir": ckpt_name, "metrics": metrics, "seconds": seconds,
                  "measure_seconds": time.perf_counter() - t, "log": ctx.logs.pop(stage.name, [])}
        state.completed.append(record)
        work.save(state)
        memory.mark(f"checkpoint:{stage.name}")
        ranks.barrier()  # every rank goes on (and may fail) only once rank 0 has kept the stage
        stage_records.append(record)
    if current is None:  # every stage was already done, or there are none
        current = first_model()

    if not world.main:  # the stages ran; rank 0 saves, measures and reports
        return RunResult(plan, {}, [], current, out, resumed_after, notes, rank=world.rank)

    # Save the final artifact into a staging directory, reload it, and verify on what was saved.
    t = time.perf_counter()
    try:
        staged = staging_dir(out)
        fmt = registries.output_formats.get(plan.output_format)
        try:
            if not fmt.streams:  # an offloaded model is written whole by this format
                from squeezelang.models.offload import materialize_

                materialize_(current.model)
            files = fmt.write(current, staged, dict(plan.output_options))
        except (ExecutionError, OutputError):
            raise
        except Exception as exc:  # ours say what failed; anything else gets the format's name
            message = str(exc) if isinstance(exc, SqueezeError) else \
                f"output format '{plan.output_format}' failed: {_describe(exc)}"
            raise ExecutionError(message, plugin=registries.output_formats.owner(plan.output_format)) from exc
        check_artifact(staged, files, plan.output_format,
                       registries.output_formats.owner(plan.output_format))
        timings["save"] = time.perf_counter() - t
        memory.mark("save")
        current = None  # saved: the artifact is what is measured from here on (and in memory)
        t = time.perf_counter()
        reloaded = load_artifact(fmt, staged, plan, registries, threads)
        timings["reload"] = time.perf_counter() - t
        memory.mark("reload")
        t = time.perf_counter()
        final = measure_all(plan, registries, reloaded, ctx, staged, "saved", fmt.model_files)
        said = {name: list(lines) for name, lines in ctx.metric_notes.items() if lines}
        originals, pairs = dict(state.original_metrics), {}
        original = original or ctx.original()
        for name, (before, after) in measure_paired(plan, registries, original, reloaded, ctx,
                                                    original.source_dir, staged,
                                                    fmt.model_files).items():
            pairs[name] = {"original_at_start": originals[name], "final_alone": final[name],
                           "rounds": PAIRED_ROUNDS}
            originals[name], final[name] = before, after
        timings["measure_final"] = time.perf_counter() - t
        memory.mark("measure_final")
        verdicts = verify(plan, originals, final)
        timings["total"] = time.perf_counter() - started + (search_seconds or 0.0)
        if search_seconds is not None:
            timings["search"] = search_seconds
        used = resources(timings["total"], memory)
        report = build_report(plan, registries, originals, stage_records, final, verdicts,
                              files, timings, trials or [], resumed_after, composition, used, pairs,
                              runtime_of(reloaded, fmt), said)
        write_reports(staged, plan, report, registries, out)
        work.mark_publishing()
        publish(staged, out)
    except BaseException:
        discard_staging(out)
        raise
    work.remove()
    reloaded.source_dir = out
    return RunResult(plan, report, verdicts, reloaded, out, resumed_after, notes)


def load_artifact(fmt: OutputFormat, staged: Path, plan: Plan, registries: Registries,
                  threads: int) -> ModelHandle:
    """The saved artifact as its format's runtime runs it (``OutputFormat.load``); a format that
    keeps the default loader is read back with this run's plugins (their ``rebuild_``)."""
    from squeezelang.models.load import load_model

    if type(fmt).load is OutputFormat.load:  # as saved (its dtype), on the run's device
        return placed(load_model(staged, registries, task=plan.model.task,
                                 offload=plan.model.offload), plan, dtype=False)
    try:
        return fmt.load(staged, plan.model.task, dict(plan.output_options), threads)
    except SqueezeError as exc:
        raise ExecutionError(f"output format '{plan.output_format}' cannot load what it saved: {exc}",
                             plugin=registries.output_formats.owner(plan.output_format)) from exc
    except Exception as exc:
        raise ExecutionError(f"output format '{plan.output_format}' cannot load what it saved: "
                             f"{_describe(exc)}",
                             plugin=registries.output_formats.owner(plan.output_format)) from exc


def runtime_of(handle: ModelHandle, fmt: OutputFormat) -> str:
    """What ran the reloaded artifact: its ``RuntimeModel``'s own word (a loader may fall back to
    another runtime), else the format's."""
    from squeezelang.models.runtime import RuntimeModel

    model = handle.model
    return model.runtime if isinstance(model, RuntimeModel) and model.runtime else fmt.runtime


def _resume(work: WorkDir, record: dict[str, Any], done: int, plan: Plan, registries: Registries,
            quiet: bool) -> ModelHandle:
    """Load the checkpoint of the last completed stage, saying so."""
    from squeezelang.models.load import load_model

    ckpt = work.path / record["dir"]
    if not quiet:
        print(f"resuming after stage '{record['stage']}' ({done} of {len(plan.stages)} stages "
              f"done, checkpoint {ckpt})", flush=True)
    return placed(load_model(ckpt, registries, task=plan.model.task, offload=plan.model.offload),
                  plan)


def _describe(exc: BaseException) -> str:
    """An exception as a message: ours as they are, an ``OSError`` as its path and reason."""
    if isinstance(exc, SqueezeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _copy_handle(handle: ModelHandle) -> ModelHandle:
    import copy

    from squeezelang.models.handle import ModelHandle as Handle

    return Handle(copy.deepcopy(handle.model), handle.tokenizer, handle.task, handle.source_dir,
                  copy.deepcopy(handle.codecs), copy.deepcopy(handle.edits), set(handle.states),
                  handle.tokenizer_changed)
