"""The ``size`` of a model directory: bytes of the files that hold the model itself."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

#: Files counted by ``size``; tokenizer and documentation files copied alongside are not.
MODEL_FILES = ("config.json", "squeeze.json")
WEIGHT_SUFFIX = ".safetensors"


def model_files(directory: Path, globs: Iterable[str] | None = None) -> list[Path]:
    """The files of ``directory`` that hold the model: those matching ``globs`` (an output
    format's ``model_files``), by default the weights, ``config.json`` and ``squeeze.json``."""
    directory = Path(directory)
    if globs is not None:
        return sorted({p for g in globs for p in directory.glob(g) if p.is_file()})
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIX)))


def artifact_bytes(directory: Path, globs: Iterable[str] | None = None) -> int:
    """Bytes on disk of the model files of ``directory`` (see ``model_files``)."""
    return sum(p.stat().st_size for p in model_files(directory, globs))
