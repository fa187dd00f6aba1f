"""The built-in model source ``hf(path, task = …)``: a local Hugging Face model directory."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import (TASKS, ModelSource, SqueezeError, checkpoint_dtype, config_dtype,
                                from_config, hookimpl, load_pretrained, load_tokenizer, read_config)

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta

#: Weight files that are pickles (``torch.save``): a directory holding only these is refused.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class HfSource(ModelSource):
    """``hf(path, task = "embedding")``: weights, config and tokenizer from a local directory.

    Never downloads and never runs code shipped with the model (``trust_remote_code`` is off).
    """

    name = "hf"
    description = ("a local Hugging Face transformers directory (config.json, weights, tokenizer); "
                   "task is one of " + ", ".join(TASKS))
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "the model directory"},
            "task": {"enum": list(TASKS), "default": "embedding",
                     "description": "which head to load: " + ", ".join(TASKS)},
        },
        "required": ["path"],
        "additionalProperties": False,
    }

    def locate(self, args: dict[str, Any]) -> Path:
        directory = Path(args["path"]).expanduser()
        try:
            if not directory.is_dir():
                what = "is a file, not" if directory.exists() else "does not exist; expected"
                raise SqueezeError(f"{directory}: {what} a model directory")
            if not (directory / "config.json").is_file():
                raise SqueezeError(f"{directory}: no config.json — not a transformers model directory")
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            safe = any(directory.glob("*.safetensors"))
        except OSError as exc:  # a name too long for the file system, say
            raise SqueezeError(f"{directory}: cannot read the model directory: "
                               f"{exc.strerror or exc}") from None
        read_config(directory)  # valid JSON, checked without torch
        if pickled and not safe:
            raise SqueezeError(
                f"{directory / pickled[0]}: pickle-based weights are never read (loading a pickle can "
                "run code); convert the checkpoint to safetensors, e.g. load it once with "
                "transformers and save_pretrained(..., safe_serialization=True)")
        return directory

    def config(self, args: dict[str, Any]) -> dict[str, Any] | None:
        # only asked once ``locate`` accepted the directory: no need to look it over again
        return read_config(Path(args["path"]).expanduser())

    def meta(self, args: dict[str, Any]) -> ModelMeta:
        from squeezelang.plugin import (cached_meta, layout_meta_of, measured_overhead,
                                        meta_from_model)

        directory = self.locate(args)
        task = args.get("task", "embedding")

        def build() -> ModelMeta:
            try:
                model = from_config(config, task, meta=True)
            except SqueezeError:
                raise
            except Exception as exc:  # an unknown model_type or a config transformers rejects
                raise SqueezeError(f"{directory}: cannot build a '{task}' model from config.json: "
                                   f"{type(exc).__name__}: {exc}") from None
            return meta_from_model(model, task)

        config = read_config(directory)
        key = (directory / "config.json").read_bytes()
        if config_dtype(config) is None:
            # a config that names no dtype loads in its weights' dtype (transformers' "auto"):
            # build the meta-data in it, and keep it apart in the cache
            dtype = checkpoint_dtype(directory, config)
            if dtype != "float32":
                config = {**config, "dtype": dtype}
                key += f"\n#dtype {dtype}".encode()
        meta = layout_meta_of(config, task)  # a known family: no torch needed
        if meta is None:
            meta = cached_meta(key, task, build)
        meta.overhead_bytes = measured_overhead(meta, directory)
        return meta

    def load(self, args: dict[str, Any]) -> ModelHandle:
        from squeezelang.plugin import ModelHandle

        directory = self.locate(args)
        task = args.get("task", "embedding")
        model = load_pretrained(directory, task)
        return ModelHandle(model=model, tokenizer=load_tokenizer(directory), task=task,
                           source_dir=directory)


@hookimpl
def register_model_sources(registry: Any) -> None:
    registry.add(HfSource())
