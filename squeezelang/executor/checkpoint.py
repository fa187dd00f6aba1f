"""Per-stage checkpoints and a search's trial log in a work directory beside the output, so an
interrupted run (or search) resumes.

A process may be killed at any instruction, so nothing here is ever half-trusted: a checkpoint is
written into a temporary directory and renamed into place whole, and it counts as complete only once
``state.json`` (itself replaced atomically) lists it. Removing the work directory deletes
``state.json`` first, so a removal cut short leaves nothing a rerun would resume from.

A search keeps every measured trial in ``trials.json`` (``TrialLog``), keyed by the recipe's
fingerprint, so that the same command after an interrupt skips the trials already measured. Work of
another recipe is refused, or with ``force`` discarded after saying what is discarded.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import OutputError
from squeezelang.executor.artifacts import PUBLISHING, work_dir, write_json

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle
    from squeezelang.planner.plan import Plan
    from squeezelang.planner.workers import Backend, TrialJob, TrialOutcome

STATE = "state.json"
TRIALS = "trials.json"


@dataclass
class WorkState:
    """What survives an interruption: the recipe's fingerprint and each completed stage."""

    fingerprint: str
    original_metrics: dict[str, float] | None = None
    completed: list[dict[str, Any]] = field(default_factory=list)  # {"stage", "dir", "metrics", "seconds"}


class WorkDir:
    """``.<output>.squeeze-work/`` next to the output directory."""

    def __init__(self, out: Path) -> None:
        self.path = work_dir(out)

    def open(self, fingerprint: str, force: bool) -> WorkState:
        """The state to continue from: resumed if it is this recipe's, refused if another's (with
        ``force``, that one's checkpoints are discarded). A search's trial log is kept."""
        data = _read(self.path / STATE)
        if data is not None and data.get("fingerprint") == fingerprint:
            completed = self._existing(data)
            if force and completed:
                _say(f"--force: keeping {_count(len(completed), 'completed stage checkpoint')} of "
                     f"this same recipe in {self.path} and resuming after them (delete that "
                     "directory to start over)")
            return WorkState(fingerprint, data.get("original_metrics"), completed)
        if data is not None:
            self.discard(force)
        self.clear()
        state = WorkState(fingerprint)
        self.save(state)
        return state

    def discard(self, force: bool, trials: int = 0) -> None:
        """Give up another recipe's unfinished work here: refused without ``force``; with it, say
        what is discarded (its checkpoints, and ``trials`` measured search trials), then do it."""
        if not force:
            raise OutputError(
                f"{self.path} holds an unfinished run of a different recipe (or different "
                f"settings) for the same output directory; use --force to discard it")
        what = _summary(len(self.completed()), trials) or "an unreadable state"
        _say(f"--force: discarding {what} in {self.path} (an unfinished run of a different "
             "recipe or settings)")
        (self.path / TRIALS).unlink(missing_ok=True)
        self.clear()

    def clear(self) -> None:
        """Remove the stage state (``state.json`` first) and the checkpoints; keep the trial log."""
        for name in (PUBLISHING, STATE):
            (self.path / name).unlink(missing_ok=True)
        if self.path.is_dir():
            for item in self.path.iterdir():
                if item.name == TRIALS:
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def completed(self) -> list[dict[str, Any]]:
        """The completed stages that ``state.json`` lists and whose checkpoint is in place."""
        return self._existing(_read(self.path / STATE) or {})

    def _existing(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return [c for c in data.get("completed", []) if (self.path / c["dir"]).is_dir()]

    def mark_publishing(self) -> None:
        """Say that this run now publishes: should it stop before the work directory is gone, the
        output beside it is its own and the same command may replace it (``check_output_dir``)."""
        (self.path / PUBLISHING).write_text("the run that owns this directory is publishing\n",
                                            encoding="utf-8")

    def save(self, state: WorkState) -> None:
        write_json(self.path / STATE, {"fingerprint": state.fingerprint,
                                       "original_metrics": state.original_metrics,
                                       "completed": state.completed})

    def checkpoint(self, handle: ModelHandle, index: int, stage: str) -> str:
        """Save the model after stage ``index``; return the checkpoint's directory name."""
        from squeezelang.models.save import save_model

        name = f"stage-{index:02d}-{stage}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.path))
        try:
            save_model(handle, tmp)
            final = self.path / name
            if final.exists():  # a stage run again: move the old one aside whole, never half-delete it
                os.replace(final, tmp.with_name(tmp.name + "-old"))
            os.replace(tmp, final)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-old")):
                shutil.rmtree(leftover, ignore_errors=True)
        return name

    def remove(self) -> None:
        """Delete the work directory, ``state.json`` first (see the module docstring)."""
        for name in (PUBLISHING, STATE):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)


def fingerprint(plan_json: dict[str, Any]) -> str:
    """A stable hash of everything that determines the run's result (not where it is written)."""
    import hashlib

    data = {k: v for k, v in plan_json.items() if k not in ("output_dir",)}
    if not isinstance(data, dict):
        raise OutputError("bad plan")
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialLog:
    """A search's measured trials, kept in ``trials.json`` in the work directory.

    Each entry is keyed by the fingerprint of the trial's fixed plan and holds its outcome, so a
    search run again after an interrupt gets the outcomes it measured before back without running
    those trials again (``wrap``). Trials that failed are not kept: they run again.
    """

    def __init__(self, path: Path, fingerprint: str, entries: dict[str, dict[str, Any]]) -> None:
        self.path, self.fingerprint, self.entries = path, fingerprint, entries

    @classmethod
    def open(cls, out: Path, plan: Plan, force: bool, quiet: bool = False) -> TrialLog:
        """The log of ``plan``'s search into ``out``: resumed if it is this recipe's (saying so),
        refused if the work directory holds another recipe's work (with ``force``, discarded)."""
        work = WorkDir(out)
        path, key = work.path / TRIALS, fingerprint(plan.to_json())
        data = _read(path)
        if data is not None and data.get("fingerprint") == key:
            entries = dict(data.get("trials") or {})
            if entries and not quiet:
                print(f"resuming the search: {_count(len(entries), 'trial')} of this recipe "
                      f"measured before ({path}) are not run again", flush=True)
            return cls(path, key, entries)
        if data is not None or _read(work.path / STATE) is not None:
            work.discard(force, trials=len((data or {}).get("trials") or {}))
        return cls(path, key, {})

    def seconds(self) -> float:
        """The time the trials in the log took when they ran (a resumed search's timeout counts it)."""
        return float(sum(entry.get("seconds") or 0.0 for entry in self.entries.values()))

    def wrap(self, backend: Backend) -> _Replaying:
        """``backend``, answering the jobs measured before from the log and logging the others."""
        return _Replaying(self, backend)

    @staticmethod
    def key(job: TrialJob) -> str:
        """What identifies a trial: its fixed plan (not where it is written) and what it measures."""
        return fingerprint(job.plan.to_json()) + ("+stages" if job.measure_stages else "")

    def replay(self, key: str, index: int) -> TrialOutcome:
        from squeezelang.planner.workers import TrialOutcome

        return TrialOutcome(**{**self.entries[key], "index": index})

    def record(self, key: str, outcome: TrialOutcome) -> None:
        """Keep ``outcome`` (unless the trial failed) and write the log, atomically."""
        if outcome.error:
            return
        self.entries[key] = {k: v for k, v in asdict(outcome).items() if k != "index"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"fingerprint": self.fingerprint, "trials": self.entries})


class _Replaying:
    """A trial backend in front of another: measured trials come from the log, in job order."""

    def __init__(self, log: TrialLog, backend: Backend) -> None:
        self.log, self.backend = log, backend
        self.name, self.workers = backend.name, backend.workers

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        keys = [self.log.key(job) for job in jobs]
        new = [job for job, key in zip(jobs, keys) if key not in self.log.entries]
        ran = iter(self.backend.run(new) if new else [])
        outcomes = []
        for job, key in zip(jobs, keys):
            if key in self.log.entries:
                outcomes.append(self.log.replay(key, job.index))
                continue
            outcome = next(ran)
            self.log.record(key, outcome)
            outcomes.append(outcome)
        return outcomes

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> _Replaying:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def saved_work(out: Path) -> str | None:
    """What runs into ``out`` left to resume from, e.g. "2 completed stage checkpoints and 5
    measured search trials in DIR"; None when there is nothing."""
    work = WorkDir(out)
    what = _summary(len(work.completed()), len((_read(work.path / TRIALS) or {}).get("trials") or {}))
    return f"{what} in {work.path}" if what else None


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``: None when there is no file, ``{}`` when it cannot be read."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(stages: int, trials: int) -> str:
    """E.g. "1 completed stage checkpoint and 2 measured search trials"; counts of 0 left out."""
    return " and ".join(_count(n, noun) for n, noun in ((stages, "completed stage checkpoint"),
                                                         (trials, "measured search trial")) if n)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _say(message: str) -> None:
    """A notice on stderr: what ``--force`` discards or keeps, shown even with ``--quiet``."""
    print(message, file=sys.stderr, flush=True)
