"""``distill { parallel = "fsdp" }``: data-parallel training through FSDP2, on CPU with gloo.

Each transformer block and then the root of a twin of the model are sharded over the ranks; the
optimizer trains the shards, pruned zeros are kept on them, and the trained values are gathered
back into every rank's model at the end. Two processes give what one gives (within the DDP test's
tolerance), the same from run to run; LoRA adapters and quantized students train as under DDP.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models.distributed import barrier, data_parallel, share

from test_distributed_distill import (CRASH_PLUGIN, TOLERANCE, _distance, _free_port, _pruned,
                                      _torchrun, _weights)


# ---------------------------------------------------------------------------- the language
def _recipe(tmp_path: Path, model: Path, parallel: str) -> Path:
    path = tmp_path / "r.squeeze"
    (tmp_path / "calib.txt").write_text("a man is playing a guitar\nthe cat sits\n",
                                        encoding="utf-8")
    path.write_text(f'model = hf("{model}", task = "embedding")\n'
                    'data calib = text("calib.txt")\n'
                    f'stage heal: distill {{ data = calib, steps = 2, parallel = "{parallel}" }}\n',
                    encoding="utf-8")
    return path


def test_check_accepts_fsdp_and_points_at_an_unknown_mode(tmp_path, tiny_bert_dir, capsys):
    from squeezelang.cli import main

    assert main(["check", str(_recipe(tmp_path, tiny_bert_dir, "fsdp"))]) == 0
    capsys.readouterr()
    path = _recipe(tmp_path, tiny_bert_dir, "x")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:59: error: 'parallel' must be one of \"ddp\", \"fsdp\"" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- one process
def test_in_one_process_fsdp_changes_nothing(monkeypatch):
    from squeezelang.plugin import counterparts

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Linear(2, 2)
    pairs = [(model.weight, model.weight != 0)]
    with data_parallel(model, "fsdp") as trained:
        assert trained is model
        assert counterparts(model, trained, pairs) == pairs
    with pytest.raises(SqueezeError, match="data-parallel mode 'zero3' is not one of ddp, fsdp"):
        with data_parallel(model, "zero3"):
            pass


def test_the_blocks_sharded_one_by_one(tiny_bert_dir):
    from squeezelang.models.load import load_model
    from squeezelang.models.sharded import blocks

    model = load_model(tiny_bert_dir).model
    assert blocks(model) == list(model.encoder.layer)  # the family's blocks
    plain = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2),
                                torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.Linear(2, 2),
                                                     torch.nn.Linear(2, 2)]))
    assert blocks(plain) == list(plain[0])  # no family: the longest list of one class


# ---------------------------------------------------------------------------- two processes
class Net(torch.nn.Module):
    """Two identical blocks and a head: a stack FSDP shards block by block (no family: the
    blocks are found as the longest list of one class)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(5, 5) for _ in range(2)])
        self.head = torch.nn.Linear(5, 1)
        with torch.no_grad():
            self.layers[0].weight[:, :2] = 0  # "pruned": kept at zero through training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _train(net: Net, ranks, mode: str, steps: int = 3) -> list[str]:
    """AdamW on this rank's share of a fixed batch, pruned zeros kept, as distill does; the
    classes of the parameters that trained."""
    from squeezelang.plugin import counterparts

    inputs = torch.linspace(-1, 1, 40).reshape(8, 5)
    masks = [(net.layers[0].weight, net.layers[0].weight.detach() != 0)]
    weight = ranks.size * len(share(range(8), ranks)) / 8
    with data_parallel(net, mode) as student:
        kept = counterparts(net, student, masks)
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=0.05)
        for _ in range(steps):
            x = torch.stack(share(list(inputs), ranks))
            loss = student(x).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            with torch.no_grad():
                for param, keep in kept:
                    param.mul_(keep)
        kinds = sorted({type(p).__name__ for p in trainable})
    return kinds


def _fsdp_on_a_rank(rank: int, port: int, results: str) -> None:
    """One of two spawned ranks: train ``Net`` through FSDP, write what the model holds after."""
    import json

    import torch.distributed as dist

    from squeezelang.models.distributed import ensure_process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = ensure_process_group()
    net = Net()
    kinds = _train(net, ranks, "fsdp")
    seen = {"kinds": kinds, "plain": all(type(p) is torch.nn.Parameter for p in net.parameters()),
            "state": {k: v.tolist() for k, v in net.state_dict().items()}}
    time.sleep(0.2)  # see test_distributed_distill: let gloo release the last tensors
    barrier()
    dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(seen), encoding="utf-8")


@pytest.mark.slow  # two spawned processes: about 4 s
def test_two_fsdp_ranks_train_as_one_process_and_keep_zeros(tmp_path: Path, monkeypatch):
    """The shards train, the zeros stay zero on every shard, and every rank ends with plain
    parameters equal to what one process computes from the whole batch."""
    import json

    import torch.multiprocessing as mp

    from squeezelang.models.distributed import World

    mp.spawn(_fsdp_on_a_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    net = Net()
    _train(net, World(0, 1), "fsdp")
    for s in seen:
        assert s["plain"] and s["kinds"] == ["DTensor"], s["kinds"]
        assert s["state"] == seen[0]["state"]  # every rank: the same model
        for name, value in net.state_dict().items():
            assert torch.allclose(torch.tensor(s["state"][name]), value, atol=1e-5), name
    assert torch.all(torch.tensor(seen[0]["state"]["layers.0.weight"])[:, :2] == 0)
    assert not torch.equal(net.layers[1].weight, Net().layers[1].weight)  # it trained


# ---------------------------------------------------------------------------- torchrun, a recipe
def _workspace(tmp_path: Path, tiny_bert_dir: Path, sentences_file: Path, stages: str) -> Path:
    """``tmp_path`` holding ``r.squeeze`` with ``stages``, and the plugin ``_torchrun`` names."""
    (tmp_path / "crash_plugin.py").write_text(CRASH_PLUGIN, encoding="utf-8")
    (tmp_path / "r.squeeze").write_text(
        f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
        f'data calib = text("{sentences_file}")\n' + stages, encoding="utf-8")
    return tmp_path


@pytest.mark.slow  # a run and two torchrun launches: 20 s on two idle cores, a minute on busy ones
def test_fsdp_distills_as_one_process_deterministically(tmp_path: Path, tiny_bert_dir: Path,
                                                        sentences_file: Path, registries):
    import squeezelang

    workspace = _workspace(tmp_path, tiny_bert_dir, sentences_file,
                           'stage sparse: prune { ratio = 0.5 }\n'
                           'stage heal: distill { teacher = original, data = calib, steps = 20, '
                           'batch_size = 8, lr = 1e-3, parallel = "fsdp" }\n')
    single = workspace / "single"
    squeezelang.run(workspace / "r.squeeze", single)
    expected = _weights(single)
    pruned = _pruned(tiny_bert_dir, registries)
    healed = _distance(expected, pruned)

    first = _torchrun(workspace, workspace / "fsdp")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("artifacts written to") == 1  # rank 0 alone reports
    assert first.stdout.count("fully sharded data-parallel (FSDP: weights, gradients and AdamW "
                              "state sharded) on 2 ranks (gloo)") == 1
    got = _weights(workspace / "fsdp")
    assert got.keys() == expected.keys()
    apart = _distance(got, expected) / healed
    assert 0 < apart < TOLERANCE, apart
    print(f"two FSDP processes vs one: {apart:.3f} of what distill changed", file=sys.stderr)
    zeros = {k: pruned[k] == 0 for k in pruned if pruned[k].dim() == 2 and ".layer." in k}
    assert zeros and all(torch.all(got[k][z] == 0) for k, z in zeros.items())

    again = _torchrun(workspace, workspace / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = _weights(workspace / "again")
    assert all(torch.equal(repeat[k], got[k]) for k in got)  # same seed, same weights
    loaded = squeezelang.load(workspace / "fsdp")
    assert all(torch.equal(t, got[k]) for k, t in loaded.state_dict().items())


#: Students whose weights train through their codes: LoRA on int8 attention projections (the
#: adapters parametrize the weights: trained through the rounding) and on dense MLP layers (the
#: adapters run beside them); and the pruned, int8 weights themselves (float shadows, zeros kept).
STUDENTS = {
    "lora-over-int8": ('stage q: quantize { scheme = "int8", include = ["*.attention.*"] }\n',
                       'lr = 3e-3, lora_rank = 4', "LoRA rank 4"),
    "qat-over-pruned-int8": ('stage sparse: prune { ratio = 0.5 }\n'
                             'stage q: quantize { scheme = "int8" }\n', 'lr = 1e-4', "quantized"),
}

#: How far FSDP's weights may be from DDP's, as a fraction of how far distillation moved them:
#: the two average the same gradients (measured: 0, the same bits on two CPU ranks). A single
#: process is no reference here: a code flips where a shadow crosses half a grid step, so the
#: rounding of a share's per-token averages moves a quantized student further from one process's
#: (measured 0.14 of the change, for DDP and FSDP alike).
FSDP_VS_DDP = 1e-3


@pytest.mark.slow  # a run and two torchrun launches each: 15 s on two idle cores
@pytest.mark.parametrize("student", list(STUDENTS))
def test_fsdp_trains_quantized_students_and_lora_adapters_as_ddp_does(
        student: str, tmp_path: Path, tiny_bert_dir: Path, sentences_file: Path):
    import squeezelang
    from squeezelang.models.load import load_model

    stages, options, logged = STUDENTS[student]
    workspace = _workspace(tmp_path, tiny_bert_dir, sentences_file, stages)
    squeezelang.run(workspace / "r.squeeze", workspace / "before")  # the stages before distill
    before = _weights(workspace / "before")
    got = {}
    for parallel in ("ddp", "fsdp"):
        _workspace(tmp_path, tiny_bert_dir, sentences_file, stages
                   + 'stage heal: distill { teacher = original, data = calib, steps = 10, '
                   f'batch_size = 8, {options}, parallel = "{parallel}" }}\n')
        run = _torchrun(workspace, workspace / parallel)
        assert run.returncode == 0, run.stderr[-3000:]
        assert logged in run.stdout and "trained through their codes" in run.stdout
        assert ("fully sharded data-parallel" in run.stdout) == (parallel == "fsdp")
        got[parallel] = _weights(workspace / parallel)
    apart = _distance(got["fsdp"], got["ddp"]) / _distance(got["ddp"], before)
    assert apart < FSDP_VS_DDP, apart
    print(f"{student}: FSDP vs DDP {apart:.2g} of what distill changed", file=sys.stderr)
    handle = load_model(workspace / "fsdp")
    query = "encoder.layer.0.attention.self.query.weight"
    assert handle.codecs[query]["quant"] == load_model(workspace / "before").codecs[query]["quant"]
    assert not torch.equal(got["fsdp"][query], before[query])  # it trained
    if "prune" in stages:  # pruned zeros stay zero (a dense int8 weight's zero codes need not)
        assert torch.all(got["fsdp"][query][before[query] == 0] == 0)
