"""Save a ``ModelHandle`` as a model directory: ``config.json``, ``model.safetensors``, ``squeeze.json``.

Without codecs and edits the directory is a plain transformers checkpoint (``save_pretrained``).
Otherwise the weights are written through their codecs (``models.codec``), ``squeeze.json``
records what ``load_model`` needs to rebuild the model: codecs, edits, states, and the
``config.json`` is marked as packed (``models.packed``) so that plain transformers and
sentence-transformers refuse the directory instead of loading random weights. Tensors shared under
several names (GPT-2's ``lm_head.weight`` tied to ``transformer.wte.weight``) are stored once, under
the first name in state-dict order, as transformers does; loading fills the others from the model's
own tying. The other files of the source directory (tokenizer, ``modules.json``, ``1_Pooling/…``,
README) are copied alongside.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from squeezelang.errors import SqueezeError
from squeezelang.models import codec

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle

WEIGHTS_FILE = "model.safetensors"
SQUEEZE_FILE = "squeeze.json"
#: Weight files of any framework: never copied from the source (the saved weights replace them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
#: Top-level files the save itself writes (or that describe another run), never copied.
OWN_FILES = frozenset({"config.json", SQUEEZE_FILE, "generation_config.json",
                       "model.safetensors.index.json", "pytorch_model.bin.index.json"})
#: Tokenizer files: copied from the source unless the stage rewrote the tokenizer.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model", "chat_template.jinja", "chat_template.json"})


def save_model(handle: ModelHandle, directory: Path) -> list[str]:
    """Write ``handle`` into ``directory`` (created if needed); return the relative paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    before = _snapshot(directory)
    from squeezelang.models.offload import is_offloaded

    if is_offloaded(handle.model):
        _save_shards(handle, directory)
    elif not handle.codecs and not handle.edits:
        _save_plain(handle, directory)
    else:
        _save_encoded(handle, directory)
    if handle.codecs or handle.edits or handle.states:
        aliases = _aliases(handle.model.state_dict())
        codecs = {aliases.get(k, k): codec.normalize(v) for k, v in sorted(handle.codecs.items())}
        doc = codec.squeeze_json_doc(handle.task, {k: v for k, v in codecs.items() if v},
                                     handle.edits, handle.states)
        _atomic_write_text(directory / SQUEEZE_FILE, codec.squeeze_json_dumps(doc))
    # A rewritten tokenizer, or one of an in-memory model with no source directory, is saved as is.
    if handle.tokenizer is not None and (handle.tokenizer_changed or handle.source_dir is None):
        handle.tokenizer.save_pretrained(str(directory))
    if handle.source_dir is not None:
        copy_aux_files(Path(handle.source_dir), directory,
                       skip_tokenizer=handle.tokenizer_changed)
        sync_pooling_config(directory, getattr(handle.model.config, "hidden_size", None))
    after = _snapshot(directory)
    return sorted(p for p, stamp in after.items() if before.get(p) != stamp)


# ---------------------------------------------------------------------------- weights
def _save_plain(handle: ModelHandle, directory: Path) -> None:
    from squeezelang.models.hf import no_progress_bars

    try:
        with no_progress_bars():
            handle.model.save_pretrained(str(directory), safe_serialization=True)
    except Exception as exc:
        raise SqueezeError(f"{directory}: cannot save the model: {type(exc).__name__}: {exc}") from None


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for tensors the state dict holds under several names."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = _storage_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def encoded_state(handle: ModelHandle) -> dict[str, torch.Tensor]:
    """The stored tensors of ``handle``'s state dict under its codecs (tied tensors once)."""
    state = handle.model.state_dict()
    aliases = _aliases(state)
    unknown = sorted(set(handle.codecs) - set(state))
    if unknown:
        raise SqueezeError(f"codecs name tensors the model does not have: {', '.join(unknown[:5])}"
                           " (a stage replaced a module without updating handle.codecs)")
    specs: dict[str, Any] = {}
    for name, spec in handle.codecs.items():
        target = aliases.get(name, name)
        if spec and specs.get(target) not in (None, spec):
            raise SqueezeError(f"tied tensors '{name}' and '{target}' have different codecs")
        if spec:
            specs[target] = spec
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in aliases:
            continue
        for stored, t in codec.encode(name, tensor, specs.get(name)).items():
            if stored in out:
                raise SqueezeError(f"stored tensor name '{stored}' is produced twice")
            out[stored] = t.contiguous()
    return out


def _save_encoded(handle: ModelHandle, directory: Path) -> None:
    from safetensors.torch import save_file

    tensors = encoded_state(handle)
    _write_config(handle, directory)
    target = directory / WEIGHTS_FILE
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    _refuse_link(target)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise SqueezeError(f"{target}: cannot write the weights: {type(exc).__name__}: {exc}") from None


def _write_config(handle: ModelHandle, directory: Path) -> None:
    model = handle.model
    try:
        _config_with_dtype(model).save_pretrained(str(directory))
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(str(directory))
    except Exception as exc:
        raise SqueezeError(f"{directory}: cannot write the config: {type(exc).__name__}: {exc}") from None
    if handle.edits or any(handle.codecs.values()):
        _pack_config(directory / "config.json")


def _save_shards(handle: ModelHandle, directory: Path) -> None:
    """An offloaded model (``models.offload``), one shard per unit, each read, encoded and
    written in turn (then the tensors outside the units), with transformers' shard index: the
    whole model is never in memory."""
    from safetensors.torch import save_file

    from squeezelang.models.load import tied_parameters
    from squeezelang.models.offload import state_of, unit_states

    model = handle.model
    _write_config(handle, directory)
    aliases = tied_parameters(model)
    unknown = sorted(set(handle.codecs) - set(model.state_dict()))
    if unknown:
        raise SqueezeError(f"codecs name tensors the model does not have: {', '.join(unknown[:5])}")
    specs = {aliases.get(k, k): v for k, v in handle.codecs.items() if v}
    count = len(state_of(model).units) + 1
    weight_map: dict[str, str] = {}
    total = 0
    for index, (_, part) in enumerate(unit_states(model)):
        tensors: dict[str, Any] = {}
        for name, tensor in part.items():
            if name in aliases:
                continue
            for stored, t in codec.encode(name, tensor, specs.get(name)).items():
                tensors[stored] = t.contiguous()
        part.clear()
        shard = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        _refuse_link(directory / shard)
        tmp = directory / (shard + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, directory / shard)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise SqueezeError(f"{directory / shard}: cannot write the weights: "
                               f"{type(exc).__name__}: {exc}") from None
        for stored, t in tensors.items():
            weight_map[stored] = shard
            total += t.numel() * t.element_size()
    _atomic_write_text(directory / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _config_with_dtype(model: Any) -> Any:
    """``model``'s config naming the dtype its weights are in, as ``save_pretrained`` writes it:
    ``load_model`` builds the model in that dtype and decodes the stored tensors into it."""
    import copy

    config = model.config
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    named = getattr(config, "dtype", None)
    name = str(dtype).replace("torch.", "")
    # a config naming no dtype loads in float32 (and is left as it was for float32 weights)
    if dtype is None or named in (dtype, name) or (named is None and name == "float32"):
        return config
    config = copy.deepcopy(config)
    config.dtype = name
    return config


def _pack_config(path: Path) -> None:
    """Mark the ``config.json`` of a packed directory so that plain loaders refuse it
    (``models.packed``)."""
    from squeezelang.models.packed import config_text, pack_config

    config = json.loads(path.read_text(encoding="utf-8"))
    _atomic_write_text(path, config_text(pack_config(config)))


# ---------------------------------------------------------------------------- other files
def _is_within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _allowed_roots(source: Path) -> list[Path]:
    """Where the source's symlinks may point: inside it, or a Hugging Face cache's ``blobs/``."""
    root = source.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def sync_pooling_config(directory: Path, hidden: int | None) -> None:
    """Keep sentence-transformers' pooling width equal to a (possibly pruned) hidden size."""
    path = directory / "1_Pooling" / "config.json"
    if hidden is None or not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if config.get("word_embedding_dimension") not in (None, hidden):
        config["word_embedding_dimension"] = hidden
        _atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def copy_aux_files(source: Path, directory: Path, skip_tokenizer: bool = False) -> list[str]:
    """Copy ``source``'s non-weight files into ``directory``; return the relative paths copied.

    Skips weight files, the files ``save`` writes itself, hidden files, reports of another run, and
    symlinks that point outside ``source``. Never writes outside ``directory``.
    """
    source = Path(source)
    if not source.is_dir():
        return []
    roots = _allowed_roots(source)
    dest_root = directory.resolve()
    copied = []
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and _is_within((here / d).resolve(), roots)
                             and (here / d).resolve() != dest_root)
        for fname in sorted(filenames):
            src = here / fname
            rel = src.relative_to(source)
            top = len(rel.parts) == 1
            if (fname.startswith(".") or fname.endswith(WEIGHT_SUFFIXES) or fname.endswith(".squeeze")
                    or (top and (fname in OWN_FILES or fname.startswith("report.")))
                    or (top and skip_tokenizer and fname in TOKENIZER_FILES)):
                continue
            real = src.resolve()
            if not real.is_file() or not _is_within(real, roots):
                continue
            dest = directory / rel
            if not _is_within(dest.parent.resolve(), [dest_root]):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            if dest.exists() and dest.resolve() == real:
                continue
            shutil.copyfile(real, dest)
            copied.append(rel.as_posix())
    return copied


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        path.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    _refuse_link(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[p.relative_to(directory).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out
