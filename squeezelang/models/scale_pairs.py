"""Where a per-input-channel scale can be folded: producers and the linear layers that read them.

Activation-aware quantization (AWQ) and SmoothQuant multiply the input channels of linear layers by
``s`` and divide the operation that produces those inputs by the same ``s``: the float model
computes the same function, and the scaled weights quantize better. That works only where the
producer is linear per channel and its output goes to those layers alone:

* a pre-norm block's norms (the family's ``input_norms``): the attention norm feeds ``q``/``k``/``v``
  (or ``qkv``), the MLP norm feeds ``mlp_in`` (or ``mlp_fused``). LayerNorm's weight and bias are
  divided by ``s``; RMSNorm's weight too; a ``rmsnorm_one_plus`` norm (Gemma, ``x · (1 + w)``) gets
  ``w' = (1 + w) / s - 1``. Post-norm blocks (BERT) have none: their norm output is also the
  residual stream;
* the value projection, feeding the output projection through the attention (a weighted sum of
  values, per channel). With grouped-query attention the value channel ``j`` of key/value group
  ``g`` is read by every query head of the group, so the scale is one per value channel and each
  output-projection input takes the scale of the value channel it reads (``ScalePair.index``);
* a gated MLP's up projection (the second of ``mlp_in``, or the second half of ``mlp_fused``),
  feeding the down projection through ``act(gate) · up``.

A plain MLP's down projection reads ``act(x)`` (not linear) and an attention output projection feeds
the residual: neither has a producer to fold into. Everything here is read from the model's
``ModelFamily``; nothing branches on a family's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ScalePair:
    """A producer whose output channels can absorb a scale, and the linear layers reading them.

    ``producer`` and ``consumers`` are module names in the model (``model.layers.0.input_layernorm``);
    ``block`` is the index of the block that holds them. ``norm_kind``: the producer is a norm of
    that kind (``NORM_KINDS``), or ``None`` for a linear layer, whose output channels
    ``rows = (start, stop)`` (a slice of a fused projection; ``None``: all of them) are read.
    ``groups`` and ``head_dim``: the consumers' input channel ``c`` reads the producer's channel
    ``(c // head_dim) // groups * head_dim + c % head_dim`` (grouped-query attention: ``groups``
    query heads per value head); ``groups = 1`` reads channel ``c``.
    """

    block: int
    producer: str
    consumers: tuple[str, ...]
    norm_kind: str | None = None
    rows: tuple[int, int] | None = None
    groups: int = 1
    head_dim: int = 1

    def index(self, inputs: int, device: Any = None) -> torch.Tensor:
        """The producer channel (relative to ``rows``) each of the consumers' ``inputs`` reads."""
        import torch

        c = torch.arange(inputs, device=device)
        if self.groups == 1:
            return c
        return (c // self.head_dim) // self.groups * self.head_dim + c % self.head_dim

    def channels(self, inputs: int) -> int:
        """How many producer channels the consumers' ``inputs`` read."""
        return inputs // self.groups


def scale_pairs(model: Any) -> list[ScalePair]:
    """Every place of ``model`` where a per-channel scale folds, block by block, in the order a
    block runs them: attention norm → attention projections, values → output projection, MLP
    norm → MLP inputs, up → down (gated MLPs). ``SqueezeError`` if the model has no registered
    family or a role names no module."""
    from squeezelang.models.surgery import base_prefix, family_of, get_path

    fam = family_of(model.config)
    dims = fam.sizes(model.config)
    heads, kv, head_dim, inner = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["inner"]
    if heads % kv:
        raise SqueezeError(f"{heads} query heads do not split into {kv} key/value groups")
    norm_of = {sublayer: norm for norm, sublayer in fam.input_norms}
    attention = (fam.qkv,) if fam.qkv else (fam.q, fam.k, fam.v)
    mlp = (fam.mlp_fused,) if fam.mlp_fused else fam.mlp_in
    # a fused projection's outputs are [queries | keys | values] and [gate | up]
    queries, width = heads * head_dim, kv * head_dim
    values = (fam.qkv, (queries + width, queries + 2 * width)) if fam.qkv else (fam.v, None)
    up = (fam.mlp_fused, (inner, 2 * inner)) if fam.mlp_fused else (fam.mlp_in[-1], None)
    blocks = get_path(getattr(model, "base_model", model), fam.blocks)
    prefix = f"{base_prefix(model)}{fam.blocks}"
    pairs: list[ScalePair] = []
    for i in range(len(blocks)):
        def at(role: str, i: int = i) -> str:
            return f"{prefix}.{i}.{role}"

        here = []
        if "attention" in norm_of:
            here.append(ScalePair(i, at(norm_of["attention"]), tuple(map(at, attention)),
                                  norm_kind=fam.norm_kind))
        here.append(ScalePair(i, at(values[0]), (at(fam.o),), rows=values[1],
                              groups=heads // kv, head_dim=head_dim))
        if "mlp" in norm_of:
            here.append(ScalePair(i, at(norm_of["mlp"]), tuple(map(at, mlp)),
                                  norm_kind=fam.norm_kind))
        if fam.gated:
            here.append(ScalePair(i, at(up[0]), (at(fam.mlp_out),), rows=up[1]))
        for pair in here:
            for name in (pair.producer, *pair.consumers):
                if get_path(model, name) is None:
                    raise SqueezeError(f"model family '{fam.name}': no module '{name}'")
        pairs += here
    return pairs


def fold_scales_(model: Any, pair: ScalePair, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scales`` (one per producer channel) and multiply
    the consumers' matching input channels by them: the float model computes the same function
    (up to rounding: the arithmetic is float32, or float64 for a float64 tensor)."""
    import torch

    from squeezelang.models.select import get_module, kind_of, output_axis

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))

    producer = get_module(model, pair.producer)
    consumers = [get_module(model, c) for c in pair.consumers]
    s = wide(scales.detach().to(producer.weight.device))
    with torch.no_grad():
        if pair.norm_kind is not None:
            w = wide(producer.weight)
            producer.weight.copy_((1 + w) / s - 1 if pair.norm_kind == "rmsnorm_one_plus" else w / s)
            if getattr(producer, "bias", None) is not None:
                producer.bias.copy_(wide(producer.bias) / s)
        else:
            axis = output_axis(kind_of(producer))
            start, stop = pair.rows or (0, producer.weight.shape[axis])
            rows = producer.weight.narrow(axis, start, stop - start)
            rows.copy_(wide(rows) / (s[:, None] if axis == 0 else s[None, :]))
            if getattr(producer, "bias", None) is not None:
                producer.bias[start:stop] = wide(producer.bias[start:stop]) / s
        for consumer in consumers:
            axis = 1 - output_axis(kind_of(consumer))
            w = consumer.weight
            expanded = s[pair.index(w.shape[axis], s.device)]
            w.copy_(wide(w) * (expanded[None, :] if axis == 1 else expanded[:, None]))
