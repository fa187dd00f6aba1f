"""``quantized_weights`` gives back the engine's exact codes and scales of quantized weights."""
from __future__ import annotations

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models import codec
from squeezelang.models.handle import ModelHandle
from squeezelang.models.quant_view import quantized_weights


def _handle(spec, shape=(6, 40), dtype=torch.float32):
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[1], shape[0]).to(dtype)
    quant = spec["quant"]
    with torch.no_grad():
        layer.weight.copy_(codec.quantize_weight(layer.weight, quant["bits"], quant["axis"],
                                                 quant.get("group")))
    model = torch.nn.Sequential(layer)
    return ModelHandle(model=model, tokenizer=None, task="embedding", codecs={"0.weight": spec})


@pytest.mark.parametrize("spec,scales_shape", [
    ({"quant": {"bits": 8, "axis": 0}}, (6,)),
    ({"quant": {"bits": 8, "axis": None}}, (1,)),
    ({"quant": {"bits": 4, "axis": 0, "group": 16}}, (6, 3)),  # 40 inputs: groups 16, 16, 8
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_times_scales_is_the_weight(spec, scales_shape, dtype):
    handle = _handle(spec, dtype=dtype)
    q = quantized_weights(handle)["0.weight"]
    qmax = 2 ** (q.bits - 1) - 1
    assert q.codes.dtype == torch.int8 and q.codes.shape == (6, 40)
    assert int(q.codes.abs().max()) == qmax  # the largest weight of a channel is +-qmax
    assert tuple(q.scales.shape) == scales_shape and q.scales.dtype == torch.float32
    weight = handle.model[0].weight
    assert torch.equal(q.dequantized().to(dtype), weight.detach())
    # the same codes as the file the squeeze format writes
    stored = codec.encode("w", weight.detach(), spec)
    assert torch.equal(stored["w" + codec.SCALES], q.scales.reshape(-1))


def test_a_weight_changed_after_quantizing_is_refused():
    handle = _handle({"quant": {"bits": 4, "axis": 0, "group": 8}})
    with torch.no_grad():
        handle.model[0].weight[0, 0] += 1e-3
    with pytest.raises(SqueezeError, match="'0.weight' is not on its 4-bit quantization grid"):
        quantized_weights(handle)


def test_unquantized_codecs_are_left_out():
    handle = _handle({"quant": {"bits": 8, "axis": 0}})
    handle.codecs["0.bias"] = {"sparse": True}
    assert list(quantized_weights(handle)) == ["0.weight"]
