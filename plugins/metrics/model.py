"""Metrics of the model itself, needing no data: size, params, nonzero, memory, latency."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from squeezelang.plugin import ExecutionError, Metric

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import MeasureContext, ModelHandle

_NONE = {"type": "object", "properties": {}, "additionalProperties": False}


def _packed_weights(module: Any) -> list[torch.Tensor]:
    """The weight and bias of a dynamically quantized module (``torch.ao`` packs them, and they
    are not parameters); empty for an ordinary module, whose ``weight`` is not callable."""
    out = []
    if callable(getattr(module, "unpacked", None)):  # squeezelang's own packed layers
        return [t for t in module.unpacked() if t is not None]
    for attr in ("weight", "bias"):
        getter = getattr(type(module), attr, None)
        if callable(getter) and not isinstance(getter, property):
            value = getattr(module, attr)()
            if value is not None:
                out.append(value)
    return out


def model_tensors(model: Any, buffers: bool = False) -> Iterator[torch.Tensor]:
    """Every weight tensor of ``model`` once (tied parameters once), packed quantized weights
    included; with ``buffers``, the persistent buffers (those saved in the state dict) too."""
    seen: set[int] = set()
    kept = []  # packed weights are fresh tensors: keep them alive so that no id is reused
    for module in model.modules():
        own = [t for _, t in module.named_parameters(recurse=False)] + _packed_weights(module)
        if buffers:
            skip = getattr(module, "_non_persistent_buffers_set", set())
            own += [t for n, t in module.named_buffers(recurse=False) if n not in skip]
        for tensor in own:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                kept.append(tensor)
                yield tensor


def _runtime_counts(model: Any) -> Any:
    """The weight counts of a model run by another runtime (``RuntimeModel.counts``), else None."""
    from squeezelang.plugin import RuntimeModel

    return model.counts if isinstance(model, RuntimeModel) else None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    import torch

    size = tensor.numel() * tensor.element_size()
    if tensor.is_quantized and tensor.qscheme() in (torch.per_channel_affine,
                                                     torch.per_channel_affine_float_qparams):
        scales = tensor.q_per_channel_scales()
        size += 2 * scales.numel() * scales.element_size()  # scales and zero points
    elif tensor.is_quantized:
        size += 16
    return size


class Size(Metric):
    name = "size"
    each_stage = True
    description = ("bytes on disk of the saved model: weights, config.json and squeeze.json "
                   "(not tokenizer or documentation files)")
    dimension = "bytes"
    higher_is_better = False
    on_artifact = True
    implicit = True
    schema = _NONE

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        from squeezelang.plugin import artifact_bytes

        if ctx.artifact_dir is None:
            raise ExecutionError("size is measured on a saved artifact, and none was given")
        return float(artifact_bytes(ctx.artifact_dir, getattr(ctx, "artifact_files", None)))


class Params(Metric):
    name = "params"
    each_stage = True
    description = ("number of parameter elements (tied tensors once; a dynamically quantized "
                   "layer's packed weight and bias included)")
    dimension = "count"
    higher_is_better = False
    implicit = True
    schema = _NONE

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        counts = _runtime_counts(handle.model)
        if counts is not None:
            return float(counts.params)
        return float(sum(t.numel() for t in model_tensors(handle.model)))


class Nonzero(Metric):
    name = "nonzero"
    each_stage = True
    description = "number of nonzero parameter elements (what pruning removes)"
    dimension = "count"
    higher_is_better = False
    schema = _NONE

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import torch

        counts = _runtime_counts(handle.model)
        if counts is not None:
            return float(counts.nonzero)
        with torch.inference_mode():
            return float(sum(int((t.dequantize() if t.is_quantized else t).count_nonzero())
                             for t in model_tensors(handle.model)))


class Memory(Metric):
    name = "memory"
    each_stage = True
    description = ("bytes the model's tensors occupy in memory: parameters and persistent buffers "
                   "at their in-memory dtype (activations and the tokenizer not included)")
    dimension = "bytes"
    higher_is_better = False
    schema = _NONE

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        counts = _runtime_counts(handle.model)
        if counts is not None:
            return float(counts.memory)
        return float(sum(_tensor_bytes(t) for t in model_tensors(handle.model, buffers=True)))


class Latency(Metric):
    name = "latency"
    description = ("median wall time, in seconds, of one forward pass on a [batch, seq] batch of "
                   "random token ids, on 'threads' CPU threads (after a warm-up of 'warmup' passes "
                   "or more, up to 0.2 s; 'repeats' timed passes or more, up to 0.5 s)")
    dimension = "time"
    higher_is_better = False
    implicit = True
    paired = True
    #: Used when ``seq`` is not given (and lowered to the model's maximum if that is shorter).
    default_seq = 128
    #: Least time spent warming up, and least total time of the timed passes (see ``measure``).
    warmup_seconds = 0.2
    min_seconds = 0.5
    schema = {
        "type": "object",
        "properties": {
            "batch": {"type": "integer", "minimum": 1, "default": 1},
            "seq": {"type": "integer", "minimum": 1,
                    "description": "tokens per input (default 128, or the model's maximum if "
                                   "shorter)"},
            "threads": {"type": "integer", "minimum": 1,
                        "description": "torch threads (default: the run's threads)"},
            "warmup": {"type": "integer", "minimum": 0, "default": 3},
            "repeats": {"type": "integer", "minimum": 1, "default": 20},
        },
        "additionalProperties": False,
    }

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import statistics
        import time

        import torch

        from squeezelang.plugin import compute_device, max_positions, onload_seconds

        model = handle.model.eval()
        limit = max_positions(model)
        seq = args.get("seq")
        if seq is None:
            seq = min(self.default_seq, limit) if limit else self.default_seq
        elif limit and seq > limit:
            raise ExecutionError(f"latency: seq = {seq} exceeds the model's maximum of {limit} "
                                 "positions")
        batch = int(args.get("batch", 1))
        threads = int(args.get("threads") or ctx.threads)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None) or model.config.vocab_size
        generator = torch.Generator().manual_seed(ctx.seed)
        device = compute_device(model)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator).to(device),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                # Warm up for `warmup` passes and up to `warmup_seconds` more (first passes
                # allocate and pick kernels); then time `repeats` passes and more, up to
                # `min_seconds` in all, so that one burst of load on a shared machine cannot move
                # the median. Fast (tiny) models stop at 4x / 5x the passes asked for.
                started = time.perf_counter()
                warmup, passes = int(args.get("warmup", 3)), 0
                while passes < warmup or (time.perf_counter() - started < self.warmup_seconds
                                          and passes < 4 * warmup):
                    model(**inputs)
                    passes += 1
                times: list[float] = []
                repeats = int(args.get("repeats", 20))
                # `min_seconds` of wall time, reading included: an offloaded model's passes are
                # long however short its compute is, and need no padding
                timing = time.perf_counter()
                while len(times) < repeats or (time.perf_counter() - timing < self.min_seconds
                                               and len(times) < 5 * repeats):
                    start, loading = time.perf_counter(), onload_seconds(model)
                    model(**inputs)
                    # an offloaded model's pass reads its weights from disk: not compute time
                    times.append(time.perf_counter() - start - (onload_seconds(model) - loading))
        finally:
            torch.set_num_threads(previous)
        return float(statistics.median(times))
