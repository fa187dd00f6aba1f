"""``distill`` over a quantized student (quantization-aware distillation): weights train through
their codes and end exactly on their codecs' grids, so the saved file is the quantize stage's."""
from __future__ import annotations

import random
import re
import sys

import pytest
import torch

import squeezelang
from squeezelang.hooks.context import Context
from squeezelang.models.codec import quantize_weight
from squeezelang.models.forward import encode, logits
from squeezelang.models.load import load_model
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from conftest import WORDS
# the same tiny models (block weights x6) and stage context as the LoRA tests
from test_distill_lora import BLOCK_WEIGHT, _ctx, models  # noqa: F401  (models: the fixture)

#: HELD_OUT: random sentences over the tiny vocabulary, not trained on; TRAIN is the LoRA tests'.
HELD_OUT = [" ".join(random.Random(i).choice(WORDS) for _ in range(4 + i % 9))
            for i in range(1000, 1032)]


def _stage(registries, handle, technique, ctx=None, **params):
    tech = registries.techniques.get(technique)
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    tech.apply_(handle, params, ctx or Context(quiet=True))
    return handle


def _quantized(registries, src, dtype=None, prune=None, **params):
    """The model at ``src`` (in ``dtype``), pruned with ``prune`` params, then quantized."""
    handle = load_model(src)
    if dtype is not None:
        handle.model.to(dtype)
    if prune is not None:
        _stage(registries, handle, "prune", **prune)
    params = {"scheme": "int4", **params}
    if params["scheme"] == "int4":
        params.setdefault("group_size", 16)
    return _stage(registries, handle, "quantize", **params)


def _off_grid(handle) -> list[str]:
    """The quantized weights that quantizing again would change (none, for a savable model)."""
    params = dict(handle.model.named_parameters(remove_duplicate=False))
    off = []
    for name, spec in handle.codecs.items():
        quant = (spec or {}).get("quant")
        if quant and not torch.equal(quantize_weight(params[name].detach(), quant["bits"],
                                                     quant["axis"], quant.get("group"),
                                                     quant.get("format")), params[name]):
            off.append(name)
    return off


def _error(handle, original, texts=HELD_OUT) -> float:
    """How far the student is from the original on held-out texts: KL for a language model,
    1 - cosine for an embedding model."""
    if handle.task == "embedding":
        return 1 - float(torch.nn.functional.cosine_similarity(
            encode(handle, texts), encode(original, texts)).mean())
    student, teacher = logits(handle, texts), logits(original, texts)
    return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


def _weights(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(ctx) -> tuple[float, float]:
    found = re.search(r"loss on a fixed batch ([\d.e+-]+) -> ([\d.e+-]+)", " ".join(ctx.logs["heal"]))
    return float(found.group(1)), float(found.group(2))


#: The learning rates: AdamW moves every weight by about ``lr`` a step, which should stay well
#: under a grid step (int8's steps are about 18 times finer than int4's).
@pytest.mark.parametrize("family,scheme,lr", [("bert", "int8", 3e-5), ("bert", "int4", 3e-4),
                                              ("gpt2", "int4", 3e-4), ("llama", "int4", 3e-4)])
def test_quantization_aware_distillation_beats_ptq_and_saves_on_the_grid(family, scheme, lr, models,
                                                                         registries, tmp_path):
    original = load_model(models[family])
    params = {"scheme": scheme} if scheme == "int8" else {}
    ptq = _quantized(registries, models[family], **params)
    save_model(ptq, tmp_path / "ptq")
    handle = _quantized(registries, models[family], **params)
    codecs, states = dict(handle.codecs), set(handle.states)
    ctx = _ctx(original)
    _stage(registries, handle, "distill", ctx, data="train", steps=20, lr=lr, batch_size=8)
    start, end = _losses(ctx)
    before, after = _error(ptq, original), _error(handle, original)
    print(f"{family} {scheme}: loss {start:.4g} -> {end:.4g}, held-out error PTQ {before:.4g} -> "
          f"QAD {after:.4g}", file=sys.stderr)
    assert end < start and after < 0.9 * before, (start, end, before, after)
    assert "quantized weights trained through their codes" in " ".join(ctx.logs["heal"])
    # every quantized weight is exactly on its grid, with its codec and the file's size unchanged
    assert handle.codecs == codecs and handle.states == states
    assert _off_grid(handle) == []
    moved = [n for n, w in _weights(handle).items() if not torch.equal(w, _weights(ptq)[n])]
    assert any(n in codecs for n in moved)  # the codes themselves changed, not only biases
    save_model(handle, tmp_path / "qad")
    assert artifact_bytes(tmp_path / "qad") == artifact_bytes(tmp_path / "ptq")
    back = load_model(tmp_path / "qad", registries)
    assert _same(_weights(back), _weights(handle)) and back.codecs == codecs


def test_same_seed_same_codes(models, registries):
    original = load_model(models["gpt2"])
    runs = [_stage(registries, _quantized(registries, models["gpt2"]), "distill",
                   _ctx(original, seed=seed), data="train", steps=4, lr=3e-3)
            for seed in (3, 3, 4)]
    weights = [_weights(r) for r in runs]
    assert _same(weights[0], weights[1]) and not _same(weights[0], weights[2])


@pytest.mark.parametrize("family,prune", [
    ("llama", {"ratio": 0.5}),                                # sparse + int4
    ("gpt2", {"method": "nm", "n": 2, "m": 4}),               # 2:4 + int4 (Conv1D: runs on axis 0)
])
def test_pruned_quantized_weights_keep_their_zeros(family, prune, models, registries, tmp_path):
    original = load_model(models[family])
    handle = _quantized(registries, models[family], prune=prune)
    zeros = {n: p == 0 for n, p in handle.model.named_parameters() if n in handle.codecs
             and (handle.codecs[n].get("sparse") or handle.codecs[n].get("nm"))}
    assert zeros
    save_model(handle, tmp_path / "ptq")
    _stage(registries, handle, "distill", _ctx(original), data="train", steps=8, lr=3e-3)
    params = dict(handle.model.named_parameters())
    assert all(torch.all(params[n][z] == 0) for n, z in zeros.items())  # (a code may become 0)
    assert _off_grid(handle) == []
    save_model(handle, tmp_path / "qad")
    assert artifact_bytes(tmp_path / "qad") == artifact_bytes(tmp_path / "ptq")
    assert _same(_weights(load_model(tmp_path / "qad", registries)), _weights(handle))


def test_lora_over_int4_merges_and_requantizes(models, registries, tmp_path):
    """LoRA on a quantized model: adapted weights read ``Q(W + scale·B·A)`` while training, and
    the merged weight is re-quantized on its codec; frozen ones (norms, embeddings, the head)
    keep their values."""
    original = load_model(models["llama"])
    ptq_model = _quantized(registries, models["llama"])
    ptq = _weights(ptq_model)
    handle = _quantized(registries, models["llama"])
    ctx = _ctx(original)
    _stage(registries, handle, "distill", ctx, data="train", steps=20, lr=3e-3, batch_size=8,
           lora_rank=4)
    start, end = _losses(ctx)
    assert end < start
    assert "LoRA rank 4" in " ".join(ctx.logs["heal"])
    assert _off_grid(handle) == []
    after = _weights(handle)
    moved = {n for n in after if not torch.equal(after[n], ptq[n])}
    assert moved and all(BLOCK_WEIGHT.search(n) for n in moved)
    assert _error(handle, original) < _error(ptq_model, original)
    save_model(handle, tmp_path / "out")
    assert _same(_weights(load_model(tmp_path / "out", registries)), after)


def test_float16_weights_end_on_their_float16_grid(models, registries, tmp_path):
    """A float16 model trains on float32 master weights; its quantized weights are put back on
    the grid of float16 values (``on_grid``), as the quantize stage leaves them."""
    original = load_model(models["llama"])
    handle = _quantized(registries, models["llama"], dtype=torch.float16)
    _stage(registries, handle, "distill", _ctx(original), data="train", steps=6, lr=3e-3)
    assert {p.dtype for p in handle.model.parameters()} == {torch.float16}
    assert _off_grid(handle) == []
    save_model(handle, tmp_path / "out")
    assert _same(_weights(load_model(tmp_path / "out", registries)), _weights(handle))


def test_quantize_then_distill_recipe_checks_plans_and_runs(models, sentences_file, tmp_path):
    head = (f'model = hf("{models["llama"]}", task = "causal-lm")\n'
            f'data calib = text("{sentences_file}")\n'
            'stage q: quantize { scheme = "int4", group_size = 16 }\n')
    sizes, predicted = {}, {}
    for label, stages in (("ptq", ""), ("qad", 'stage heal: distill { teacher = original, '
                                               'data = calib, steps = 6, batch_size = 4 }\n')):
        recipe = tmp_path / f"{label}.squeeze"
        recipe.write_text(head + stages, encoding="utf-8")
        assert [s.technique for s in squeezelang.check(recipe).stages] == \
            ["quantize", "distill"][:1 + bool(stages)]
        predicted[label] = squeezelang.plan(recipe).prediction.final_size
        result = squeezelang.run(recipe, output=tmp_path / label)
        assert result.ok
        sizes[label] = result.report["metrics"]["size"]["final"]
        assert sizes[label] == artifact_bytes(tmp_path / label)
        assert _off_grid(load_model(tmp_path / label)) == []
    # distill's estimate changes nothing, and neither does the stage: the file is quantize's
    assert predicted["qad"] == predicted["ptq"] and sizes["qad"] == sizes["ptq"]
    assert abs(predicted["qad"] - sizes["qad"]) / sizes["qad"] < 0.002  # header bytes estimated
