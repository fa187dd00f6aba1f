"""What a run used: its peak resident memory, overall and at the end of each phase, and its CPU and
wall time, as the operating system counts them (torch-free: read from ``resource`` and ``/proc``)."""
from __future__ import annotations

import os
import sys
from typing import Any

#: ``ru_maxrss`` is in bytes on macOS, KiB elsewhere.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def high_water_bytes() -> int | None:
    """This process's peak resident memory since it started this program (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_bytes() -> int | None:
    """This process's peak resident memory so far: ``VmHWM`` where Linux gives it, else
    ``ru_maxrss``; None where the platform tells neither (Windows). See ``resources``."""
    own = high_water_bytes()
    if own is not None:
        return own
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


class PhaseMemory:
    """The process's memory at the end of each phase of a run, in the order the phases end: the
    peak reached so far (a running maximum, so a phase's own peak is its figure where that rose
    above the previous phase's) and the resident memory then (which shows what a phase freed)."""

    def __init__(self) -> None:
        self.peaks: dict[str, int | None] = {}
        self.resident: dict[str, int | None] = {}

    def mark(self, phase: str) -> None:
        """Record the memory as ``phase`` ends."""
        peak = peak_bytes()
        # the kernel counts resident pages per CPU in batches: a reading may fall a few pages
        # below an earlier one, and a running maximum never falls
        earlier = [p for p in self.peaks.values() if p is not None]
        self.peaks[phase] = None if peak is None else max([peak, *earlier])
        self.resident[phase] = rss_bytes()


def resources(wall_seconds: float, phases: PhaseMemory | None = None) -> dict[str, Any]:
    """What the run used: the peak resident memory (max RSS, bytes) of this process and of its
    finished child processes (a search's worker processes), the CPU seconds of both, and
    ``wall_seconds`` (the run's wall time, a search included); with ``phases``, this process's
    peak so far and its resident memory at the end of each phase (``phase_max_rss_bytes``,
    ``phase_rss_bytes``).

    The peaks and CPU times are the operating system's figures for the whole process so far: under
    ``squeeze run`` that is the command; through the API, whatever the calling process did before
    counts too. ``None`` where the platform has no ``resource`` module (Windows).

    This process's own peak is the kernel's high-water mark of its address space (``VmHWM``) where
    Linux gives it: ``ru_maxrss`` also keeps the peak of the process that started it, from before
    it ran this program (Linux carries it across ``fork`` and ``exec``), so a ``squeeze run``
    launched by a large process would report that process's memory as its own.
    """
    by_phase = {} if phases is None else {"phase_max_rss_bytes": dict(phases.peaks),
                                          "phase_rss_bytes": dict(phases.resident)}
    try:
        import resource
    except ImportError:
        return {"max_rss_bytes": None, "self_max_rss_bytes": None, "children_max_rss_bytes": None,
                "cpu_seconds": None, "wall_seconds": wall_seconds, **by_phase}
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = high_water_bytes()
    own = own if own is not None else me.ru_maxrss * _MAXRSS_UNIT
    if phases is not None:  # an earlier reading may exceed a later one by a few pages (``mark``)
        own = max([own, *(p for p in phases.peaks.values() if p is not None)])
    return {"max_rss_bytes": max(own, children.ru_maxrss * _MAXRSS_UNIT),
            "self_max_rss_bytes": own,
            "children_max_rss_bytes": children.ru_maxrss * _MAXRSS_UNIT,
            "cpu_seconds": me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime,
            "wall_seconds": wall_seconds, **by_phase}
