"""Trace a compressed model into a float32 ONNX graph with dynamic batch and sequence axes.

The graph is traced with torch's TorchScript exporter (``torch.onnx.export(dynamo=False)``) on a
float32 copy of the model whose attention runs the ``"eager"`` implementation. ONNX Runtime fuses
that graph best: all-MiniLM-L6-v2 quantized by ONNX Runtime's own ``quantize_dynamic`` runs one
128-token input in 9.0 ms (ONNX Runtime 1.32, 2 threads) from this trace, in 10.8 ms with SDPA
attention, and in 13.7 ms from the torch.export-based exporter (``dynamo=True``, whose GELU and
attention ONNX Runtime fuses less); the trace also takes a fraction of a second instead of seconds.
The TorchScript exporter is deprecated in torch 2.9+ but still shipped; should a torch drop it,
``trace`` fails with a ``SqueezeError`` naming the exporter.

A trace freezes the branches the model takes on its example input, so the example always has a
padded row: the attention mask is then built in the graph, and right-padded batches (and unpadded
ones) run exactly as in torch. Weights keep their values bit for bit (the exporter only transposes
them), which is how ``integer`` finds the quantized ones again.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle

#: The graph's inputs: token ids and mask always, token types when the tokenizer makes them.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: The example the graph is traced on: two rows, the second one padded.
EXAMPLE_SHAPE = (2, 8)
EXAMPLE_PADDING = 3
#: Prefix of the wrapped model's names in the graph (the wrapper's attribute).
PREFIX = "model."


def output_names(task: str) -> tuple[str, ...]:
    """What the graph returns for ``task``: an embedding model its token states; the others their
    logits and the final hidden state (what ``hidden_states[-1]`` is in transformers)."""
    return ("last_hidden_state",) if task == "embedding" else ("logits", "last_hidden_state")


def input_names(handle: ModelHandle) -> tuple[str, ...]:
    names = getattr(handle.tokenizer, "model_input_names", None) or ()
    return TOKEN_INPUTS if "token_type_ids" in names else TOKEN_INPUTS[:2]


def forward_module(model: Any, task: str, inputs: tuple[str, ...]) -> torch.nn.Module:
    """``model`` behind a module that takes ``inputs`` in order and returns
    ``output_names(task)``."""
    import torch

    cache = {"use_cache": False} if task == "causal-lm" else {}

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            kwargs = dict(zip(inputs, tensors))
            if task == "embedding":
                out = self.model(**kwargs, return_dict=True)
                return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0],)
            out = self.model(**kwargs, **cache, output_hidden_states=True, return_dict=True)
            return out.logits, out.hidden_states[-1]

    return Forward().eval()


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``[out, in]`` and ``bias`` (shared where float32)."""
    import torch

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                             device="meta")
    linear.weight = torch.nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False)
    return linear


def float_model(handle: ModelHandle) -> Any:
    """A float32 copy of ``handle.model`` to trace, whose attention runs as ``"eager"`` matrix
    products (the pattern ONNX Runtime fuses best); the handle's model is left as it was.

    Modules are copied; float32 tensors are shared, not copied. Int8-kernel layers
    (``Int8DynamicLinear``) become ``nn.Linear`` with their dequantized weight (what their state
    dict, and so ``quantized_weights``, holds), W8A8 layers (``W8A8Linear``) ``nn.Linear`` with
    their weight (``integer`` puts their static activation quantization back), and GPT-2's
    ``Conv1D`` an ``nn.Linear`` with the transposed weight: a plain ``MatMul`` on the 3-D
    activation instead of a ``Gemm`` between reshapes.
    """
    import torch

    from squeezelang.plugin import Int8DynamicLinear, W8A8Linear, kind_of

    model = handle.model
    memo: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, Int8DynamicLinear):
            memo[id(module)] = _as_linear(*module.unpacked())
        elif isinstance(module, W8A8Linear):
            memo[id(module)] = _as_linear(module.weight.t() if module.transposed else module.weight,
                                          module.bias)
        elif kind_of(module) == "Conv1D":
            memo[id(module)] = _as_linear(module.weight.t(), module.bias)
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        memo.update({id(t): t for t in tensors})
    copied = copy.deepcopy(model, memo).float().eval()
    setter = getattr(copied, "set_attn_implementation", None)
    if setter is not None and getattr(copied.config, "_attn_implementation", "eager") != "eager":
        setter("eager")
    return copied


def _vocab_size(model: Any) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if not size:
        raise SqueezeError("format onnx: the model has no input embeddings (their vocabulary "
                           "sizes the example input the graph is traced on)")
    return int(size)


def example_inputs(model: Any, inputs: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Token ids, a mask whose second row is right-padded, and zero token types."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(model), EXAMPLE_SHAPE, generator=generator)
    mask = torch.ones(EXAMPLE_SHAPE, dtype=torch.long)
    mask[1, EXAMPLE_SHAPE[1] - EXAMPLE_PADDING:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[name] for name in inputs)


def buffer_names(model: Any) -> set[str]:
    """The graph names of ``model``'s buffers (position ids, rotary frequencies): not weights."""
    return {PREFIX + name for name, _ in model.named_buffers()}


def trace(handle: ModelHandle, model: Any, path: Path, opset: int) -> None:
    """Export ``model`` (``float_model(handle)``) to ``path``."""
    import torch

    inputs = input_names(handle)
    outputs = output_names(handle.task)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs + outputs}
    if handle.task == "classification":
        axes["logits"] = {0: "batch"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # frozen-branch warnings: the padded example takes the branches any batch needs
            warnings.simplefilter("ignore")
            torch.onnx.export(forward_module(model, handle.task, inputs),
                              example_inputs(model, inputs), str(path), dynamo=False,
                              input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"format onnx: torch.onnx.export cannot trace this "
                           f"{type(model).__name__}: {type(exc).__name__}: {exc}") from None
