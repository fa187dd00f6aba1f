"""A fused ``Attention`` node (``fusion``) whose projections hold 8-bit codes, as ``QAttention``.

ONNX Runtime's ``Attention`` reads the query, key and value projections packed side by side as one
``[hidden, 3 * hidden]`` float weight. When the three weights are the engine's 8-bit codes (one
scale per output channel or per tensor, inputs quantized dynamically), the node becomes
``com.microsoft.QAttention``: the input quantized once by ``DynamicQuantizeLinear``, the three
code matrices packed as one int8 ``[hidden, 3 * hidden]`` initializer with one scale per column
(a per-tensor scale repeated along its block) and zero zero points, the float bias and the mask as
they were. The codes are the engine's, never quantized again.

Three W8A8 projections (``quantize`` scheme ``w8a8``) read one input on one static grid: the
input is then quantized with it (``QuantizeLinear``, as ``static`` does) instead of per call.
Anything else that a fused node would have to hold (group-wise codes, float activations, static
grids that differ, only some of the three quantized) raises ``Unfusable``: the caller then writes the
plain graph, where each projection gets its own kernel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from onnx import GraphProto, NodeProto

    from squeezelang_plugins.onnx_format.integer import IntegerRewriter, Match

MS_DOMAIN = "com.microsoft"
PARTS = 3


class Unfusable(Exception):
    """A fused ``Attention`` cannot hold its projections' codes; write the plain graph."""


def packed_parts(graph: GraphProto, index: dict[Any, Match]) -> dict[str, list[Match | None]]:
    """``{packed weight initializer: [query, key, value matches]}`` for each ``Attention`` node
    whose packed weight holds at least one quantized weight (``index``: ``integer.weight_index``,
    fingerprints of each quantized weight and of its transpose)."""
    from onnx import TensorProto, numpy_helper

    from squeezelang_plugins.onnx_format.integer import fingerprint

    initializers = {init.name: init for init in graph.initializer}
    found: dict[str, list[Match | None]] = {}
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != MS_DOMAIN or len(node.input) < 2:
            continue
        init = initializers.get(node.input[1])
        if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2 \
                or init.dims[1] % PARTS:
            continue
        packed = numpy_helper.to_array(init)
        width = packed.shape[1] // PARTS
        parts = [index.get(fingerprint(packed[:, i * width:(i + 1) * width]))
                 for i in range(PARTS)]
        if any(part is not None for part in parts):
            found[init.name] = parts
    return found


def _scales(match: Match, width: int) -> np.ndarray:
    import numpy as np

    scales = match.weight.scales.numpy().astype(np.float32).reshape(-1)
    return np.broadcast_to(scales, (width,)) if scales.size == 1 else scales


def _quantized_input(r: IntegerRewriter, activation: str,
                     weights: list[Any]) -> tuple[str, str, str]:
    """The uint8 input of the fused projections, its scale and zero point: quantized per call
    (``DynamicQuantizeLinear``), or with the one static grid of three W8A8 layers."""
    static = [w in r.static for w in weights]
    if any(static):
        grids = {r.static.grids[w.name] for w in weights if w in r.static}
        if not all(static) or len(grids) != 1:
            raise Unfusable("the projections quantize their input on different grids")
        return r.static.quantized_input(activation, weights[0])
    if any(r.float_activations(w) for w in weights):
        raise Unfusable("a projection multiplies float activations")
    return r._quantized_activation(activation)


def qattention(rewriter: IntegerRewriter, node: NodeProto, parts: list[Match | None]) -> None:
    """Write ``node`` (a fused ``Attention``) as ``QAttention`` on the codes of ``parts``."""
    import numpy as np
    from onnx import helper

    r = rewriter
    for part in parts:
        if part is None:
            raise Unfusable("only some of the projections are quantized")
        weight = part.weight
        if weight.group is not None or weight.bits != 8 or weight.code_format is not None:
            raise Unfusable(f"'{weight.name}' holds codes QAttention cannot take (only 8-bit "
                            "integer codes per channel or per tensor)")
        if not part.flipped or weight.axis not in (None, 0):
            raise Unfusable(f"the scales of '{weight.name}' do not run along its outputs")
    matches = [p for p in parts if p is not None]
    q, q_scale, q_zero = _quantized_input(r, node.input[0], [m.weight for m in matches])
    codes = np.concatenate([m.weight.codes.numpy().T for m in matches], axis=1)
    width = codes.shape[1] // PARTS
    scales = np.concatenate([_scales(m, width) for m in matches]).astype(np.float32)
    base = node.input[1]
    codes_name = r._initializer(f"{base}.codes", np.ascontiguousarray(codes, dtype=np.int8),
                                {"role": "codes", "shape": [codes.shape[1], codes.shape[0]],
                                 "zero": 0})
    scale_name = r._initializer(f"{base}.scale", scales, {"role": "scales"})
    zero_name = r._initializer(f"{base}.zero_point", np.zeros(scales.shape, dtype=np.int8),
                               {"role": "scales"})
    bias = node.input[2] if len(node.input) > 2 else ""
    mask = node.input[3] if len(node.input) > 3 else ""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    r.out.nodes.append(helper.make_node(
        "QAttention", [q, codes_name, bias, q_scale, scale_name, mask, q_zero, zero_name],
        list(node.output[:1]), domain=MS_DOMAIN, name=node.name, **attrs))
