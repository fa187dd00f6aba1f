"""Store once the weights the tracer wrote several times, and read shared ones directly.

The TorchScript exporter reads a parameter used by several modules (blocks sharing their
parameters: ``share { method = "cross_layer" }``) through ``Identity`` nodes, which
``inline_identities_`` removes before the integer rewrite, so that it sees every ``MatMul``
reading the initializer itself. It also folds each use of a transposed weight into a fresh
initializer: a tied output layer (GPT-2's ``lm_head``, BERT's masked-LM decoder) becomes a second,
transposed copy of the embedding matrix. ``dedupe_`` reads identical copies from the first, and
makes a transposed copy a ``Transpose`` of it, which ONNX Runtime folds back into a constant when
the session is built: the file holds the matrix once and the kernels still read a constant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from squeezelang_plugins.onnx_format.integer import fingerprint

if TYPE_CHECKING:
    from onnx import GraphProto

def inline_identities_(graph: GraphProto) -> None:
    """Let the readers of an ``Identity`` of an initializer read the initializer itself."""
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    renamed = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Identity" and node.input[0] in initializers
               and node.output[0] not in outputs}
    if not renamed:
        return
    nodes = [node for node in graph.node
             if not (node.op_type == "Identity" and node.output[0] in renamed)]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(nodes)


#: Smaller initializers are left as they are (biases, norms: not worth hashing).
MIN_ELEMENTS = 1024


def dedupe_(graph: GraphProto) -> int:
    """Replace duplicate float initializers of ``graph`` in place; return how many were dropped."""
    import math

    from onnx import TensorProto, helper, numpy_helper

    kept: dict[tuple[tuple[int, ...], str], str] = {}
    transposed: dict[tuple[tuple[int, ...], str], str] = {}
    renamed: dict[str, str] = {}
    transposes = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or math.prod(init.dims) < MIN_ELEMENTS:
            continue
        value = numpy_helper.to_array(init)
        key = fingerprint(value)
        if key in kept:
            renamed[init.name] = kept[key]
        elif key in transposed:
            transposes.append(helper.make_node("Transpose", [transposed[key]], [init.name],
                                               perm=[1, 0], name=f"{init.name}/transpose"))
        else:
            kept[key] = init.name
            if value.ndim == 2:
                transposed.setdefault(fingerprint(value.T), init.name)
    dropped = set(renamed) | {node.output[0] for node in transposes}
    if not dropped:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    nodes = transposes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept_inits = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return len(dropped)
