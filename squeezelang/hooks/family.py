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

This module is imported by ``squeeze check``: it must not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from squeezelang.errors import PluginError, SqueezeError
from squeezelang.hooks.registry import Registry

if TYPE_CHECKING:
    from squeezelang.hooks.registry import Registries

NORM_KINDS = ("layernorm", "rmsnorm", "rmsnorm_one_plus")
"""``layernorm`` (weight and bias), ``rmsnorm`` (weight), ``rmsnorm_one_plus`` (Gemma: ``x · (1 + w)``)."""


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
        ``per_layer_keys``: config lists with one entry per layer (``layer_types``), sliced when
        layers go; ``layer_index_attrs``: block-relative attributes holding the layer number
        (``self_attn.layer_idx``), renumbered when layers go.

    ``unsupported``: ``(what, reason)`` pairs for what this family cannot do yet (``what`` as the
    techniques name it: ``"prune:heads"``, ``"shrink"``, ``"task_prune"``, …); techniques call ``require`` at plan time so that ``squeeze check``/``plan`` refuse.
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
    embedding_norm: str | None = None
    final_norm: str | None = None
    embeddings: tuple[str, ...] = ()
    embedding_scale: bool = False
    kv_heads_key: str | None = None
    head_dim_key: str | None = None
    inner_factor: int = 4
    per_layer_keys: tuple[str, ...] = ()
    layer_index_attrs: tuple[str, ...] = ()
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
        if not self.embeddings:
            raise PluginError("embeddings is empty (the token embedding comes first)")

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

    def require(self, technique: str) -> None:
        """Raise ``SqueezeError`` naming the family and technique if it cannot be done yet."""
        for name, reason in self.unsupported:
            if name == technique:
                raise SqueezeError(f"{technique} is not supported on model family '{self.name}' "
                                   f"yet: {reason}")


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


def family_of(config: Any, registries: Registries | None = None) -> ModelFamily:
    """The registered family of a config; ``SqueezeError`` listing the known model types if none."""
    if registries is None:
        from squeezelang.hooks.manager import default_registries

        registries = default_registries()
    found = registries.families.for_config(config)
    if found is None:
        raise SqueezeError(
            f"structured pruning supports model types {', '.join(registries.families.model_types())}, "
            f"not '{_get(config, 'model_type')}' (a plugin can add a family: see docs/plugins.md, "
            "'Adding a model family')")
    return found
