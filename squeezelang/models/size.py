"""The ``size`` of a model directory: bytes of the files that hold the model itself."""
from __future__ import annotations

from pathlib import Path

#: Files counted by ``size``; tokenizer and documentation files copied alongside are not.
MODEL_FILES = ("config.json", "squeeze.json")
WEIGHT_SUFFIX = ".safetensors"


def model_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIX)))


def artifact_bytes(directory: Path) -> int:
    """Bytes on disk of the weights, ``config.json`` and ``squeeze.json`` of ``directory``."""
    return sum(p.stat().st_size for p in model_files(directory))
