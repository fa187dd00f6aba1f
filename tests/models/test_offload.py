"""Offloaded models (``models.offload``): weights read from their files one unit at a time.

An offloaded model computes what the same model in memory computes, holds one unit at a time
through a forward pass, writes a unit a stage changed to its overlay (never to the input files),
saves in shards that load back (plain ones with transformers too), and a run with
``offload = true`` gives the artifact and the metrics of a run in memory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models import offload
from squeezelang.models.load import load_model
from squeezelang.models.save import save_model

from conftest import SENTENCES, build_family_handle


@pytest.fixture(autouse=True)
def small_units(monkeypatch):
    """Tiny models: the embeddings and the head are units of their own too."""
    monkeypatch.setattr(offload, "UNIT_MIN_ELEMENTS", 1024)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    handle = build_family_handle("llama")
    handle.model.config.tie_word_embeddings = False
    handle.model.save_pretrained(directory)
    handle.tokenizer.save_pretrained(directory)
    (directory / "calib.txt").write_text("\n".join(SENTENCES * 2) + "\n")
    return directory


def _digest(directory: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.glob("*.safetensors")))).hexdigest()


def _resident(model) -> list[str]:
    state = offload.state_of(model)
    return [u.prefix for u in state.units
            if any(p.device.type != "meta" for p in u.module.parameters())]


def test_an_offloaded_forward_matches_memory_and_holds_one_unit_at_a_time(llama_dir):
    memory = load_model(llama_dir).model
    handle = load_model(llama_dir, offload=True)
    model = handle.model
    prefixes = [u.prefix for u in offload.state_of(model).units]
    assert prefixes[:3] == [f"model.layers.{i}" for i in range(3)]
    assert {"model.embed_tokens", "lm_head"} <= set(prefixes)
    assert _resident(model) == []  # nothing read until it runs
    most = []  # units in memory as each linear layer of a block runs
    for block in model.model.layers:
        for layer in block.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda *_: most.append(len(_resident(model))))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        expected = memory(input_ids=ids).logits
        before = offload.onload_seconds(model)
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert most and set(most) == {1}  # each block alone in memory while it ran
    assert _resident(model) == []
    assert offload.onload_seconds(model) > before
    assert offload.compute_device(model).type == "cpu"


def test_a_changed_unit_is_written_to_the_overlay_and_the_input_is_untouched(llama_dir):
    digest = _digest(llama_dir)
    model = load_model(llama_dir, offload=True).model
    state = offload.state_of(model)
    block = model.model.layers[1]
    with offload.resident(model, block.mlp.down_proj, write=False):
        assert _resident(model) == ["model.layers.1"]
        old = block.mlp.down_proj.weight.detach().clone()
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert state.writes == 0  # read and run, not changed: nothing written
    with offload.resident(model, block, write=False), torch.no_grad():
        block.mlp.down_proj.weight.mul_(2)  # an in-place write is seen
    assert state.writes == 1 and _resident(model) == []
    with offload.resident(model, block, write=False), torch.no_grad():
        block.mlp.down_proj.weight.data.mul_(0.5)  # through .data: only a declared write is
    assert state.writes == 1
    with offload.resident(model, block), torch.no_grad():  # declared: written
        block.mlp.down_proj.weight.data.mul_(3)
    assert state.writes == 2
    written = list(state.overlay.glob("*.safetensors"))
    assert len(written) == 1 and written[0].parent != llama_dir
    with offload.resident(model, block, write=False):
        assert torch.equal(block.mlp.down_proj.weight, old * 6)
    assert _digest(llama_dir) == digest
    overlay = state.overlay
    del model, state, block
    import gc

    gc.collect()
    assert not overlay.exists()  # the overlay goes with the model


def test_a_nan_written_back_is_refused_naming_the_weight(llama_dir):
    model = load_model(llama_dir, offload=True).model
    with pytest.raises(SqueezeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN"):
        with offload.resident(model, model.model.layers[0]), torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")


def test_shards_of_an_offloaded_model_load_back_with_transformers(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    handle = load_model(llama_dir, offload=True)
    files = save_model(handle, tmp_path / "out")
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == len(offload.state_of(handle.model).units) + 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    memory = load_model(llama_dir).model
    for name, tensor in memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("surgery", ["layers", "hidden"])
def test_structured_surgery_reads_one_block_at_a_time_and_stays_offloaded(llama_dir, surgery):
    from squeezelang.models.surgery import reshape_

    digest = _digest(llama_dir)
    cut = {"layers": {"layers": [0, 2]}, "hidden": {"hidden": list(range(0, 64, 2))}}[surgery]
    memory = reshape_(load_model(llama_dir).model, **cut)
    model = load_model(llama_dir, offload=True).model
    read = []  # the units in memory each time one is read
    real = offload._onload

    def counting(unit, state):
        real(unit, state)
        read.append((unit.prefix, len(_resident(model))))

    offload._onload = counting
    try:
        assert reshape_(model, **cut) is model
    finally:
        offload._onload = real
    blocks = [prefix for prefix, _ in read if prefix.startswith("model.layers.")]
    if surgery == "layers":
        assert blocks == ["model.layers.0", "model.layers.2"]  # the dropped ones never read
        assert {prefix for prefix, _ in read} == set(blocks)  # the rest kept as stored
    assert max(n for prefix, n in read if prefix.startswith("model.layers.")) == 1
    assert offload.is_offloaded(model) and _resident(model) == []
    assert [u.prefix for u in offload.state_of(model).units][:2] == ["model.layers.0",
                                                                     "model.layers.1"]
    sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    assert [getattr(model.config, k) for k in sizes] == [getattr(memory.config, k) for k in sizes]
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, memory(input_ids=ids).logits)
    assert _digest(llama_dir) == digest


def test_a_unit_a_stage_replaces_is_forgotten_and_its_replacement_saved(llama_dir, tmp_path):
    from squeezelang.models.select import set_module

    handle = load_model(llama_dir, offload=True)
    model = handle.model
    head = model.lm_head
    with offload.resident(model, head):
        new = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(head.weight * 2)
        set_module(model, "lm_head", new)
    assert "lm_head" not in [u.prefix for u in offload.state_of(model).units]
    assert model.lm_head is new and new.weight.device.type == "cpu"  # in memory from now on
    save_model(handle, tmp_path / "out")
    loaded = load_model(tmp_path / "out").model
    assert torch.equal(loaded.lm_head.weight, new.weight)
    memory = load_model(llama_dir).model
    assert torch.equal(loaded.lm_head.weight, memory.lm_head.weight * 2)


def test_materialize_and_offload_again(llama_dir):
    model = load_model(llama_dir, offload=True).model
    offload.materialize_(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        model.lm_head.weight.zero_()
    offload.offload_again_(model)
    assert _resident(model) == []
    with offload.resident(model, model.lm_head):
        assert not model.lm_head.weight.any()


RECIPE = """model = hf("{model}", task = "causal-lm"{offload})
data calib = text("{model}/calib.txt")
metric loss = perplexity(calib)
stage s: {stage}
output "{out}"
"""


@pytest.mark.parametrize("stage,whole", [
    ('quantize { scheme = "int4", method = "gptq", group_size = 32, data = calib }', False),
    ('quantize { scheme = "int8" }', False),
    ('prune { method = "magnitude", ratio = 0.5 }', True),
    # structured surgery, block by block: layers dropped; heads and neurons sliced; the hidden
    # size too (the embeddings, the head and the norms sliced together)
    ('prune { method = "depth", ratio = 0.5, data = calib }', False),
    ('prune { method = "activation", target = ["heads", "mlp"], ratio = 0.5, data = calib }',
     False),
    ('prune { method = "activation", target = "embedding", ratio = 0.25, data = calib }', False),
    ('factorize { method = "asvd", rank = 0.25, data = calib }', False),
])
def test_an_offloaded_run_gives_the_artifact_and_metrics_of_a_run_in_memory(
        llama_dir, tmp_path, stage, whole):
    """The same bits: every weight quantized once (an offloaded block's weights are fresh
    tensors each time it is read, so no stage may tell weights apart by identity)."""
    from squeezelang.api import run

    digest = _digest(llama_dir)
    results = {}
    for mode, flag in (("memory", ""), ("offload", ", offload = true")):
        recipe = tmp_path / f"{mode}.squeeze"
        recipe.write_text(RECIPE.format(model=llama_dir, offload=flag, stage=stage,
                                        out=tmp_path / mode))
        results[mode] = run(recipe)
        assert results[mode].ok
    memory, offloaded = results["memory"], results["offload"]
    assert offload.is_offloaded(offloaded.model) and not offload.is_offloaded(memory.model)
    assert offloaded.report["model"]["offload"] is True and memory.report["model"]["offload"] is False
    loss = {m: r.report["metrics"]["loss"] for m, r in results.items()}
    assert loss["offload"]["original"] == loss["memory"]["original"]
    a, b = load_model(tmp_path / "memory"), load_model(tmp_path / "offload")
    assert a.codecs == b.codecs
    assert loss["offload"]["final"] == loss["memory"]["final"]
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[name], tensor), name
    assert (tmp_path / "offload" / "model.safetensors.index.json").is_file()
    log = " ".join(offloaded.report["stages"][0]["log"])
    assert ("needs the whole model" in log) == whole
    assert _digest(llama_dir) == digest


def test_offload_is_a_boolean_in_the_recipe(llama_dir, tmp_path):
    from squeezelang.api import check
    from squeezelang.errors import RecipeErrors

    recipe = tmp_path / "bad.squeeze"
    recipe.write_text(RECIPE.format(model=llama_dir, offload=', offload = "yes"',
                                    stage='quantize { scheme = "int8" }', out=tmp_path / "o"))
    with pytest.raises(RecipeErrors) as caught:
        check(recipe)
    (error,) = caught.value.errors
    assert "offload" in error.message and "true or false" in error.message
    assert error.span is not None and error.span.line == 1
