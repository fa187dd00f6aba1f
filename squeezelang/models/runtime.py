"""A saved artifact run by its own runtime (ONNX Runtime, llama.cpp) behind a transformers-like model.

An output format for another runtime returns, from ``OutputFormat.load``, a ``ModelHandle`` whose
model is a ``RuntimeModel``: every metric then runs on that runtime unchanged, because the shared
forward passes (``models.forward``) and ``latency`` call the model the way they call a transformers
model — ``model(input_ids=…, attention_mask=…)`` — and read ``logits``, ``last_hidden_state`` or
``hidden_states[-1]`` from what it returns.

A subclass implements ``run``; the weight counts that ``params``, ``nonzero`` and ``memory`` report
come from ``counts``, which the format fills from the tensors it wrote (the runtime's own memory is
not visible from Python).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RuntimeCounts:
    """What the artifact holds: weight elements (``params``, a quantized weight counted at its
    logical shape), nonzero weight elements, and the bytes its weight tensors take as stored."""

    params: int = 0
    nonzero: int = 0
    memory: int = 0


@dataclass
class RuntimeOutput:
    """What a ``RuntimeModel`` returns: the fields of a transformers output that the runtime gives
    (``None`` for the others)."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = field(default=None)

    def __getitem__(self, index: int) -> torch.Tensor:
        present = [t for t in (self.last_hidden_state, self.logits) if t is not None]
        return present[index]


class RuntimeModel(torch.nn.Module):
    """Base class of models run by another runtime; see the module docstring.

    ``config`` is the transformers config of the saved model (``max_position_embeddings`` and
    ``vocab_size`` are read from it), ``runtime`` names what runs it (reports show it).
    """

    runtime: str = ""

    def __init__(self, config: Any, counts: RuntimeCounts | None = None) -> None:
        super().__init__()
        self.config = config
        self.counts = counts or RuntimeCounts()

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Run a padded batch (int64 ``[batch, seq]`` tensors, right-padded, mask 1 on real tokens);
        return float tensors by name: ``"logits"`` (``[batch, seq, vocab]`` or ``[batch, classes]``)
        and/or ``"last_hidden_state"`` (``[batch, seq, hidden]``)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: Any) -> RuntimeOutput:
        from squeezelang.errors import ExecutionError

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.run(input_ids, attention_mask, token_type_ids)
        hidden = out.get("last_hidden_state")
        if output_hidden_states and hidden is None:
            raise ExecutionError(f"{self.runtime or 'this runtime'} gives no hidden states for this "
                                 "model; measure it with a metric that reads its logits")
        return RuntimeOutput(logits=out.get("logits"), last_hidden_state=hidden,
                             hidden_states=(hidden,) if output_hidden_states else None)

    def get_input_embeddings(self) -> None:
        return None
