"""The ``distill`` technique: it recovers fidelity lost to pruning, keeps zeros, and is deterministic."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.forward import encode, logits
from squeezelang.models.load import load_model
from squeezelang.models.meta import meta_from_model
from squeezelang.models.save import save_model
from conftest import SENTENCES, WORDS

#: Training texts: random sentences over the tiny vocabulary; SENTENCES stay held out.
TRAIN = [" ".join(random.Random(i).choice(WORDS) for _ in range(4 + i % 9)) for i in range(200)]


def _amplified(src: Path, dest: Path) -> Path:
    """A copy of ``src`` whose block weights are 6x larger, so that pruning them really hurts.

    (Freshly initialised tiny models barely use their blocks: pruning 80% of them changes little.)
    """
    handle = load_model(src)
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            if (".layer." in name or ".h." in name) and p.dim() == 2:
                p.mul_(6)
    save_model(handle, dest)
    return dest


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir, tmp_path_factory):
    return _amplified(tiny_bert_dir, tmp_path_factory.mktemp("bert-x6"))


@pytest.fixture(scope="module")
def gpt2_dir(tiny_gpt2_dir, tmp_path_factory):
    return _amplified(tiny_gpt2_dir, tmp_path_factory.mktemp("gpt2-x6"))


def _ctx(original, texts=TRAIN, seed=0):
    ctx = Context(quiet=True, seed=seed, original_loader=lambda: original)
    ctx.data.add("train", [{"text": t} for t in texts])
    return ctx


def _run(registries, handle, ctx, **params):
    tech = registries.techniques.get("distill")
    tech.apply_(handle, {**tech.defaults(), "data": "train", **params}, ctx)
    return handle


def _pruned(registries, src, ratio=0.8):
    handle = load_model(src)
    prune = registries.techniques.get("prune")
    prune.apply_(handle, {**prune.defaults(), "ratio": ratio}, Context(quiet=True))
    return handle


def _fidelity(handle, original, texts=SENTENCES) -> float:
    return float(torch.nn.functional.cosine_similarity(encode(handle, texts),
                                                       encode(original, texts)).mean())


def _kl(handle, original, texts=SENTENCES) -> float:
    student, teacher = logits(handle, texts), logits(original, texts)
    return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


def test_plugin_modules_import_no_heavy_library():
    code = ("import sys\nimport squeezelang_plugins.distill, squeezelang_plugins.vocab_trim\n"
            "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_distill_recovers_pruned_bert(bert_dir, registries, tmp_path):
    original = load_model(bert_dir)
    handle = _pruned(registries, bert_dir)
    zeros = {n: p == 0 for n, p in handle.model.named_parameters() if n in handle.codecs}
    codecs, before = dict(handle.codecs), _fidelity(handle, original)
    _run(registries, handle, _ctx(original), steps=60, lr=1e-3)
    after = _fidelity(handle, original)
    assert after > before + 0.05 and after > 0.98, (before, after)
    # pruned weights stay exactly zero, and nothing else about storage changed
    params = dict(handle.model.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())
    assert handle.codecs == codecs and handle.states == {"sparse"}
    assert not handle.model.training
    assert all(p.requires_grad for p in handle.model.parameters())
    save_model(handle, tmp_path / "out")
    back = load_model(tmp_path / "out", registries)
    assert torch.equal(encode(back, SENTENCES), encode(handle, SENTENCES))


def test_distill_lowers_gpt2_kl(gpt2_dir, registries):
    original = load_model(gpt2_dir)
    handle = _pruned(registries, gpt2_dir)
    before = _kl(handle, original)
    _run(registries, handle, _ctx(original), steps=30, lr=1e-3, batch_size=8)
    after = _kl(handle, original)
    assert after < 0.5 * before, (before, after)


def test_same_seed_same_weights(bert_dir, registries):
    original = load_model(bert_dir)
    runs = [_run(registries, _pruned(registries, bert_dir), _ctx(original, seed=seed), steps=8)
            for seed in (3, 3, 4)]
    states = [r.model.state_dict() for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_teacher_path_hidden_loss_and_time_limit(bert_dir, registries, capsys):
    original = load_model(bert_dir)
    handle = _pruned(registries, bert_dir)
    ctx = _ctx(original)
    ctx.quiet = False
    _run(registries, handle, ctx, teacher=str(bert_dir), hidden_weight=1.0, steps=1000, time=0.5)
    err = capsys.readouterr().err
    assert "(time limit)" in err and "loss on a fixed batch" in err
    with pytest.raises(SqueezeError, match="neither `original` nor a model directory"):
        _run(registries, handle, ctx, teacher=str(bert_dir / "missing"), steps=1)


def test_factorized_and_vocab_trimmed_students(bert_dir, gpt2_dir, registries):
    original = load_model(bert_dir)
    handle = load_model(bert_dir)
    fact = registries.techniques.get("factorize")
    fact.apply_(handle, {**fact.defaults(), "rank": 0.25}, Context(quiet=True))
    before = _fidelity(handle, original)
    _run(registries, handle, _ctx(original), steps=30, lr=1e-3)
    assert _fidelity(handle, original) > before
    # a trimmed vocabulary: the student's ids are mapped to the teacher's by token
    for src in (bert_dir, gpt2_dir):
        original = load_model(src)
        handle = _pruned(registries, src)
        trim = registries.techniques.get("vocab_trim")
        trim.apply_(handle, {**trim.defaults(), "data": "train"}, _ctx(original))
        assert len(handle.tokenizer) < len(original.tokenizer)
        _run(registries, handle, _ctx(original), steps=5)


def test_refuses_int8_kernels_clusters_and_bad_loss(bert_dir, registries):
    """Quantized models train (tests/plugins/test_distill_qat.py); int8 kernels and clustered
    weights do not."""
    tech = registries.techniques.get("distill")
    assert "quantized" not in tech.refuses and "clustered" in tech.refuses
    original = load_model(bert_dir)
    handle = load_model(bert_dir)
    quant = registries.techniques.get("quantize")
    quant.apply_(handle, {**quant.defaults(), "scheme": "int8-dynamic"}, Context(quiet=True))
    with pytest.raises(SqueezeError, match="distill cannot train int8 kernels .*scheme \"int8\""):
        _run(registries, handle, _ctx(original), steps=1)
    handle = load_model(bert_dir)
    share = registries.techniques.get("share")
    share.apply_(handle, {**share.defaults_for({"method": "cluster"}), "method": "cluster",
                          "bits": 4}, Context(quiet=True))
    with pytest.raises(SqueezeError, match="distill cannot train clustered weights"):
        _run(registries, handle, _ctx(original), steps=1)
    with pytest.raises(SqueezeError, match="loss 'kl' needs logits"):
        _run(registries, load_model(bert_dir), _ctx(original), steps=1, loss="kl")


def test_estimate_changes_nothing(bert_dir, registries):
    tech = registries.techniques.get("distill")
    meta = meta_from_model(load_model(bert_dir).model, "embedding")
    out = tech.estimate(meta, {**tech.defaults(), "data": "train"})
    assert out.size_bytes() == meta.size_bytes() and out.params() == meta.params()
    assert tech.defaults()["teacher"] == "original" and tech.data_params == {"data": "text|a,b"}


@pytest.mark.slow
def test_distill_minilm_after_pruning(minilm_dir, registries):
    texts = (Path(__file__).resolve().parents[2] / "specs" / "data" / "calib.txt").read_text(
        encoding="utf-8").splitlines()
    train, held = texts[:80], texts[80:]
    original = load_model(minilm_dir)
    handle = _pruned(registries, minilm_dir, ratio=0.6)
    before = (_fidelity(handle, original, train), _fidelity(handle, original, held))
    _run(registries, handle, _ctx(original, train), steps=40, batch_size=8, time=45.0)
    after = (_fidelity(handle, original, train), _fidelity(handle, original, held))
    print(f"minilm prune 0.6 + distill: fidelity train {before[0]:.4f} -> {after[0]:.4f}, "
          f"held-out {before[1]:.4f} -> {after[1]:.4f}", file=sys.stderr)
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.05


def _similarities(handle, texts=SENTENCES) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(encode(handle, texts), dim=-1)
    return vectors @ vectors.T


def test_distill_a_narrower_student(bert_dir, registries):
    """Heads pruned with their hidden channels: the student's vectors are narrower than the
    teacher's, so distillation matches the sentences' similarities instead of the vectors."""
    original = load_model(bert_dir)
    handle = load_model(bert_dir)
    prune = registries.techniques.get("prune")
    ctx = _ctx(original)
    prune.apply_(handle, {**prune.defaults(), "method": "activation", "target": "heads",
                          "ratio": 0.5, "data": "train"}, ctx)
    assert encode(handle, SENTENCES).shape[-1] < encode(original, SENTENCES).shape[-1]
    target = _similarities(original)
    before = float(((_similarities(handle) - target) ** 2).mean())
    _run(registries, handle, ctx, steps=60, lr=1e-3)
    after = float(((_similarities(handle) - target) ** 2).mean())
    assert after < 0.7 * before, (before, after)
