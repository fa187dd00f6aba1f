"""Run a third-party evaluation library (lm-evaluation-harness, MTEB) inside a metric without it
reaching the network or changing the run's state.

Both libraries were written to fetch their data from the Hugging Face hub and to seed the global
random generators; a metric hands them its rows itself. ``contained`` sets the hub's offline
switches while the library is imported and runs (``datasets`` and ``huggingface_hub`` read them at
import), puts back the states of Python's, NumPy's and torch's generators afterwards (MTEB seeds
all three when it builds a task, which would otherwise change what a later stage draws), turns the
library's loggers down to errors and, for a quiet run, keeps its progress bars off stderr.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import sys
from typing import Iterator

#: The environment switches that keep ``datasets``, ``huggingface_hub`` and ``transformers`` local.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def contained(*loggers: str, quiet: bool = False) -> Iterator[None]:
    """Offline, generator states kept, ``loggers`` at ERROR, stderr swallowed when ``quiet``."""
    saved_env = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    states = _rng_states()
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _restore_rng(states)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rng_states() -> dict[str, object]:
    states: dict[str, object] = {"random": random.getstate()}
    if "numpy" in sys.modules:
        import numpy

        states["numpy"] = numpy.random.get_state()
    if "torch" in sys.modules:
        import torch

        states["torch"] = torch.random.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, object]) -> None:
    random.setstate(states["random"])  # type: ignore[arg-type]
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])  # type: ignore[arg-type]
    if "torch" in states:
        import torch

        torch.random.set_rng_state(states["torch"])  # type: ignore[arg-type]
        if "cuda" in states:
            torch.cuda.set_rng_state_all(states["cuda"])  # type: ignore[arg-type]
