"""Make a packed model directory impossible to load wrongly with plain transformers.

A directory whose ``model.safetensors`` holds encoded tensors (int8/int4 codes, sparse bitmasks,
codebooks) or whose modules were replaced (low-rank factors, int8 kernels) cannot be read by
``from_pretrained``: the stored names are not the model's parameters, so transformers would build
the architecture, find none of its weights, initialise them at random and return a model whose
outputs are noise — with a warning at most. Plain ``AutoModel.from_pretrained(dir)`` and
``SentenceTransformer(dir)`` must fail loudly instead.

So the ``config.json`` of a packed directory carries a ``model_type`` that no transformers version
knows, and whose text tells the reader what to do: transformers refuses it with
"has model type `squeezelang-packed: load it with squeezelang.load(dir) …` but Transformers does not
recognize this architecture". The real model type is kept under ``squeezelang_model_type``, and
``hf.read_config`` gives every reader inside squeezelang the real config back; every other key stays
where transformers put it.
"""
from __future__ import annotations

from typing import Any

#: ``model_type`` of a packed directory: refused by transformers, and its text says what loads it.
PACKED_MODEL_TYPE = "squeezelang-packed: load it with squeezelang.load(dir), not transformers"
#: Where a packed ``config.json`` keeps the real ``model_type``.
REAL_TYPE_KEY = "squeezelang_model_type"


def is_packed(config: dict[str, Any]) -> bool:
    """Whether ``config`` (a ``config.json`` dict) is the config of a packed directory."""
    return config.get("model_type") == PACKED_MODEL_TYPE and REAL_TYPE_KEY in config


def pack_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ``model_type`` replaced by the marker that plain loaders refuse."""
    if is_packed(config):
        return dict(config)
    out = {"model_type": PACKED_MODEL_TYPE, REAL_TYPE_KEY: config.get("model_type")}
    out.update((k, v) for k, v in config.items() if k != "model_type")
    return out


def unpack_config(config: dict[str, Any]) -> dict[str, Any]:
    """The real config of a packed ``config`` (any other config is returned as it is)."""
    if not is_packed(config):
        return config
    out = {k: v for k, v in config.items() if k not in ("model_type", REAL_TYPE_KEY)}
    return {"model_type": config[REAL_TYPE_KEY], **out}


def config_text(config: dict[str, Any]) -> str:
    """``config`` as transformers writes a ``config.json`` (sorted keys, two-space indent)."""
    import json

    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def packed_config_extra_bytes(config: dict[str, Any]) -> int:
    """Bytes that packing adds to the ``config.json`` of a model of ``config`` (for estimates)."""
    plain = {"model_type": config.get("model_type"), "~": 0}  # "~" sorts last: both lines get a comma
    return len(config_text(pack_config(plain)).encode()) - len(config_text(plain).encode())
