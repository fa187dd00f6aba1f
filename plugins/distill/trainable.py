"""What ``distill`` trains: parameters frozen, zeros kept, LoRA adapters, fake-quantized weights.

``Trainee.prepare_`` sets the model up before the training loop, ``train_in`` points it at the
parameters that train (an FSDP twin's shards under ``parallel = "fsdp"``); ``finish_`` undoes it
after (adapters merged, quantized weights baked on their grid, every parameter trainable again),
and ``requantize_`` puts the quantized weights on their grid in the dtype they are saved in.
Imported only from inside ``Distill.apply_`` (``lora`` and ``qat`` import torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import LINEAR_KINDS, SqueezeError

from . import lora as lora_
from . import qat

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle


def refuse_untrainable(handle: ModelHandle) -> None:
    """``SqueezeError`` for weights distill cannot train and save back: int8 kernels (their
    weights are packed inside torch's quantized linear op) and clustered weights (a codebook of
    at most ``2**bits`` values that training would not keep)."""
    from squeezelang.plugin import Int8DynamicLinear

    kernels = [n for n, m in handle.model.named_modules() if isinstance(m, Int8DynamicLinear)]
    if kernels:
        raise SqueezeError(f"distill cannot train int8 kernels ('{kernels[0]}' and "
                           f"{len(kernels) - 1} more run quantize scheme \"int8-dynamic\"); use "
                           "scheme \"int8\" (the same file, weights trained through their codes) "
                           "or put distill before that quantize stage")
    clustered = sorted(n for n, s in handle.codecs.items() if s and "cluster" in s)
    if clustered:
        raise SqueezeError(f"distill cannot train clustered weights ('{clustered[0]}', share "
                           "method \"cluster\"): put distill before the share stage")


def _parameters(handle: ModelHandle) -> dict[str, torch.Tensor]:
    return dict(handle.model.named_parameters(remove_duplicate=False))


def zero_masks(handle: ModelHandle) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, nonzero mask)`` of every tensor a codec stores sparse or N:M."""
    params = _parameters(handle)
    out, seen = [], set()
    for name, spec in sorted(handle.codecs.items()):
        if not (spec and (spec.get("sparse") or spec.get("nm"))) or name not in params \
                or id(params[name]) in seen:
            continue
        seen.add(id(params[name]))
        out.append((params[name], params[name].detach() != 0))
    return out


def quantized(handle: ModelHandle) -> dict[int, tuple[torch.Tensor, dict[str, Any]]]:
    """``{id(parameter): (parameter, quant spec)}`` of every weight whose codec quantizes it."""
    params = _parameters(handle)
    return {id(params[name]): (params[name], dict(spec["quant"]))
            for name, spec in sorted(handle.codecs.items())
            if spec and spec.get("quant") and name in params}


def _refuse_tied(handle: ModelHandle, targets: list[tuple[str, Any]]) -> None:
    """An adapter merges into its weight: refuse one whose weight another module also reads (a
    head tied to the embeddings), which would change untrained."""
    readers: dict[int, list[str]] = {}
    for name, param in _parameters(handle).items():
        readers.setdefault(id(param), []).append(name)
    for name, module in targets:
        others = [n for n in readers.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            raise SqueezeError(f"distill: LoRA cannot adapt '{name}', whose weight is tied to "
                               f"'{others[0]}'; leave it out with lora_exclude")


@dataclass
class Trainee:
    """The model set up for training (see the module docstring); ``lora``: the stage's
    ``lora_*`` parameters (``rank``, ``alpha``, ``include``, ``exclude``), or None."""

    handle: ModelHandle
    lora: dict[str, Any] | None
    train_embeddings: bool
    frozen: list[Any] = field(default_factory=list)
    masks: list[tuple[Any, Any]] = field(default_factory=list)
    #: ``masks`` as the module that trains holds them (``train_in``): under FSDP, shards of both
    kept: list[tuple[Any, Any]] = field(default_factory=list)
    #: the quantized weights that train through their codes, with their ``quant`` specs
    coded: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    adapted: list[lora_.Adapted] = field(default_factory=list)
    base_params: int = 0

    def prepare_(self) -> Trainee:
        from squeezelang.plugin import select_modules

        model = self.handle.model
        self.base_params = sum(p.numel() for p in model.parameters())
        self.masks = zero_masks(self.handle)
        self.kept = self.masks  # until ``train_in`` says what trains
        codes = quantized(self.handle)
        if self.lora is None:
            self.frozen = [] if self.train_embeddings else [
                p for p in (model.get_input_embeddings().weight,) if p.requires_grad]
        else:
            self.frozen = [p for p in model.parameters() if p.requires_grad]
        for param in self.frozen:
            param.requires_grad_(False)  # no gradient computed at all, restored by finish_
        if self.lora is not None:
            targets = select_modules(model, LINEAR_KINDS, self.lora["include"],
                                     self.lora["exclude"])
            if not targets:
                raise SqueezeError("distill: lora_include/lora_exclude select no linear layer")
            _refuse_tied(self.handle, targets)
            self.adapted = lora_.add_adapters_(
                targets, int(self.lora["rank"]), float(self.lora["alpha"]),
                {id(p): keep for p, keep in self.masks}, set(codes))
            ids = {id(a.module.parametrizations.weight.original) for a in self.adapted
                   if a.hook is None}
            self.coded = [v for k, v in codes.items() if k in ids]
        else:
            self.coded = [v for v in codes.values() if v[0].requires_grad]
        qat.fake_quantize_(model, {id(p): q for p, q in self.coded})
        return self

    def train_in(self, student: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters that train in ``student`` (what ``data_parallel`` yields: the model, its
        DDP wrapper, or its FSDP twin, whose parameters are shards), with the masks of the zeros
        to keep laid out as they are."""
        from squeezelang.plugin import counterparts

        self.kept = counterparts(self.handle.model, student, self.masks)
        return [p for p in student.parameters() if p.requires_grad]

    def keep_zeros_(self) -> None:
        """Put the pruned zeros back after an optimizer step (shadows of quantized weights too:
        a zero rounds to the zero code), in the parameters that train (``train_in``)."""
        import torch

        with torch.no_grad():
            for param, keep in self.kept:
                param.mul_(keep)

    def finish_(self) -> None:
        """Merge the adapters, leave quantized weights on their grid, make every parameter
        trainable again (the model as the stage found it, with new values)."""
        self.kept = []  # under FSDP, the shards go with the loop
        lora_.merge_(self.adapted)
        qat.bake_(self.handle.model)
        for param in self.frozen:
            param.requires_grad_(True)

    def requantize_(self) -> None:
        qat.requantize_(self.coded)

    def describe(self, trainable: list[Any], optimizer: Any) -> str:
        """What was trained and what it held in memory: parameters, gradients, AdamW state (the
        bytes this rank held: under FSDP, its shards)."""
        import torch

        def local(t: torch.Tensor) -> torch.Tensor:  # this rank's shard of an FSDP tensor
            return t.to_local() if hasattr(t, "to_local") else t

        count = sum(p.numel() for p in trainable)
        grads = sum(local(p).numel() * p.element_size() for p in trainable)
        state = sum(local(t).numel() * t.element_size() for s in optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        what = ""
        if self.lora is not None:
            what = (f" (LoRA rank {self.lora['rank']}, alpha {self.lora['alpha']:g}, on "
                    f"{len(self.adapted)} layers, merged)")
        coded = (f"; {len(self.coded)} quantized weights trained through their codes "
                 "(straight-through), saved on their grid" if self.coded else "")
        held = " (this rank's shards)" if any(hasattr(p, "to_local") for p in trainable) else ""
        return (f"distill: trained {count:,} of {self.base_params:,} parameters{what}: gradients "
                f"{grads:,} bytes, AdamW state {state:,} bytes{held}{coded}")
