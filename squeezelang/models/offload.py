"""Offloaded models: weights that live in safetensors files and are in memory one block at a time.

``model = hf("dir", task = "causal-lm", offload = true)`` (or ``squeeze run --offload``) builds the
model with its parameters on the meta device and reads each *unit* (every block of the model's
block list, and every other module holding a large weight: the embeddings, the head) from the
files only while it runs: ``unit.forward`` is wrapped so that its weights are read (decoded
through their codecs, in the run's dtype, on its device) on entry and dropped on exit. A forward
pass of the whole model then holds one unit at a time, plus the small parameters that stay in
memory (norms, weights tied across units) and the activations.

A stage changes a unit only inside ``resident(model, module, ...)`` (``block_stats`` keeps each
block resident while its caller works on it): on leaving, a unit whose parameters changed (a new
tensor, or an in-place write: ``Tensor._version``) is written to the model's *overlay* directory
(a temporary directory, or one under the run's work directory) and read from there from then on;
the input files are never written. ``save_model`` streams an offloaded model unit by unit into
shards. Time spent reading, decoding and writing is counted in ``onload_seconds(model)``, which
the latency metric subtracts from each timed pass: an offloaded model's latency is its compute
time, not the disk's.

A technique that cannot work unit by unit (``Technique.blockwise_for`` false) gets the whole model
in memory: ``materialize_`` loads every unit and removes the wrappers, ``offload_again_`` writes
every unit to the overlay and puts them back.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle

#: A module outside the block list is a unit of its own from this many parameter elements on;
#: smaller ones (norms, biases) stay in memory.
UNIT_MIN_ELEMENTS = 1 << 20
ATTR = "_squeeze_offload"


@dataclass
class Entry:
    """Where one parameter is read from: stored tensors of a file, and their codec."""

    file: Path
    #: The name the stored tensors derive from (``codec.stored_names(name, spec)``).
    name: str
    spec: dict[str, Any] | None = None
    #: Its values were found finite (on the first read, or as written): not tested again.
    checked: bool = False

    @property
    def stored(self) -> list[str]:
        from squeezelang.models import codec

        return codec.stored_names(self.name, self.spec)


@dataclass
class Unit:
    prefix: str
    module: Any
    #: Parameter name relative to the unit -> where it is read from.
    entries: dict[str, Entry]
    #: Parameters tied to a module outside the unit: kept in memory, never dropped.
    shared: set[str] = field(default_factory=set)
    pins: int = 0
    #: Written back on its last release whatever its versions say (a ``resident`` that may
    #: change it: writes through ``.data`` leave no version behind).
    changing: bool = False
    #: While resident: ``{name: (id, version)}`` as read, to see whether a stage changed it.
    snapshot: dict[str, tuple[int, int]] | None = None
    forward: Any = None


@dataclass
class Offload:
    """What ``model._squeeze_offload`` holds."""

    units: list[Unit]
    device: str
    overlay: Path
    seconds: float = 0.0
    writes: int = 0
    _owned: Any = field(default=None, repr=False)


def state_of(model: Any) -> Offload | None:
    return getattr(model, ATTR, None)


def is_offloaded(model: Any) -> bool:
    """Whether ``model``'s units are read from files as they run (see the module docstring)."""
    state = state_of(model)
    return state is not None and bool(state.units)


def onload_seconds(model: Any) -> float:
    """Seconds ``model`` has spent reading, decoding and writing its offloaded units (0.0 for a
    model in memory): a timed pass subtracts what this grew by during it."""
    state = state_of(model)
    return state.seconds if state is not None else 0.0


def compute_device(model: Any) -> Any:
    """The device ``model`` computes on (an offloaded model's parameters are mostly on meta)."""
    import torch

    state = state_of(model)
    if state is not None:
        return torch.device(state.device)
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- units
def _block_list(model: Any) -> Any:
    """The model's block list: its longest ``ModuleList`` of modules with parameters."""
    import torch

    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                all(any(True for _ in m.parameters()) for m in module) and \
                (best is None or len(module) > len(best)):
            best = module
    return best


def _units(model: Any) -> list[tuple[str, Any]]:
    """``(prefix, module)`` of every unit: the blocks, then the large modules outside them."""
    blocks = _block_list(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = [(names[id(b)], b) for b in blocks] if blocks is not None else []
    inside = {id(m) for _, b in out for m in b.modules()}
    if blocks is not None:
        inside.add(id(blocks))
    for name, module in model.named_modules():
        if id(module) in inside or not name:
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own >= UNIT_MIN_ELEMENTS and not any(True for _ in module.children()):
            out.append((name, module))
    return out


def _owners(model: Any) -> dict[int, list[str]]:
    """Every parameter's names (tied ones have several)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _set_param(module: Any, name: str, tensor: Any, requires_grad: bool) -> None:
    import torch

    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=requires_grad)


def attach_(model: Any, entries: dict[str, Entry], device: str = "cpu",
            overlay_root: Path | None = None) -> Any:
    """Offload ``model`` (built with its parameters on meta): its units read from ``entries``
    (full parameter name -> where it is stored), every other parameter read now. Returns it."""
    import torch

    units = []
    owners = _owners(model)
    for prefix, module in _units(model):
        own: dict[str, Entry] = {}
        tied: set[str] = set()
        for rel, param in module.named_parameters(remove_duplicate=False):
            full = f"{prefix}.{rel}"
            if len(owners.get(id(param), ())) > 1:  # tied across modules: stays in memory
                tied.add(rel)
                continue
            if full not in entries:
                raise SqueezeError(f"offload: no stored tensor for '{full}'")
            own[rel] = entries[full]
        units.append(Unit(prefix, module, own, tied))
    overlay = Path(tempfile.mkdtemp(prefix="squeeze-offload-", dir=overlay_root))
    state = Offload(units, device, overlay)
    state._owned = weakref.finalize(model, shutil.rmtree, str(overlay), True)
    setattr(model, ATTR, state)
    in_units = {f"{u.prefix}.{rel}" for u in units for rel in u.entries}
    for name, param in model.named_parameters():
        if name in in_units:
            continue
        if name not in entries:
            raise SqueezeError(f"offload: no stored tensor for '{name}'")
        tensor = _read({name: entries[name]}, {name: param}, state)[name]
        _set_param(model, name, tensor, param.requires_grad)
    from squeezelang.models.load import retie_

    retie_(model, {alias: names[0] for names in owners.values() for alias in names[1:]})
    for unit in units:
        _wrap(unit, state)
    return model


def _wrap(unit: Unit, state: Offload) -> None:
    import functools

    original = unit.module.forward
    unit.forward = original

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with _pinned(unit, state):
            return original(*args, **kwargs)

    unit.module.forward = forward


def _unwrap(unit: Unit) -> None:
    if unit.forward is not None:
        unit.module.__dict__.pop("forward", None)
        unit.forward = None


def _read(entries: dict[str, Entry], like: dict[str, Any], state: Offload) -> dict[str, Any]:
    """``{name: tensor}`` read and decoded from ``entries``, each in the shape and dtype of its
    (meta) parameter in ``like``, on the run's device; ordinary tensors, not inference ones, so
    that a stage's in-place writes to them are seen."""
    import torch
    from safetensors import safe_open

    from squeezelang.models import codec
    from squeezelang.models.load import nonfinite

    by_file: dict[Path, list[str]] = {}
    for entry in entries.values():
        by_file.setdefault(entry.file, []).extend(entry.stored)
    stored: dict[str, Any] = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for n in names:
                    stored[n] = f.get_tensor(n)
        except Exception as exc:
            raise SqueezeError(f"{path}: cannot read the weights: {type(exc).__name__}: {exc}") from None
    out = {}
    with torch.inference_mode(False):
        for name, entry in entries.items():
            tensor = codec.decode(entry.name, stored, entry.spec, like[name].shape, like[name].dtype)
            if not entry.checked:
                problem = nonfinite(tensor)
                if problem:
                    raise SqueezeError(f"{entry.file}: tensor '{name}' holds {problem}")
                entry.checked = True
            out[name] = tensor.to(state.device)
    return out


def _onload(unit: Unit, state: Offload) -> None:
    started = time.perf_counter()
    params = dict(unit.module.named_parameters(remove_duplicate=False))
    read = _read(unit.entries, params, state)
    for rel, tensor in read.items():
        _set_param(unit.module, rel, tensor, params[rel].requires_grad)
    unit.snapshot = {rel: _stamp(p) for rel, p in _own(unit)}
    state.seconds += time.perf_counter() - started


def _own(unit: Unit) -> list[tuple[str, Any]]:
    """The unit's offloaded parameters in memory now (a stage may have replaced modules)."""
    return [(rel, p) for rel, p in unit.module.named_parameters(remove_duplicate=False)
            if p.device.type != "meta" and rel not in unit.shared]


def _stamp(param: Any) -> tuple[int, int]:
    return (id(param), param._version)


def _release(unit: Unit, state: Offload) -> None:
    """Drop the unit's weights, writing them to the overlay first if a stage changed them."""
    import torch

    started = time.perf_counter()
    own = _own(unit)
    now = {rel: _stamp(p) for rel, p in own}
    if unit.changing or now != unit.snapshot:
        _write(unit, own, state)
    unit.changing = False
    for rel, param in own:
        _set_param(unit.module, rel, torch.empty(param.shape, dtype=param.dtype, device="meta"),
                   param.requires_grad)
    del own, now
    unit.snapshot = None
    _trim()
    state.seconds += time.perf_counter() - started


def _trim() -> None:
    """Give the memory of the dropped weights back to the system (glibc keeps freed blocks under
    its mmap threshold, and that threshold grows with every large free)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _write(unit: Unit, own: list[tuple[str, Any]], state: Offload) -> None:
    from safetensors.torch import save_file

    from squeezelang.models.load import nonfinite

    tensors = {}
    for rel, param in own:
        problem = nonfinite(param.detach())
        if problem:
            raise SqueezeError(f"weight '{unit.prefix}.{rel}' holds {problem}")
        tensors[rel] = param.detach().to("cpu").contiguous()
    state.writes += 1
    path = state.overlay / f"{unit.prefix}.{state.writes}.safetensors"
    save_file(tensors, str(path))
    old = {e.file for e in unit.entries.values() if e.file.parent == state.overlay}
    unit.entries = {rel: Entry(path, rel, checked=True) for rel in tensors}
    for stale in old - {path}:
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _pinned(unit: Unit, state: Offload) -> Iterator[None]:
    import torch

    if unit.pins == 0:
        with torch.inference_mode(False):  # ordinary parameters: a stage's writes are seen
            _onload(unit, state)
    unit.pins += 1
    try:
        yield
    finally:
        unit.pins -= 1
        if unit.pins == 0:
            with torch.inference_mode(False):
                _release(unit, state)


def _units_of(state: Offload, modules: Iterable[Any]) -> list[Unit]:
    """The units holding, or held by, each of ``modules``."""
    found: list[Unit] = []
    for module in modules:
        inner = {id(m) for m in module.modules()}
        for unit in state.units:
            if unit in found:
                continue
            if id(unit.module) in inner or any(m is module for m in unit.module.modules()):
                found.append(unit)
    return found


@contextlib.contextmanager
def resident(model: Any, *modules: Any, write: bool = True) -> Iterator[None]:
    """Keep the units of ``modules`` (submodules of ``model``, or the model) in memory inside the
    block; on leaving, they are written to the overlay (with ``write = False``, only those whose
    parameters were replaced or written in place: a write through ``.data`` is not seen).
    Nothing for a model in memory."""
    state = state_of(model)
    if state is None or not state.units:
        yield
        return
    with contextlib.ExitStack() as stack:
        for unit in _units_of(state, modules or (model,)):
            stack.enter_context(_pinned(unit, state))
            unit.changing = unit.changing or write
        yield
    _drop_detached(model, state)


def _drop_detached(model: Any, state: Offload) -> None:
    """Forget the units whose module a stage removed or replaced (``set_module``): they are no
    longer read or saved; a module put in a unit's place stays in memory."""
    present = {id(m) for m in model.modules()}
    state.units = [unit for unit in state.units if id(unit.module) in present]


def materialize_(model: Any) -> None:
    """Every unit in memory and unwrapped: the model as a model in memory (``offload_again_``
    undoes it)."""
    import torch

    state = state_of(model)
    if state is None:
        return
    for unit in state.units:
        _unwrap(unit)
        if unit.pins == 0:
            with torch.inference_mode(False):
                _onload(unit, state)
        unit.pins += 1
        unit.changing = True  # a stage on the whole model may write through ``.data``


def offload_again_(model: Any) -> None:
    """Undo ``materialize_``: units written to the overlay (where changed) and wrapped again. A
    unit the stage removed from the model is dropped; a module the stage added stays in memory."""
    import torch

    state = state_of(model)
    if state is None:
        return
    _drop_detached(model, state)
    for unit in state.units:
        unit.pins = max(unit.pins - 1, 0)
        if unit.pins == 0:
            with torch.inference_mode(False):
                _release(unit, state)
        _wrap(unit, state)


def unit_states(model: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(prefix, {full name: tensor})`` of every unit in turn, each resident while its caller
    holds it; then ``("", ...)`` the tensors outside the units (state-dict order within each)."""
    state = state_of(model)
    units = state.units if state is not None else []
    done: set[str] = set()
    for unit in units:
        with _pinned(unit, state):
            part = {f"{unit.prefix}.{k}": v for k, v in unit.module.state_dict().items()}
            done |= set(part)
            yield unit.prefix, part
    # the rest: parameters and persistent buffers outside the units
    rest = {}
    for name, tensor in model.state_dict().items():
        if name not in done and tensor.device.type != "meta":
            rest[name] = tensor
    yield "", rest


def entries_from_files(directory: Path, codecs: dict[str, Any] | None = None,
                       names: Iterable[str] = ()) -> dict[str, Entry]:
    """Where every parameter of ``names`` is stored among ``directory``'s ``*.safetensors``
    (through its codec in ``codecs``); a missing one is an error naming it."""
    from squeezelang.models import codec
    from squeezelang.models.hf import safetensors_dtypes

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise SqueezeError(f"{directory}: no *.safetensors weights to offload from")
    where: dict[str, Path] = {}
    for path in files:
        for stored in safetensors_dtypes(path):
            where.setdefault(stored, path)
    codecs = codecs or {}
    out = {}
    missing = []
    for name in names:
        spec = codecs.get(name)
        stored = codec.stored_names(name, spec)
        if not all(n in where for n in stored):
            missing.append(name)
            continue
        out[name] = Entry(where[stored[0]], name, spec or None)
    if missing:
        raise SqueezeError(f"{directory}: no stored tensor for {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                           + " (offloading reads each parameter under its own name)")
    return out


def load_offloaded(directory: Path, task: str, device: str = "cpu",
                   codecs: dict[str, Any] | None = None, overlay_root: Path | None = None,
                   model: Any = None) -> Any:
    """The model of ``directory`` (a transformers checkpoint, or a squeezelang artifact's
    ``model`` built by ``load_model`` on meta with ``codecs``), offloaded."""
    from squeezelang.models.load import parameters_on_meta

    if model is None:
        with parameters_on_meta():
            from squeezelang.models.load import _build

            model = _build(Path(directory), task)
    names = [n for n, _ in model.named_parameters()]  # tied ones under their first name
    entries = entries_from_files(Path(directory), codecs, names)
    return attach_(model.eval(), entries, device, overlay_root)
