"""Write a model as a compressed-tensors checkpoint: ``config.json`` with its
``quantization_config``, ``model.safetensors`` with the packed layers, the tokenizer.

Every quantized ``torch.nn.Linear`` is packed (``pack.py``) from the engine's own codes
(``quantized_weights``): integer codes ``pack-quantized``, FP8 codes ``float-quantized``. A
quantized embedding, and a weight tied to one (a tied ``lm_head``), stays in float holding its
quantized values — compressed-tensors and vLLM quantize linear layers — so the model computes
the same, but those tensors are not smaller. Everything else
(norms, biases, unquantized layers) is written as it is; the linear layers left in float are
listed in ``ignore``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError, copy_aux_files, standard_model

from .pack import pack, scheme_of
from .scheme import Scheme, quantization_config

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle

WEIGHTS_FILE = "model.safetensors"


def save_(handle: ModelHandle, directory: Path) -> list[str]:
    """Write ``handle`` into ``directory``; return the relative paths of the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = standard_model(handle, "compressed-tensors")
    packed, schemes = packed_layers(handle, model)
    if handle.source_dir is not None:  # tokenizer, sentence-transformers modules and pooling
        copy_aux_files(handle.source_dir, directory, skip_tokenizer=handle.tokenizer_changed)
    _write_weights(model, packed, directory / WEIGHTS_FILE)
    _write_config(model, schemes, _float_linears(model, schemes), directory)
    if handle.tokenizer is not None and (handle.tokenizer_changed or handle.source_dir is None):
        handle.tokenizer.save_pretrained(str(directory))
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def packed_layers(handle: ModelHandle, model: Any
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Scheme]]:
    """The packed tensors and the scheme of every quantized linear layer, by module name."""
    import torch

    from squeezelang.plugin import get_module, kind_of, quantized_weights

    shared = _tied_names(model)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    schemes: dict[str, Scheme] = {}
    for name, weight in quantized_weights(handle).items():
        module_name, _, leaf = name.rpartition(".")
        module = get_module(model, module_name)
        if leaf != "weight" or isinstance(module, torch.nn.Embedding) or name in shared:
            continue  # kept in float, holding its quantized values
        if not isinstance(module, torch.nn.Linear):
            raise SqueezeError(f"output format 'compressed-tensors': '{module_name}' is a "
                               f"{kind_of(module)}, not a torch.nn.Linear; compressed-tensors and "
                               "vLLM pack linear layers only: use format = \"squeeze\"")
        schemes[module_name] = scheme_of(weight, module_name)
        packed[module_name] = pack(weight, module.weight.dtype)
    return packed, schemes


def _tied_names(model: Any) -> set[str]:
    """Names of parameters reachable under several names (a tied embedding and head)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def _write_weights(model: Any, packed: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """The state dict (a tied tensor once, under its first name) with each packed layer's
    ``weight`` replaced by its packed tensors."""
    from safetensors.torch import save_file

    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    kept = set(first.values())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if (name in params and name not in kept) or (module_name in packed and leaf == "weight"):
            continue
        tensors[name] = tensor.detach().cpu().contiguous()
    for module_name, parts in packed.items():
        tensors.update({f"{module_name}.{k}": v for k, v in parts.items()})
    save_file(tensors, str(path), metadata={"format": "pt"})


def _float_linears(model: Any, schemes: dict[str, Scheme]) -> list[str]:
    """The linear layers written in float (compressed-tensors' ``ignore``)."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in schemes]


def _write_config(model: Any, schemes: dict[str, Scheme], ignore: list[str],
                  directory: Path) -> None:
    """``config.json`` naming the weights' dtype, with the ``quantization_config`` (checked by
    compressed-tensors itself) when a layer is packed; ``generation_config.json`` for a generator."""
    import copy

    from compressed_tensors.quantization import QuantizationConfig

    config = copy.deepcopy(model.config)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    config.save_pretrained(str(directory))
    if getattr(model, "can_generate", lambda: False)():
        model.generation_config.save_pretrained(str(directory))
    if not schemes:
        return  # nothing packed: a plain transformers checkpoint
    quant = quantization_config(schemes, ignore)
    QuantizationConfig.model_validate(quant)
    path = directory / "config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["quantization_config"] = quant
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
