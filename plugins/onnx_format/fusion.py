"""Fuse each encoder self-attention into one ONNX Runtime ``Attention`` kernel before quantizing.

The traced graph of a BERT-layout encoder computes self-attention as three projections, reshapes,
transposes, two matrix products and a softmax: some twenty nodes a layer, each of which ONNX Runtime
dispatches to its thread pool on its own. ONNX Runtime's transformer optimizer
(``onnxruntime.transformers``, shipped in the onnxruntime wheel) recognizes that pattern and
replaces it by one ``com.microsoft.Attention`` node that reads the three projections packed side by
side as one ``[hidden, 3 * hidden]`` weight. ``integer`` then runs that node as ``QAttention`` on the
engine's own 8-bit codes: one dynamic quantization of the input and one integer product for the
three projections. On all-MiniLM-L6-v2 in int8 (128 tokens, 2 threads, ONNX Runtime 1.32) a
forward pass takes 6.7 ms instead of 8.0 ms.

Only attention is fused: ONNX Runtime's ``SkipLayerNormalization`` and ``BiasGelu`` fusions are
slower than the plain graph on the CPU at these widths (measured), and ``EmbedLayerNormalization``
would need float word embeddings. The mask stays the raw ``[batch, sequence]`` attention mask
(``AttentionMaskFormat.AttentionMask``), so left- and right-padded batches both run as in torch.

The fusion is data about the runtime, per ``model_type`` (``OPTIMIZER_TYPES``): the families whose
attention ONNX Runtime's ``bert`` optimizer recognizes. A fused graph is kept only when ONNX
Runtime computes the same outputs from it as from the plain graph (``SAME_OUTPUTS``) on a padded
example, and when its projections fit ``QAttention`` (``qattention``); otherwise the plain graph is
written.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnx import ModelProto

#: ``model_type`` -> ONNX Runtime transformer-optimizer model type whose attention fusion applies.
OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert"}
#: Largest absolute difference allowed between the fused and the plain float graphs' outputs.
SAME_OUTPUTS = 1e-4
MS_DOMAIN = "com.microsoft"


def _options(model_type: str) -> Any:
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    options = FusionOptions(model_type)
    for flag in ("enable_gelu", "enable_layer_norm", "enable_skip_layer_norm",
                 "enable_embed_layer_norm", "enable_bias_skip_layer_norm", "enable_bias_gelu",
                 "enable_gelu_approximation", "enable_qordered_matmul", "enable_rotary_embeddings",
                 "enable_gemm_fast_gelu"):
        if hasattr(options, flag):
            setattr(options, flag, False)
    options.enable_attention = True
    options.use_multi_head_attention = False
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    return options


def attention_nodes(proto: ModelProto) -> list[Any]:
    return [n for n in proto.graph.node if n.op_type == "Attention" and n.domain == MS_DOMAIN]


def fused(proto: ModelProto, config: Any) -> ModelProto | None:
    """A copy of ``proto`` whose self-attentions are ``Attention`` nodes, or None (no fusion for
    the family of ``config`` (a transformers config), the optimizer missing or failing, or
    nothing fused). The heads and width are the config's ``num_attention_heads`` and
    ``hidden_size`` (the optimizer cannot read them from a graph with dynamic shapes)."""
    optimizer_type = OPTIMIZER_TYPES.get(getattr(config, "model_type", None) or "")
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if optimizer_type is None or not heads or not hidden:
        return None
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    copy = type(proto)()
    copy.CopyFrom(proto)
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        result = optimizer.optimize_model(copy, model_type=optimizer_type, num_heads=heads,
                                          hidden_size=hidden, optimization_options=_options(optimizer_type),
                                          opt_level=0)
    except Exception:  # the optimizer is best effort: the plain graph is always valid
        return None
    finally:
        logger.setLevel(level)
    out = result.model
    return out if attention_nodes(out) else None


def same_outputs(plain: ModelProto, fused_proto: ModelProto, feeds: dict[str, Any]) -> bool:
    """Whether ONNX Runtime computes ``plain``'s outputs from ``fused_proto`` (within
    ``SAME_OUTPUTS``) on ``feeds``."""
    import numpy as np
    import onnxruntime

    def run(proto: ModelProto) -> list[Any]:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names})

    try:
        expected, got = run(plain), run(fused_proto)
    except Exception:
        return False
    return all(a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) <= SAME_OUTPUTS
               for a, b in zip(expected, got))
