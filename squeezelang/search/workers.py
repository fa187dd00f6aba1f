"""Run search trials: in this process, in worker processes on this machine, or as Ray tasks.

A trial is independent of the others: a fixed plan (no ``auto`` left) run to a saved, reloaded and
measured artifact, exactly like the final run. The search hands a batch of ``TrialJob``s to a
``Backend`` and gets one ``TrialOutcome`` per job back, in job order. The scheduling is the engine's
own, never ours: a ``concurrent.futures.ProcessPoolExecutor`` (``"process"``) or Ray (``"ray"``,
the ``squeezelang[ray]`` extra). ``"serial"`` runs the trials one after another in this process.

- A trial that fails (a stage, a metric or a save raising) comes back as an outcome with ``error``
  set to the message, which names the stage and the plugin as ``ExecutionError`` does; the search
  goes on with the other trials.
- Worker processes rebuild the registries once each, from the installed entry points plus the
  plugin modules the parent registered by name (``Registries.extra``); ``open_backend`` refuses
  plugins that cannot be rebuilt that way (objects registered in-process) before any trial runs.
- An in-memory model (``squeezelang.run(model=...)``) is saved once to a temporary directory that
  every worker loads it from; ``close`` removes it.
- Trials that run at once share the machine: a ``latency`` (any time metric) measured in a
  parallel trial is contaminated by the others. It is returned anyway; the search
  (``search._Trials._settle``) runs a trial whose verdict hangs on it again alone in the main
  process with ``run_trial``, and the final run alone decides the verdicts.
- Worker processes are spawned, which re-imports the main module: a script that searches with
  ``"process"`` needs the usual ``if __name__ == "__main__":`` guard.
- Ray workers read the recipe's model and data files (and a shipped in-memory model) by path: on a
  multi-node cluster these must be on a filesystem every node sees.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from squeezelang.errors import SqueezeError
from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from squeezelang.models.handle import ModelHandle

BACKENDS = ("serial", "process", "ray")


@dataclass(frozen=True)
class TrialJob:
    """One trial: a fixed plan and the directory its artifact is written to (removed afterwards)."""

    index: int  # 1-based trial number
    plan: Plan
    output: str
    original_metrics: dict[str, float] | None = None  # measured once by the parent
    #: also measure after each stage (a composed search uses it to tell which stage lost quality)
    measure_stages: bool = False


@dataclass
class TrialOutcome:
    """What one trial measured; ``error`` is set (and ``ok`` false) when the trial failed."""

    index: int
    metrics: dict[str, float]  # name -> value measured on the saved artifact
    verdicts: dict[str, bool]  # constraint text -> met
    ok: bool
    seconds: float
    worker: str  # "pid 1234", or "ray node 1a2b3c4d pid 1234"
    error: str | None = None
    #: the original model's metrics as the trial used them (measured by it when the job had none)
    original: dict[str, float] | None = None
    #: the metrics after each stage, ``{stage name: {metric: value}}``, when the job asked for them
    stages: dict[str, dict[str, float]] | None = None


class Backend(Protocol):
    """Runs batches of trials; ``run`` returns one outcome per job, in job order."""

    name: str
    workers: int

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------- one trial
def run_trial(job: TrialJob, registries: Registries, handle: ModelHandle | None = None,
              threads: int | None = None, worker: str | None = None) -> TrialOutcome:
    """Run ``job`` with ``execute`` and remove its artifact; a failure becomes the outcome's error."""
    from squeezelang.executor.run import execute

    worker = worker or f"pid {os.getpid()}"
    started = time.perf_counter()
    extra = {} if threads is None else {"threads": threads}
    try:
        result = execute(job.plan, registries, output=job.output, force=True, handle=handle,
                         quiet=True, original_metrics=job.original_metrics,
                         stage_metrics="all" if job.measure_stages else "none",
                         **extra)
    except Exception as exc:  # noqa: BLE001 - one broken trial must not end the search
        return TrialOutcome(job.index, {}, {}, False, time.perf_counter() - started, worker,
                            error=_describe(exc))
    finally:
        shutil.rmtree(job.output, ignore_errors=True)
    metrics = result.report["metrics"]
    return TrialOutcome(
        job.index, {name: m["final"] for name, m in metrics.items()},
        {v.constraint: v.met for v in result.verdicts}, result.ok, time.perf_counter() - started,
        worker, original={name: m["original"] for name, m in metrics.items()},
        stages={s["name"]: s["metrics"] for s in result.report["stages"]} if job.measure_stages else None)


def _describe(exc: BaseException) -> str:
    """The message of a failed trial; an unexpected exception also says where it was raised."""
    if isinstance(exc, SqueezeError):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


# ---------------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class _Setup:
    """What a worker process needs besides the job; sent with every job, acted on once."""

    plugins: tuple[str, ...]
    threads: int
    model_dir: str | None = None  # a shipped in-memory model
    task: str | None = None
    source_dir: str | None = None  # the in-memory model's own source directory, if any


_state: dict[_Setup, tuple[Registries, Any]] = {}


def _worker_trial(job: TrialJob, setup: _Setup, kind: str) -> TrialOutcome:
    """Run ``job`` in a worker process (pool or Ray), setting the process up on its first job."""
    worker = f"pid {os.getpid()}"
    if kind == "ray":
        import ray

        worker = f"ray node {ray.get_runtime_context().get_node_id()[:8]} {worker}"
    try:
        registries, handle = _state.get(setup) or _set_up(setup)
    except Exception as exc:  # noqa: BLE001 - reported on the trial; the next job tries again
        return TrialOutcome(job.index, {}, {}, False, 0.0, worker,
                            error=f"setting up the worker failed: {_describe(exc)}")
    return run_trial(job, registries, handle, setup.threads, worker)


def _set_up(setup: _Setup) -> tuple[Registries, Any]:
    import torch

    from squeezelang.hooks.manager import default_registries

    torch.set_num_threads(setup.threads)
    registries = default_registries(setup.plugins)
    handle = None
    if setup.model_dir is not None:
        from squeezelang.models.load import load_model

        handle = load_model(Path(setup.model_dir), registries, task=setup.task)
        # as the in-memory model: the tokenizer is saved with it, other files come from its source
        handle.source_dir = Path(setup.source_dir) if setup.source_dir else None
    _state.clear()
    _state[setup] = (registries, handle)
    return registries, handle


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it stops the workers)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------- backends
class _Base:
    name = ""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def close(self) -> None:
        pass

    def __enter__(self) -> _Base:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialBackend(_Base):
    """Trials one after another in this process (the in-memory model is used as is)."""

    name = "serial"

    def __init__(self, registries: Registries, handle: ModelHandle | None, threads: int | None) -> None:
        super().__init__(1)
        self.registries, self.handle, self.threads = registries, handle, threads

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        return [run_trial(job, self.registries, self.handle, self.threads) for job in jobs]


class _Shipped(_Base):
    """A backend whose workers rebuild the plugins and load any in-memory model themselves."""

    def __init__(self, workers: int, registries: Registries, handle: ModelHandle | None,
                 threads: int) -> None:
        super().__init__(workers)
        check_rebuildable(registries)
        self._model_dir: str | None = None
        setup = _Setup(registries.extra, threads)
        if handle is not None:
            from squeezelang.models.save import save_model

            self._model_dir = tempfile.mkdtemp(prefix="squeeze-trial-model-")
            try:
                save_model(handle, Path(self._model_dir))
            except BaseException:
                shutil.rmtree(self._model_dir, ignore_errors=True)
                raise
            setup = _Setup(registries.extra, threads, self._model_dir, handle.task,
                           str(handle.source_dir) if handle.source_dir else None)
        self.setup = setup

    def close(self) -> None:
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None


class ProcessBackend(_Shipped):
    """Trials in a pool of ``workers`` spawned processes on this machine."""

    name = "process"

    def __init__(self, workers: int, registries: Registries, handle: ModelHandle | None,
                 threads: int) -> None:
        super().__init__(workers, registries, handle, threads)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: forking a process that has torch's thread pools running is unsafe
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_ignore_sigint)
        return self._pool

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        from concurrent.futures.process import BrokenProcessPool

        pool = self._executor()
        futures = [pool.submit(_worker_trial, job, self.setup, "process") for job in jobs]
        outcomes = []
        try:
            for job, future in zip(jobs, futures):
                try:
                    outcomes.append(future.result())
                except BrokenProcessPool as exc:
                    self._discard()  # a worker died (killed, out of memory): the next batch gets a new pool
                    outcomes.append(_lost(job, f"a worker process died: {exc}"))
                except Exception as exc:  # noqa: BLE001 - e.g. a job that cannot be pickled
                    outcomes.append(_lost(job, _describe(exc)))
        except KeyboardInterrupt:
            self._stop()
            raise
        return outcomes

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _stop(self) -> None:
        """Stop now: cancel what has not started and end the workers running trials."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # concurrent.futures has no public way to end running work before Python 3.14
        terminate = getattr(pool, "terminate_workers", None)
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        if terminate is not None:
            terminate()
        else:
            for process in processes:
                process.terminate()
        for process in processes:
            process.join(timeout=5)

    def close(self) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        except KeyboardInterrupt:
            self._stop()
            raise
        finally:
            super().close()


class RayBackend(_Shipped):
    """Trials as Ray tasks, on the cluster at ``address`` or on a local instance started for them."""

    name = "ray"

    def __init__(self, workers: int, registries: Registries, handle: ModelHandle | None,
                 threads: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise SqueezeError('backend = "ray" needs Ray: pip install "squeezelang[ray]"') from None
        self._ray = ray
        self._started = False
        super().__init__(workers, registries, handle, threads)
        try:
            if not ray.is_initialized():
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    # a compression run never reports usage anywhere (unless the user opted in)
                    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                    ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    self._started = True
        except Exception as exc:
            super().close()
            where = f"the Ray cluster at '{address}'" if address else "a local Ray instance"
            raise SqueezeError(f"cannot start or join {where}: {type(exc).__name__}: {exc}") from None
        # a task holds as many Ray CPUs as torch threads it runs, so Ray never oversubscribes a node
        self._task = ray.remote(_worker_trial).options(num_cpus=threads, max_retries=0)

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        ray = self._ray
        refs = [self._task.remote(job, self.setup, "ray") for job in jobs]
        outcomes = []
        try:
            for job, ref in zip(jobs, refs):
                try:
                    outcomes.append(ray.get(ref))
                except ray.exceptions.RayError as exc:  # the worker or its node died
                    outcomes.append(_lost(job, f"{type(exc).__name__}: {exc}"))
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        return outcomes

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
        super().close()


def _lost(job: TrialJob, message: str) -> TrialOutcome:
    shutil.rmtree(job.output, ignore_errors=True)
    return TrialOutcome(job.index, {}, {}, False, 0.0, "?", error=message)


# ---------------------------------------------------------------------------- choosing one
def check_rebuildable(registries: Registries) -> None:
    """Refuse plugins a worker process cannot rebuild from entry points and ``registries.extra``."""
    from squeezelang.hooks.manager import build_registries, plugin_manager

    rebuilt = build_registries(plugin_manager(registries.extra))
    for kind, registry in registries.by_hook().items():
        other = rebuilt.by_hook()[kind]
        missing = [name for name in registry.names() if name not in other]
        if missing:
            name = missing[0]
            raise SqueezeError(
                f"{registry.kind} '{name}' of plugin '{registry.owner(name)}' cannot be rebuilt in a "
                "worker process, which loads only installed plugins and plugin modules given by "
                'name; register it from an importable module (squeeze --plugin MODULE) or use '
                'backend = "serial"')


def open_backend(kind: str, workers: int, registries: Registries, handle: ModelHandle | None = None,
                 address: str | None = None, threads: int | None = None) -> Backend:
    """The backend ``kind`` ("serial", "process" or "ray") running ``workers`` trials at once.

    ``threads`` is each trial's torch thread count; by default the machine's CPUs shared among the
    workers (one per Ray task on a cluster at ``address``, where Ray decides how many run at once).
    """
    if kind not in BACKENDS:
        raise SqueezeError(f"unknown backend '{kind}': expected one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise SqueezeError(f"workers must be at least 1, got {workers}")
    if kind == "serial":
        return SerialBackend(registries, handle, threads)
    if threads is None:
        threads = 1 if (kind == "ray" and address) else max(1, (os.cpu_count() or 1) // workers)
    if kind == "process":
        return ProcessBackend(workers, registries, handle, threads)
    return RayBackend(workers, registries, handle, threads, address)
