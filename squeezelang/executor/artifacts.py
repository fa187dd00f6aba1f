"""Atomic output: everything is written into a temporary sibling directory, then renamed into place."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from squeezelang.errors import OutputError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output directory unless ``force``; refuse a file in its place."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output directory {out} exists and is not empty; "
                          "use --force to replace it (it is only replaced once the new run succeeds)")


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write into {out.parent}")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish(staged: Path, out: Path) -> None:
    """Move ``staged`` into place as ``out``; a previous ``out`` is removed only after the move."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(out, backup)
    try:
        os.replace(staged, out)
    except OSError:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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
