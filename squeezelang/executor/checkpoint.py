"""Per-stage checkpoints in a work directory beside the output, so an interrupted run resumes.

A process may be killed at any instruction, so nothing here is ever half-trusted: a checkpoint is
written into a temporary directory and renamed into place whole, and it counts as complete only once
``state.json`` (itself replaced atomically) lists it. Removing the work directory deletes
``state.json`` first, so a removal cut short leaves nothing a rerun would resume from.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.errors import OutputError
from squeezelang.executor.artifacts import write_json

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle

STATE = "state.json"


@dataclass
class WorkState:
    """What survives an interruption: the recipe's fingerprint and each completed stage."""

    fingerprint: str
    original_metrics: dict[str, float] | None = None
    completed: list[dict[str, Any]] = field(default_factory=list)  # {"stage", "dir", "metrics", "seconds"}


class WorkDir:
    """``.<output>.squeeze-work/`` next to the output directory."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.squeeze-work"

    def open(self, fingerprint: str, force: bool) -> WorkState:
        """The state to continue from: resumed if it is this recipe's, refused if another's."""
        state_file = self.path / STATE
        if state_file.is_file():
            try:
                data = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                data = {}
            if data.get("fingerprint") == fingerprint:
                completed = [c for c in data.get("completed", []) if (self.path / c["dir"]).is_dir()]
                return WorkState(fingerprint, data.get("original_metrics"), completed)
            if not force:
                raise OutputError(
                    f"{self.path} holds an unfinished run of a different recipe (or different "
                    f"settings) for the same output directory; use --force to discard it")
        if self.path.exists():
            state_file.unlink(missing_ok=True)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        state = WorkState(fingerprint)
        self.save(state)
        return state

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
        (self.path / STATE).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)


def fingerprint(plan_json: dict[str, Any]) -> str:
    """A stable hash of everything that determines the run's result (not where it is written)."""
    import hashlib

    data = {k: v for k, v in plan_json.items() if k not in ("output_dir",)}
    if not isinstance(data, dict):
        raise OutputError("bad plan")
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
