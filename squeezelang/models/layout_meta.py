"""Model meta-data of the known families, computed from ``config.json`` without torch.

``squeeze plan`` needs every tensor's name and shape, not the weights. Building the model on torch's
meta device gives them for any architecture, but importing torch and transformers' model code costs
about 3 s, most of a first plan. For the families structured surgery knows (``bert``, ``gpt2``) the
tensors follow from a handful of config keys, so they are written out here, in the order and with
the names and module kinds that ``meta.meta_from_model`` records for the transformers model
(``tests/models/test_layout_meta.py`` checks that they agree, config by config and task by task).

Anything this does not know — another family, a head it does not lay out, an option that adds
tensors (cross-attention, relative positions), a dtype other than float32 — gives ``None``, and the
caller builds the model on the meta device as before.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from squeezelang.models.meta import ModelMeta, ModuleMeta, TensorMeta

#: Defaults transformers' config classes give keys a ``config.json`` may leave out.
_DEFAULTS = {
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
             "type_vocab_size": 2, "tie_word_embeddings": True},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_inner": None, "tie_word_embeddings": True},
}
#: Keys whose value transformers rewrites on reading (it records its own version, renames the dtype).
_DROPPED = ("transformers_version", "torch_dtype", "dtype", "_name_or_path")


class _Builder:
    """Collects modules and tensors in registration order."""

    def __init__(self, task: str, config: dict[str, Any]) -> None:
        self.meta = ModelMeta(task=task, config=config)

    def add(self, name: str, kind: str, *tensors: tuple[str, tuple[int, ...]]) -> None:
        owned = []
        for suffix, shape in tensors:
            full = f"{name}.{suffix}"
            self.meta.tensors[full] = TensorMeta(tuple(int(d) for d in shape))
            owned.append(full)
        self.meta.modules[name] = ModuleMeta(name, kind, owned)

    def linear(self, name: str, out_features: int, in_features: int, bias: bool = True) -> None:
        tensors = [("weight", (out_features, in_features))] + ([("bias", (out_features,))] if bias else [])
        self.add(name, "Linear", *tensors)

    def conv1d(self, name: str, in_features: int, out_features: int) -> None:
        """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed."""
        self.add(name, "Conv1D", ("weight", (in_features, out_features)), ("bias", (out_features,)))

    def norm(self, name: str, width: int) -> None:
        self.add(name, "LayerNorm", ("weight", (width,)), ("bias", (width,)))

    def embedding(self, name: str, rows: int, width: int) -> None:
        self.add(name, "Embedding", ("weight", (rows, width)))


def _labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))


def _bert(b: _Builder, c: dict[str, Any]) -> bool:
    if c.get("position_embedding_type", "absolute") != "absolute" or c.get("add_cross_attention"):
        return False
    task = b.meta.task
    prefix = "" if task == "embedding" else "bert."
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    if hidden % c["num_attention_heads"]:
        return False
    b.embedding(f"{prefix}embeddings.word_embeddings", c["vocab_size"], hidden)
    b.embedding(f"{prefix}embeddings.position_embeddings", c["max_position_embeddings"], hidden)
    b.embedding(f"{prefix}embeddings.token_type_embeddings", c["type_vocab_size"], hidden)
    b.norm(f"{prefix}embeddings.LayerNorm", hidden)
    for i in range(c["num_hidden_layers"]):
        layer = f"{prefix}encoder.layer.{i}"
        for part in ("query", "key", "value"):
            b.linear(f"{layer}.attention.self.{part}", hidden, hidden)
        b.linear(f"{layer}.attention.output.dense", hidden, hidden)
        b.norm(f"{layer}.attention.output.LayerNorm", hidden)
        b.linear(f"{layer}.intermediate.dense", inner, hidden)
        b.linear(f"{layer}.output.dense", hidden, inner)
        b.norm(f"{layer}.output.LayerNorm", hidden)
    if task in ("embedding", "classification"):
        b.linear(f"{prefix}pooler.dense", hidden, hidden)
    if task == "classification":
        b.linear("classifier", _labels(c), hidden)
    elif task in ("masked-lm", "causal-lm"):  # BertLMHeadModel has the same prediction head
        b.add("cls.predictions", "BertLMPredictionHead", ("bias", (c["vocab_size"],)))
        b.linear("cls.predictions.transform.dense", hidden, hidden)
        b.norm("cls.predictions.transform.LayerNorm", hidden)
        if not c["tie_word_embeddings"]:  # tied, the decoder is the word embeddings and the bias
            b.linear("cls.predictions.decoder", c["vocab_size"], hidden)
    return True


def _gpt2(b: _Builder, c: dict[str, Any]) -> bool:
    task = b.meta.task
    if task == "masked-lm" or c.get("add_cross_attention"):
        return False
    prefix = "" if task == "embedding" else "transformer."
    width = c["n_embd"]
    inner = c["n_inner"] if c["n_inner"] is not None else 4 * width
    if width % c["n_head"]:
        return False
    b.embedding(f"{prefix}wte", c["vocab_size"], width)
    b.embedding(f"{prefix}wpe", c["n_positions"], width)
    for i in range(c["n_layer"]):
        block = f"{prefix}h.{i}"
        b.norm(f"{block}.ln_1", width)
        b.conv1d(f"{block}.attn.c_attn", width, 3 * width)
        b.conv1d(f"{block}.attn.c_proj", width, width)
        b.norm(f"{block}.ln_2", width)
        b.conv1d(f"{block}.mlp.c_fc", width, inner)
        b.conv1d(f"{block}.mlp.c_proj", inner, width)
    b.norm(f"{prefix}ln_f", width)
    if task == "causal-lm" and not c["tie_word_embeddings"]:
        b.linear("lm_head", c["vocab_size"], width, bias=False)
    elif task == "classification":
        b.linear("score", _labels(c), width, bias=False)
    return True


_FAMILIES: dict[str, Callable[[_Builder, dict[str, Any]], bool]] = {"bert": _bert, "gpt2": _gpt2}
_TASKS = ("embedding", "causal-lm", "masked-lm", "classification")


def meta_of(config: dict[str, Any], task: str) -> ModelMeta | None:
    """The meta-data of a fresh ``task`` model of ``config`` (a ``config.json`` dict), or ``None``
    when this module does not know the layout exactly (the caller then builds the model)."""
    family = config.get("model_type")
    if family not in _FAMILIES or task not in _TASKS:
        return None
    if str(config.get("dtype") or config.get("torch_dtype") or "float32") != "float32":
        return None  # built on the meta device, such a model may take the config's dtype
    torch = sys.modules.get("torch")  # not imported: its default dtype is float32
    if torch is not None and torch.get_default_dtype() != torch.float32:
        return None  # a model built now would take that dtype
    resolved = {key: value for key, value in config.items() if key not in _DROPPED}
    for key, default in _DEFAULTS[family].items():
        resolved.setdefault(key, default)
    sizes = [value for key, value in resolved.items()
             if key in _DEFAULTS[family] and key != "tie_word_embeddings" and value is not None]
    if not all(type(value) is int and value > 0 for value in sizes):
        return None  # a size that is not a positive whole number: let transformers say what is wrong
    try:
        builder = _Builder(task, resolved)
        if not _FAMILIES[family](builder, resolved):
            return None
    except (KeyError, TypeError, ValueError):  # e.g. labels that are not a mapping
        return None
    return builder.meta
