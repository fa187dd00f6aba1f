"""The built-in model families: BERT-layout encoders, GPT-2, and Llama-style decoders.

Each is a ``ModelFamily`` (``squeezelang.plugin``) registered through
``register_model_families``, exactly as a third-party plugin would add one. Module names, layouts
and config defaults follow the transformers modeling and configuration code of each
``model_type``; ``tests/models/test_families.py`` builds a tiny model of every family and checks
that every role names a real module, and ``tests/models/test_layout_meta.py`` that every layout
gives the meta-data of the model transformers builds, task by task.
"""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import Layout, LayoutModule, ModelFamily, TaskLayout, hookimpl, linear

# ---------------------------------------------------------------------------- BERT-layout encoders
#: Post-norm blocks: each norm's output is also the residual stream, so no ``input_norms``.
_ENCODER: dict[str, Any] = dict(
    blocks="encoder.layer", q="attention.self.query", k="attention.self.key",
    v="attention.self.value", o="attention.output.dense", mlp_in=("intermediate.dense",),
    mlp_out="output.dense", norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embedding_norm="embeddings.LayerNorm",
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                "embeddings.token_type_embeddings"),
    layers_key="num_hidden_layers", hidden_key="hidden_size", heads_key="num_attention_heads",
    inner_key="intermediate_size", layer_index_attrs=("attention.self.layer_idx",),
    unsupported=(("rotate", "post-norm LayerNorm blocks: the norm outputs are the residual stream, "
                            "and LayerNorm's mean subtraction does not commute with a rotation"),),
)
_ENCODER_SIZES = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072,
                  "max_position_embeddings": 512, "type_vocab_size": 2,
                  "tie_word_embeddings": True}
_ENCODER_LAYOUT: dict[str, Any] = dict(
    block=("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
           "output.dense", "output.LayerNorm"),
    rows={"embeddings.position_embeddings": "max_position_embeddings",
          "embeddings.token_type_embeddings": "type_vocab_size"},
    attention_bias=True, o_bias=True, mlp_bias=True,
    requires={"position_embedding_type": "absolute", "add_cross_attention": False},
)
_POOLER = linear("{base}pooler.dense", "hidden", "hidden")


def _lm_head(name: str, kind: str, dense: str, norm: str) -> TaskLayout:
    """The encoders' masked-LM prediction head (their causal-LM classes share it): a bias over the
    vocabulary, a dense transform and its norm, and a decoder tied to the word embeddings."""
    return TaskLayout(
        modules=(LayoutModule(name, kind, (("bias", ("vocab",)),)),
                 linear(f"{name}.{dense}", "hidden", "hidden"),
                 LayoutModule(f"{name}.{norm}", "LayerNorm",
                              (("weight", ("hidden",)), ("bias", ("hidden",)))),
                 linear(f"{name}.decoder", "vocab", "hidden")),
        ties=((f"{name}.decoder.weight", "{base}embeddings.word_embeddings.weight"),
              (f"{name}.decoder.bias", f"{name}.bias")))


_BERT_LM = _lm_head("cls.predictions", "BertLMPredictionHead", "transform.dense",
                    "transform.LayerNorm")
_ROBERTA_CLASSIFIER = (linear("classifier.dense", "hidden", "hidden"),
                       linear("classifier.out_proj", "labels", "hidden"))
#: RoBERTa registers the token-type embeddings and the norm before the position embeddings.
_ROBERTA_BASE = ("embeddings.word_embeddings", "embeddings.token_type_embeddings",
                 "embeddings.LayerNorm", "embeddings.position_embeddings", "encoder.layer")


def _roberta_tasks(head_kind: str, head_first: bool) -> dict[str, TaskLayout]:
    lm = _lm_head("lm_head", head_kind, "dense", "layer_norm")
    lm = TaskLayout(lm.modules, lm.ties, head_first)
    return {"embedding": TaskLayout((_POOLER,)), "causal-lm": lm, "masked-lm": lm,
            "classification": TaskLayout(_ROBERTA_CLASSIFIER, head_first=head_first)}


# ---------------------------------------------------------------------------- Llama-style decoders
#: Config keys and roles shared by the Llama-style decoders (RMSNorm, rotary, GQA, gated MLP).
_DECODER: dict[str, Any] = dict(
    blocks="layers", o="self_attn.o_proj", mlp_out="mlp.down_proj",
    layers_key="num_hidden_layers", hidden_key="hidden_size", heads_key="num_attention_heads",
    inner_key="intermediate_size", kv_heads_key="num_key_value_heads", head_dim_key="head_dim",
    norms=("input_layernorm", "post_attention_layernorm"), norm_kind="rmsnorm",
    input_norms=(("input_layernorm", "attention"), ("post_attention_layernorm", "mlp")),
    final_norm="norm", embeddings=("embed_tokens",), per_layer_keys=("layer_types",),
    layer_index_attrs=("self_attn.layer_idx",),
)
_QKV = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj")
_GATED = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"))
_QK_NORMS = dict(head_norms=("self_attn.q_norm", "self_attn.k_norm"))
#: Gemma: ``x · (1 + w)`` norms, a norm before and after the MLP too, embeddings × sqrt(hidden)
#: (``post_attention_layernorm`` normalises the attention's output, before the residual add).
_GEMMA = dict(norm_kind="rmsnorm_one_plus", embedding_scale=True,
              norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"),
              input_norms=(("input_layernorm", "attention"), ("pre_feedforward_layernorm", "mlp")),
              unsupported=(("rotate", "the norms after the attention and the MLP (before the "
                                      "residual add) cannot absorb a rotation of the residual "
                                      "stream: it would have to run online"),))

_DECODER_TASKS = {
    "embedding": TaskLayout(),
    "causal-lm": TaskLayout((linear("lm_head", "vocab", "hidden", bias=False),),
                            ties=(("lm_head.weight", "{base}embed_tokens.weight"),)),
    "classification": TaskLayout((linear("score", "labels", "hidden", bias=False),)),
}
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = _NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _decoder_layout(norm_class: str, block: tuple[str, ...] = _ATTENTION + _MLP + _NORMS,
                    **extra: Any) -> Layout:
    return Layout(prefix="model", base=("embed_tokens", "layers", "norm"), block=block,
                  tasks=_DECODER_TASKS, norm_class=norm_class, **extra)


def _sizes(vocab: int, hidden: int, layers: int, heads: int, inner: int, tied: bool,
           **extra: Any) -> dict[str, Any]:
    """Config-class defaults of a decoder (``num_key_value_heads`` and ``head_dim`` only where the
    class fixes them: otherwise they follow the head count and ``hidden / heads``)."""
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": inner, "tie_word_embeddings": tied,
            **extra}


def _tokens(pad: int | None, bos: int | None, eos: int | None) -> dict[str, int | None]:
    return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}


FAMILIES = (
    ModelFamily(
        name="bert", model_types=("bert",), **_ENCODER,
        config_defaults={**_ENCODER_SIZES, **_tokens(0, None, None)},
        layout=Layout(prefix="bert", base=_ENCODER["embeddings"] + ("embeddings.LayerNorm",
                                                                      "encoder.layer"),
                      tasks={"embedding": TaskLayout((_POOLER,)),
                             "classification": TaskLayout((_POOLER,
                                                           linear("classifier", "labels", "hidden"))),
                             "masked-lm": _BERT_LM, "causal-lm": _BERT_LM},
                      **_ENCODER_LAYOUT)),
    ModelFamily(
        name="roberta", model_types=("roberta",), **_ENCODER,
        config_defaults={**_ENCODER_SIZES, "vocab_size": 50265, **_tokens(1, 0, 2)},
        layout=Layout(prefix="roberta", base=_ROBERTA_BASE,
                      tasks=_roberta_tasks("RobertaLMHead", head_first=False), **_ENCODER_LAYOUT)),
    ModelFamily(
        name="xlm-roberta", model_types=("xlm-roberta",), **_ENCODER,
        config_defaults={**_ENCODER_SIZES, **_tokens(1, 0, 2)},
        layout=Layout(prefix="roberta", base=_ROBERTA_BASE,
                      tasks=_roberta_tasks("XLMRobertaLMHead", head_first=True), **_ENCODER_LAYOUT)),
    ModelFamily(
        name="gpt2", model_types=("gpt2",), blocks="h", qkv="attn.c_attn", o="attn.c_proj",
        mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", conv1d=True, norms=("ln_1", "ln_2"),
        input_norms=(("ln_1", "attention"), ("ln_2", "mlp")),
        final_norm="ln_f", embeddings=("wte", "wpe"), layers_key="n_layer", hidden_key="n_embd",
        heads_key="n_head", inner_key="n_inner", layer_index_attrs=("attn.layer_idx",),
        unsupported=(("rotate", "LayerNorm's mean subtraction does not commute with a rotation"),),
        config_defaults={"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                         "n_head": 12, "n_inner": None, "tie_word_embeddings": True,
                         **_tokens(None, 50256, 50256)},
        layout=Layout(
            prefix="transformer", base=("wte", "wpe", "h", "ln_f"),
            block=("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"),
            rows={"wpe": "n_positions"}, attention_bias=True, o_bias=True, mlp_bias=True,
            requires={"add_cross_attention": False},
            tasks={"embedding": TaskLayout(),
                   "causal-lm": TaskLayout((linear("lm_head", "vocab", "hidden", bias=False),),
                                           ties=(("lm_head.weight", "{base}wte.weight"),)),
                   "classification": TaskLayout((linear("score", "labels", "hidden", bias=False),))})),
    ModelFamily(
        name="llama", model_types=("llama",), **_DECODER, **_QKV, **_GATED, hidden_per_head=True,
        config_defaults={**_sizes(32000, 4096, 32, 32, 11008, False, attention_bias=False,
                                  mlp_bias=False), **_tokens(None, 1, 2)},
        layout=_decoder_layout("LlamaRMSNorm", attention_bias="attention_bias",
                               o_bias="attention_bias", mlp_bias="mlp_bias")),
    ModelFamily(
        name="mistral", model_types=("mistral",), **_DECODER, **_QKV, **_GATED,
        config_defaults={**_sizes(32000, 4096, 32, 32, 14336, False, num_key_value_heads=8),
                         **_tokens(None, 1, 2)},
        layout=_decoder_layout("MistralRMSNorm")),
    ModelFamily(
        name="qwen2", model_types=("qwen2",), **_DECODER, **_QKV, **_GATED,
        config_defaults={**_sizes(151936, 4096, 32, 32, 22016, False, num_key_value_heads=32),
                         **_tokens(None, None, None)},
        layout=_decoder_layout("Qwen2RMSNorm", attention_bias=True)),
    ModelFamily(
        name="qwen3", model_types=("qwen3",), **_DECODER, **_QKV, **_GATED, **_QK_NORMS,
        config_defaults={**_sizes(151936, 4096, 32, 32, 22016, False, num_key_value_heads=32,
                                  head_dim=128, attention_bias=False),
                         **_tokens(None, None, None)},
        layout=_decoder_layout("Qwen3RMSNorm",
                               block=_ATTENTION + _QK_NORMS["head_norms"] + _MLP + _NORMS,
                               attention_bias="attention_bias", o_bias="attention_bias")),
    ModelFamily(
        name="phi3", model_types=("phi3",), **_DECODER, qkv="self_attn.qkv_proj",
        mlp_fused="mlp.gate_up_proj",
        config_defaults={**_sizes(32064, 3072, 32, 32, 8192, False), **_tokens(32000, 1, 32000)},
        layout=_decoder_layout("Phi3RMSNorm", block=("self_attn.o_proj", "self_attn.qkv_proj",
                                                     "mlp.gate_up_proj", "mlp.down_proj") + _NORMS)),
    ModelFamily(
        name="gemma2", model_types=("gemma2",), **{**_DECODER, **_GEMMA}, **_QKV, **_GATED,
        hidden_per_head=True,
        config_defaults={**_sizes(256000, 2304, 26, 8, 9216, True, num_key_value_heads=4,
                                  head_dim=256, attention_bias=False), **_tokens(0, 2, 1)},
        layout=_decoder_layout("Gemma2RMSNorm", block=_ATTENTION + _MLP + _GEMMA_NORMS,
                               attention_bias="attention_bias", o_bias="attention_bias")),
    ModelFamily(
        name="gemma3_text", model_types=("gemma3_text",),
        **{**_DECODER, **_GEMMA, "layer_index_attrs": ("layer_idx", "self_attn.layer_idx")},
        **_QKV, **_GATED, **_QK_NORMS, hidden_per_head=True,
        config_defaults={**_sizes(262208, 2304, 26, 8, 9216, True, num_key_value_heads=4,
                                  head_dim=256, attention_bias=False), **_tokens(0, 2, 1)},
        layout=_decoder_layout("Gemma3RMSNorm",
                               block=_ATTENTION + _QK_NORMS["head_norms"] + _MLP + _GEMMA_NORMS,
                               attention_bias="attention_bias", o_bias="attention_bias")),
)


@hookimpl
def register_model_families(registry: Any) -> None:
    for family in FAMILIES:
        registry.add(family)
