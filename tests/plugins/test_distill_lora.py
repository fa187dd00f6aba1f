"""``distill`` with LoRA (``lora_rank``): only low-rank adapters train, merged into the weights at the end."""
from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.forward import encode, logits
from squeezelang.models.load import load_model
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes
from conftest import SENTENCES, WORDS, build_tiny_bert, build_tiny_gpt2, build_tiny_llama

#: Training texts: random sentences over the tiny vocabulary; SENTENCES stay held out.
TRAIN = [" ".join(random.Random(i).choice(WORDS) for _ in range(4 + i % 9)) for i in range(200)]
BUILDERS = {"bert": build_tiny_bert, "gpt2": build_tiny_gpt2, "llama": build_tiny_llama}
#: An adapted linear layer of each family (GPT-2's is a ``Conv1D``, weight ``[in, out]``).
LAYER = {"bert": "encoder.layer.0.intermediate.dense", "gpt2": "transformer.h.0.mlp.c_fc",
         "llama": "model.layers.0.mlp.up_proj"}
BLOCK_WEIGHT = re.compile(r"\.(layer|h|layers)\.\d.*\.weight$")
LORA = {"rank": 4, "alpha": 8.0, "include": ["*.[0-9]*"], "exclude": []}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model with its block weights 6x larger, so that damage shows (freshly
    initialised tiny models barely use their blocks)."""
    out = {}
    for family, build in BUILDERS.items():
        handle = load_model(build(tmp_path_factory.mktemp(family)))
        with torch.no_grad():
            for name, p in handle.model.named_parameters():
                if BLOCK_WEIGHT.search(name) and p.dim() == 2:
                    p.mul_(6)
        out[family] = tmp_path_factory.mktemp(f"{family}-x6")
        save_model(handle, out[family])
    return out


def _ctx(original, texts=TRAIN, seed=0):
    ctx = Context(quiet=True, seed=seed, original_loader=lambda: original)
    ctx.data.add("train", [{"text": t} for t in texts])
    ctx.stage = "heal"  # so that ctx.logs keeps what the stage says
    return ctx


def _distill(registries, handle, ctx, **params):
    tech = registries.techniques.get("distill")
    params = {"data": "train", **params}
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    tech.apply_(handle, params, ctx)
    return handle


def _damaged(registries, src: Path, damage: str):
    """The model after a lossy stage: magnitude pruning (sparse weights, whose zeros must stay),
    or noise on the block weights (a dense model: adapters run beside the weights)."""
    handle = load_model(src)
    if damage == "prune":
        prune = registries.techniques.get("prune")
        prune.apply_(handle, {**prune.defaults(), "ratio": 0.6}, Context(quiet=True))
        return handle
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            if BLOCK_WEIGHT.search(name) and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    return handle


def _error(handle, original, texts=SENTENCES) -> float:
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


def _base_name(name: str) -> str:
    """A parameter's name in the plain model (a parametrized weight is ``…parametrizations.
    weight.original`` while its adapter is on)."""
    return name.replace("parametrizations.weight.original", "weight")


@pytest.mark.parametrize("damage", ["noise", "prune"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_adapters_train_alone_and_merge_into_what_they_computed(family, damage, models,
                                                                 registries):
    from squeezelang_plugins.distill.trainable import Trainee

    handle = _damaged(registries, models[family], damage)
    model = handle.model
    before = _weights(handle)
    trainee = Trainee(handle, LORA, train_embeddings=False).prepare_()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".A", ".B")) for n in names)
    # a pruned weight's adapter is a parametrization (its update masked); a dense one's runs beside
    adapted = model.get_submodule(LAYER[family])
    assert hasattr(adapted, "parametrizations") == (damage == "prune")
    assert hasattr(adapted, "lora") == (damage == "noise")
    batch = handle.tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch)[0].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trainee.keep_zeros_()
    # the base weights are bitwise what they were while the adapters train
    base = {_base_name(n): p for n, p in model.named_parameters()
            if not n.endswith((".A", ".B"))}
    assert base and set(base) <= set(before)
    assert all(torch.equal(p, before[n]) for n, p in base.items())
    with torch.no_grad():
        adapter_out = model(**batch)[0]
    trainee.finish_()
    after = _weights(handle)
    assert after.keys() == before.keys()  # adapters gone, architecture as before
    assert type(adapted).__name__ in ("Linear", "Conv1D") and not hasattr(adapted, "lora")
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        merged_out = model(**batch)[0]
    assert torch.allclose(merged_out, adapter_out, rtol=1e-4, atol=1e-5 * adapter_out.abs().max())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(BLOCK_WEIGHT.search(n) for n in changed)  # adapted weights only
    for name in changed:
        if damage == "prune":  # the update is masked: pruned zeros stay zero
            assert torch.all(after[name][before[name] == 0] == 0)
            continue
        # rank <= 4 up to the float32 rounding of W + update (singular values ~1e-5 of the top)
        singular = torch.linalg.svdvals((after[name] - before[name]).double())
        assert singular[LORA["rank"]:].max() < 1e-3 * singular[0], singular


@pytest.mark.parametrize("family,damage", [("bert", "noise"), ("gpt2", "prune"),
                                           ("llama", "noise"), ("llama", "prune")])
def test_lora_heals_with_the_same_architecture_and_size(family, damage, models, registries,
                                                        tmp_path):
    original = load_model(models[family])
    handle = _damaged(registries, models[family], damage)
    codecs, states = dict(handle.codecs), set(handle.states)
    zeros = {n: p == 0 for n, p in handle.model.named_parameters() if n in handle.codecs}
    save_model(handle, tmp_path / "damaged")
    before = _error(handle, original)
    ctx = _ctx(original)
    _distill(registries, handle, ctx, steps=20, lr=1e-2, batch_size=8, lora_rank=4)
    after = _error(handle, original)
    print(f"{family} {damage} + LoRA: error {before:.4g} -> {after:.4g}", file=sys.stderr)
    assert after < 0.8 * before, (before, after)
    params = dict(handle.model.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())
    assert handle.codecs == codecs and handle.states == states
    save_model(handle, tmp_path / "healed")
    assert artifact_bytes(tmp_path / "healed") == artifact_bytes(tmp_path / "damaged")
    back = load_model(tmp_path / "healed", registries)
    saved, kept = _weights(back), _weights(handle)
    assert saved.keys() == kept.keys()
    assert [k for k in saved if not torch.equal(saved[k], kept[k])] == []
    log = " ".join(ctx.logs["heal"])
    trained, total = (int(x.replace(",", "")) for x in
                      re.search(r"trained ([\d,]+) of ([\d,]+) parameters", log).groups())
    assert "LoRA rank 4, alpha 8" in log and trained < 0.3 * total


def test_lora_trains_fewer_parameters_with_less_optimizer_state(models, registries):
    """The stage's log gives what each way of training held: LoRA's gradients and AdamW state are
    a small fraction of full distillation's."""
    original = load_model(models["llama"])
    held = {}
    for label, extra in (("full", {}), ("lora", {"lora_rank": 2})):
        ctx = _ctx(original)
        _distill(registries, _damaged(registries, models["llama"], "prune"), ctx, steps=2,
                 batch_size=4, **extra)
        log = " ".join(ctx.logs["heal"])
        held[label] = [int(re.search(rf"{what} ([\d,]+)", log).group(1).replace(",", ""))
                       for what in ("trained", "gradients", "AdamW state")]
    assert all(lora < 0.2 * full for lora, full in zip(held["lora"], held["full"])), held
    assert held["lora"][2] >= 2 * held["lora"][1]  # AdamW: two moments per parameter


def test_same_seed_same_adapters(models, registries):
    original = load_model(models["bert"])
    runs = [_distill(registries, _damaged(registries, models["bert"], "noise"),
                     _ctx(original, seed=seed), steps=4, lr=1e-2, lora_rank=4)
            for seed in (3, 3, 4)]
    weights = [_weights(r) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_lora_parameters_are_checked(models, registries):
    tech = registries.techniques.get("distill")
    assert not {"lora_alpha", "lora_include", "lora_exclude"} & set(tech.defaults_for({}))
    defaults = tech.defaults_for({"lora_rank": 8})
    assert (defaults["lora_alpha"], defaults["lora_include"], defaults["lora_exclude"]) == \
        (16, ["*.[0-9]*"], [])
    assert tech.check({"lora_alpha": 8}) == [("lora_alpha", "'lora_alpha' configures LoRA: set "
                                                            "lora_rank too")]
    assert [k for k, _ in tech.check({"lora_rank": 4, "train_embeddings": True})] == \
        ["train_embeddings"]
    original = load_model(models["bert"])
    handle = load_model(models["bert"])
    with pytest.raises(SqueezeError, match="lora_include/lora_exclude select no linear layer"):
        _distill(registries, handle, _ctx(original), steps=1, lora_rank=4,
                 lora_include=["nothing.*"])
    assert all(p.requires_grad for p in handle.model.parameters())  # left as it was


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two processes under torchrun: 15 s on two idle cores
def test_lora_and_quantized_students_train_data_parallel(tiny_bert_dir, sentences_file, tmp_path):
    """Under ``torchrun`` the adapters (beside dense layers, and parametrizing int4 ones) are
    parameters of the model ``DistributedDataParallel`` averages: two processes train what one
    does, within the tolerance of ``tests/executor/test_distributed_distill.py``."""
    import os
    import subprocess
    import sys

    import squeezelang
    from squeezelang.models.codec import quantize_weight

    recipe = tmp_path / "r.squeeze"
    recipe.write_text(
        f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
        f'data calib = text("{sentences_file}")\n'
        'stage q: quantize { scheme = "int4", group_size = 16, include = ["*.attention.*"] }\n'
        'stage heal: distill { teacher = original, data = calib, steps = 10, batch_size = 8, '
        'lr = 1e-2, lora_rank = 4 }\n', encoding="utf-8")
    squeezelang.run(recipe, tmp_path / "single")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(_free_port()), "-m", "squeezelang.cli", "run", str(recipe), "-o",
                           str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("data-parallel on 2 ranks (gloo)") == 1
    single, ddp = (load_model(tmp_path / d) for d in ("single", "ddp"))
    for handle in (single, ddp):  # int4 weights on their grid
        params = dict(handle.model.named_parameters())
        assert handle.codecs
        for name, spec in handle.codecs.items():
            q = spec["quant"]
            assert torch.equal(quantize_weight(params[name].detach(), q["bits"], q["axis"],
                                               q.get("group")), params[name])
    # the dense weights (adapters beside them, merged) moved alike; a quantized weight's codes
    # may flip on a rounding difference, a whole grid step at once, so they are not compared
    start, one, two = _weights(load_model(tiny_bert_dir)), _weights(single), _weights(ddp)
    dense = [k for k in one if k not in single.codecs and one[k].is_floating_point()]
    moved = sum(float((one[k] - start[k]).pow(2).sum()) for k in dense) ** 0.5
    apart = sum(float((one[k] - two[k]).pow(2).sum()) for k in dense) ** 0.5
    assert 0 < apart < 0.1 * moved, (apart, moved)


def test_a_tied_head_gets_no_adapter(models, registries):
    """Merging into GPT-2's head would change the embeddings tied to it, which never trained."""
    original = load_model(models["gpt2"])
    handle = load_model(models["gpt2"])
    with pytest.raises(SqueezeError, match="LoRA cannot adapt 'lm_head', whose weight is tied to "
                                           "'transformer.wte.weight'"):
        _distill(registries, handle, _ctx(original), steps=1, lora_rank=4,
                 lora_include=["*.[0-9]*", "lm_head"])
    assert handle.model.lm_head.weight is handle.model.transformer.wte.weight

