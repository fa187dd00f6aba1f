"""Fully sharded data parallelism (torch's FSDP2) for ``data_parallel(model, mode="fsdp")``.

DDP keeps the whole gradient and the whole optimizer state on every rank; FSDP cuts the trained
weights, their gradients and the optimizer's state (AdamW's two moments) into one shard per rank,
and gathers a block's weights only while the block runs. The rank's share of the training state
drops from about three times the weights to three times the weights over the number of ranks.

Every rank still holds ``model`` itself, since every rank runs every stage of the recipe. What
trains is a *twin* of it (``sharded_twin``): the model's modules copied, its tensors shared, then
each transformer block and the root passed to ``fully_shard``, which gives the twin new, sharded
parameters and leaves the model's own untouched. After the loop, ``gather_`` copies the twin's
values, gathered whole, into the model's parameters. Every rank then ends with the same plain
model, as after DDP; a loop that fails leaves the model as it was. Sharding ``model`` in place
would change its modules' classes and hooks, and torch has no public way back, while the stage's
model must be a plain module again afterwards (rank 0 saves it and the next stage changes it).

Gradients are averaged over the ranks, as DDP averages them, so a loss weighted by a rank's share
of the batch means the same thing under both. This module imports torch: ``data_parallel`` imports
it when it shards, and ``squeezelang.plugin`` when a plugin first asks for ``counterparts``.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    from squeezelang.models.distributed import World


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, each sharded as one unit: the model family's blocks, or, for a
    module of no registered family, the children of its longest ``ModuleList`` of one class."""
    from squeezelang.models.surgery import layer_modules

    if getattr(model, "config", None) is not None:
        try:
            found = layer_modules(model)
        except (SqueezeError, TypeError):  # no registered family, or its blocks are not there
            found = []
        if found:
            return found
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def _tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Every tensor the model's modules hold: parameters (tied ones under each name), buffers, and
    plain tensor attributes (a LoRA adapter's mask)."""
    for module in model.modules():
        yield from module._parameters.values()
        yield from module._buffers.values()
        yield from (v for v in vars(module).values() if isinstance(v, torch.Tensor))


def sharded_twin(model: nn.Module, ranks: World) -> nn.Module:
    """A copy of ``model``'s modules sharing its tensors, each block and then the root passed to
    ``fully_shard`` on a mesh of all the ranks; its parameters are this rank's shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(iter(model.parameters())).device
    mesh = init_device_mesh(device.type, (ranks.size,))
    memo = {id(t): t for t in _tensors(model) if t is not None}
    twin = copy.deepcopy(model, memo)  # modules copied, tensors shared: nothing weight-sized
    for block in blocks(twin):
        fully_shard(block, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    return twin


def gather_(model: nn.Module, twin: nn.Module) -> None:
    """Copy each of the twin's parameters, gathered whole, into the model's parameter of the same
    name (every rank gathers the same parameters in the same order)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in twin.named_parameters():
            own[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)


def counterparts(model: nn.Module, student: nn.Module,
                 pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter of model, tensor of its shape)`` pairs (say, a weight and the mask of its
    zeros) as they are in ``student``, the module ``data_parallel(model)`` yields.

    In one process and under DDP, the student trains the model's own parameters: the pairs are
    returned as they are. Under FSDP, each parameter is replaced by the sharded one that trains in
    its place, and its tensor is cut the same way, into this rank's shard.
    """
    ours = {id(p) for p in student.parameters()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    theirs = dict(student.named_parameters(remove_duplicate=False))
    out = []
    for param, tensor in pairs:
        if id(param) in ours:
            out.append((param, tensor))
            continue
        twin = theirs[names[id(param)]]
        if isinstance(twin, DTensor):
            tensor = distribute_tensor(tensor.to(twin.device), twin.device_mesh, twin.placements,
                                       src_data_rank=None)  # every rank holds it: cut locally
        out.append((twin, tensor))
    return out
