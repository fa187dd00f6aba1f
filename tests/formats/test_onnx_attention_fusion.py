"""The ``onnx`` format fuses an encoder's self-attention into ONNX Runtime's ``Attention`` kernel
(``QAttention`` on the engine's 8-bit codes), and writes the plain graph whenever a fused node
could not hold the weights exactly as quantized or would compute something else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from conftest import build_tiny_llama  # noqa: E402
from squeezelang.models.load import load_model  # noqa: E402
from squeezelang.models.quant_view import quantized_weights  # noqa: E402
from test_onnx_format import _apply, _ops, fmt  # noqa: E402,F401  (fmt: the fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROJECTIONS = ("query", "key", "value")


def _save(fmt, handle, path, **options):
    fmt.save(handle, path, {**fmt.defaults(), **options})
    graph = onnx.load(str(path / "model.onnx"))
    return graph, fmt.load(path, handle.task, {**fmt.defaults(), **options}, 2)


def _padded(handle, side):
    """Three rows of 11 token ids, two of them padded on ``side``, and their mask."""
    vocab = handle.model.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (3, 11), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([11, 6, 2])
    positions = torch.arange(11)[None, :]
    if side == "right":
        mask = positions < lengths[:, None]
    else:
        mask = positions >= (11 - lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long()


def _error(handle, reloaded, side):
    """Largest difference over real tokens between torch and ONNX Runtime, relative to the
    largest value."""
    ids, mask = _padded(handle, side)
    with torch.no_grad():
        ref = handle.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = reloaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    return float((got - ref)[real].abs().max() / ref[real].abs().max())


def _layers(handle):
    return handle.model.config.num_hidden_layers


def test_int8_attention_runs_as_qattention_on_the_engines_codes(fmt, registries, tiny_bert_dir,
                                                                tmp_path):
    handle = _apply(load_model(tiny_bert_dir), registries, "quantize", scheme="int8")
    graph, reloaded = _save(fmt, handle, tmp_path / "fused")
    ops = _ops(graph)
    assert ops["QAttention"] == _layers(handle)
    assert ops["Softmax"] == 0 and ops["Attention"] == 0  # the whole attention is one kernel
    node = next(n for n in graph.graph.node if n.op_type == "QAttention")
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    weights = quantized_weights(handle)
    layer = "encoder.layer.0.attention.self"
    expected = np.concatenate([weights[f"{layer}.{p}.weight"].codes.numpy().T
                               for p in PROJECTIONS], axis=1)
    packed = next(value for name, value in stored.items() if name == node.input[1])
    # one of the layers' packs is layer 0's: the codes are the engine's, packed side by side
    packs = [stored[n.input[1]] for n in graph.graph.node if n.op_type == "QAttention"]
    assert packed.dtype == np.int8 and any((p == expected).all() for p in packs)
    scales = stored[node.input[4]]
    assert scales.shape == (packed.shape[1],)
    for side in ("right", "left"):
        assert _error(handle, reloaded, side) < 0.02, side


def test_float_encoders_run_a_fused_float_attention(fmt, tiny_bert_dir, tmp_path):
    handle = load_model(tiny_bert_dir)
    graph, reloaded = _save(fmt, handle, tmp_path / "float")
    assert _ops(graph)["Attention"] == _layers(handle)
    for side in ("right", "left"):
        assert _error(handle, reloaded, side) < 1e-5, side


def test_fuse_attention_false_writes_the_plain_graph(fmt, registries, tiny_bert_dir, tmp_path):
    handle = _apply(load_model(tiny_bert_dir), registries, "quantize", scheme="int8")
    fused, _ = _save(fmt, handle, tmp_path / "fused")
    plain, reloaded = _save(fmt, handle, tmp_path / "plain", fuse_attention=False)
    ops = _ops(plain)
    assert ops["QAttention"] == ops["Attention"] == 0 and ops["Softmax"] == _layers(handle)
    assert ops["MatMulInteger"] == _ops(fused)["MatMulInteger"] + 3 * _layers(handle)
    assert _error(handle, reloaded, "right") < 0.02


@pytest.mark.parametrize("params", [
    {"scheme": "int4", "group_size": 16},                                # group-wise codes
    {"scheme": "int8", "include": ["encoder.layer.*.attention.self.query"]},  # one of three
], ids=["int4-groups", "query-only"])
def test_attention_that_a_fused_kernel_cannot_hold_stays_plain(fmt, registries, tiny_bert_dir,
                                                               tmp_path, params):
    handle = _apply(load_model(tiny_bert_dir), registries, "quantize", **params)
    graph, reloaded = _save(fmt, handle, tmp_path / "plain")
    ops = _ops(graph)
    assert ops["QAttention"] == ops["Attention"] == 0 and ops["Softmax"] == _layers(handle)
    assert ops["MatMulNBits"] + ops["MatMulInteger"] > 0
    assert _error(handle, reloaded, "left") < 0.05


def test_a_fusion_that_computes_something_else_is_discarded(fmt, tiny_bert_dir, tmp_path,
                                                            monkeypatch):
    from squeezelang_plugins.onnx_format import fusion

    monkeypatch.setattr(fusion, "SAME_OUTPUTS", -1.0)  # no fused graph can be close enough
    handle = load_model(tiny_bert_dir)
    graph, reloaded = _save(fmt, handle, tmp_path / "plain")
    assert _ops(graph)["Attention"] == 0
    assert _error(handle, reloaded, "right") < 1e-5


def test_decoders_are_not_fused(fmt, registries, tmp_path):
    handle = _apply(load_model(build_tiny_llama(tmp_path / "llama"), task="causal-lm"),
                    registries, "quantize", scheme="int8")
    graph, _ = _save(fmt, handle, tmp_path / "out")
    ops = _ops(graph)
    assert ops["QAttention"] == ops["Attention"] == 0 and ops["MatMulInteger"] > 0
