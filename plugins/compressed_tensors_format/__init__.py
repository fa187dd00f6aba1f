"""The ``compressed-tensors`` output format: the checkpoint vLLM serves (and transformers loads).

Quantized linear layers are written as compressed-tensors ``pack-quantized`` weight-only integer
layers (W4A16 / W8A16: ``weight_packed``, ``weight_scale``, ``weight_shape``) and FP8 ones as
``float-quantized`` (``weight`` in float8_e4m3fn, ``weight_scale``), with the engine's own
codes, described by the ``quantization_config`` of ``config.json``; the layout is the one
llm-compressor writes. ``scheme.py`` says what fits and builds the config (no torch),
``pack.py`` packs one layer, ``write.py`` writes the directory and ``runtime.py`` loads it back
with transformers. Importing this package imports neither torch nor compressed-tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import OutputFormat, SqueezeError, hookimpl

from .scheme import refusals

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle


class CompressedTensorsFormat(OutputFormat):
    name = "compressed-tensors"
    description = (
        "A compressed-tensors checkpoint, as llm-compressor writes it and vLLM serves it: each "
        "quantized linear layer stored pack-quantized (4- or 8-bit symmetric codes packed in int32, "
        "scales per output channel or per group in the model's dtype) or, for FP8 weights, "
        "float-quantized (float8_e4m3fn weights, scales per channel or per tensor; weight-only), "
        "config.json holding the quantization_config. Loads with transformers' from_pretrained "
        "(needs the 'compressed-tensors' extra). An integer per-tensor scale is written per "
        "channel (same values); quantized embeddings and a head tied to them stay in float with "
        "their quantized values (not smaller); pruned zeros are stored dense. Group sizes must "
        "divide the layers' inputs. "
        "Not for factorized, clustered or shared layers, other widths than 4 and 8, or GPT-2's "
        "Conv1D projections. Older vLLM releases do not load a quantized lm_head: exclude it "
        "from the quantize stage to serve there.")
    model_files = ("config.json", "*.safetensors")
    runtime = "transformers (compressed-tensors)"
    example = 'output "out/llama-w4a16" { format = "compressed-tensors" }'

    def check(self, options: dict[str, Any], stages: list[tuple[str, frozenset[str]]], task: str,
              config: dict[str, Any] | None) -> list[tuple[str | None, str]]:
        return refusals(stages, _conv1d(config))

    def save(self, handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
        self.require_extra("compressed-tensors", "compressed_tensors")
        from .write import save_

        return save_(handle, directory)

    def load(self, directory: Path, task: str, options: dict[str, Any], threads: int) -> ModelHandle:
        self.require_extra("compressed-tensors", "compressed_tensors")
        from .runtime import load_artifact

        return load_artifact(directory, task)


def _conv1d(config: dict[str, Any] | None) -> bool:
    """Whether the config's family stores its projections as GPT-2 ``Conv1D`` (unknown: no)."""
    from squeezelang.plugin import family_of

    if config is None:
        return False
    try:
        return family_of(config).conv1d
    except SqueezeError:  # no registered family: save finds out from the modules themselves
        return False


@hookimpl
def register_output_formats(registry: Any) -> None:
    registry.add(CompressedTensorsFormat())
