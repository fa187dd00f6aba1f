"""Rewrite a float ONNX graph so that quantized weights run as ONNX Runtime integer kernels.

The traced graph holds every weight as a float initializer, bit for bit the model's value or its
transpose (``export``). Each initializer equal to a quantized weight (or to its transpose) is
found by a hash of its bytes, and the nodes that read it are replaced, with the engine's own codes
and scales (``quantized_weights``), never quantized again:

- 8-bit codes of a W8A8 layer (``quantize`` scheme ``w8a8``): its input is quantized with the
  layer's static scale and zero point, then multiplied by ``MatMulIntegerToFloat`` (``static``),
  whatever ``activations`` says: the layer computes so in torch too.
- other 8-bit codes, one scale per output channel or per tensor: ``MatMul``/``Gemm`` becomes the
  pattern ONNX Runtime's own ``quantize_dynamic`` emits — ``DynamicQuantizeLinear`` on the
  activation (one per activation, shared by the layers reading it), ``MatMulInteger`` (uint8 x
  int8 codes ``[K, N]``), ``Cast`` and the product of both scales — which ONNX Runtime fuses into
  its ``DynamicQuantizeMatMul`` kernel. With ``activations = "float"`` the codes are cast and scaled
  instead (constants only: ONNX Runtime folds them into a float weight when the session starts).
- codes with group-wise scales (4 or 8 bits, a power-of-two group of at least 16):
  ``com.microsoft.MatMulNBits`` (``block_size`` = the group; a code ``c`` is stored as
  ``c + 2**(bits-1)``, the op's default zero point; two 4-bit codes a byte, the low nibble first;
  a row's last block padded with zero codes; ``accuracy_level`` 4, int8 activations, unless
  ``activations = "float"``).
- a fused self-attention (``fusion``: one ``com.microsoft.Attention`` reading the three
  projections packed side by side) whose three weights are 8-bit codes per channel or tensor:
  ``QAttention`` on the packed codes (``qattention``); what it cannot hold raises ``Unfusable``
  and the plain graph is rewritten instead.
- embeddings (``Gather``): the int8 rows and their scales are gathered and multiplied in the
  graph; group-wise ones use ``com.microsoft.GatherBlockQuantized`` on the very initializer a tied
  output layer's ``MatMulNBits`` reads, so a tied vocabulary matrix is stored once.

The roles of the initializers written (codes at their logical shape, scales and zero points) are
returned for the graph's metadata, from which ``runtime`` counts the weights.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

from squeezelang_plugins.onnx_format.qattention import packed_parts, qattention

if TYPE_CHECKING:
    import numpy as np
    from onnx import GraphProto, NodeProto

    from squeezelang.plugin import QuantizedWeight

#: Widths the kernels take: 8 bits per channel/tensor (MatMulInteger) or grouped (MatMulNBits).
WIDTHS = (4, 8)
#: MatMulNBits and GatherBlockQuantized take blocks of a power of two, at least this long.
MIN_BLOCK = 16
MS_DOMAIN = "com.microsoft"
MATMULS = ("MatMul", "Gemm")
#: The graph's metadata entry naming the roles of the initializers (see ``Rewrite.roles``).
ROLES_KEY = "squeezelang.initializers"


def block_size_problem(group: int) -> str | None:
    """Why ``group`` cannot be a ``MatMulNBits`` block, or None."""
    if group < MIN_BLOCK or group & (group - 1):
        return (f"group_size = {group}: ONNX Runtime's MatMulNBits takes groups of a power of two "
                f"of at least {MIN_BLOCK} (16, 32, 64, 128 …)")
    return None


def fingerprint(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    """The shape and a hash of the float32 bytes of ``array``."""
    import numpy as np

    data = np.ascontiguousarray(array, dtype=np.float32)
    return tuple(data.shape), hashlib.sha1(data.tobytes()).hexdigest()


@dataclass
class Match:
    """An initializer equal to a quantized weight ``weight`` (its transpose if ``flipped``)."""

    weight: QuantizedWeight
    flipped: bool


@dataclass
class Rewrite:
    """The rewritten nodes, the initializers to add, and the roles of those initializers."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    #: initializer name -> {"role": "codes", "shape": [N, K], "zero": the stored zero code,
    #: "bits": 4 where two codes share a byte} or {"role": "scales"} (scales and zero points)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)


def weight_index(weights: dict[str, QuantizedWeight],
                 values: dict[str, np.ndarray]) -> dict[tuple[tuple[int, ...], str], Match]:
    """The fingerprints of each 2-D quantized weight and of its transpose (``values``: each
    weight's float32 value as the traced model held it)."""
    index: dict[tuple[tuple[int, ...], str], Match] = {}
    for name, weight in weights.items():
        value = values[name]
        if value.ndim != 2:
            continue
        index.setdefault(fingerprint(value.T), Match(weight, True))
        index[fingerprint(value)] = Match(weight, False)
    return index


def matches(graph: GraphProto, index: dict[tuple[tuple[int, ...], str], Match]) -> dict[str, Match]:
    """The float initializers of ``graph`` equal to a quantized weight or to its transpose."""
    from onnx import TensorProto, numpy_helper

    shapes = {key[0] for key in index}
    found = {}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or tuple(init.dims) not in shapes:
            continue
        match = index.get(fingerprint(numpy_helper.to_array(init)))
        if match is not None:
            found[init.name] = match
    return found


class IntegerRewriter:
    """Replaces the nodes reading matched initializers (see the module docstring)."""

    def __init__(self, graph: GraphProto, found: dict[str, Match], activations: str,
                 float_globs: list[str] | tuple[str, ...] = (),
                 grids: dict[str, tuple[float, int]] | None = None,
                 packed: dict[str, list[Match | None]] | None = None) -> None:
        from squeezelang_plugins.onnx_format.static import StaticMatMuls, bias_adds

        self.graph = graph
        self.found = found
        #: packed weight of a fused ``Attention`` -> its projections (``qattention``)
        self.packed = packed or {}
        self.activations = activations
        self.float_globs = tuple(float_globs)
        self.out = Rewrite()
        self.layouts: dict[str, str] = {}
        self.stored: dict[tuple[str, str], tuple[str, ...]] = {}
        self.quantized: dict[str, tuple[str, str, str]] = {}
        self.constants: dict[tuple[int, ...], str] = {}
        readers: dict[str, set[str]] = {}
        for node in graph.node:
            for name in node.input:
                if name in found:
                    readers.setdefault(found[name].weight.name, set()).add(node.op_type)
        self.readers = readers
        self.static = StaticMatMuls(self, grids or {})
        widths = {init.name: int(init.dims[-1]) for init in graph.initializer if init.name in found}
        products = {node.output[0]: widths[node.input[1]] for node in graph.node  # B: [K, N]
                    if node.op_type == "MatMul" and node.input[1] in found
                    and found[node.input[1]].weight in self.static}
        #: a static layer's MatMul output -> the bias Add its kernel takes in
        self.bias_adds = bias_adds(graph, products)
        self.absorbed = {id(add) for add, _ in self.bias_adds.values()}

    # ------------------------------------------------------------------ driver
    def run(self) -> Rewrite:
        for node in self.graph.node:
            read = [i for i, name in enumerate(node.input) if name in self.found]
            if id(node) in self.absorbed:
                continue
            if node.op_type == "Attention" and len(node.input) > 1 \
                    and node.input[1] in self.packed:
                qattention(self, node, self.packed[node.input[1]])
            elif not read:
                self.out.nodes.append(node)
            elif node.op_type in MATMULS and read == [1]:
                self._matmul(node, self.found[node.input[1]])
            elif node.op_type == "Gather" and read == [0]:
                self._gather(node, self.found[node.input[0]])
            else:
                weight = self.found[node.input[read[0]]].weight
                raise SqueezeError(f"format onnx: quantized weight '{weight.name}' is read by a "
                                   f"{node.op_type} node of the traced graph, which has no integer "
                                   "kernel (only MatMul, Gemm and Gather do)")
        return self.out

    # ------------------------------------------------------------------ helpers
    def _node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        from onnx import helper

        domain = MS_DOMAIN if op in ("MatMulNBits", "GatherBlockQuantized") else ""
        self.out.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

    def _initializer(self, name: str, array: np.ndarray, role: dict[str, Any] | None = None) -> str:
        from onnx import numpy_helper

        self.out.initializers.append(numpy_helper.from_array(array, name))
        if role is not None:
            self.out.roles[name] = role
        return name

    def _ints(self, values: tuple[int, ...]) -> str:
        """A shared int64 constant (shapes, axes)."""
        import numpy as np

        if values not in self.constants:
            name = f"squeeze.const.{'_'.join(str(v).replace('-', 'm') for v in values)}"
            self.constants[values] = self._initializer(name, np.array(values, dtype=np.int64))
        return self.constants[values]

    def _layout(self, match: Match, initializer_is_nk: bool, op: str) -> str:
        """``"nk"`` if the weight's stored tensor is ``[outputs, inputs]`` for this reader, else
        ``"kn"``; the weight's scales must run along its outputs, and every reader agree."""
        weight = match.weight
        nk = initializer_is_nk != match.flipped
        if weight.axis is not None and weight.axis != (0 if nk else 1):
            raise SqueezeError(f"format onnx: the scales of '{weight.name}' run along the inputs "
                               f"of the {op} that reads it; an integer kernel needs them along "
                               "its outputs")
        layout = "nk" if nk else "kn"
        if self.layouts.setdefault(weight.name, layout) != layout:
            raise SqueezeError(f"format onnx: '{weight.name}' is read with its outputs on "
                               "different axes by two nodes of the traced graph")
        return layout

    def _codes_nk(self, weight: QuantizedWeight, layout: str) -> np.ndarray:
        codes = weight.codes.numpy()
        return codes if layout == "nk" else codes.T

    # ------------------------------------------------------------------ stored forms
    def _int8(self, weight: QuantizedWeight, layout: str, rows: bool) -> tuple[str, str]:
        """int8 codes ``[K, N]`` (``rows``: ``[N, K]``, for a weight only gathered) and the scale
        (``[N]``, or a scalar per tensor), stored once per weight."""
        import numpy as np

        key = (weight.name, "rows" if rows else "int8")
        if key not in self.stored:
            codes = self._codes_nk(weight, layout)
            codes = np.ascontiguousarray(codes if rows else codes.T, dtype=np.int8)
            n = codes.shape[0 if rows else 1]
            shape = () if weight.axis is None else (n,)
            scale = weight.scales.numpy().astype(np.float32).reshape(shape)
            self.stored[key] = (
                self._initializer(f"{weight.name}.codes", codes,
                                  {"role": "codes", "shape": list(codes.shape), "zero": 0}),
                self._initializer(f"{weight.name}.scale", scale, {"role": "scales"}))
        return self.stored[key]  # type: ignore[return-value]

    def _zero_point(self, weight: QuantizedWeight) -> str:
        """The int8 zero point (zeros: the codes are symmetric), shaped like the scale."""
        import numpy as np

        key = (weight.name, "zero_point")
        if key not in self.stored:
            shape = () if weight.axis is None else (int(weight.codes.shape[weight.axis]),)
            self.stored[key] = (self._initializer(f"{weight.name}.zero_point",
                                                  np.zeros(shape, dtype=np.int8),
                                                  {"role": "scales"}),)
        return self.stored[key][0]

    def _blocks(self, weight: QuantizedWeight, layout: str) -> tuple[str, str]:
        """Codes ``[N, blocks, block bytes]`` (uint8, offset by the zero point ``2**(bits-1)``,
        4-bit pairs packed low nibble first) and scales ``[N * blocks]``, stored once."""
        import numpy as np

        key = (weight.name, "blocks")
        if key not in self.stored:
            bits, group = weight.bits, int(weight.group or 0)
            codes = self._codes_nk(weight, layout).astype(np.int16)
            n, k = codes.shape
            blocks = -(-k // group)
            zero = 1 << (bits - 1)
            padded = np.full((n, blocks * group), zero, dtype=np.uint8)
            padded[:, :k] = (codes + zero).astype(np.uint8)
            packed = padded.reshape(n, blocks, group)
            if bits == 4:
                packed = packed[..., 0::2] | (packed[..., 1::2] << 4)
            scales = weight.scales.numpy().astype(np.float32).reshape(n, -1)
            if scales.shape[1] != blocks:
                raise SqueezeError(f"format onnx: '{weight.name}' has {scales.shape[1]} groups of "
                                   f"{group} along {k} inputs")
            base = weight.name
            self.stored[key] = (
                self._initializer(f"{base}.codes", np.ascontiguousarray(packed, dtype=np.uint8),
                                  {"role": "codes", "shape": [n, k], "zero": zero, "bits": bits}),
                self._initializer(f"{base}.scales", scales.reshape(-1), {"role": "scales"}))
        return self.stored[key]  # type: ignore[return-value]

    def _quantized_activation(self, name: str) -> tuple[str, str, str]:
        """``DynamicQuantizeLinear`` of activation ``name``, once for all the layers reading it."""
        if name not in self.quantized:
            outs = (f"{name}/dq.quantized", f"{name}/dq.scale", f"{name}/dq.zero_point")
            self._node("DynamicQuantizeLinear", [name], list(outs))
            self.quantized[name] = outs
        return self.quantized[name]

    # ------------------------------------------------------------------ readers
    def _matmul(self, node: NodeProto, match: Match) -> None:
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attrs.get("alpha", 1.0), attrs.get("beta", 1.0),
                 attrs.get("transA", 0)) == (1, 1, 0)
        if node.op_type == "Gemm" and not plain:
            raise SqueezeError(f"format onnx: quantized weight '{match.weight.name}' is read by a "
                               f"Gemm with alpha/beta/transA {attrs}")
        layout = self._layout(match, bool(attrs.get("transB", 0)), node.op_type)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        out = node.output[0]
        if match.weight in self.static:
            if out in self.bias_adds:
                add, bias = self.bias_adds[out]
                out = add.output[0]
            self.static.matmul(node.input[0], out, match.weight, layout, bias)
            return
        product = f"{out}/gemm.product" if bias else out
        if match.weight.group is not None:
            self._nbits(node.input[0], product, match.weight, layout)
        else:
            self._int8_matmul(node.input[0], product, match.weight, layout)
        if bias:
            self._node("Add", [product, bias], [out])

    def float_activations(self, weight: QuantizedWeight) -> bool:
        """Whether ``weight``'s layer multiplies float activations (``activations = "float"``,
        or its module name matches a ``float_activations`` glob)."""
        import fnmatch

        module = weight.name.rpartition(".")[0]
        return self.activations == "float" or any(fnmatch.fnmatchcase(module, g)
                                                   for g in self.float_globs)

    def _int8_matmul(self, a: str, out: str, weight: QuantizedWeight, layout: str) -> None:
        from onnx import TensorProto

        codes, scale = self._int8(weight, layout, rows=False)
        if self.float_activations(weight):
            # constant inputs only: ONNX Runtime folds them into a float weight at load
            self._node("Cast", [codes], [f"{out}/w.codes"], to=TensorProto.FLOAT)
            self._node("Mul", [f"{out}/w.codes", scale], [f"{out}/w.float"])
            self._node("MatMul", [a, f"{out}/w.float"], [out])
            return
        zero = self._zero_point(weight)
        q, q_scale, q_zero = self._quantized_activation(a)
        self._node("MatMulInteger", [q, codes, q_zero, zero], [f"{out}/mmi.int32"])
        self._node("Cast", [f"{out}/mmi.int32"], [f"{out}/mmi.float"], to=TensorProto.FLOAT)
        self._node("Mul", [q_scale, scale], [f"{out}/mmi.scale"])
        self._node("Mul", [f"{out}/mmi.float", f"{out}/mmi.scale"], [out])

    def _nbits(self, a: str, out: str, weight: QuantizedWeight, layout: str) -> None:
        codes, scales = self._blocks(weight, layout)
        n, k = self.out.roles[codes]["shape"]
        level = 0 if self.float_activations(weight) else 4
        self._node("MatMulNBits", [a, codes, scales], [out], K=k, N=n, bits=weight.bits,
                   block_size=int(weight.group or 0), accuracy_level=level)

    def _gather(self, node: NodeProto, match: Match) -> None:
        from onnx import helper

        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            raise SqueezeError(f"format onnx: quantized weight '{match.weight.name}' is gathered "
                               f"along axis {axis}")
        layout = self._layout(match, True, "Gather")
        ids, out = node.input[1], node.output[0]
        if match.weight.group is not None:
            self._gather_blocks(ids, out, match.weight, layout)
        elif self.readers.get(match.weight.name, set()) & set(MATMULS):
            self._gather_columns(ids, out, match.weight, layout)
        else:
            self._gather_rows(ids, out, match.weight, layout)

    def _dequantize_rows(self, rows: str, scale: str, row_scales: str | None, out: str) -> None:
        from onnx import TensorProto

        self._node("Cast", [rows], [f"{out}/float"], to=TensorProto.FLOAT)
        if row_scales is None:
            self._node("Mul", [f"{out}/float", scale], [out])
            return
        self._node("Unsqueeze", [row_scales, self._ints((-1,))], [f"{out}/row_scale"])
        self._node("Mul", [f"{out}/float", f"{out}/row_scale"], [out])

    def _gather_rows(self, ids: str, out: str, weight: QuantizedWeight, layout: str) -> None:
        """An embedding only gathered: its int8 rows, times their scales."""
        codes, scale = self._int8(weight, layout, rows=True)
        self._node("Gather", [codes, ids], [f"{out}/codes"])
        row_scales = None
        if weight.axis is not None:
            row_scales = f"{out}/scales"
            self._node("Gather", [scale, ids], [row_scales])
        self._dequantize_rows(f"{out}/codes", scale, row_scales, out)

    def _gather_columns(self, ids: str, out: str, weight: QuantizedWeight, layout: str) -> None:
        """An embedding tied to an output layer: its rows are the columns of the ``[K, N]`` codes
        that ``MatMulInteger`` reads, gathered along axis 1 and transposed back (tokens x hidden,
        not the whole matrix)."""
        codes, scale = self._int8(weight, layout, rows=False)
        flat = f"{out}/flat_ids"
        self._node("Reshape", [ids, self._ints((-1,))], [flat])
        self._node("Gather", [codes, flat], [f"{out}/columns"], axis=1)
        self._node("Transpose", [f"{out}/columns"], [f"{out}/codes"], perm=[1, 0])
        row_scales = None
        if weight.axis is not None:
            row_scales = f"{out}/scales"
            self._node("Gather", [scale, flat], [row_scales])
        self._dequantize_rows(f"{out}/codes", scale, row_scales, f"{out}/flat")
        self._reshape_like(ids, f"{out}/flat", out, trailing=-1)

    def _gather_blocks(self, ids: str, out: str, weight: QuantizedWeight, layout: str) -> None:
        """``GatherBlockQuantized`` on the ``[N, blocks, bytes]`` codes ``MatMulNBits`` reads."""
        codes, scales = self._blocks(weight, layout)
        n, k = self.out.roles[codes]["shape"]
        group = int(weight.group or 0)
        blocks = -(-k // group)
        self._node("Reshape", [scales, self._ints((n, blocks, 1))], [f"{out}/scales"])
        self._node("GatherBlockQuantized", [codes, ids, f"{out}/scales"], [f"{out}/blocks"],
                   gather_axis=0, quantize_axis=2, block_size=group, bits=weight.bits)
        padded = blocks * group != k
        self._reshape_like(ids, f"{out}/blocks", f"{out}/padded" if padded else out,
                           trailing=blocks * group)
        if padded:
            self._node("Slice", [f"{out}/padded", self._ints((0,)), self._ints((k,)),
                                 self._ints((-1,))], [out])

    def _reshape_like(self, ids: str, value: str, out: str, trailing: int) -> None:
        """``value`` reshaped to ``shape(ids) + [trailing]``."""
        self._node("Shape", [ids], [f"{out}/ids_shape"])
        self._node("Concat", [f"{out}/ids_shape", self._ints((trailing,))], [f"{out}/shape"],
                   axis=0)
        self._node("Reshape", [value, f"{out}/shape"], [out])


def rewrite_(graph: GraphProto, weights: dict[str, QuantizedWeight], values: dict[str, np.ndarray],
             activations: str, float_globs: list[str] | tuple[str, ...] = (),
             grids: dict[str, tuple[float, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Replace, in place, what reads each quantized weight in ``graph`` by an integer kernel and
    drop its float initializers; return the roles of the initializers added. ``grids``: the
    static input scale and zero point of the W8A8 layers' weights (``static.grids``)."""
    index = weight_index(weights, values)
    found = matches(graph, index)
    packed = packed_parts(graph, index)
    if not found and not packed:
        return {}
    result = IntegerRewriter(graph, found, activations, float_globs, grids, packed).run()
    del graph.node[:]
    graph.node.extend(result.nodes)
    read = {name for node in graph.node for name in node.input}
    replaced = set(found) | set(packed)
    kept = [init for init in graph.initializer if init.name not in replaced or init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + result.initializers)
    return result.roles
