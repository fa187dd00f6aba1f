"""W8A8 layers (``quantize`` scheme ``w8a8``) in the graph: inputs quantized with static scales.

A ``W8A8Linear`` quantizes its input with a calibrated uint8 scale and zero point, then multiplies
by its int8 weight codes. In the graph that is ``QuantizeLinear`` with those two constants (once
per activation and grid, shared by the layers reading it: ``q``, ``k`` and ``v`` have one grid)
and ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat`` — uint8 activations times the int8
codes ``[K, N]``, accumulated in int32, times ``scale_x · scale_w``, plus the bias (a ``Gemm``'s,
or the ``Add`` of a constant that follows a ``MatMul``, taken into the kernel).

The kernel is written directly rather than as the standard ``MatMulInteger → Cast → Mul(scale_x ·
scale_w)`` that ONNX Runtime fuses into it: with a static scale both scales are constants, the
session folds their product first, and the pattern is no longer recognised (it runs unfused).
Measured on 8 chained layers (128 tokens, 384 -> 1536 -> 384 …), 2 threads, ONNX Runtime 1.32,
one process, interleaved (a loaded machine: 10th-percentile times): ``MatMulIntegerToFloat``
2.18 ms, the unfused pattern 2.61 ms, ``QLinearMatMul`` (uint8 output on a second calibrated
grid, then ``DequantizeLinear``) 2.94 ms, the dynamic ``DynamicQuantizeMatMul`` 2.29 ms. On
all-MiniLM-L6-v2 (batch 1, 128 tokens, 2 threads, medians of 700 interleaved runs) the w8a8 graph
takes 9.2 ms, the int8-dynamic one 9.6 ms.

Unsigned activations times signed weights (U8S8) is ONNX Runtime's fast x86 path; on a CPU without
VNNI its kernel adds pairs of products in 16 bits, which can saturate for activations near the top
of the grid (as in its dynamic path); with VNNI (the machines measured here) it is exact.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

    from squeezelang.plugin import ModelHandle, QuantizedWeight

#: The ONNX Runtime contrib domain of ``MatMulIntegerToFloat``.
MS_DOMAIN = "com.microsoft"


def grids(handle: ModelHandle) -> dict[str, tuple[float, int]]:
    """``{weight name: (input scale, input zero point)}`` of every ``W8A8Linear`` of the model."""
    from squeezelang.plugin import W8A8Linear

    return {f"{name}.weight": (float(module.input_scale), int(module.input_zero_point))
            for name, module in handle.model.named_modules() if isinstance(module, W8A8Linear)}


def bias_adds(graph: GraphProto, products: dict[str, int]) -> dict[str, tuple[NodeProto, str]]:
    """``{product: (Add node, bias)}`` for each ``products`` output (mapped to its width ``N``)
    that only an ``Add`` of a constant float ``[N]`` initializer reads (the bias of a ``MatMul``
    on a 3-D activation)."""
    from onnx import TensorProto

    vectors = {init.name: int(init.dims[0]) for init in graph.initializer
               if init.data_type == TensorProto.FLOAT and len(init.dims) == 1}
    outputs = {out.name for out in graph.output}
    readers: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in products:
                readers.setdefault(name, []).append(node)
    found = {}
    for product, nodes in readers.items():
        if len(nodes) != 1 or product in outputs or nodes[0].op_type != "Add":
            continue
        other = [name for name in nodes[0].input if name != product]
        if len(other) == 1 and vectors.get(other[0]) == products[product]:
            found[product] = (nodes[0], other[0])
    return found


class StaticMatMuls:
    """Writes ``QuantizeLinear`` + ``MatMulIntegerToFloat`` for the W8A8 layers of a rewrite
    (``integer.IntegerRewriter``, whose helpers add the nodes and initializers)."""

    def __init__(self, rewriter: Any, grids: dict[str, tuple[float, int]]) -> None:
        self.rewriter = rewriter
        self.grids = grids
        self.quantized: dict[tuple[str, float, int], tuple[str, str, str]] = {}

    def __contains__(self, weight: QuantizedWeight) -> bool:
        return weight.name in self.grids

    def quantized_input(self, activation: str, weight: QuantizedWeight) -> tuple[str, str, str]:
        """The uint8 activation, its scale and zero point (``QuantizeLinear``, once per grid)."""
        import numpy as np

        scale, zero = self.grids[weight.name]
        module = weight.name.rpartition(".")[0]
        key = (activation, scale, zero)
        if key not in self.quantized:
            r = self.rewriter
            s = r._initializer(f"{module}.input_scale", np.array(scale, dtype=np.float32),
                               {"role": "scales"})
            z = r._initializer(f"{module}.input_zero_point", np.array(zero, dtype=np.uint8),
                               {"role": "scales"})
            out = f"{activation}/q.{module}"
            r._node("QuantizeLinear", [activation, s, z], [out])
            self.quantized[key] = (out, s, z)
        return self.quantized[key]

    def matmul(self, activation: str, out: str, weight: QuantizedWeight, layout: str,
               bias: str) -> None:
        """``out = dequantized(quantized(activation) @ codes) + bias`` (``bias`` may be empty)."""
        from onnx import helper

        r = self.rewriter
        codes, scale = r._int8(weight, layout, rows=False)
        zero = r._zero_point(weight)
        q, q_scale, q_zero = self.quantized_input(activation, weight)
        inputs = [q, codes, q_scale, scale, q_zero, zero] + ([bias] if bias else [])
        r.out.nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [out],
                                            domain=MS_DOMAIN))
