"""Model families: the structure of a transformer architecture, described as data.

Structured techniques (``prune`` methods ``activation`` and ``depth``, ``shrink``, ``task_prune``)
and the activation statistics behind them never name a module such as ``encoder.layer`` or
``c_fc``: they ask a ``ModelFamily`` for *roles* ("the MLP input projections of block 3", "the
key/value groups", "the norms of a block") and for the config keys that change with a dimension.
A family is registered by a plugin through ``register_model_families``, exactly like a technique;
the built-in ones live in ``plugins/families.py``.

Module names are templates relative to a block (``self_attn.q_proj``) or to the base model
(``embed_tokens``, ``norm``); the base model is what transformers' ``model.base_model`` returns,
so the same family serves every task head (``LlamaModel`` inside ``LlamaForCausalLM`` or
``LlamaForSequenceClassification``).

A family may also describe its *layout* (``Layout``): the order of its modules, their classes,
which projections have biases and the modules of each task head. ``models.layout_meta`` then
computes the meta-data of a model (every tensor's name, shape and dtype) from ``config.json``
without importing torch; a family without one is built on torch's meta device instead.

The family of a config is looked up in the registries of the plan or run in progress
(``families_in_use``), so a family that a ``--plugin`` module registers is seen by every technique.

This module is imported by ``squeeze check``: it must not import torch.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from squeezelang.errors import PluginError, SqueezeError
from squeezelang.hooks.registry import Registry

if TYPE_CHECKING:
    from squeezelang.hooks.registry import Registries

NORM_KINDS = ("layernorm", "rmsnorm", "rmsnorm_one_plus")
"""``layernorm`` (weight and bias), ``rmsnorm`` (weight), ``rmsnorm_one_plus`` (Gemma: ``x · (1 + w)``)."""

SUBLAYERS = ("attention", "mlp")
"""The sublayers an ``input_norms`` entry may feed: the attention projections or the MLP inputs."""

LAYOUT_TASKS = ("embedding", "causal-lm", "masked-lm", "classification")
"""The tasks a ``Layout`` may describe (``embedding`` is the base model itself)."""


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True, eq=False)
class LayoutModule:
    """A module of a task head: its name relative to the task model (``{base}`` stands for the
    base model's prefix with its dot, empty for the base model itself), its class name, and its
    tensors as ``(suffix, shape)`` pairs whose dimensions are *size names*: ``hidden``, ``inner``,
    ``heads``, ``kv_heads``, ``head_dim``, ``layers`` (the family's sizes), ``vocab`` (the config's
    ``vocab_size``), ``labels`` (``id2label``/``num_labels``), or any other config key."""

    name: str
    kind: str
    tensors: tuple[tuple[str, tuple[str, ...]], ...] = ()


def linear(name: str, out_features: str, in_features: str, bias: bool = True) -> LayoutModule:
    """A ``torch.nn.Linear`` head module (weight ``[out, in]``, bias ``[out]``)."""
    weight = (("weight", (out_features, in_features)),)
    return LayoutModule(name, "Linear", weight + ((("bias", (out_features,)),) if bias else ()))


@dataclass(frozen=True, eq=False)
class TaskLayout:
    """What a task model adds to the base model.

    ``modules``: the head's modules, in registration order. ``ties``: pairs of tensor names (with
    ``{base}``) that are one tensor when the config's ``tie_word_embeddings`` is true (the output
    layer and the token embedding); a tied tensor belongs to the module that comes first.
    ``head_first``: the head is registered before the base model (XLM-RoBERTa's task classes).
    """

    modules: tuple[LayoutModule, ...] = ()
    ties: tuple[tuple[str, str], ...] = ()
    head_first: bool = False


@dataclass(frozen=True, eq=False)
class Layout:
    """How the tensors of a family's models are laid out, in state-dict order.

    ``prefix``: the attribute that holds the base model in a task model (``model``, ``bert``).
    ``base``: the base model's modules in order, base-relative; the family's ``blocks`` path
    stands for every block. Only the family's ``embeddings``, ``embedding_norm`` and
    ``final_norm`` may appear besides it.
    ``block``: a block's modules in order, block-relative, each one of the family's roles (``q``,
    ``qkv``, ``o``, ``mlp_in``, ``norms``, ``head_norms``, …); shapes follow from the roles.
    ``tasks``: the tasks transformers has a class for, with what each adds (``TaskLayout``).
    ``norm_class``: the class name of the family's norms (projections are ``Linear``, or
    ``Conv1D`` with ``conv1d``; embeddings, Gemma's scaled one too, are ``Embedding``).
    ``rows``: the config key of each embedding's row count (the token embedding: ``vocab_size``).
    ``attention_bias`` (``q``/``k``/``v`` or ``qkv``), ``o_bias`` and ``mlp_bias``: whether those
    projections have a bias: ``True``, ``False`` or the name of a boolean config key.
    ``requires``: config values the layout assumes (an option that adds tensors, such as
    cross-attention); a config with another value is not laid out here.

    Non-persistent buffers (rotary frequencies, position ids, Gemma's embedding scale) are not in
    the state dict and are not described.
    """

    prefix: str
    base: tuple[str, ...]
    block: tuple[str, ...]
    tasks: Mapping[str, TaskLayout] = field(default_factory=dict)
    norm_class: str = "LayerNorm"
    rows: Mapping[str, str] = field(default_factory=dict)
    attention_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    requires: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFamily:
    """The structure of one transformer architecture, as the structured techniques need it.

    Recognition
        ``name``: the registry name; ``model_types``: the ``config.model_type`` values it covers.

    Blocks
        ``blocks``: dotted path of the block list under the base model (``encoder.layer``, ``h``,
        ``layers``).

    Attention (names relative to a block)
        ``q``, ``k``, ``v``: the separate projections; or ``qkv``: one fused projection whose
        outputs are ``[queries | keys | values]`` (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``).
        ``o``: the output projection (its input is the per-head attention context).
        ``head_norms``: norms over the head dimension (Qwen3's and Gemma 3's ``q_norm``/``k_norm``);
        surgery never changes the head dimension of a family that has them, so they are untouched.

    MLP (names relative to a block)
        ``mlp_in``: projections whose *outputs* are the neurons (plain: one, gated: gate and up);
        ``mlp_fused``: one projection whose outputs are ``[gate | up]`` (Phi-3's ``gate_up_proj``);
        ``mlp_out``: the projection whose *inputs* are the neurons (its input is the activation
        that calibration measures).

    Weights
        ``conv1d``: weights are stored ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``[out, in]``.

    Norms
        ``norms``: the hidden-wide norms of a block; ``norm_kind``: one of ``NORM_KINDS``;
        ``embedding_norm`` and ``final_norm``: relative to the base model (or ``None``).
        ``input_norms``: the norms of a *pre-norm* block, as ``(norm, sublayer)`` pairs, whose
        output is the input of that sublayer and of nothing else: ``"attention"`` (read by ``q``,
        ``k``, ``v`` or ``qkv``) or ``"mlp"`` (read by ``mlp_in`` or ``mlp_fused``). A
        per-channel scale of those inputs can be folded into such a norm (AWQ, SmoothQuant).
        Empty for a post-norm block (BERT), whose norm output is also the residual stream.

    Embeddings and head
        ``embeddings``: the embedding tables under the base model, the token embedding first;
        ``embedding_scale``: the token embeddings are multiplied by ``sqrt(hidden)`` (Gemma).
        The output head and its tying follow the config's ``tie_word_embeddings``.

    Config keys
        ``layers_key``, ``hidden_key``, ``heads_key``, ``inner_key``: the sizes; ``kv_heads_key``:
        the key/value head count of grouped-query attention (``None``: as many as query heads);
        ``head_dim_key``: an explicit head dimension that the modeling code honours (``None``: the
        head dimension is ``hidden / heads`` and the attention is as wide as the hidden size);
        ``inner_factor``: the MLP width when ``inner_key`` is unset (GPT-2: ``4 × hidden``);
        ``hidden_per_head``: the config class refuses a hidden size that is not a multiple of the
        head count even when ``head_dim`` is explicit (transformers' Llama and Gemma configs);
        ``per_layer_keys``: config lists with one entry per layer (``layer_types``), sliced when
        layers go; ``layer_index_attrs``: block-relative attributes holding the layer number
        (``self_attn.layer_idx``), renumbered when layers go.

    ``config_defaults``: the values the config class gives keys a ``config.json`` may leave out
    (sizes, ``tie_word_embeddings``, bias flags, ``pad_token_id``/``bos_token_id``/
    ``eos_token_id``); a key absent here is one whose default is not known. ``layout``: how its
    tensors are laid out (``Layout``), or ``None`` (meta-data then comes from building the model).

    ``unsupported``: ``(what, reason)`` pairs for what this family cannot do yet (``what`` as the
    techniques name it: ``"prune:heads"``, ``"shrink"``, ``"task_prune"``, …); techniques call
    ``require`` at plan time so that ``squeeze check``/``plan`` refuse.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    o: str
    mlp_out: str
    layers_key: str
    hidden_key: str
    heads_key: str
    inner_key: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    head_norms: tuple[str, ...] = ()
    mlp_in: tuple[str, ...] = ()
    mlp_fused: str | None = None
    conv1d: bool = False
    norms: tuple[str, ...] = ()
    norm_kind: str = "layernorm"
    input_norms: tuple[tuple[str, str], ...] = ()
    embedding_norm: str | None = None
    final_norm: str | None = None
    embeddings: tuple[str, ...] = ()
    embedding_scale: bool = False
    kv_heads_key: str | None = None
    head_dim_key: str | None = None
    inner_factor: int = 4
    hidden_per_head: bool = False
    per_layer_keys: tuple[str, ...] = ()
    layer_index_attrs: tuple[str, ...] = ()
    config_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    layout: Layout | None = None
    unsupported: tuple[tuple[str, str], ...] = ()

    def validate_definition(self) -> None:
        """Refuse an inconsistent description at registration (a ``PluginError``)."""
        if not self.model_types:
            raise PluginError("model_types is empty")
        if (self.qkv is None) == (self.q is None):
            raise PluginError("give either q, k and v, or qkv")
        if self.q is not None and (self.k is None or self.v is None):
            raise PluginError("q needs k and v")
        if bool(self.mlp_in) == bool(self.mlp_fused):
            raise PluginError("give either mlp_in or mlp_fused")
        if self.norm_kind not in NORM_KINDS:
            raise PluginError(f"norm_kind must be one of {', '.join(NORM_KINDS)}")
        for norm, sublayer in self.input_norms:
            if norm not in self.norms or sublayer not in SUBLAYERS:
                raise PluginError(f"input_norms: ({norm!r}, {sublayer!r}) must pair one of the "
                                  f"norms with one of {', '.join(SUBLAYERS)}")
        if not self.embeddings:
            raise PluginError("embeddings is empty (the token embedding comes first)")
        if self.layout is not None:
            self._validate_layout(self.layout)

    def _validate_layout(self, layout: Layout) -> None:
        roles = set(self.block_roles())
        wrong = [name for name in layout.block if name not in roles]
        if wrong:
            raise PluginError(f"layout.block names modules that are not roles: {', '.join(wrong)}")
        outside = {self.blocks, *self.embeddings, self.embedding_norm, self.final_norm} - {None}
        wrong = [name for name in layout.base if name not in outside]
        if wrong or self.blocks not in layout.base:
            what = ", ".join(wrong) or "without the blocks"
            raise PluginError("layout.base lists the blocks path, the embeddings and the embedding "
                              f"and final norms only (not {what})")
        missing = [e for e in self.embeddings[1:] if e not in layout.rows]
        if missing:
            raise PluginError(f"layout.rows gives no row-count key for {', '.join(missing)}")
        unknown = [task for task in layout.tasks if task not in LAYOUT_TASKS]
        if unknown:
            raise PluginError(f"layout.tasks: unknown task {', '.join(unknown)} (expected one of "
                              f"{', '.join(LAYOUT_TASKS)})")

    def block_roles(self) -> tuple[str, ...]:
        """Every block-relative module name this family gives a role."""
        names = (self.q, self.k, self.v, self.qkv, self.o, *self.mlp_in, self.mlp_fused,
                 self.mlp_out, *self.norms, *self.head_norms)
        return tuple(n for n in names if n)

    # ------------------------------------------------------------------ reading a config
    @property
    def tied_head_dim(self) -> bool:
        """The head dimension is ``hidden / heads`` (no explicit key): heads and hidden move together."""
        return self.head_dim_key is None

    @property
    def gated(self) -> bool:
        return self.mlp_fused is not None or len(self.mlp_in) > 1

    def sizes(self, config: Any) -> dict[str, int]:
        """``layers``, ``heads``, ``kv_heads``, ``hidden``, ``inner`` and ``head_dim`` of a config."""
        hidden = int(_get(config, self.hidden_key))
        heads = int(_get(config, self.heads_key))
        inner = _get(config, self.inner_key)
        kv = _get(config, self.kv_heads_key) if self.kv_heads_key else None
        head_dim = _get(config, self.head_dim_key) if self.head_dim_key else None
        return {"layers": int(_get(config, self.layers_key)), "heads": heads,
                "kv_heads": int(kv) if kv is not None else heads, "hidden": hidden,
                "inner": int(inner) if inner is not None else self.inner_factor * hidden,
                "head_dim": int(head_dim) if head_dim is not None else hidden // heads}

    def refusal(self, technique: str) -> str | None:
        """Why ``technique`` cannot be done on this family yet (naming both), or ``None``."""
        for name, reason in self.unsupported:
            if name == technique:
                return f"{technique} is not supported on model family '{self.name}' yet: {reason}"
        return None

    def require(self, technique: str) -> None:
        """Raise ``SqueezeError`` naming the family and technique if it cannot be done yet."""
        refusal = self.refusal(technique)
        if refusal is not None:
            raise SqueezeError(refusal)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


class FamilyRegistry(Registry[ModelFamily]):
    """Model families by name, with a lookup by ``config.model_type``; a model type claimed by two
    families is refused, naming both plugins."""

    def __init__(self) -> None:
        super().__init__("model family")
        self._by_type: dict[str, str] = {}

    def add(self, item: ModelFamily, plugin: str) -> None:
        if not isinstance(item, ModelFamily):
            raise PluginError(f"plugin '{plugin}' registered a model family that is not a "
                              f"ModelFamily: {item!r}")
        for model_type in item.model_types:
            other = self._by_type.get(model_type)
            if other is not None:
                raise PluginError(
                    f"model type '{model_type}' is claimed by family '{other}' (plugin "
                    f"'{self.owner(other)}') and family '{item.name}' (plugin '{plugin}'); "
                    "uninstall one of them")
        super().add(item, plugin)
        for model_type in item.model_types:
            self._by_type[model_type] = item.name

    def for_config(self, config: Any) -> ModelFamily | None:
        """The family of a config (object or dict), or ``None``."""
        name = self._by_type.get(_get(config, "model_type"))
        return self.get(name) if name else None

    def model_types(self) -> list[str]:
        return sorted(self._by_type)


_IN_USE: contextvars.ContextVar[Registries | None] = contextvars.ContextVar(
    "squeezelang_families_in_use", default=None)


@contextlib.contextmanager
def families_in_use(registries: Registries) -> Iterator[None]:
    """Look families up in ``registries`` inside the block (the planner and the executor wrap
    estimates, the model source and stages in it), so that a family registered by a ``--plugin``
    module, which the installed entry points do not know, is the one every technique sees."""
    token = _IN_USE.set(registries)
    try:
        yield
    finally:
        _IN_USE.reset(token)


def registries_in_use() -> Registries:
    """The registries of the plan or run in progress, else those of the installed plugins."""
    current = _IN_USE.get()
    if current is not None:
        return current
    from squeezelang.hooks.manager import default_registries

    return default_registries()


def family_of(config: Any, registries: Registries | None = None) -> ModelFamily:
    """The registered family of a config (in ``registries``, default ``registries_in_use()``);
    ``SqueezeError`` listing the known model types if none."""
    registries = registries if registries is not None else registries_in_use()
    found = registries.families.for_config(config)
    if found is None:
        raise SqueezeError(
            f"structured pruning supports model types {', '.join(registries.families.model_types())}, "
            f"not '{_get(config, 'model_type')}' (a plugin can add a family: see docs/plugins.md, "
            "'Adding a model family')")
    return found
