"""Model meta-data computed from ``config.json`` and the family's ``Layout``, without torch.

``squeeze plan`` needs every tensor's name and shape, not the weights. Building the model on torch's
meta device gives them for any architecture, but importing torch and transformers' model code costs
about 3 s, most of a first plan. For a family that describes its layout
(``squeezelang.hooks.family.Layout``: module order, classes, biases, task heads) the tensors follow
from a handful of config keys, so they are written out here, in the order and with the names,
module kinds and dtypes that ``meta.meta_from_model`` records for the transformers model
(``tests/models/test_layout_meta.py`` checks that they agree, family by family and task by task).
Nothing here names a family: the built-in layouts are data in ``plugins/families.py``.

Anything this does not know — a family without a layout, a task it does not lay out, an option
its ``requires`` excludes (cross-attention, relative positions), sizes that do not fit together, a
dtype other than float32/float16/bfloat16 — gives ``None``, and the caller builds the model on the
meta device as before.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from squeezelang.models.meta import ModelMeta, ModuleMeta, TensorMeta

if TYPE_CHECKING:
    from squeezelang.hooks.family import Layout, ModelFamily, TaskLayout

#: A module's tensors: ``(suffix, shape)`` pairs.
Tensors = list[tuple[str, tuple[int, ...]]]

#: Keys whose value transformers rewrites on reading (it records its own version, renames the dtype).
_DROPPED = ("transformers_version", "torch_dtype", "dtype", "_name_or_path")
#: Dtypes every tensor of a model built with the config's ``dtype`` takes.
_DTYPES = ("float32", "float16", "bfloat16")


class _Builder:
    """Collects modules and tensors in registration order; a tensor tied to one already collected
    is the same tensor and belongs to the module that came first (as ``meta_from_model`` counts)."""

    def __init__(self, task: str, config: dict[str, Any], dtype: str,
                 ties: dict[str, str]) -> None:
        self.meta = ModelMeta(task=task, config=config)
        self.dtype = dtype
        self.ties = ties
        self.seen: set[str] = set()

    def add(self, name: str, kind: str, tensors: Tensors) -> None:
        owned = []
        for suffix, shape in tensors:
            full = f"{name}.{suffix}"
            key = self.ties.get(full, full)
            if key in self.seen:
                continue
            self.seen.add(key)
            if any(type(d) is not int or d <= 0 for d in shape):
                raise ValueError(f"{full}: shape {shape}")
            self.meta.tensors[full] = TensorMeta(tuple(shape), self.dtype)
            owned.append(full)
        if owned:
            self.meta.modules[name] = ModuleMeta(name, kind, owned)


def _labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))


def _flag(value: bool | str, config: dict[str, Any]) -> bool:
    """A layout's bias flag: a constant, or a boolean config key."""
    if isinstance(value, bool):
        return value
    flag = config.get(value, False)
    if not isinstance(flag, bool):
        raise ValueError(f"{value} is not a boolean")
    return flag


class _Shapes:
    """The shape of every module of a family's layout, from its roles and a config's sizes."""

    def __init__(self, fam: ModelFamily, layout: Layout, config: dict[str, Any]) -> None:
        self.fam, self.layout, self.config = fam, layout, config
        self.sizes = {**fam.sizes(config), "vocab": config["vocab_size"], "labels": _labels(config)}
        s = self.sizes
        attn = s["heads"] * s["head_dim"]
        kv = s["kv_heads"] * s["head_dim"]
        hidden, inner = s["hidden"], s["inner"]
        self.linear_kind = "Conv1D" if fam.conv1d else "Linear"
        qkv_bias = _flag(layout.attention_bias, config)
        o_bias = _flag(layout.o_bias, config)
        mlp_bias = _flag(layout.mlp_bias, config)
        #: block role -> (out, in, bias)
        self.projections: dict[str, tuple[int, int, bool]] = {
            fam.o: (hidden, attn, o_bias), fam.mlp_out: (hidden, inner, mlp_bias)}
        if fam.qkv:
            self.projections[fam.qkv] = (attn + 2 * kv, hidden, qkv_bias)
        else:
            self.projections.update({fam.q: (attn, hidden, qkv_bias), fam.k: (kv, hidden, qkv_bias),
                                     fam.v: (kv, hidden, qkv_bias)})
        for name in fam.mlp_in:
            self.projections[name] = (inner, hidden, mlp_bias)
        if fam.mlp_fused:
            self.projections[fam.mlp_fused] = (2 * inner, hidden, mlp_bias)
        self.norm_widths = {name: hidden for name in fam.norms}
        self.norm_widths.update({name: s["head_dim"] for name in fam.head_norms})

    def block_module(self, name: str) -> tuple[str, Tensors]:
        if name in self.projections:
            out, inp, bias = self.projections[name]
            weight = (inp, out) if self.fam.conv1d else (out, inp)
            return self.linear_kind, [("weight", weight)] + ([("bias", (out,))] if bias else [])
        return self.layout.norm_class, self.norm(self.norm_widths[name])

    def base_module(self, name: str) -> tuple[str, Tensors]:
        fam, hidden = self.fam, self.sizes["hidden"]
        if name in fam.embeddings:
            rows = self.config["vocab_size"] if name == fam.embeddings[0] else \
                self.config[self.layout.rows[name]]
            return "Embedding", [("weight", (rows, hidden))]
        return self.layout.norm_class, self.norm(hidden)

    def norm(self, width: int) -> Tensors:
        with_bias = self.fam.norm_kind == "layernorm"
        return [("weight", (width,))] + ([("bias", (width,))] if with_bias else [])

    def head_module(self, tensors: tuple[tuple[str, tuple[str, ...]], ...]) -> Tensors:
        return [(suffix, tuple(self.size(d) for d in shape)) for suffix, shape in tensors]

    def size(self, name: str) -> int:
        return self.sizes[name] if name in self.sizes else self.config[name]


def _lay_out(b: _Builder, fam: ModelFamily, layout: Layout, head: TaskLayout, base: str) -> None:
    shapes = _Shapes(fam, layout, b.meta.config)
    if head.head_first:
        _lay_out_head(b, shapes, head, base)
    for name in layout.base:
        if name != fam.blocks:
            b.add(f"{base}{name}", *shapes.base_module(name))
            continue
        for i in range(shapes.sizes["layers"]):
            for part in layout.block:
                b.add(f"{base}{fam.blocks}.{i}.{part}", *shapes.block_module(part))
    if not head.head_first:
        _lay_out_head(b, shapes, head, base)


def _lay_out_head(b: _Builder, shapes: _Shapes, head: TaskLayout, base: str) -> None:
    for module in head.modules:
        b.add(module.name.format(base=base), module.kind, shapes.head_module(module.tensors))


def _valid(fam: ModelFamily, config: dict[str, Any]) -> bool:
    """Sizes that are positive whole numbers and fit together (else transformers says what is
    wrong, or builds something this does not describe)."""
    keys = [fam.layers_key, fam.hidden_key, fam.heads_key, fam.inner_key, fam.kv_heads_key,
            fam.head_dim_key, "vocab_size"]
    values = [config.get(k) for k in keys if k and config.get(k) is not None]
    if not all(type(v) is int and v > 0 for v in values):
        return False
    s = fam.sizes(config)
    if s["heads"] % s["kv_heads"] or (fam.tied_head_dim and s["hidden"] % s["heads"]):
        return False
    pad = config.get("pad_token_id")  # an embedding's padding index must be one of its rows
    return pad is None or (type(pad) is int and 0 <= pad < config["vocab_size"])


def meta_of(config: dict[str, Any], task: str,
            family: ModelFamily | None = None) -> ModelMeta | None:
    """The meta-data of a fresh ``task`` model of ``config`` (a ``config.json`` dict), or ``None``
    when its family (default: the registered family of its ``model_type``) has no layout of that
    task or the config asks for something the layout does not describe (the caller then builds
    the model)."""
    if family is None:
        from squeezelang.hooks.family import registries_in_use

        family = registries_in_use().families.for_config(config)
    layout = family.layout if family is not None else None
    if layout is None or task not in layout.tasks:
        return None
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPES:
        return None
    torch = sys.modules.get("torch")  # not imported: its default dtype is float32
    if torch is not None and torch.get_default_dtype() != torch.float32:
        return None  # a model built now may take that dtype
    resolved = {key: value for key, value in config.items() if key not in _DROPPED}
    for key, default in family.config_defaults.items():
        resolved.setdefault(key, default)
    if any(resolved.get(key, value) != value for key, value in layout.requires.items()):
        return None
    head = layout.tasks[task]
    base = "" if task == "embedding" else f"{layout.prefix}."
    try:
        if not _valid(family, resolved):
            return None
        tie = resolved.get("tie_word_embeddings", False) is True
        ties = {}
        for first, second in head.ties if tie else ():
            ties[second.format(base=base)] = first.format(base=base)
        builder = _Builder(task, resolved, dtype, ties)
        _lay_out(builder, family, layout, head, base)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # e.g. labels not a mapping
        return None
    return builder.meta
