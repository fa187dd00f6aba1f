"""Data-parallel runs under ``torchrun``: two CPU processes (gloo) distill as one process does.

Every rank runs every stage and rank 0 alone writes; ``distill`` shares each global batch between
the ranks and trains through ``DistributedDataParallel``. The two-process result matches the
single-process one within a tolerance (per-token terms are averaged over a share's tokens, not the
batch's), is the same from run to run, and a crashed two-process run resumes from its checkpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from squeezelang.errors import SqueezeError
from squeezelang.models.distributed import (World, any_rank, barrier, broadcast_json, data_parallel,
                                            share, world)

#: Fails the stage while ``DIR/crash`` exists: a crash after the first stage's checkpoint.
CRASH_PLUGIN = '''
from pathlib import Path
from squeezelang.plugin import SqueezeError, Technique, hookimpl

class Crash(Technique):
    name = "crash"
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"dir": {"type": "string"}}, "required": ["dir"]}
    def estimate(self, meta, params):
        return meta
    def apply_(self, handle, params, ctx):
        if Path(params["dir"], "crash").exists():
            raise SqueezeError("crashed on purpose")

@hookimpl
def register_techniques(registry):
    registry.add(Crash())
'''

#: How far the two-process weights may be from the single-process ones, as a fraction of how far
#: distillation moved them: measured 0.018 (per-token loss terms are averaged over a share's tokens,
#: and Adam turns rounding in a gradient that is nearly zero, like a key bias's, into a full step).
TOLERANCE = 0.1


# ---------------------------------------------------------------------------- helpers, one process
@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
def test_share_covers_the_global_batch_in_order(n: int, size: int):
    items = list(range(100, 100 + n))
    parts = [share(items, World(rank, size)) for rank in range(size)]
    assert [x for part in parts for x in part] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_world_comes_from_the_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(0, 1, 0) and world().main
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(1, 2, 1) and not world().main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SqueezeError, match="RANK=2 and WORLD_SIZE=2"):
        world()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SqueezeError, match="WORLD_SIZE='two' is not an integer"):
        world()


def test_in_one_process_the_helpers_change_nothing(monkeypatch):
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    barrier()
    assert any_rank(True) and not any_rank(False)
    assert broadcast_json({"a": [1, 2.5]}) == {"a": [1, 2.5]}
    model = torch.nn.Linear(2, 2)
    with data_parallel(model) as trained:
        assert trained is model


def test_a_group_that_cannot_be_joined_is_a_clear_error(monkeypatch):
    from squeezelang.models.distributed import ensure_process_group

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SqueezeError, match="cannot join the process group as rank 0 of 2 .*"
                                           "MASTER_ADDR=\\(unset\\).*launch with torchrun"):
        ensure_process_group()


def test_a_search_is_refused_under_torchrun(monkeypatch):
    from squeezelang.executor.ranks import single_process

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SqueezeError, match="a search runs in one process, not on 2 torchrun ranks"):
        single_process("a search")


def test_distill_refuses_fewer_texts_per_batch_than_ranks(monkeypatch, tiny_bert_dir, registries):
    from squeezelang.hooks.context import Context
    from squeezelang.models.load import load_model

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    original = load_model(tiny_bert_dir)
    ctx = Context(quiet=True, original_loader=lambda: original)
    ctx.data.add("calib", [{"text": "a man is playing a guitar"}] * 8)
    tech = registries.techniques.get("distill")
    with pytest.raises(SqueezeError, match="a batch of 2 texts cannot be shared by 4 data-parallel"):
        tech.apply_(load_model(tiny_bert_dir), {**tech.defaults(), "data": "calib", "batch_size": 2},
                    ctx)


# ---------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helpers_on_a_rank(rank: int, port: int, results: str) -> None:
    """One of two spawned ranks: join the group, use every helper, write what it saw."""
    import json

    import torch
    import torch.distributed as dist

    from squeezelang.models.distributed import ensure_process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = ensure_process_group()
    torch.manual_seed(rank)  # different weights: data_parallel starts every rank from rank 0's
    model = torch.nn.Linear(3, 1)
    inputs = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    with data_parallel(model) as trained:
        trained(torch.stack(share(list(inputs), ranks))).pow(2).mean().backward()
    seen = {"world": [ranks.rank, ranks.size], "main": ranks.main, "any": any_rank(rank == 1),
            "none": any_rank(False), "json": broadcast_json({"from": rank} if rank == 0 else None),
            "weight": model.weight.tolist(), "grad": model.weight.grad.tolist()}
    # gloo's worker threads release a finished collective's tensors a moment after it returns, and
    # abort if the interpreter is already shutting down: leave them that moment (a run has it:
    # its last collective comes after a stage's work), then leave with a collective of no tensors
    time.sleep(0.2)
    barrier()
    dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(seen), encoding="utf-8")


def test_the_helpers_agree_across_two_processes(tmp_path: Path):
    """Every rank gets the same answers, and the averaged gradient of equal shares is the
    gradient of the whole batch."""
    import json

    import torch
    import torch.multiprocessing as mp

    mp.spawn(_helpers_on_a_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert [s["world"] for s in seen] == [[0, 2], [1, 2]] and [s["main"] for s in seen] == [True, False]
    assert all(s["any"] and not s["none"] and s["json"] == {"from": 0} for s in seen)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model(torch.arange(12, dtype=torch.float32).reshape(4, 3)).pow(2).mean().backward()
    for s in seen:
        assert torch.equal(torch.tensor(s["weight"]), model.weight.detach())
        assert torch.allclose(torch.tensor(s["grad"]), model.weight.grad, rtol=1e-6)


def _torchrun(workspace: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m squeezelang.cli run`` on CPU, as a user would."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(workspace), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
               "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "squeezelang.cli", "run", str(workspace / "r.squeeze"), "-o", str(out),
               "--plugin", "crash_plugin"]
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=300)


def _weights(out: Path) -> dict:
    from squeezelang.models.load import load_model

    return {k: v.detach().clone() for k, v in load_model(out).model.state_dict().items()}


def _distance(a: dict, b: dict) -> float:
    """The L2 distance between two models' floating weights, all tensors together."""
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def _pruned(model_dir: Path, registries) -> dict:
    """The weights the ``sparse`` stage leaves, before ``heal``."""
    from squeezelang.hooks.context import Context
    from squeezelang.models.load import load_model

    handle, prune = load_model(model_dir), registries.techniques.get("prune")
    prune.apply_(handle, {**prune.defaults(), "ratio": 0.5}, Context(quiet=True))
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert_dir: Path, sentences_file: Path, monkeypatch) -> Path:
    (tmp_path / "crash_plugin.py").write_text(CRASH_PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "r.squeeze").write_text(
        f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
        f'data calib = text("{sentences_file}")\n'
        'stage sparse: prune { ratio = 0.5 }\n'
        f'stage maybe: crash {{ dir = "{tmp_path}" }}\n'
        'stage heal: distill { teacher = original, data = calib, steps = 20, batch_size = 8, '
        'lr = 1e-3 }\n', encoding="utf-8")
    return tmp_path


@pytest.mark.slow  # three torchrun launches: 20 s on two idle cores, a minute on busy ones
def test_two_processes_distill_as_one_deterministically_and_resume(workspace: Path,
                                                                   tiny_bert_dir: Path, registries):
    import torch

    import squeezelang

    single = workspace / "single"
    squeezelang.run(workspace / "r.squeeze", single, plugins=["crash_plugin"])
    expected = _weights(single)
    healed = _distance(expected, _pruned(tiny_bert_dir, registries))

    first = _torchrun(workspace, workspace / "ddp")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("artifacts written to") == 1  # rank 0 alone reports
    assert first.stdout.count("data-parallel on 2 ranks (gloo)") == 1
    got = _weights(workspace / "ddp")
    assert got.keys() == expected.keys()
    apart = _distance(got, expected) / healed
    assert 0 < apart < TOLERANCE, apart
    print(f"two processes vs one: {apart:.3f} of what distill changed", file=sys.stderr)

    # A crash after the first stage's checkpoint; the same command resumes on both ranks.
    (workspace / "crash").write_text("", encoding="utf-8")
    crashed = _torchrun(workspace, workspace / "again")
    assert crashed.returncode != 0 and "crashed on purpose" in crashed.stderr
    assert not (workspace / "again").exists()
    (workspace / "crash").unlink()
    resumed = _torchrun(workspace, workspace / "again")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after stage 'sparse'" in resumed.stdout
    again = _weights(workspace / "again")
    assert all(torch.equal(again[k], got[k]) for k in got)  # same seed, same weights
