"""A search's measured trials kept in the work directory, so a search run again after an interrupt
does not measure them again.

``trials.json`` sits in the run's work directory (``executor.checkpoint.WorkDir``) beside the stage
checkpoints, keyed by the recipe's fingerprint: another recipe's log is refused, or with ``force``
discarded after saying so.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.executor.artifacts import write_json
from squeezelang.executor.checkpoint import STATE, TRIALS, WorkDir, count_of, fingerprint, read_json

if TYPE_CHECKING:
    from squeezelang.planner.plan import Plan
    from squeezelang.search.workers import Backend, TrialJob, TrialOutcome


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
        data = read_json(path)
        if data is not None and data.get("fingerprint") == key:
            entries = dict(data.get("trials") or {})
            if entries and not quiet:
                print(f"resuming the search: {count_of(len(entries), 'trial')} of this recipe "
                      f"measured before ({path}) are not run again", flush=True)
            return cls(path, key, entries)
        if data is not None or read_json(work.path / STATE) is not None:
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
        from squeezelang.search.workers import TrialOutcome

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


