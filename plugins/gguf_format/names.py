"""What llama.cpp calls each supported family, as data: its architecture, its metadata keys and
where each value comes from in a transformers config, and how its tensors differ from transformers'.

Tensor *names* come from gguf-py's own table (``gguf.TensorNameMap``, the one llama.cpp's
``convert_hf_to_gguf.py`` uses); this module holds what that table does not say: which families
llama.cpp runs the way transformers does (checked by ``tests/formats/test_gguf_format.py`` against
torch logits), and the per-family differences of layout (GPT-2's ``Conv1D`` weights are stored
``[in, out]``; llama.cpp's ``llama`` architecture rotates interleaved pairs, so the rows of the
query and key projections are permuted from transformers' half-split layout; Gemma's norms
compute ``x * (1 + w)`` and llama.cpp multiplies by the stored weight, so ``1 + w`` is stored).
The families checked in that test are the ones listed here; any other is refused by ``limits``.

Imported by ``squeeze check``: no torch, no gguf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Metadata every decoder of this module writes: ``(key after "{arch}.", fact)`` (facts: ``facts``).
_DECODER = (
    ("context_length", "context"), ("embedding_length", "hidden"), ("block_count", "layers"),
    ("feed_forward_length", "inner"), ("attention.head_count", "heads"),
    ("attention.head_count_kv", "kv_heads"), ("attention.key_length", "head_dim"),
    ("attention.value_length", "head_dim"), ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", "rope_theta"), ("rope.dimension_count", "rope_dims"),
    ("vocab_size", "vocab_size"),
)
#: Metadata keys whose value is a float (the others are unsigned integers).
FLOAT_KEYS = frozenset({"attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon",
                        "rope.freq_base", "rope.freq_base_swa", "attn_logit_softcapping",
                        "final_logit_softcapping", "rope.scaling.factor"})


@dataclass(frozen=True)
class Arch:
    """One family as llama.cpp runs it.

    ``arch``: llama.cpp's architecture (``general.architecture``); ``keys``: its metadata as
    ``(key after "{arch}.", fact)``; ``rope_permute``: the query/key rows are permuted for
    llama.cpp's interleaved rotary embedding; ``norm_offset``: added to every norm weight;
    ``output``: ``"optional"`` (a tied head is not written, llama.cpp reads the token embedding),
    ``"tied"`` (llama.cpp always reads the token embedding: an untied head is refused);
    ``swa_pattern``: llama.cpp's fixed sliding-window layer pattern (every n-th layer global, 0:
    none); ``skip``: state-dict suffixes that are not weights. (GPT-2's ``Conv1D`` weights, stored
    ``[in, out]``, are transposed by their module's kind: ``tensors.slots``.)
    """

    arch: str
    keys: tuple[tuple[str, str], ...] = _DECODER
    rope_permute: bool = False
    norm_offset: float = 0.0
    output: str = "optional"
    swa_pattern: int = 0
    skip: tuple[str, ...] = ()
    #: config keys that, when set, must have one of these values for llama.cpp to match
    requires: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: config keys that must not be unset (llama.cpp applies a default of its own)
    needs: tuple[str, ...] = ()


_GEMMA_KEYS = _DECODER + (("attention.sliding_window", "sliding_window"),)

#: transformers ``model_type`` -> how llama.cpp runs it.
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("gpt2", keys=(
        ("context_length", "context"), ("embedding_length", "hidden"), ("block_count", "layers"),
        ("feed_forward_length", "inner"), ("attention.head_count", "heads"),
        ("attention.layer_norm_epsilon", "layer_norm_epsilon"), ("vocab_size", "vocab_size")),
        skip=(".attn.bias", ".attn.masked_bias"),
        requires={"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                  "scale_attn_by_inverse_layer_idx": (False, None),
                  "reorder_and_upcast_attn": (False, None)}),
    "llama": Arch("llama", rope_permute=True),
    # convert_hf_to_gguf.py writes Mistral as llama.cpp's llama architecture, which has no
    # sliding window (nor does its phi3): refused (``limits``) when it is shorter than the context
    "mistral": Arch("llama", rope_permute=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", requires={"attention_bias": (False,)}),
    "phi3": Arch("phi3", keys=_DECODER + (
        ("rope.scaling.original_context_length", "original_context"),
        ("attention.sliding_window", "phi3_window"))),
    "gemma2": Arch("gemma2", keys=_GEMMA_KEYS + (
        ("attn_logit_softcapping", "attn_logit_softcapping"),
        ("final_logit_softcapping", "final_logit_softcapping")),
        norm_offset=1.0, output="tied", swa_pattern=2, requires={"attention_bias": (False,)},
        needs=("attn_logit_softcapping", "final_logit_softcapping")),
    "gemma3_text": Arch("gemma3", keys=_GEMMA_KEYS + (("rope.freq_base_swa", "rope_theta_swa"),),
                        norm_offset=1.0, swa_pattern=6,
                        requires={"final_logit_softcapping": (None,),
                                  "attn_logit_softcapping": (None,), "attention_bias": (False,)}),
}

#: rope types written as llama.cpp has them (``llama3``: a ``rope_freqs`` tensor).
ROPE_TYPES = ("default", "linear", "llama3")


def arch_of(config: dict[str, Any] | None) -> Arch | None:
    """The ``Arch`` of a config dict, ``None`` if llama.cpp is not known to run it like transformers."""
    return ARCHS.get(str((config or {}).get("model_type")))


def rope_parameters(config: dict[str, Any], kind: str = "full_attention") -> dict[str, Any]:
    """The rotary parameters of a config (transformers 5's ``rope_parameters``, per layer kind for
    Gemma 3; older configs' ``rope_theta`` and ``rope_scaling``)."""
    params = config.get("rope_parameters") or {}
    if isinstance(params.get(kind), dict):
        params = params[kind]
    merged = {**(config.get("rope_scaling") or {}), **params}
    if "rope_theta" not in merged and config.get("rope_theta") is not None:
        merged["rope_theta"] = config["rope_theta"]
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    return merged


def facts(config: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """Every value a key of ``ARCHS`` names, from a full config dict and the family's ``sizes``."""
    rope = rope_parameters(config)
    local = rope_parameters(config, "sliding_attention")
    heads = sizes["heads"]
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0)
    return {
        **config, **sizes,
        "context": config.get("max_position_embeddings", config.get("n_positions")),
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_theta_swa": float(local.get("rope_theta", 10000.0)),
        "rope_dims": int(partial * sizes["head_dim"]) if config.get("model_type") != "phi3"
        else int(partial * sizes["hidden"]) // heads,
        "original_context": config.get("original_max_position_embeddings")
        or config.get("max_position_embeddings"),
        "phi3_window": config.get("sliding_window") or 0,
    }


def _layer_kinds(config: dict[str, Any], pattern: int, layers: int) -> str | None:
    """Why the config's sliding/full layers differ from llama.cpp's fixed pattern, or ``None``."""
    kinds = config.get("layer_types")
    if not kinds:
        return None
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(layers)]
    if list(kinds) != expected:
        return (f"its layer_types are not llama.cpp's fixed pattern (every {pattern}th layer "
                "global, the others sliding-window)")
    return None


def limits(config: dict[str, Any], layers: int | None = None) -> list[str]:
    """What of this config llama.cpp would not run as transformers does (empty: nothing)."""
    arch = arch_of(config)
    if arch is None:
        return [f"model type '{config.get('model_type')}' is not one this format writes "
                f"(it writes {', '.join(sorted(ARCHS))})"]
    problems = []
    for key, allowed in arch.requires.items():
        if key in config and config[key] not in allowed:
            problems.append(f"{key} = {config.get(key)!r} (llama.cpp's {arch.arch} has "
                            f"{' or '.join(repr(a) for a in allowed)})")
    if arch.arch != "gpt2":
        rope_type = rope_parameters(config).get("rope_type") or "default"
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope type '{rope_type}' is not written yet (written: "
                            f"{', '.join(ROPE_TYPES)})")
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    if arch.arch in ("llama", "phi3") and window and context and window < context:
        problems.append(f"its sliding window ({window}) is shorter than its context ({context}) "
                        f"and llama.cpp's {arch.arch} attends to the whole context")
    if arch.arch == "qwen2" and config.get("use_sliding_window"):
        problems.append("use_sliding_window = true: llama.cpp's qwen2 has no sliding window")
    for key in arch.needs:
        if key in config and config[key] is None:
            problems.append(f"{key} is unset and llama.cpp's {arch.arch} applies one")
    if arch.output == "tied" and config.get("tie_word_embeddings") is False:
        problems.append(f"an untied output layer (llama.cpp's {arch.arch} reads the token "
                        "embedding as its output layer)")
    if arch.swa_pattern and layers:
        reason = _layer_kinds(config, arch.swa_pattern, layers)
        problems += [reason] if reason else []
    scalar, head_dim = config.get("query_pre_attn_scalar"), config.get("head_dim")
    if scalar is not None and head_dim is not None and scalar != head_dim:
        problems.append(f"query_pre_attn_scalar = {scalar} differs from head_dim = {head_dim} "
                        "(llama.cpp scales queries by the head size)")
    return problems
