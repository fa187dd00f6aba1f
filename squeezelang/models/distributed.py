"""Data-parallel training on ``torch.distributed``, for runs launched with ``torchrun``.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) every process runs the whole
recipe: the stages are deterministic, so every rank holds the same model. A technique that trains
(``distill``) draws the same global batches on every rank, computes its loss on its rank's
``share`` of each one, and trains the model wrapped by ``data_parallel``, whose gradient averaging
makes every step the step of the whole global batch (``DistributedDataParallel``, or FSDP2 when
the gradients and optimizer state should be sharded: ``squeezelang.models.sharded``). Rank 0 alone
writes and measures (the executor's business). Without ``torchrun`` everything here describes one
process and does nothing.

The process group uses gloo for CPU tensors and, when torch sees a GPU, NCCL for CUDA tensors. This
module imports torch only inside its functions, and only once a process group may exist.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypeVar

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: How long a rank waits for the others at a collective. Generous: rank 0 measures metrics (the
#: original's, each stage's) while the other ranks wait for it at the next data-parallel stage.
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes and measures."""
        return self.rank == 0


def _group() -> Any:
    """``torch.distributed`` when a process group is initialized, else ``None`` (no torch import:
    a process that has not imported it has no group)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise SqueezeError(f"environment variable {name}={value!r} is not an integer (torchrun "
                           "sets RANK, WORLD_SIZE and LOCAL_RANK; unset them to run in one "
                           "process)") from None


def world() -> World:
    """The ranks as the initialized process group sees them, else as ``torchrun`` announces them
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process of one without either."""
    local_rank = _env_int("LOCAL_RANK", 0)
    dist = _group()
    if dist is not None:
        return World(dist.get_rank(), dist.get_world_size(), local_rank)
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise SqueezeError(f"RANK={rank} and WORLD_SIZE={size} do not describe a rank of a group "
                           "(launch with torchrun, which sets them, or unset them)")
    return World(rank, size, local_rank)


def is_main() -> bool:
    """Whether this process is rank 0 (always, without ``torchrun``)."""
    return world().main


def ensure_process_group() -> World:
    """Join the ``torchrun`` process group if there is one to join and it is not joined yet.

    Uses the ``env://`` rendezvous that ``torchrun`` sets up (``MASTER_ADDR``, ``MASTER_PORT``);
    with a GPU, also selects this rank's device (``LOCAL_RANK``). A group that cannot be joined is
    a ``SqueezeError`` saying what was tried.
    """
    here = world()
    if here.size == 1 or _group() is not None:
        return here
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise SqueezeError(f"WORLD_SIZE={here.size} asks for {here.size} processes, but this torch "
                           "build has no torch.distributed; run in one process (unset WORLD_SIZE)")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        if here.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(here.local_rank)
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=here.rank,
                                world_size=here.size, timeout=TIMEOUT)
    except Exception as exc:  # a missing address, a port in use, a peer that never came
        where = (f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '(unset)')}, "
                 f"MASTER_PORT={os.environ.get('MASTER_PORT', '(unset)')}")
        raise SqueezeError(f"cannot join the process group as rank {here.rank} of {here.size} "
                           f"({backend}, {where}): {type(exc).__name__}: {exc}; launch with "
                           "torchrun (it sets these), or unset WORLD_SIZE to run in one "
                           "process") from None
    return world()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def share(items: Sequence[T], ranks: World | None = None) -> list[T]:
    """This rank's contiguous part of ``items`` (a global batch): rank ``r`` of ``n`` gets
    ``items[r·len/n : (r+1)·len/n]``, so the ranks' parts cover ``items`` exactly, in order."""
    ranks = ranks or world()
    n = len(items)
    return list(items[ranks.rank * n // ranks.size:(ranks.rank + 1) * n // ranks.size])


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (each rank passes its own); every rank gets the same
    answer, so that a loop stopped by a clock stops at the same step everywhere."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return flag
    import torch

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo, on any device
    return bool(value.item())


def broadcast_json(value: Any = None) -> Any:
    """Rank 0's ``value`` (anything JSON can carry) on every rank; the others pass nothing. Sent
    as UTF-8 JSON bytes, never pickled."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return value
    import json

    import torch

    data = json.dumps(value).encode("utf-8") if dist.get_rank() == 0 else b""
    length = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(length, src=0)
    buffer = (torch.tensor(list(data), dtype=torch.uint8) if data
              else torch.empty(int(length.item()), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.tolist()).decode("utf-8"))


#: The wrappers ``data_parallel`` trains through (``distill``'s ``parallel``).
MODES = ("ddp", "fsdp")


@contextmanager
def data_parallel(model: torch.nn.Module, mode: str = "ddp") -> Iterator[torch.nn.Module]:
    """The module to train ``model`` through when several ranks run (the process group joined if
    need be), else ``model`` itself.

    ``mode = "ddp"``: ``model`` wrapped in ``DistributedDataParallel``. ``mode = "fsdp"``: a twin of
    ``model`` whose blocks and root torch's ``fully_shard`` shards over the ranks (its parameters
    are this rank's shards, DTensors; see ``squeezelang.models.sharded``): build the optimizer
    from what this yields, and reach the parameters that train through ``counterparts``. On leaving
    the block normally, ``model``'s parameters receive the trained values, gathered whole; if the
    block raises, ``model`` is left as it was.

    Either way each backward pass averages the gradients over the ranks, so with equal shares of a
    global batch every rank takes the same step and the models stay equal. Freeze parameters
    (``requires_grad_(False)``) before entering; ones the loss never reads are allowed (torch warns
    once when there are none). The wrapper is for the loop only: after it, keep using ``model``
    (and hold no reference to the wrapper, whose gradient hooks live as long as it does).
    """
    if mode not in MODES:
        raise SqueezeError(f"data-parallel mode '{mode}' is not one of {', '.join(MODES)}")
    ranks = ensure_process_group()
    if ranks.size == 1:
        yield model
        return
    if mode == "fsdp":
        from squeezelang.models.sharded import gather_, sharded_twin

        twin = sharded_twin(model, ranks)
        try:
            yield twin
            gather_(model, twin)
        finally:
            del twin
        return
    from torch.nn.parallel import DistributedDataParallel

    device = next(iter(model.parameters())).device
    # unused: parameters the loss never reads (a pooler) keep no gradient, as in one process
    wrapped = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)
    try:
        yield wrapped
    finally:
        del wrapped
