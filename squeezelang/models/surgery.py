"""Structured surgery: remove attention heads, MLP neurons, hidden channels or whole layers.

Every operation leaves a *standard* model of the same family whose ``config`` describes it exactly,
so ``save_model`` writes a plain transformers checkpoint that ``from_pretrained`` loads with no
codec and no edit record. The work is done on the state dict: the kept rows/columns are selected,
a fresh model is built from the shrunk config and loaded strictly, and the result replaces the old
model's contents in place (the Python object stays the same).

Families (``config.model_type``): ``bert`` (BERT, MiniLM and other BERT-layout encoders) and ``gpt2``.

The constraint that shapes the design: these configs have no per-layer sizes and no ``head_dim``;
the head dimension is ``hidden / heads`` and the attention inner size equals the hidden size. Hence

* heads, MLP neurons and layers are removed by the same *count* in every layer (which ones may differ
  per layer);
* removing heads while keeping the head dimension shrinks the hidden size to ``heads × head_dim``:
  ``prune_heads_`` needs the hidden channels to keep (``hidden=``) unless the counts already agree;
* removing hidden channels keeps the head count, so the hidden size must stay a multiple of it and
  every head's dimension shrinks to ``hidden / heads``: the query/key and value dimensions of each
  head are chosen by weight norm, and the queries are rescaled by ``sqrt(new_dim / old_dim)`` so
  that the attention temperature ``1 / sqrt(head_dim)`` is unchanged.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.meta import ModelMeta


@dataclass(frozen=True)
class Layout:
    """Config keys of one family."""

    layers: str
    heads: str
    hidden: str
    inner: str


LAYOUTS = {
    "bert": Layout("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"),
    "gpt2": Layout("n_layer", "n_head", "n_embd", "n_inner"),
}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def family(config: Any) -> str:
    """The layout family of a model config (object or dict); ``SqueezeError`` if unsupported."""
    model_type = _get(config, "model_type")
    if model_type not in LAYOUTS:
        raise SqueezeError(f"structured pruning supports model types {', '.join(LAYOUTS)}, not "
                           f"'{model_type}'")
    return model_type


def sizes(config: Any) -> dict[str, int]:
    """``layers``, ``heads``, ``hidden``, ``inner`` (MLP width) and ``head_dim`` of a config."""
    lay = LAYOUTS[family(config)]
    hidden = int(_get(config, lay.hidden))
    heads = int(_get(config, lay.heads))
    inner = _get(config, lay.inner)
    return {"layers": int(_get(config, lay.layers)), "heads": heads, "hidden": hidden,
            "inner": int(inner) if inner is not None else 4 * hidden, "head_dim": hidden // heads}


def shrunk_config(config: dict[str, Any], layers: int | None = None, heads: int | None = None,
                  hidden: int | None = None, inner: int | None = None) -> dict[str, Any]:
    """A copy of a config dict with the given sizes (``None`` keeps one); checks they are valid."""
    lay = LAYOUTS[family(config)]
    cur = sizes(config)
    new = {"layers": layers or cur["layers"], "heads": heads or cur["heads"],
           "inner": inner or cur["inner"]}
    new["hidden"] = hidden or (new["heads"] * cur["head_dim"] if heads else cur["hidden"])
    for key, value in new.items():
        if not 1 <= value <= cur[key]:
            raise SqueezeError(f"{key} must be between 1 and {cur[key]}, not {value}")
    if new["hidden"] % new["heads"]:
        raise SqueezeError(f"the hidden size ({new['hidden']}) must be a multiple of the number of "
                           f"heads ({new['heads']}): this family's config derives the head "
                           "dimension as hidden / heads")
    if new["hidden"] // new["heads"] > cur["head_dim"]:
        raise SqueezeError(f"{new['heads']} heads of a {new['hidden']}-wide model would need a head "
                           f"dimension of {new['hidden'] // new['heads']} > {cur['head_dim']}; "
                           "remove hidden channels along with the heads")
    out = copy.deepcopy(config)
    out.update({lay.layers: new["layers"], lay.heads: new["heads"], lay.hidden: new["hidden"],
                lay.inner: new["inner"]})
    return out


def resized_meta(meta: ModelMeta, layers: int | None = None, heads: int | None = None,
                 hidden: int | None = None, inner: int | None = None) -> ModelMeta:
    """The meta-data of the model after surgery to the given sizes (built on the meta device)."""
    config = shrunk_config(meta.config, layers, heads, hidden, inner)
    out = config_meta(config, meta.task)
    for name, t in out.tensors.items():
        old = meta.tensors.get(name)
        if old is not None:
            t.codec = copy.deepcopy(old.codec)
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
    """The state-dict prefix of the base model (``""``, ``"bert."``, ``"transformer."``)."""
    base = getattr(model, "base_model", model)
    return "" if base is model else model.base_model_prefix + "."


def layer_modules(model: Any) -> list[Any]:
    """The transformer blocks, in order."""
    base = getattr(model, "base_model", model)
    return list(base.encoder.layer if family(model.config) == "bert" else base.h)


def _uniform(keep: dict[int, Sequence[int]], n_layers: int, what: str) -> int:
    if sorted(keep) != list(range(n_layers)):
        raise SqueezeError(f"{what}: give the kept indices of every layer 0..{n_layers - 1}")
    counts = {len(set(v)) for v in keep.values()}
    if len(counts) != 1:
        raise SqueezeError(f"{what}: keep the same number in every layer (the config has one size "
                           f"for all layers), not {sorted(counts)}")
    return counts.pop()


def _index(values: Sequence[int], limit: int, what: str) -> torch.Tensor:
    import torch

    idx = sorted(set(int(v) for v in values))
    if not idx or idx[0] < 0 or idx[-1] >= limit:
        raise SqueezeError(f"{what}: indices must lie in 0..{limit - 1}")
    return torch.tensor(idx, dtype=torch.long)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(int(i) for i in scores.topk(k).indices)


def reshape_(model: Any, layers: Sequence[int] | None = None,
             heads: dict[int, Sequence[int]] | None = None, hidden: Sequence[int] | None = None,
             mlp: dict[int, Sequence[int]] | None = None) -> Any:
    """Apply any combination of the four removals at once; return ``model`` (changed in place).

    Layer indices in ``heads``/``mlp`` refer to the layers *before* ``layers`` drops any.
    """
    import torch

    fam = family(model.config)
    cur = sizes(model.config)
    d = cur["head_dim"]
    layer_idx = _index(layers, cur["layers"], "layers") if layers is not None else torch.arange(cur["layers"])
    n_heads = _uniform(heads, cur["layers"], "heads") if heads is not None else cur["heads"]
    n_inner = _uniform(mlp, cur["layers"], "mlp") if mlp is not None else cur["inner"]
    hid = _index(hidden, cur["hidden"], "hidden") if hidden is not None else torch.arange(cur["hidden"])
    n_hidden = len(hid)
    if heads is not None and hidden is None and n_heads * d != cur["hidden"]:
        raise SqueezeError(f"keeping {n_heads} of {cur['heads']} heads of dimension {d} makes the "
                           f"attention {n_heads * d} wide, but this family's config ties it to the "
                           f"hidden size ({cur['hidden']}): give the hidden channels to keep too")
    config = shrunk_config(model.config.to_dict(), len(layer_idx), n_heads, n_hidden, n_inner)
    new_d = n_hidden // n_heads
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre = base_prefix(model)

    def sel(key: str, dim: int, idx: torch.Tensor) -> None:
        if key in state:
            state[key] = state[key].index_select(dim, idx)

    # ---- per layer: attention inner dims, MLP neurons, hidden channels
    for i in range(cur["layers"]):
        kept_heads = sorted(set(heads[i])) if heads is not None else list(range(cur["heads"]))
        if kept_heads and max(kept_heads) >= cur["heads"]:
            raise SqueezeError(f"heads: indices must lie in 0..{cur['heads'] - 1}")
        qk_rows, v_rows = _head_dims(fam, state, pre, i, kept_heads, d, new_d, cur["hidden"])
        qk_idx = torch.tensor(qk_rows, dtype=torch.long)
        v_idx = torch.tensor(v_rows, dtype=torch.long)
        neurons = (_index(mlp[i], cur["inner"], "mlp") if mlp is not None
                   else torch.arange(cur["inner"]))
        scale = (new_d / d) ** 0.5
        if fam == "bert":
            p = f"{pre}encoder.layer.{i}."
            for name, rows in (("query", qk_idx), ("key", qk_idx), ("value", v_idx)):
                sel(f"{p}attention.self.{name}.weight", 0, rows)
                sel(f"{p}attention.self.{name}.bias", 0, rows)
                sel(f"{p}attention.self.{name}.weight", 1, hid)
            if new_d != d:
                for suffix in ("weight", "bias"):
                    state[f"{p}attention.self.query.{suffix}"] *= scale
            sel(f"{p}attention.output.dense.weight", 1, v_idx)
            sel(f"{p}attention.output.dense.weight", 0, hid)
            sel(f"{p}attention.output.dense.bias", 0, hid)
            sel(f"{p}intermediate.dense.weight", 0, neurons)
            sel(f"{p}intermediate.dense.bias", 0, neurons)
            sel(f"{p}intermediate.dense.weight", 1, hid)
            sel(f"{p}output.dense.weight", 1, neurons)
            sel(f"{p}output.dense.weight", 0, hid)
            sel(f"{p}output.dense.bias", 0, hid)
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                sel(f"{p}{ln}.weight", 0, hid)
                sel(f"{p}{ln}.bias", 0, hid)
        else:
            p = f"{pre}h.{i}."
            width = cur["hidden"]
            cols = torch.cat([qk_idx, qk_idx + width, v_idx + 2 * width])
            sel(f"{p}attn.c_attn.weight", 1, cols)
            sel(f"{p}attn.c_attn.bias", 0, cols)
            if new_d != d:
                n_q = len(qk_idx)
                state[f"{p}attn.c_attn.weight"][:, :n_q] *= scale
                state[f"{p}attn.c_attn.bias"][:n_q] *= scale
            sel(f"{p}attn.c_attn.weight", 0, hid)
            sel(f"{p}attn.c_proj.weight", 0, v_idx)
            sel(f"{p}attn.c_proj.weight", 1, hid)
            sel(f"{p}attn.c_proj.bias", 0, hid)
            sel(f"{p}mlp.c_fc.weight", 1, neurons)
            sel(f"{p}mlp.c_fc.bias", 0, neurons)
            sel(f"{p}mlp.c_fc.weight", 0, hid)
            sel(f"{p}mlp.c_proj.weight", 0, neurons)
            sel(f"{p}mlp.c_proj.weight", 1, hid)
            sel(f"{p}mlp.c_proj.bias", 0, hid)
            for ln in ("ln_1", "ln_2"):
                sel(f"{p}{ln}.weight", 0, hid)
                sel(f"{p}{ln}.bias", 0, hid)

    # ---- embeddings and everything outside the blocks (pooler, ln_f, heads, tied lm_head)
    if fam == "bert":
        for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            sel(f"{pre}embeddings.{emb}.weight", 1, hid)
        for suffix in ("weight", "bias"):
            sel(f"{pre}embeddings.LayerNorm.{suffix}", 0, hid)
    else:
        sel(f"{pre}wte.weight", 1, hid)
        sel(f"{pre}wpe.weight", 1, hid)
    if n_hidden != cur["hidden"]:
        _outside_blocks(model, state, pre, fam, cur["hidden"], hid)

    # ---- renumber the kept layers
    if layers is not None:
        stack = f"{pre}encoder.layer." if fam == "bert" else f"{pre}h."
        renamed = {}
        new_of = {int(old): new for new, old in enumerate(layer_idx)}
        for key, value in state.items():
            if key.startswith(stack):
                num, _, rest = key[len(stack):].partition(".")
                if int(num) not in new_of:
                    continue
                key = f"{stack}{new_of[int(num)]}.{rest}"
            renamed[key] = value
        state = renamed
    return _replace_(model, config, state)


def _head_dims(fam: str, state: dict[str, torch.Tensor], pre: str, i: int, kept: list[int],
               d: int, new_d: int, width: int) -> tuple[list[int], list[int]]:
    """Rows of the attention inner dimension kept for queries/keys and for values."""
    if new_d == d:
        rows = [h * d + j for h in kept for j in range(d)]
        return rows, rows
    if fam == "bert":
        p = f"{pre}encoder.layer.{i}.attention."
        wq, wk, wv = (state[f"{p}self.{n}.weight"] for n in ("query", "key", "value"))
        wo = state[f"{p}output.dense.weight"].t()
    else:
        w = state[f"{pre}h.{i}.attn.c_attn.weight"].t()
        wq, wk, wv = w[:width], w[width:2 * width], w[2 * width:]
        wo = state[f"{pre}h.{i}.attn.c_proj.weight"]
    # q·k sums products over a head's dims: keep dims where both rows are large; v dims feed wo.
    qk_score = wq.norm(dim=1) * wk.norm(dim=1)
    v_score = wv.norm(dim=1) * wo.norm(dim=1)
    qk_rows, v_rows = [], []
    for h in kept:
        span = slice(h * d, (h + 1) * d)
        qk_rows += [h * d + j for j in _top(qk_score[span], new_d)]
        v_rows += [h * d + j for j in _top(v_score[span], new_d)]
    return qk_rows, v_rows


def _outside_blocks(model: Any, state: dict[str, torch.Tensor], pre: str, fam: str,
                    width: int, hid: torch.Tensor) -> None:
    """Slice the hidden axis of the pooler, final norm and task heads (found by module kind)."""
    skip = (f"{pre}encoder.", f"{pre}embeddings.") if fam == "bert" else (
        f"{pre}h.", f"{pre}wte.", f"{pre}wpe.")
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if prefix.startswith(skip) or not name:
            continue
        kind = type(module).__name__
        w, b = f"{prefix}weight", f"{prefix}bias"
        if w not in state:
            continue
        if kind == "Linear":
            if module.in_features == width:
                state[w] = state[w].index_select(1, hid)
            if module.out_features == width:
                state[w] = state[w].index_select(0, hid)
                if b in state:
                    state[b] = state[b].index_select(0, hid)
        elif kind == "LayerNorm" and tuple(module.normalized_shape) == (width,):
            state[w] = state[w].index_select(0, hid)
            if b in state:
                state[b] = state[b].index_select(0, hid)
        elif kind == "Embedding" and module.embedding_dim == width:
            state[w] = state[w].index_select(1, hid)
    # Anything still as wide as the old hidden size outside the blocks is a tensor we missed.
    for key, value in list(state.items()):
        if key.endswith("weight") and value.dim() == 2 and value.shape[1] == width and \
                not key.startswith(skip):
            raise SqueezeError(f"cannot tell how to shrink '{key}' {tuple(value.shape)}")


def _replace_(model: Any, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """Build the shrunk model, load ``state`` strictly and move it into ``model``'s object."""
    cfg = copy.deepcopy(model.config)
    for key, value in config.items():
        if key in LAYOUTS[family(cfg)].__dict__.values():
            setattr(cfg, key, value)
    new = type(model)(cfg)
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SqueezeError(f"structured surgery produced weights that do not fit: {exc}") from None
    new.eval()
    model.__dict__.clear()
    model.__dict__.update(new.__dict__)
    return model
