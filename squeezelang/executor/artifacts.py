"""Atomic output: everything is written into a temporary sibling directory, then renamed into place.

The temporary (``.<out>.tmp-<pid>-…``, a search's ``.<out>.trials-<pid>-…``) and backup
(``.<out>.old-<pid>``) siblings carry the id of the process that made them, so that a later run can
tell those of a killed process from those of a live one and clean them up (``recover``).

Temporary directories are private (``mkdtemp`` makes them 0700, and safetensors writes its files
0600); ``publish`` gives the artifact the modes of any file the user writes before it appears.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from squeezelang.errors import OutputError

#: In the work directory while a run publishes: the output beside it is that run's to replace.
PUBLISHING = "publishing"


def work_dir(out: Path) -> Path:
    """The work directory of runs into ``out`` (checkpoints, a search's trial log), beside it."""
    return out.parent / f".{out.name}.squeeze-work"


def check_output_dir(out: Path, force: bool, inputs: Iterable[str | Path] = (),
                     announce: bool = True) -> None:
    """Refuse an existing non-empty output directory unless ``force``; refuse a file in its place.

    Also refuse, even with ``force``, an output directory that is or holds one of ``inputs`` (the
    model directory, the recipe, the data files): replacing it would destroy them. A run that was
    stopped while it published (its work directory says so) may replace the output without
    ``force``: the same command resumes it. With ``force`` and ``announce``, say on stderr which
    previous output is replaced.
    """
    out = Path(out).expanduser().resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == out or out in path.parents:
            raise OutputError(f"output directory {out} holds an input of the run ({path}); "
                              "choose another output directory (it is replaced as a whole)")
    recover(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    previous = out.is_dir() and any(out.iterdir())
    if previous and not force and not (work_dir(out) / PUBLISHING).is_file():
        raise OutputError(f"output directory {out} exists and is not empty; "
                          "use --force to replace it (it is only replaced once the new run succeeds)")
    if previous and force and announce:
        files = sum(1 for p in out.rglob("*") if not p.is_dir())
        print(f"--force: discarding the previous output {out} ({files} file{'s' * (files != 1)}) "
              "once this run succeeds", file=sys.stderr, flush=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent} for the output: {exc.strerror or exc}") from None
    # Checked before any work: the checkpoints and the staged output are written next to ``out``.
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {out.parent}, where the output {out.name} and its work "
                          "directory go (permission denied or a read-only file system)")


_SIBLING = re.compile(r"(tmp|trials|old)-(\d+)(-.*)?")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no harmless liveness probe there: treat the process as running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> None:
    """Clean up after killed runs into ``out``: remove their staging directories, and put back a
    previous output that a kill caught between the two renames of ``publish``."""
    prefix = f".{out.name}."
    try:
        names = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    backups = []
    for path in names:
        match = _SIBLING.fullmatch(path.name[len(prefix):])
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old":
            backups.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if backups and not out.exists():
        newest = max(backups, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)
        backups.remove(newest)
    for path in backups:  # the new output did replace these
        shutil.rmtree(path, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write into {out.parent}")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def discard_staging(out: Path) -> None:
    """Remove this process's staging directories for ``out``, even one whose creation an interrupt
    cut short before its path was returned."""
    prefix = f".{out.name}.tmp-{os.getpid()}-"
    for path in out.parent.iterdir() if out.parent.is_dir() else ():
        if path.name.startswith(prefix):
            shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, out: Path) -> None:
    """Move ``staged`` into place as ``out``; a previous ``out`` is removed only after the move."""
    share_modes(staged)
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(out, backup)
    try:
        os.replace(staged, out)
    except BaseException:  # an error or an interrupt: the previous output goes back in place
        if backup is not None and not out.exists():
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def share_modes(root: Path) -> None:
    """Give ``root`` and what it holds the modes of anything the user writes: directories (and
    executable files) ``0777 & ~umask``, other files ``0666 & ~umask``. Symlinks are left alone."""
    mask = umask()
    paths = [Path(root)]
    for directory, dirs, files in os.walk(root):  # never descends a symlinked directory
        paths += [Path(directory, name) for name in dirs + files]
    for path in paths:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode):
            full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
            os.chmod(path, full & ~mask)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def confined(base: Path, name: str) -> Path:
    """``base / name``, refusing names that escape ``base`` (``..``, absolute paths, symlinks)."""
    target = (base / name).resolve()
    if not target.is_relative_to(base.resolve()):
        raise OutputError(f"artifact name {name!r} would be written outside {base}")
    return target
