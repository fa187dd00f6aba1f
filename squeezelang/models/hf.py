"""Hugging Face model directories: the class for each task, loading, and building from a config."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from squeezelang.errors import SqueezeError
from squeezelang.models.packed import is_packed, unpack_config

_AUTO_CLASS = {
    "embedding": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "classification": "AutoModelForSequenceClassification",
}


def auto_class(task: str) -> Any:
    import transformers

    if task not in _AUTO_CLASS:
        raise SqueezeError(f"unknown task '{task}' (expected one of {', '.join(_AUTO_CLASS)})")
    return getattr(transformers, _AUTO_CLASS[task])


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of ``directory`` as a dict; a packed one (``models.packed``) unpacked."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SqueezeError(f"{path}: no config.json — not a transformers model directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise SqueezeError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise SqueezeError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return unpack_config(config)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Turn transformers' "Loading weights" / "Writing model shards" bars off for a block: a
    search loads and saves a model per trial, and the bars would repeat for every one."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def load_pretrained(directory: Path, task: str) -> Any:
    """Load weights from a local directory (never the hub, never remote code), in eval mode.

    Only safetensors weights are read (never a pickle such as ``pytorch_model.bin``); they are checked
    first (``load.check_weight_files``), so a corrupt file or a NaN weight is named before loading.
    """
    from squeezelang.models.load import check_weight_files

    cls = auto_class(task)
    check_weight_files(Path(directory))
    try:
        with no_progress_bars():
            model = cls.from_pretrained(str(directory), local_files_only=True,
                                        trust_remote_code=False, use_safetensors=True)
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{directory}: cannot load a '{task}' model: {type(exc).__name__}: {exc}") from None
    return model.eval()


def from_config(config: Any, task: str, meta: bool = False) -> Any:
    """A model of ``config``'s architecture with fresh weights (on the meta device if ``meta``)."""
    import torch
    import transformers

    if isinstance(config, dict):
        config = config_from_dict(config)
    cls = auto_class(task)
    if meta:
        with torch.device("meta"):
            return cls.from_config(config, trust_remote_code=False)
    return cls.from_config(config, trust_remote_code=False).eval()


def config_from_dict(config: dict[str, Any]) -> Any:
    """The transformers config object of a ``config.json`` dict (as ``from_pretrained`` reads it)."""
    import transformers

    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"model type {model_type!r} is not one this transformers version knows")
    return transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))


def load_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer; a packed directory's tokenizer gets the real config, which
    ``AutoTokenizer`` would otherwise read (and refuse) to find the tokenizer class."""
    from transformers import AutoTokenizer

    extra: dict[str, Any] = {}
    try:
        raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
        if isinstance(raw, dict) and is_packed(raw):
            extra["config"] = config_from_dict(unpack_config(raw))
    except (OSError, ValueError):
        pass  # no or unreadable config: AutoTokenizer says what it needs
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                             trust_remote_code=False, **extra)
    except Exception as exc:
        raise SqueezeError(f"{directory}: cannot load the tokenizer: {type(exc).__name__}: {exc}") from None
