"""A disk cache of the meta-data a model source builds from a ``config.json``.

Building a model on torch's meta device is cheap, but importing torch and transformers' model code
to do it is not: about 3 s of the 3.3 s ``squeeze plan`` takes for all-MiniLM-L6-v2 on 2 cores. The
meta-data depends only on the config, the task and the versions of the code that built it, so it
is kept as JSON under ``$SQUEEZE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/squeezelang``, else
``~/.cache/squeezelang``) in ``meta/<key>.json``, where the key hashes all of those. A later plan of
the same model reads it back without importing torch. (For the families that describe their
layout, every built-in one, ``layout_meta`` computes the meta-data from the config even on a first
plan, which never reaches this cache.)

The cache never decides anything a fresh build would not: an entry whose key differs is simply
another file, an unreadable or malformed entry is rebuilt, and writes go through a temporary file
and a rename, so a reader never sees half an entry. ``SQUEEZE_CACHE_DIR=off`` turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

from squeezelang.models.meta import ModelMeta, ModuleMeta, TensorMeta

T = TypeVar("T")

#: Bumped whenever ``ModelMeta``'s fields or ``meta_from_model`` change what they record.
FORMAT = 2
_PACKAGES = ("squeezelang", "torch", "transformers")


def cache_dir() -> Path | None:
    """The cache's root, or ``None`` when ``SQUEEZE_CACHE_DIR`` is ``off``."""
    configured = os.environ.get("SQUEEZE_CACHE_DIR")
    if configured:
        return None if configured.lower() in ("off", "0", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "squeezelang"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(*parts: bytes | str) -> str:
    """A key for what a cached value depends on: ``parts`` and the versions of the code."""
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for package in _PACKAGES:
        digest.update(f"{package} {_version(package)}\n".encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:32]


def to_json(meta: ModelMeta) -> dict[str, Any]:
    return {"task": meta.task, "config": meta.config,
            "modules": [[m.name, m.kind, m.tensors] for m in meta.modules.values()],
            "tensors": [[name, list(t.shape), t.dtype, t.codec] for name, t in meta.tensors.items()],
            "states": sorted(meta.states), "notes": meta.notes}


def from_json(data: dict[str, Any]) -> ModelMeta:
    return ModelMeta(
        task=data["task"], config=data["config"],
        modules={name: ModuleMeta(name, kind, list(tensors)) for name, kind, tensors in data["modules"]},
        tensors={name: TensorMeta(tuple(int(d) for d in shape), dtype, codec)
                 for name, shape, dtype, codec in data["tensors"]},
        states=set(data["states"]), notes=list(data["notes"]))


def cached_json(namespace: str, key: str, build: Callable[[], Any],
                decode: Callable[[Any], T] = lambda value: value) -> T:
    """``decode`` of the JSON value stored under ``namespace/key``, else of ``build()``'s value,
    stored. Either way the value is decoded as read back from JSON, so a first and a cached call
    give the same; an entry that cannot be read or decoded is built and stored again."""
    root = cache_dir()
    entry = root / namespace / f"{key}.json" if root is not None else None
    if entry is not None:
        try:
            return decode(json.loads(entry.read_text(encoding="utf-8"))["value"])
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            pass  # absent, unreadable or malformed: build it again
    value = build()
    try:
        text = json.dumps({"value": value})
    except (TypeError, ValueError):  # values JSON cannot hold: not cached
        return decode(value)
    if entry is not None:
        _write(entry, text)
    return decode(json.loads(text)["value"])


def cached_meta(key: bytes | str, task: str, build: Callable[[], ModelMeta]) -> ModelMeta:
    """The meta-data of the model that ``key`` (a config file's bytes, a config's JSON) describes
    for ``task``: read from the cache, else ``build()`` and stored. ``overhead_bytes`` is not cached
    (it depends on the directory's other files)."""
    return cached_json("meta", cache_key("meta", task, key), lambda: to_json(build()), from_json)


def _write(entry: Path, text: str) -> None:
    """Store an entry atomically; a read-only or full cache directory costs speed, never the plan."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".tmp", dir=entry.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, entry)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
