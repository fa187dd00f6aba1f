"""Give back a sentence-transformers model (pooling, normalisation and all) around a loaded model.

A sentence-transformers input directory (``modules.json``, ``1_Pooling/`` …) keeps those files in the
output, but a packed output cannot be opened with ``SentenceTransformer(dir)``: its ``config.json``
is marked so that plain loaders refuse it (``models.packed``). ``sentence_transformer`` builds the
same pipeline with sentence-transformers' own loading code on a scratch copy of the directory's
small files — the real config, the tokenizer, the module configs, and an empty weights file — and
then puts the model that ``load_model`` decoded in place of the transformer module's weights.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from squeezelang.errors import SqueezeError


def sentence_transformer(directory: Path, model: Any) -> Any:
    """A ``SentenceTransformer`` with the modules of ``directory`` and ``model`` as its transformer."""
    directory = Path(directory)
    if not (directory / "modules.json").is_file():
        raise SqueezeError(f"{directory}: not a sentence-transformers model (no modules.json); "
                           "load it with squeezelang.load(dir) as a transformers model")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SqueezeError("loading as a SentenceTransformer needs the sentence-transformers "
                           "package: pip install sentence-transformers") from None
    scratch = Path(tempfile.mkdtemp(prefix=".squeeze-st-"))
    try:
        _scratch_copy(directory, scratch)
        with _quiet():
            st = SentenceTransformer(str(scratch), device="cpu", local_files_only=True)
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{directory}: sentence-transformers cannot build the model's modules: "
                           f"{type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _set_transformer(st, model, directory)
    return st.eval()


def _scratch_copy(directory: Path, scratch: Path) -> None:
    """The directory's small files, its real config, and a weights file that holds no tensor."""
    from safetensors.torch import save_file

    from squeezelang.models.hf import read_config
    from squeezelang.models.packed import config_text
    from squeezelang.models.save import copy_aux_files

    copy_aux_files(directory, scratch)
    (scratch / "config.json").write_text(config_text(read_config(directory)), encoding="utf-8")
    save_file({}, str(scratch / "model.safetensors"), metadata={"format": "pt"})


def _set_transformer(st: Any, model: Any, directory: Path) -> None:
    """Put ``model`` in the pipeline's transformer module (``model``, or ``auto_model`` before
    sentence-transformers 6)."""
    for module in st:
        if isinstance(getattr(type(module), "auto_model", None), property) and hasattr(module, "model"):
            module.model = model
            return
        if hasattr(module, "auto_model"):
            module.auto_model = model
            return
    raise SqueezeError(f"{directory}: modules.json names no transformer module")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' missing-weights warning and progress bars off (the weights come after)."""
    from transformers.utils import logging

    from squeezelang.models.hf import no_progress_bars

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with no_progress_bars():
            yield
    finally:
        logging.set_verbosity(level)
