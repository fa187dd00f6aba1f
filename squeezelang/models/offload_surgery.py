"""Structured surgery on an offloaded model, one block at a time.

``surgery.reshape_`` on a model in memory slices a copy of the whole state dict and builds the
shrunk model from it. On an offloaded model (``models.offload``) that would need the model in
memory twice; ``streamed_reshape_`` instead reads each kept block, slices it (``slice_block``,
the same function the in-memory path runs), and writes it under its new index to a file of its
own; the tensors outside the blocks are sliced together only when the hidden size changes (else
their stored tensors are used as they are). The shrunk model is then built on the meta device,
moved into the old model's object and offloaded from those files: a forward pass, a later stage
and the save read it unit by unit as before. Dropped blocks are never read.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from squeezelang.hooks.family import ModelFamily


def streamed_reshape_(model: Any, fam: ModelFamily, config: dict[str, Any], stack: str,
                      kept: Sequence[int], slice_block: Callable[[int, Any], None],
                      slice_outside: Callable[[Any], None] | None) -> Any:
    """``reshape_`` of an offloaded ``model``: blocks ``kept`` (old indices, in order) under
    ``stack`` (``"model.layers."``), each sliced by ``slice_block(old index, WeightState)``; the
    rest sliced by ``slice_outside(WeightState)`` when given. Returns ``model``, offloaded."""
    from safetensors.torch import save_file

    from squeezelang.models.load import parameters_on_meta
    from squeezelang.models.offload import Entry, attach_, resident, state_of
    from squeezelang.models.slicing import WeightState
    from squeezelang.models.surgery import dtype_of, get_path, move_into_, shrunk_model

    state = state_of(model)
    base = getattr(model, "base_model", model)
    blocks = list(get_path(base, fam.blocks))
    files = Path(tempfile.mkdtemp(prefix="squeeze-surgery-", dir=state.overlay.parent))
    cleanup = weakref.finalize(model, shutil.rmtree, str(files), True)
    entries: dict[str, Entry] = {}
    dtype = dtype_of(dict(model.named_parameters()))  # meta parameters keep their dtype

    def write(tag: str, tensors: dict[str, Any]) -> None:
        path = files / f"{tag}.safetensors"
        first: dict[Any, str] = {}  # a tied tensor is stored once, read under its first name
        for k, v in tensors.items():
            first.setdefault((v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else k, k)
        save_file({k: tensors[k].detach().contiguous() for k in first.values()}, str(path))
        entries.update({k: Entry(path, k, checked=True) for k in first.values()})

    try:
        for new_index, old_index in enumerate(kept):
            old = f"{stack}{old_index}."
            with resident(model, blocks[old_index], write=False):
                ws = WeightState({old + k: v.detach().clone()
                                  for k, v in blocks[old_index].state_dict().items()}, fam.conv1d)
            slice_block(old_index, ws)
            write(f"block-{new_index}", {f"{stack}{new_index}.{k[len(old):]}": v
                                         for k, v in ws.state.items()})
            del ws
        # outside the blocks: the other units' stored tensors, and what stays in memory
        outside_units = [u for u in state.units if not (u.prefix + ".").startswith(stack)]

        def outside() -> dict[str, Any]:
            """The tensors outside the blocks that are in memory now."""
            return {k: v for k, v in model.state_dict().items()
                    if not k.startswith(stack) and v.device.type != "meta"}

        if slice_outside is None:
            for unit in outside_units:
                entries.update({f"{unit.prefix}.{rel}": entry
                                for rel, entry in unit.entries.items()})
            write("rest", outside())
        else:
            with resident(model, *(u.module for u in outside_units), write=False):
                ws = WeightState({k: v.detach().clone() for k, v in outside().items()}, fam.conv1d)
            slice_outside(ws)
            write("outside", ws.state)
            del ws
        with parameters_on_meta():
            new = shrunk_model(model, fam, config, dtype)
        buffers = {k for k, _ in new.named_buffers()}
        persistent = {k: v for k, v in entries.items() if k in buffers}
        device, root = state.device, state.overlay.parent
        move_into_(model, new)
        attach_(model, {k: v for k, v in entries.items() if k not in persistent}, device, root)
        _load_buffers_(model, persistent)
    except BaseException:
        cleanup()  # else the files go with the model (the same object, offloaded from them)
        raise
    used = {entry.file for entry in entries.values()}
    for stale in state.overlay.glob("*.safetensors"):  # changed blocks since rewritten
        if stale not in used:
            stale.unlink(missing_ok=True)
    return model


def _load_buffers_(model: Any, entries: dict[str, Any]) -> None:
    """Persistent buffers (``position_ids``) read from their entries into the new model."""
    from safetensors import safe_open

    for name, entry in entries.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        with safe_open(str(entry.file), framework="pt") as f:
            value = f.get_tensor(entry.name)
        current = module._buffers[attr]
        if current is not None and tuple(current.shape) == tuple(value.shape):
            module._buffers[attr] = value.to(current.dtype)
