"""Model meta-data for estimates: every saved tensor's shape, dtype and codec, without weights.

``squeeze plan`` builds a ``ModelMeta`` from a model created on torch's meta device, and each stage's
``Technique.estimate`` returns a transformed copy; the predicted size is ``size_bytes()``.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class TensorMeta:
    """A saved tensor: its shape, the dtype it is stored in when dense (the checkpoint's, such as
    ``bfloat16``; ``codec.stored_bytes`` counts it) and its codec."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    codec: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class ModuleMeta:
    """A module that owns tensors; ``kind`` is the class name (``Linear``, ``Embedding``, …)."""

    name: str
    kind: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class ModelMeta:
    task: str
    config: dict[str, Any]
    modules: dict[str, ModuleMeta] = field(default_factory=dict)
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    states: set[str] = field(default_factory=set)
    #: Bytes of files saved next to the weights that count towards ``size`` (config, codec index).
    overhead_bytes: int = 0
    #: Edit records the saved ``squeeze.json`` will hold (``add_edit``): an edited model is packed.
    edits: int = 0
    #: Caveats of an estimate (assumptions a technique had to make without weights).
    notes: list[str] = field(default_factory=list)

    def copy(self) -> ModelMeta:
        """A deep copy that an estimate may change freely.

        Built field by field rather than by ``copy.deepcopy``: planning copies the meta-data for
        every stage of every candidate setting, and the generic deep copy was most of its time.
        """
        if type(self) is not ModelMeta:  # a subclass may hold more than this knows to copy
            return copy.deepcopy(self)
        return ModelMeta(
            task=self.task, config=copy.deepcopy(self.config),
            modules={name: (ModuleMeta(m.name, m.kind, list(m.tensors)) if type(m) is ModuleMeta
                            else copy.deepcopy(m)) for name, m in self.modules.items()},
            tensors={name: (TensorMeta(copy.copy(t.shape), t.dtype, copy.deepcopy(t.codec))
                            if type(t) is TensorMeta else copy.deepcopy(t))
                     for name, t in self.tensors.items()},
            states=set(self.states), overhead_bytes=self.overhead_bytes, edits=self.edits,
            notes=list(self.notes))

    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def add_edit(self, record: dict[str, Any]) -> None:
        """Count an edit record that the stage will write into ``squeeze.json`` (its bytes, and
        that the saved directory is packed)."""
        from squeezelang.models.codec import edit_bytes

        self.overhead_bytes += edit_bytes(record)
        self.edits += 1

    @property
    def packed(self) -> bool:
        """Whether the saved directory is packed (``models.packed``): encoded tensors or edits."""
        return bool(self.edits) or any(t.codec for t in self.tensors.values())

    def size_bytes(self) -> int:
        """Predicted ``artifact_bytes`` of the saved model: ``overhead_bytes`` + ``modeled_bytes()``."""
        return self.overhead_bytes + self.modeled_bytes()

    def modeled_bytes(self) -> int:
        """Bytes that follow from the tensors: data, safetensors header entries, ``squeeze.json``.

        ``overhead_bytes`` holds the rest (``config.json``, fixed headers, stage edit records);
        ``measured_overhead`` fits it to a saved directory.
        """
        from squeezelang.models.codec import index_bytes, squeeze_json_base_bytes, stored_bytes
        from squeezelang.models.packed import packed_config_extra_bytes

        total = sum(stored_bytes(t.shape, t.dtype, t.codec) + index_bytes(n, t.shape, t.dtype, t.codec)
                    for n, t in self.tensors.items())
        if self.states or any(t.codec for t in self.tensors.values()):
            total += squeeze_json_base_bytes(self.task, self.states)
        if self.packed:
            total += packed_config_extra_bytes(self.config)
        return total

    def select(self, kinds: Iterable[str] = ("Linear",), include: Iterable[str] | None = None,
               exclude: Iterable[str] = ()) -> list[ModuleMeta]:
        """Modules of the given kinds whose dotted names match the include/exclude globs."""
        kinds = tuple(kinds)
        return [m for m in self.modules.values()
                if m.kind in kinds and matches(m.name, include, exclude)]


def matches(name: str, include: Iterable[str] | None, exclude: Iterable[str] = ()) -> bool:
    """Glob selection by dotted module name, as used by every ``include``/``exclude`` parameter."""
    if include is not None:
        include = list(include)
        if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
            return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


def meta_from_model(model: Any, task: str, codecs: dict[str, dict[str, Any]] | None = None,
                    states: Iterable[str] = ()) -> ModelMeta:
    """Meta-data of a torch model (real or on the meta device); tied parameters count once."""
    from squeezelang.models.select import kind_of

    codecs = codecs or {}
    config = model.config.to_dict() if hasattr(model, "config") else {}
    meta = ModelMeta(task=task, config=config, states=set(states))
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        owned: list[str] = []
        for pname, p in list(module.named_parameters(recurse=False)) + [
                (b, t) for b, t in module.named_buffers(recurse=False)
                if b not in getattr(module, "_non_persistent_buffers_set", set())]:
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}" if mod_name else pname
            meta.tensors[full] = TensorMeta(tuple(p.shape), str(p.dtype).replace("torch.", ""),
                                            codecs.get(full))
            owned.append(full)
        if owned:
            meta.modules[mod_name] = ModuleMeta(mod_name, kind_of(module), owned)
    return meta


def measured_overhead(meta: ModelMeta, directory: Any) -> int:
    """The ``overhead_bytes`` that makes ``meta.size_bytes()`` equal the saved size of ``directory``."""
    from squeezelang.models.size import artifact_bytes

    return artifact_bytes(directory) - meta.modeled_bytes()
