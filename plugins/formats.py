"""The built-in output formats: ``squeeze`` (compact, codecs and edits) and ``dense`` (plain transformers)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import OutputFormat, hookimpl

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle


class SqueezeFormat(OutputFormat):
    name = "squeeze"
    description = ("The compressed model as squeezelang saves it: sparse and quantized weights "
                   "encoded compactly in model.safetensors, squeeze.json telling how to decode them "
                   "and rebuild changed modules. Load with squeezelang.load(dir); a model with no "
                   "codecs or edits is a plain transformers checkpoint.")
    predicts_size = True
    streams = True

    def save(self, handle: ModelHandle, directory: Path,
             options: dict[str, Any] | None = None) -> list[str]:
        from squeezelang.plugin import save_model

        return save_model(handle, directory)


class DenseFormat(OutputFormat):
    name = "dense"
    description = ("A plain transformers checkpoint (float weights, no squeeze.json) that loads with "
                   "from_pretrained: pruned zeros and quantized values are kept, but stored dense, "
                   "so the file is not smaller. Impossible after a stage that changes the "
                   "architecture (factorize).")

    def save(self, handle: ModelHandle, directory: Path,
             options: dict[str, Any] | None = None) -> list[str]:
        from squeezelang.plugin import ModelHandle as Handle, save_model, standard_model

        model = standard_model(handle, self.name)
        plain = Handle(model=model, tokenizer=handle.tokenizer, task=handle.task,
                       source_dir=handle.source_dir, tokenizer_changed=handle.tokenizer_changed)
        return save_model(plain, directory)


@hookimpl
def register_output_formats(registry: Any) -> None:
    registry.add(SqueezeFormat())
    registry.add(DenseFormat())
