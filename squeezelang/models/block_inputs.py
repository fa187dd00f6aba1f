"""Calibration that runs each block once: inputs carried from one block to the next.

``input_stats(..., stop_after=block)`` runs the model from the embeddings to the block of interest
for every block, so calibrating ``L`` blocks costs about ``L²/2`` block passes. ``block_stats``
runs the model once, up to the first block of interest, recording what every block is called with
(the hidden states entering the first, and the other arguments of each: attention masks, position
embeddings, which are the same whatever the weights); then, block after block, it calls the block
on the carried hidden states with the statistics hooks on, hands the statistics to the caller
(which may change the block's weights: quantize, prune), and calls the block again to carry its
new outputs to the next one. About ``3L`` block passes, and the same statistics as
``input_stats`` gives with the earlier blocks already changed (the test compares them).

A model whose blocks are not each called once per forward pass, in order (a block shared by
several layers), is calibrated the long way, with ``input_stats``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

from squeezelang.models.offload import resident
from squeezelang.models.linear_stats import (InputStats, _Stop, accumulate, finish, input_stats,
                                              no_cache)

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle

Group = tuple[Any, list[tuple[str, Any]]]


class _Irregular(Exception):
    """The blocks are not called once each, in order: carrying inputs would be wrong."""


class _Call:
    """How the model calls a block, but for the hidden states (which ``block_stats`` carries)."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            self.hidden, self.args, self.kwargs = args[0], args[1:], kwargs
        elif "hidden_states" in kwargs:
            self.hidden = kwargs["hidden_states"]
            self.args, self.kwargs = (), {k: v for k, v in kwargs.items() if k != "hidden_states"}
        else:
            raise _Irregular
        self.positional = bool(args)

    def __call__(self, block: Any, hidden: Any) -> Any:
        if self.positional:
            return block(hidden, *self.args, **self.kwargs)
        return block(hidden_states=hidden, **self.kwargs)


def _recorded_calls(handle: ModelHandle, batches: list[dict[str, Any]],
                    blocks: list[Any]) -> list[list[_Call]]:
    """For every batch, how each block is called, up to the last one; only the first call keeps
    its hidden states."""
    import torch

    model = handle.model
    extra = no_cache(model)
    calls: list[_Call] = []

    def recorder(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(calls) != index:
                raise _Irregular
            call = _Call(args, kwargs)
            if index:
                call.hidden = None
            calls.append(call)
            if index == len(blocks) - 1:
                raise _Stop
        return hook

    hooks = [b.register_forward_pre_hook(recorder(i), with_kwargs=True)
             for i, b in enumerate(blocks)]
    out = []
    try:
        with torch.inference_mode():
            for inputs in batches:
                calls = []
                try:
                    model(**inputs, **extra)
                except _Stop:
                    pass
                if len(calls) != len(blocks):
                    raise _Irregular
                out.append(calls)
    finally:
        for h in hooks:
            h.remove()
    return out


def _hidden(output: Any) -> Any:
    """The hidden states a block passes on (blocks return them alone or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _chain(model: Any, blocks: list[Any]) -> list[Any] | None:
    """The blocks of the model's block list from the first of ``blocks`` to the last (those in
    between carry the inputs too), or ``None`` when no single list holds them in that order."""
    import torch

    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        ids = [id(m) for m in module]
        if all(id(b) in ids for b in blocks):
            if len(set(ids)) != len(ids):
                return None  # a block shared by several layers runs more than once per pass
            where = [ids.index(id(b)) for b in blocks]
            if where == sorted(where) and len(set(where)) == len(where):
                return list(module)[where[0]:where[-1] + 1]
    return None


def block_stats(handle: ModelHandle, texts: Sequence[str], groups: Sequence[Group],
                gram: bool = False, batch_size: int = 16,
                max_length: int = 128) -> Iterator[tuple[Any, list[tuple[str, Any]], dict[str, InputStats]]]:
    """For each ``(block, members)`` of ``groups`` (``by_block``'s order), yield
    ``(block, members, stats)``: the input statistics of the members with every earlier block as
    the caller left it. Resuming the generator carries the inputs through the block as it is then.
    A group whose block is ``None`` (modules outside the blocks) is measured with a full pass."""
    import torch

    from squeezelang.models.forward import _batches

    if not groups:
        return
    handle.model.eval()
    members_of = {id(b): members for b, members in groups if b is not None}
    chain = _chain(handle.model, [b for b, _ in groups if b is not None]) if members_of else []
    batches = ([inputs for _, inputs in _batches(handle, list(texts), None, batch_size, max_length)]
               if chain else [])
    try:
        if chain is None:
            raise _Irregular
        calls = _recorded_calls(handle, batches, chain) if chain else []
    except _Irregular:
        for block, members in groups:
            stats = input_stats(handle, texts, members, gram=gram, batch_size=batch_size,
                                max_length=max_length, stop_after=block)
            with resident(handle.model, *(m for _, m in members)):
                yield block, members, stats
        return
    hidden = [c[0].hidden for c in calls]
    masks = [inputs["attention_mask"].bool() for inputs in batches]
    for position, block in enumerate(chain):
        members = members_of.get(id(block))
        # an offloaded block is read once, stays while the caller changes it, and is written back
        with resident(handle.model, block):
            if members is not None:
                sums: dict[str, list[Any]] = {}
                with accumulate(members, sums, gram) as live, torch.inference_mode():
                    for b, batch_calls in enumerate(calls):
                        live["mask"], live["seen"] = masks[b], {}
                        batch_calls[position](block, hidden[b])
                yield block, members, finish(members, sums)
            if position < len(chain) - 1:
                with torch.inference_mode():
                    for b, batch_calls in enumerate(calls):
                        hidden[b] = _hidden(batch_calls[position](block, hidden[b]))
    for block, members in groups:
        if block is None:
            stats = input_stats(handle, texts, members, gram=gram, batch_size=batch_size,
                                max_length=max_length)
            with resident(handle.model, *(m for _, m in members)):
                yield block, members, stats
