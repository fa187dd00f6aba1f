"""Hugging Face model directories: the class for each task, loading, and building from a config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from squeezelang.errors import SqueezeError

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
    return config


def load_pretrained(directory: Path, task: str) -> Any:
    """Load weights from a local directory (never the hub, never remote code), in eval mode.

    Only safetensors weights are read (never a pickle such as ``pytorch_model.bin``); they are checked
    first (``load.check_weight_files``), so a corrupt file or a NaN weight is named before loading.
    """
    from squeezelang.models.load import check_weight_files

    cls = auto_class(task)
    check_weight_files(Path(directory))
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                    use_safetensors=True)
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
        config = transformers.AutoConfig.for_model(**config)
    cls = auto_class(task)
    if meta:
        with torch.device("meta"):
            return cls.from_config(config, trust_remote_code=False)
    return cls.from_config(config, trust_remote_code=False).eval()


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as exc:
        raise SqueezeError(f"{directory}: cannot load the tokenizer: {type(exc).__name__}: {exc}") from None
