"""Structured surgery: remove attention heads, MLP neurons, hidden channels or whole layers.

Every operation leaves a *standard* model of the same family whose ``config`` describes it exactly,
so ``save_model`` writes a plain transformers checkpoint that ``from_pretrained`` loads with no
codec and no edit record. The work is done on the state dict (``models.slicing``): the kept
rows/columns are selected, a fresh model is built from the shrunk config and loaded strictly, and
the result replaces the old model's contents in place (the Python object stays the same).

Which model types are known, and where each role lives, is data: the registered ``ModelFamily``
of ``config.model_type`` in the run's registries (``squeezelang.hooks.family``; built-ins in
``plugins/families.py``).
Nothing here branches on a family's name. What shapes the operations:

* a config has one size for all layers, so heads, MLP neurons and layers are removed by the same
  *count* in every layer (which ones may differ per layer);
* grouped-query attention (``kv_heads < heads``): query head ``h`` reads key/value group
  ``h // (heads / kv_heads)``. Kept heads must form a standard layout: the same number of query
  heads in every kept group (whole groups go when all their query heads go);
* a family with an explicit head dimension (``head_dim_key``, the rotary decoders) never changes
  it: heads go without touching the hidden size, and hidden channels go without touching the
  heads (rotary pairs and per-head ``q_norm``/``k_norm`` stay intact);
* a family whose head dimension is ``hidden / heads`` (BERT, GPT-2) ties the two: removing heads
  while keeping the head dimension shrinks the hidden size to ``heads × head_dim`` (``prune_heads_``
  needs the hidden channels to keep unless the counts already agree), and removing hidden channels
  keeps the head count, so every head's dimension shrinks to ``hidden / heads``: the query/key and
  value dimensions of each head are chosen by weight norm, and the queries are rescaled by
  ``sqrt(new_dim / old_dim)`` so that the attention temperature is unchanged.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.hooks.family import ModelFamily
    from squeezelang.models.meta import ModelMeta


def family_of(config: Any) -> ModelFamily:
    """The registered ``ModelFamily`` of a config (object or dict); ``SqueezeError`` if none.

    It is looked up in the registries of the plan or run in progress (``families_in_use``, which
    the planner and the executor enter), so a family from a ``--plugin`` module is found too.
    """
    from squeezelang.hooks.family import family_of as lookup

    return lookup(config)


def family(config: Any) -> str:
    """The name of the family of a model config (object or dict); ``SqueezeError`` if unsupported."""
    return family_of(config).name


def sizes(config: Any) -> dict[str, int]:
    """``layers``, ``heads``, ``kv_heads``, ``hidden``, ``inner`` (MLP width) and ``head_dim``."""
    return family_of(config).sizes(config)


# ---------------------------------------------------------------------------- head counts (GQA)
def _head_layouts(cur: dict[str, int]) -> list[tuple[int, int]]:
    """Every standard ``(heads, kv_heads)`` reachable by removing heads, more kv groups first."""
    group = cur["heads"] // cur["kv_heads"]
    return sorted(((kv * per, kv) for kv in range(1, cur["kv_heads"] + 1)
                   for per in range(1, group + 1)), key=lambda hk: (hk[0], -hk[1]))


def nearest_heads(config: Any, target: int) -> int:
    """The head count nearest ``target`` that a standard layout of this config can have."""
    fam, cur = family_of(config), sizes(config)
    options = sorted({h for h, _ in _head_layouts(cur)})
    if fam.hidden_per_head and not fam.tied_head_dim:  # the config class checks hidden % heads
        options = [h for h in options if cur["hidden"] % h == 0] or options
    return min(options, key=lambda h: (abs(h - target), -h))


def kv_heads_for(cur: dict[str, int], heads: int) -> int:
    """The key/value group count kept with ``heads`` query heads (as many groups as possible)."""
    if cur["kv_heads"] == cur["heads"]:
        return heads
    for h, kv in _head_layouts(cur):
        if h == heads:
            return kv
    raise SqueezeError(f"{heads} query heads cannot share {cur['kv_heads']} key/value groups of "
                       f"{cur['heads'] // cur['kv_heads']} evenly; choose a count among "
                       f"{sorted({h for h, _ in _head_layouts(cur)})}")


def choose_heads(scores: Sequence[torch.Tensor], config: Any, heads: int) -> dict[int, list[int]]:
    """The ``heads`` query heads to keep per layer from per-head ``scores`` (higher = keep).

    Under grouped-query attention the kept groups are those whose best query heads score highest,
    and each keeps its best ``heads / groups`` query heads, so the result is a standard layout.
    """
    cur = sizes(config)
    kv = kv_heads_for(cur, heads)
    group = cur["heads"] // cur["kv_heads"]
    per = heads // kv
    out: dict[int, list[int]] = {}
    for i, s in enumerate(scores):
        by_group = s.reshape(cur["kv_heads"], group)
        best = by_group.topk(per, dim=1)
        kept_groups = best.values.sum(1).topk(kv).indices.tolist()
        out[i] = sorted(int(g) * group + int(j) for g in kept_groups for j in best.indices[g])
    return out


# ---------------------------------------------------------------------------- configs and metas
def shrunk_config(config: dict[str, Any], layers: int | None = None, heads: int | None = None,
                  hidden: int | None = None, inner: int | None = None, kv_heads: int | None = None,
                  kept_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """A copy of a config dict with the given sizes (``None`` keeps one); checks they are valid.

    ``kept_layers`` (default: the first ``layers``) picks the entries of per-layer config lists.
    """
    fam = family_of(config)
    cur = fam.sizes(config)
    new = {"layers": layers or cur["layers"], "heads": heads or cur["heads"],
           "inner": inner or cur["inner"]}
    if fam.tied_head_dim:
        new["hidden"] = hidden or (new["heads"] * cur["head_dim"] if heads else cur["hidden"])
    else:
        new["hidden"] = hidden or cur["hidden"]
    for key, value in new.items():
        if not 1 <= value <= cur[key]:
            raise SqueezeError(f"{key} must be between 1 and {cur[key]}, not {value}")
    new["kv_heads"] = kv_heads or kv_heads_for(cur, new["heads"])
    if new["heads"] % new["kv_heads"]:
        raise SqueezeError(f"{new['heads']} heads cannot share {new['kv_heads']} key/value groups")
    if fam.hidden_per_head and not fam.tied_head_dim and new["hidden"] % new["heads"]:
        raise SqueezeError(f"the hidden size ({new['hidden']}) must be a multiple of the number of "
                           f"heads ({new['heads']}): the {fam.name} config class refuses it "
                           "otherwise, even with an explicit head_dim")
    if fam.tied_head_dim:
        if new["hidden"] % new["heads"]:
            raise SqueezeError(f"the hidden size ({new['hidden']}) must be a multiple of the number "
                               f"of heads ({new['heads']}): this family's config derives the head "
                               "dimension as hidden / heads")
        if new["hidden"] // new["heads"] > cur["head_dim"]:
            raise SqueezeError(f"{new['heads']} heads of a {new['hidden']}-wide model would need a "
                               f"head dimension of {new['hidden'] // new['heads']} > "
                               f"{cur['head_dim']}; remove hidden channels along with the heads")
    out = copy.deepcopy(config)
    out.update({fam.layers_key: new["layers"], fam.heads_key: new["heads"],
                fam.hidden_key: new["hidden"], fam.inner_key: new["inner"]})
    if fam.kv_heads_key:
        out[fam.kv_heads_key] = new["kv_heads"]
    if fam.head_dim_key:  # written out: a config that derived it from hidden / heads must not now
        out[fam.head_dim_key] = cur["head_dim"]
    kept = list(kept_layers) if kept_layers is not None else list(range(new["layers"]))
    for key in fam.per_layer_keys:
        values = out.get(key)
        if isinstance(values, list) and len(values) == cur["layers"]:
            out[key] = [values[i] for i in kept]
    return out


def changed_keys(fam: ModelFamily) -> tuple[str, ...]:
    """The config keys surgery may change in a family."""
    keys = (fam.layers_key, fam.heads_key, fam.hidden_key, fam.inner_key, fam.kv_heads_key,
            fam.head_dim_key, *fam.per_layer_keys)
    return tuple(k for k in keys if k)


_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def resized_meta(meta: ModelMeta, layers: int | None = None, heads: int | None = None,
                 hidden: int | None = None, inner: int | None = None) -> ModelMeta:
    """The meta-data of the model after surgery to the given sizes (built on the meta device)."""
    config = shrunk_config(meta.config, layers, heads, hidden, inner)
    out = config_meta(config, meta.task)
    # the shrunk model is built in its weights' dtype (``_build_like``), whatever the config says
    dtype = next((t.dtype for t in meta.tensors.values() if t.dtype in _FLOAT_DTYPES), None)
    for name, t in out.tensors.items():
        old = meta.tensors.get(name)
        if old is not None:
            t.codec = copy.deepcopy(old.codec)
        if dtype is not None and t.dtype in _FLOAT_DTYPES:
            t.dtype = dtype
    out.states = set(meta.states)
    out.overhead_bytes = meta.overhead_bytes
    out.notes = list(meta.notes)
    return out


def config_meta(config: dict[str, Any], task: str) -> ModelMeta:
    """The meta-data of a fresh model of ``config`` for ``task``, built on the meta device.

    Planning asks for the same sizes again and again (a bisection over a knob lands on the same
    whole number of layers or neurons many times), so the answers are remembered; each call gets
    its own copy.
    """
    from squeezelang.models import layout_meta

    known = layout_meta.meta_of(config, task)  # a known family: computed, no torch needed
    if known is not None:
        return known
    try:
        key = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):  # not JSON: build it every time
        return _config_meta(config, task)
    torch = sys.modules.get("torch")  # not imported yet: the default dtype is torch's own
    dtype = str(torch.get_default_dtype()) if torch is not None else "torch.float32"
    return _remembered_config_meta(key, task, dtype).copy()


@functools.lru_cache(maxsize=64)
def _remembered_config_meta(config_json: str, task: str, default_dtype: str) -> ModelMeta:
    """Remembered in the process, and kept across processes by the planner's disk cache."""
    from squeezelang.models.meta_cache import cached_meta

    return cached_meta(f"{default_dtype}\n{config_json}", task,
                       lambda: _config_meta(json.loads(config_json), task))


def _config_meta(config: dict[str, Any], task: str) -> ModelMeta:
    from squeezelang.models import hf
    from squeezelang.models.meta import meta_from_model

    return meta_from_model(hf.from_config(config, task, meta=True), task)


def heads_meta(meta: ModelMeta, heads: int, hidden: int | None = None) -> ModelMeta:
    """Meta after ``prune_heads_`` to ``heads`` per layer (hidden default ``heads × head_dim``)."""
    return resized_meta(meta, heads=heads, hidden=hidden)


def mlp_meta(meta: ModelMeta, inner: int) -> ModelMeta:
    """Meta after ``prune_mlp_`` to ``inner`` neurons per layer."""
    return resized_meta(meta, inner=inner)


def hidden_meta(meta: ModelMeta, hidden: int) -> ModelMeta:
    """Meta after ``prune_hidden_`` to ``hidden`` channels."""
    return resized_meta(meta, hidden=hidden)


def layers_meta(meta: ModelMeta, layers: int) -> ModelMeta:
    """Meta after ``drop_layers_`` keeping ``layers`` layers."""
    return resized_meta(meta, layers=layers)


# ---------------------------------------------------------------------------- public operations
def prune_heads_(model: Any, keep: dict[int, Sequence[int]],
                 hidden: Sequence[int] | None = None) -> Any:
    """Keep the heads ``keep[layer]`` (same count in every layer); ``hidden``: channels to keep.

    ``hidden`` is needed when ``kept heads × head_dim`` differs from the hidden size (see the module
    docstring); its length must be a multiple of the kept head count.
    """
    return reshape_(model, heads=keep, hidden=hidden)


def prune_mlp_(model: Any, keep: dict[int, Sequence[int]]) -> Any:
    """Keep the MLP neurons ``keep[layer]`` (same count in every layer)."""
    return reshape_(model, mlp=keep)


def prune_hidden_(model: Any, keep: Sequence[int]) -> Any:
    """Keep the hidden (embedding) channels ``keep``; heads stay, each head's dimension shrinks."""
    return reshape_(model, hidden=keep)


def drop_layers_(model: Any, keep: Sequence[int]) -> Any:
    """Keep the layers ``keep`` (in model order), dropping the others."""
    return reshape_(model, layers=keep)


# ---------------------------------------------------------------------------- the one transform
def base_prefix(model: Any) -> str:
    """The state-dict prefix of the base model (``""``, ``"bert."``, ``"model."``)."""
    base = getattr(model, "base_model", model)
    return "" if base is model else model.base_model_prefix + "."


def get_path(root: Any, path: str) -> Any:
    """The attribute at dotted ``path`` under ``root`` (``None`` when absent)."""
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def layer_modules(model: Any) -> list[Any]:
    """The transformer blocks, in order."""
    base = getattr(model, "base_model", model)
    return list(get_path(base, family_of(model.config).blocks))


def block_module(model: Any, block: Any, role: str) -> Any:
    """The module of ``block`` playing ``role``: an attribute of the family (``"o"``, ``"mlp_out"``)."""
    return get_path(block, getattr(family_of(model.config), role))


def _uniform(keep: dict[int, Sequence[int]], n_layers: int, what: str) -> int:
    if sorted(keep) != list(range(n_layers)):
        raise SqueezeError(f"{what}: give the kept indices of every layer 0..{n_layers - 1}")
    counts = {len(set(v)) for v in keep.values()}
    if len(counts) != 1:
        raise SqueezeError(f"{what}: keep the same number in every layer (the config has one size "
                           f"for all layers), not {sorted(counts)}")
    return counts.pop()


def _kv_groups(kept: list[int], cur: dict[str, int]) -> int:
    """The key/value groups the kept query heads use; refuse a layout that is not standard."""
    group = cur["heads"] // cur["kv_heads"]
    per: dict[int, int] = {}
    for h in kept:
        per[h // group] = per.get(h // group, 0) + 1
    if len(set(per.values())) > 1:
        raise SqueezeError(f"heads: keep the same number of query heads in every kept key/value "
                           f"group (groups of {group}), not {sorted(per.values())}")
    return len(per)


def _index(values: Sequence[int], limit: int, what: str) -> torch.Tensor:
    import torch

    idx = sorted(set(int(v) for v in values))
    if not idx or idx[0] < 0 or idx[-1] >= limit:
        raise SqueezeError(f"{what}: indices must lie in 0..{limit - 1}")
    return torch.tensor(idx, dtype=torch.long)


def reshape_(model: Any, layers: Sequence[int] | None = None,
             heads: dict[int, Sequence[int]] | None = None, hidden: Sequence[int] | None = None,
             mlp: dict[int, Sequence[int]] | None = None) -> Any:
    """Apply any combination of the four removals at once; return ``model`` (changed in place).

    ``heads[layer]`` are the kept *query* heads; under grouped-query attention their key/value
    groups are kept with them. Layer indices in ``heads``/``mlp`` refer to the layers *before*
    ``layers`` drops any.
    """
    import torch

    from squeezelang.models.slicing import (WeightState, renumber_layers, slice_block_,
                                            slice_outside_)

    fam = family_of(model.config)
    cur = fam.sizes(model.config)
    d = cur["head_dim"]
    layer_idx = _index(layers, cur["layers"], "layers") if layers is not None else torch.arange(cur["layers"])
    n_heads = _uniform(heads, cur["layers"], "heads") if heads is not None else cur["heads"]
    n_inner = _uniform(mlp, cur["layers"], "mlp") if mlp is not None else cur["inner"]
    hid = _index(hidden, cur["hidden"], "hidden") if hidden is not None else torch.arange(cur["hidden"])
    n_hidden = len(hid)
    if fam.tied_head_dim and heads is not None and hidden is None and n_heads * d != cur["hidden"]:
        raise SqueezeError(f"keeping {n_heads} of {cur['heads']} heads of dimension {d} makes the "
                           f"attention {n_heads * d} wide, but this family's config ties it to the "
                           f"hidden size ({cur['hidden']}): give the hidden channels to keep too")
    kept_heads = {}
    for i in range(cur["layers"]):
        kept_heads[i] = sorted(set(heads[i])) if heads is not None else list(range(cur["heads"]))
        if kept_heads[i] and (min(kept_heads[i]) < 0 or max(kept_heads[i]) >= cur["heads"]):
            raise SqueezeError(f"heads: indices must lie in 0..{cur['heads'] - 1}")
    n_kv = {_kv_groups(kept_heads[i], cur) for i in range(cur["layers"])}
    if len(n_kv) != 1:
        raise SqueezeError(f"heads: keep the same number of key/value groups in every layer, not "
                           f"{sorted(n_kv)}")
    config = shrunk_config(model.config.to_dict(), len(layer_idx), n_heads, n_hidden, n_inner,
                           kv_heads=n_kv.pop(), kept_layers=layer_idx.tolist())
    new_d = n_hidden // n_heads if fam.tied_head_dim else d
    pre = base_prefix(model)

    def slice_block(i: int, ws: WeightState) -> None:
        """Block ``i``'s tensors in ``ws`` (under their old names) as kept."""
        neurons = (_index(mlp[i], cur["inner"], "mlp") if mlp is not None
                   else torch.arange(cur["inner"]))
        slice_block_(fam, ws, f"{pre}{fam.blocks}.{i}.", cur, kept_heads[i], neurons, hid, new_d)

    def slice_outside(ws: WeightState) -> None:
        """The tensors outside the blocks in ``ws`` as kept (only the hidden size changes them)."""
        slice_outside_(fam, model, ws, pre, cur["hidden"], hid)
        if fam.embedding_scale and not getattr(model.config, "tie_word_embeddings", False):
            # The token embeddings are multiplied by sqrt(hidden): keep their scale. (Tied to the
            # output layer they cannot be rescaled without scaling the logits too.)
            ws.state[f"{pre}{fam.embeddings[0]}.weight"] *= (cur["hidden"] / n_hidden) ** 0.5

    from squeezelang.models.offload import is_offloaded

    if is_offloaded(model):  # block by block, from and to files
        from squeezelang.models.offload_surgery import streamed_reshape_

        return streamed_reshape_(model, fam, config, f"{pre}{fam.blocks}.", layer_idx.tolist(),
                                 slice_block, slice_outside if n_hidden != cur["hidden"] else None)
    ws = WeightState({k: v.detach().clone() for k, v in model.state_dict().items()}, fam.conv1d)
    for i in range(cur["layers"]):
        slice_block(i, ws)
    if n_hidden != cur["hidden"]:
        slice_outside(ws)
    state = ws.state
    if layers is not None:
        state = renumber_layers(state, f"{pre}{fam.blocks}.", layer_idx.tolist())
    return _replace_(model, fam, config, state)


def _build_like(model: Any, cfg: Any, dtype: Any) -> Any:
    """A fresh model of ``model``'s class and ``cfg`` in ``dtype`` (its weights'): built under
    that default dtype, as ``from_pretrained`` does, so a half-precision model stays half
    precision while the buffers transformers computes in float32 (rotary frequencies) stay so."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return type(model)(cfg)
    finally:
        torch.set_default_dtype(previous)


def dtype_of(state: dict[str, torch.Tensor]) -> Any:
    """The dtype of the first floating tensor of ``state`` (float32 when none): the model's."""
    import torch

    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def shrunk_model(model: Any, fam: ModelFamily, config: dict[str, Any], dtype: Any) -> Any:
    """A new model of ``model``'s class with the sizes of ``config`` (in eval mode), its blocks'
    layer indices renumbered."""
    cfg = copy.deepcopy(model.config)
    for key in changed_keys(fam):
        if key in config:
            setattr(cfg, key, config[key])
    new = _build_like(model, cfg, dtype)
    new.eval()
    base = getattr(new, "base_model", new)
    for i, block in enumerate(get_path(base, fam.blocks)):
        for attr in fam.layer_index_attrs:  # the cache and per-layer behaviour key on it
            owner, _, name = attr.rpartition(".")
            target = get_path(block, owner) if owner else block
            if target is not None and hasattr(target, name):
                setattr(target, name, i)
    return new


def move_into_(model: Any, new: Any) -> Any:
    """``new``'s contents moved into ``model`` (the Python object stays the same)."""
    model.__dict__.clear()
    model.__dict__.update(new.__dict__)
    return model


def _replace_(model: Any, fam: ModelFamily, config: dict[str, Any],
              state: dict[str, torch.Tensor]) -> Any:
    """Build the shrunk model, load ``state`` strictly and move it into ``model``'s object."""
    new = shrunk_model(model, fam, config, dtype_of(state))
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SqueezeError(f"structured surgery produced weights that do not fit: {exc}") from None
    return move_into_(model, new)
