"""A run launched by ``torchrun`` on several processes: what each rank does.

Every rank runs every stage: stages are deterministic, and a data-parallel stage (``distill``)
keeps the ranks' models equal. Rank 0 alone touches the disk and measures: it checks the output
directory, keeps the work directory (state and checkpoints), measures the original, each stage and
the saved artifact, saves and reports. The other ranks return after the last stage, having written
nothing.

Resuming: rank 0 opens the work directory as a single process does and sends the state it resumes
from to the other ranks over the process group (never through a file they could read while it is
rewritten); they load the same checkpoint, which an earlier run wrote whole before listing it. No
rank reads a checkpoint written during the current run, but after each stage every rank waits at a
``barrier`` until rank 0 has checkpointed and listed it: a rank that fails in the next stage makes
``torchrun`` stop them all, and must not stop rank 0 before the stage is kept. On several machines
the output's parent directory must be on a file system they all see.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from squeezelang.errors import SqueezeError
from squeezelang.executor.checkpoint import WorkDir, WorkState, checkpoint_name
from squeezelang.models.distributed import (World, barrier, broadcast_json, ensure_process_group,
                                            world)

__all__ = ["World", "barrier", "join", "single_process", "work_dir"]

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


def join() -> World:
    """This process's rank, the process group joined when ``torchrun`` started several."""
    return ensure_process_group()


def work_dir(out: Path, ranks: World) -> WorkDir:
    """The work directory of runs into ``out`` as rank ``ranks.rank`` uses it (see the module
    docstring); a plain ``WorkDir`` in one process."""
    if ranks.size == 1:
        return WorkDir(out)
    return _MainWorkDir(out) if ranks.main else _FollowerWorkDir(out)


def single_process(what: str) -> None:
    """Refuse ``what`` (something with no data-parallel meaning) under ``torchrun``."""
    ranks = world()
    if ranks.size > 1:
        raise SqueezeError(f"{what} runs in one process, not on {ranks.size} torchrun ranks: run "
                           "it without torchrun (its trials can run in parallel with `search { "
                           "workers = N, backend = \"process\" }` or on a Ray cluster with "
                           "`backend = \"ray\"`); the recipe.lock.squeeze it writes has no "
                           "`auto` left and runs under torchrun")


class _MainWorkDir(WorkDir):
    """Rank 0's work directory: a single process's, whose opened state the other ranks receive."""

    def open(self, fingerprint: str, force: bool) -> WorkState:
        state = super().open(fingerprint, force)
        broadcast_json(asdict(state))
        return state


class _FollowerWorkDir(WorkDir):
    """Another rank's view of the work directory: rank 0's state, and no writes."""

    def open(self, fingerprint: str, force: bool) -> WorkState:
        return WorkState(**broadcast_json())

    def save(self, state: WorkState) -> None:
        """Rank 0 saves the state."""

    def checkpoint(self, handle: ModelHandle, index: int, stage: str) -> str:
        """Rank 0 writes the checkpoint; its name is the same on every rank."""
        return checkpoint_name(index, stage)

    def mark_publishing(self) -> None:
        """Rank 0 publishes."""

    def remove(self) -> None:
        """Rank 0 removes the work directory once it has published."""

    def clear(self) -> None:
        """Rank 0 clears the work directory."""
