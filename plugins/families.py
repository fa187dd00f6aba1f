"""The built-in model families: BERT-layout encoders, GPT-2, and Llama-style decoders.

Each is a ``ModelFamily`` (``squeezelang.hooks.family``) registered through
``register_model_families``, exactly as a third-party plugin would add one. Module names follow the
transformers modeling code of each ``model_type``; ``tests/models/test_families.py`` builds a tiny
model of every family and checks that every role names a real module.
"""
from __future__ import annotations

from typing import Any

from squeezelang import hookimpl
from squeezelang.hooks.family import ModelFamily

#: Config keys and roles shared by the Llama-style decoders (RMSNorm, rotary, GQA, gated MLP).
_DECODER: dict[str, Any] = dict(
    blocks="layers", o="self_attn.o_proj", mlp_out="mlp.down_proj",
    layers_key="num_hidden_layers", hidden_key="hidden_size", heads_key="num_attention_heads",
    inner_key="intermediate_size", kv_heads_key="num_key_value_heads", head_dim_key="head_dim",
    norms=("input_layernorm", "post_attention_layernorm"), norm_kind="rmsnorm",
    final_norm="norm", embeddings=("embed_tokens",), per_layer_keys=("layer_types",),
    layer_index_attrs=("self_attn.layer_idx",),
)
_QKV = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj")
_GATED = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"))
_QK_NORMS = dict(head_norms=("self_attn.q_norm", "self_attn.k_norm"))
#: Gemma: ``x · (1 + w)`` norms, a norm before and after the MLP too, embeddings × sqrt(hidden).
_GEMMA = dict(norm_kind="rmsnorm_one_plus", embedding_scale=True,
              norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"))

FAMILIES = (
    ModelFamily(
        name="bert", model_types=("bert", "roberta", "xlm-roberta"), blocks="encoder.layer",
        q="attention.self.query", k="attention.self.key", v="attention.self.value",
        o="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense",
        norms=("attention.output.LayerNorm", "output.LayerNorm"), embedding_norm="embeddings.LayerNorm",
        embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                    "embeddings.token_type_embeddings"),
        layers_key="num_hidden_layers", hidden_key="hidden_size", heads_key="num_attention_heads",
        inner_key="intermediate_size", layer_index_attrs=("attention.self.layer_idx",)),
    ModelFamily(
        name="gpt2", model_types=("gpt2",), blocks="h", qkv="attn.c_attn", o="attn.c_proj",
        mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", conv1d=True, norms=("ln_1", "ln_2"),
        final_norm="ln_f", embeddings=("wte", "wpe"), layers_key="n_layer", hidden_key="n_embd",
        heads_key="n_head", inner_key="n_inner", layer_index_attrs=("attn.layer_idx",)),
    ModelFamily(name="llama", model_types=("llama",), **_DECODER, **_QKV, **_GATED),
    ModelFamily(name="mistral", model_types=("mistral",), **_DECODER, **_QKV, **_GATED),
    ModelFamily(name="qwen2", model_types=("qwen2",), **_DECODER, **_QKV, **_GATED),
    ModelFamily(name="qwen3", model_types=("qwen3",), **_DECODER, **_QKV, **_GATED, **_QK_NORMS),
    ModelFamily(name="phi3", model_types=("phi3",), **_DECODER, qkv="self_attn.qkv_proj",
                mlp_fused="mlp.gate_up_proj"),
    ModelFamily(name="gemma2", model_types=("gemma2",), **{**_DECODER, **_GEMMA}, **_QKV, **_GATED),
    ModelFamily(name="gemma3_text", model_types=("gemma3_text",),
                **{**_DECODER, **_GEMMA, "layer_index_attrs": ("layer_idx", "self_attn.layer_idx")},
                **_QKV, **_GATED, **_QK_NORMS),
)


@hookimpl
def register_model_families(registry: Any) -> None:
    for family in FAMILIES:
        registry.add(family)
