"""A squeeze artifact is read into a skeleton whose parameters were never allocated (meta device):
every weight comes from the file, tied weights are one parameter again, and the buffers no file
holds keep their computed values."""
from __future__ import annotations

import torch

from squeezelang.models.load import load_model
from squeezelang.models.save import save_model


def test_reloaded_weights_are_real_tied_and_equal(tmp_path, tiny_gpt2_dir, registries):
    handle = load_model(tiny_gpt2_dir, registries, task="causal-lm")
    assert handle.model.lm_head.weight is handle.model.transformer.wte.weight
    save_model(handle, tmp_path / "a")
    again = load_model(tmp_path / "a", registries, task="causal-lm")
    model = again.model
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert model.lm_head.weight is model.transformer.wte.weight  # one parameter, as trained
    for (name, a), (_, b) in zip(handle.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(handle.model(ids).logits, model(ids).logits)
