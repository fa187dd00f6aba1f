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


#: Dtype names of ``config.json`` and safetensors headers, as torch spells them.
_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def config_dtype(config: dict[str, Any]) -> str | None:
    """The dtype ``config.json`` names (``dtype``, or the older ``torch_dtype``), or None."""
    value = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(value, str) or value == "auto":
        return None
    return value.replace("torch.", "")


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """``{tensor name: dtype}`` from a safetensors file's JSON header, read without torch.

    The file starts with the header's length (8 bytes, little endian) and the header; dtypes come
    back as torch names (``bfloat16``), or as safetensors spells them (``I64``) for other kinds.
    """
    import struct

    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise SqueezeError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                           f"{exc}") from None
    return {name: _HEADER_DTYPES.get(info.get("dtype"), info.get("dtype"))
            for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


def checkpoint_dtype(directory: Path, config: dict[str, Any] | None = None) -> str:
    """The dtype ``load_pretrained`` gives a directory's floating weights, found without torch.

    As transformers' ``dtype="auto"``: the dtype ``config.json`` names, else that of the first
    floating tensor of the weight files (a checkpoint saved without it), else float32.
    """
    named = config_dtype(config if config is not None else read_config(directory))
    if named is not None:
        return named
    for path in sorted(Path(directory).glob("*.safetensors")):
        for dtype in safetensors_dtypes(path).values():
            if dtype in _HEADER_DTYPES.values():
                return dtype
    return "float32"


def load_pretrained(directory: Path, task: str) -> Any:
    """Load weights from a local directory (never the hub, never remote code), in eval mode.

    Only safetensors weights are read (never a pickle such as ``pytorch_model.bin``); they are checked
    first (``load.check_weight_files``), so a corrupt file or a NaN weight is named before loading.
    The weights keep the checkpoint's dtype (``dtype="auto"``, see ``checkpoint_dtype``): a
    bfloat16 model is computed on and saved in bfloat16, never silently widened to float32.
    """
    from squeezelang.models.load import check_weight_files

    cls = auto_class(task)
    check_weight_files(Path(directory))
    try:
        with no_progress_bars():
            model = cls.from_pretrained(str(directory), local_files_only=True,
                                        trust_remote_code=False, use_safetensors=True,
                                        **{_dtype_keyword(): "auto"})
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
    # the config's dtype, as a checkpoint of it loads (transformers 5 does so itself, 4 did not)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    extra = {_dtype_keyword(): dtype} if dtype is not None and dtype != "auto" else {}
    if meta:
        with torch.device("meta"):
            return cls.from_config(config, trust_remote_code=False, **extra)
    return cls.from_config(config, trust_remote_code=False, **extra).eval()


def _dtype_keyword() -> str:
    """The name of transformers' dtype argument: ``dtype`` since 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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
