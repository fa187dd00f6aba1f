"""Model meta-data: copies are deep and cheap; the remembered index sizes equal the computed ones."""
from __future__ import annotations

import copy

import pytest

from squeezelang.models import codec
from squeezelang.models.meta import ModelMeta, ModuleMeta, TensorMeta


def sample() -> ModelMeta:
    return ModelMeta(
        task="embedding", config={"hidden_size": 8, "id2label": {"0": "a"}, "layers": [1, 2]},
        modules={"enc.q": ModuleMeta("enc.q", "Linear", ["enc.q.weight", "enc.q.bias"])},
        tensors={"enc.q.weight": TensorMeta((8, 8), "float32", {"quant": {"bits": 8, "axis": 0}}),
                 "enc.q.bias": TensorMeta((8,))},
        states={"sparse"}, overhead_bytes=123, notes=["a note"])


def test_copy_is_equal_and_independent():
    meta = sample()
    twin = meta.copy()
    assert twin == meta == copy.deepcopy(meta)
    twin.config["id2label"]["0"] = "b"
    twin.config["layers"].append(3)
    twin.modules["enc.q"].tensors.append("x")
    twin.tensors["enc.q.weight"].codec["quant"]["bits"] = 4
    twin.tensors["enc.q.bias"].shape = (4,)
    twin.states.add("quantized")
    twin.notes.append("another")
    twin.overhead_bytes = 0
    assert meta == sample()


def test_copy_of_a_subclass_keeps_what_it_adds():
    class Tagged(ModelMeta):
        tag: list[str] = []

    meta = Tagged(task="embedding", config={})
    meta.tag = ["x"]
    twin = meta.copy()
    assert type(twin) is Tagged and twin.tag == ["x"] and twin.tag is not meta.tag


@pytest.mark.parametrize("spec", [
    None, {}, {"quant": {"bits": 8, "axis": 0}}, {"quant": {"bits": 4, "axis": 0, "group": 4}},
    {"sparse": True, "density": 0.5}, {"sparse": True, "density": 0.5, "quant": {"bits": 8, "axis": 0}},
    {"cluster": {"bits": 4}},
])
def test_index_bytes_remembered_equal_computed(spec):
    for name, shape in (("a.weight", (8, 16)), ("b.weight", [16, 8]), ("c", (32,))):
        if spec and "group" in spec.get("quant", {}) and len(shape) != 2:
            continue
        expected = codec._index_bytes(name, tuple(shape), "float32", copy.deepcopy(spec))
        assert codec.index_bytes(name, shape, "float32", spec) == expected
        assert codec.index_bytes(name, shape, "float32", spec) == expected  # the remembered answer
