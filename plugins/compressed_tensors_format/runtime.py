"""The artifact as transformers runs it: ``from_pretrained`` with its compressed-tensors support.

transformers reads ``quantization_config``, builds the packed layers with compressed-tensors and
loads ``weight_packed`` / ``weight_scale`` / ``weight_shape`` into them; the layers are then
decompressed on the CPU (compressed-tensors' ``ModelCompressor.decompress_model``, which
transformers would otherwise run before the first forward pass) into float weights
``code * scale``, computed with the scale in the model's dtype. The model is wrapped in a
``RuntimeModel`` whose counts describe the checkpoint: weights at their logical shape (a packed
layer's ``weight_shape``, not its scales), and the bytes its tensors take in the files.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from squeezelang.plugin import RuntimeCounts, RuntimeModel

RUNTIME = "transformers (compressed-tensors)"
#: Parameters compressed-tensors keeps beside a decompressed weight (not weights themselves).
QPARAMS = ("weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale")


class CompressedTensorsModel(RuntimeModel):
    """A transformers model loaded from a compressed-tensors checkpoint."""

    runtime = RUNTIME

    def __init__(self, net: Any, counts: RuntimeCounts) -> None:
        super().__init__(net.config, counts)
        self.net = net

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return {k: getattr(out, k) for k in ("logits", "last_hidden_state")
                if getattr(out, k, None) is not None}


def load_net(directory: Path, task: str) -> Any:
    """The transformers model of ``directory``, its packed layers decompressed."""
    from squeezelang.plugin import load_pretrained, read_config

    net = load_pretrained(directory, task)
    quant = read_config(directory).get("quantization_config")
    if quant:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig

        ModelCompressor(quantization_config=QuantizationConfig.model_validate(quant)
                        ).decompress_model(net)
    return net


def counts_of(net: Any, directory: Path) -> RuntimeCounts:
    """Weights (tied ones once, compressed-tensors' scales not counted) and their nonzeros from
    the decompressed ``net``; bytes from the tensors stored in ``directory``'s weight files."""
    counts = RuntimeCounts()
    with torch.inference_mode():
        for name, p in net.named_parameters():
            if name.rpartition(".")[2] not in QPARAMS:
                counts.params += p.numel()
                counts.nonzero += int(p.count_nonzero())
    counts.memory = sum(_stored_bytes(path) for path in sorted(Path(directory).glob("*.safetensors")))
    return counts


def _stored_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors, from the offsets in its header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return sum(v["data_offsets"][1] - v["data_offsets"][0]
               for k, v in header.items() if k != "__metadata__")


def load_artifact(directory: Path, task: str) -> Any:
    """The handle of a saved compressed-tensors artifact, run by transformers in this process (on
    torch's threads, like the in-memory model it is compared with)."""
    from squeezelang.plugin import ModelHandle, load_tokenizer

    net = load_net(directory, task)
    return ModelHandle(model=CompressedTensorsModel(net, counts_of(net, directory)),
                       tokenizer=load_tokenizer(directory), task=task, source_dir=Path(directory))
