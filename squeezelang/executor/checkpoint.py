"""Per-stage checkpoints in a work directory beside the output, so an interrupted run resumes (a
search's trial log lives there too: ``search.trial_log``).

A process may be killed at any instruction, so nothing here is ever half-trusted: a checkpoint is
written into a temporary directory and renamed into place whole, and it counts as complete only once
``state.json`` (itself replaced atomically) lists it. Removing the work directory deletes
``state.json`` first, so a removal cut short leaves nothing a rerun would resume from.

Work of another recipe is refused, or with ``force`` discarded after saying what is discarded
(completed stages, and the trials a search kept in ``trials.json``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.errors import OutputError
from squeezelang.executor.artifacts import PUBLISHING, work_dir, write_json

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle

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
        data = read_json(self.path / STATE)
        if data is not None and data.get("fingerprint") == fingerprint:
            completed = self._existing(data)
            if force and completed:
                _say(f"--force: keeping {count_of(len(completed), 'completed stage checkpoint')} of "
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
                f"settings, or input files changed since) for the same output directory; use "
                f"--force to discard it")
        what = _summary(len(self.completed()), trials) or "an unreadable state"
        _say(f"--force: discarding {what} in {self.path} (an unfinished run of a different "
             "recipe or settings, or of input files changed since)")
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
        return self._existing(read_json(self.path / STATE) or {})

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

        name = checkpoint_name(index, stage)
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


def checkpoint_name(index: int, stage: str) -> str:
    """The directory, in the work directory, of the checkpoint after stage ``index``."""
    return f"stage-{index:02d}-{stage}"


def fingerprint(plan_json: dict[str, Any]) -> str:
    """A stable hash of everything that determines the run's result (not where it is written)."""
    import hashlib

    data = {k: v for k, v in plan_json.items() if k not in ("output_dir",)}
    if not isinstance(data, dict):
        raise OutputError("bad plan")
    data["inputs"] = input_stamps(plan_json)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_stamps(plan_json: dict[str, Any]) -> list[Any]:
    """The size and modification time of every file the run reads: the model directory's and the
    data files' (their ``path`` arguments), so that checkpoints and measured trials of a model or
    data set that changed since are not resumed."""
    paths = [(plan_json.get("model") or {}).get("args", {}).get("path")]
    paths += [(d.get("args") or {}).get("path") for d in plan_json.get("data") or ()]
    stamps: list[Any] = []
    for item in paths:
        if not isinstance(item, str):
            continue
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                info = f.stat()
            except OSError:
                stamps.append([str(f), None])
                continue
            stamps.append([str(f), info.st_size, info.st_mtime_ns])
    return stamps


def saved_work(out: Path) -> str | None:
    """What runs into ``out`` left to resume from, e.g. "2 completed stage checkpoints and 5
    measured search trials in DIR"; None when there is nothing."""
    work = WorkDir(out)
    what = _summary(len(work.completed()), len((read_json(work.path / TRIALS) or {}).get("trials") or {}))
    return f"{what} in {work.path}" if what else None


def read_json(path: Path) -> dict[str, Any] | None:
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
    return " and ".join(count_of(n, noun) for n, noun in ((stages, "completed stage checkpoint"),
                                                         (trials, "measured search trial")) if n)


def count_of(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _say(message: str) -> None:
    """A notice on stderr: what ``--force`` discards or keeps, shown even with ``--quiet``."""
    print(message, file=sys.stderr, flush=True)
