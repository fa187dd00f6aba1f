"""What data-source, model-source and output-format plugins provide."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.errors import SqueezeError
from squeezelang.hooks.schema import check_param_schema

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it; a module blocked in
    ``sys.modules`` counts as absent)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class DataSource:
    """Reads a data set into rows (dicts of column -> value).

    Positional arguments are mapped onto ``positional`` names (``csv("f.csv")`` -> ``path``); every
    argument is validated against ``schema``. Paths arrive already resolved against the recipe's
    directory.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    positional: ClassVar[tuple[str, ...]] = ("path",)
    path_params: ClassVar[tuple[str, ...]] = ("path",)
    schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {},
                                        "additionalProperties": False}

    def validate_definition(self) -> None:
        check_param_schema(self.schema)

    def columns(self, args: dict[str, Any]) -> list[str]:
        """The column names, found cheaply (a header line at most); raise ``SqueezeError`` if unreadable."""
        raise NotImplementedError

    def load(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """All rows (honouring ``limit``); raise ``SqueezeError`` naming the file on bad content."""
        raise NotImplementedError


class ModelSource:
    """Loads the model to compress."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    positional: ClassVar[tuple[str, ...]] = ("path",)
    path_params: ClassVar[tuple[str, ...]] = ("path",)
    schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {},
                                        "additionalProperties": False}

    def validate_definition(self) -> None:
        check_param_schema(self.schema)

    def locate(self, args: dict[str, Any]) -> Path:
        """The model directory; raise ``SqueezeError`` if absent. Must not import torch."""
        raise NotImplementedError

    def meta(self, args: dict[str, Any]) -> ModelMeta:
        """Meta-data (shapes, dtypes, module kinds) without loading weights."""
        raise NotImplementedError

    def config(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """The model's ``config.json`` as a dict, read without torch (``squeeze check`` looks its
        family up in it), or ``None`` when the source cannot tell before loading."""
        return None

    def load(self, args: dict[str, Any]) -> ModelHandle:
        """The model with its tokenizer, ready to run."""
        raise NotImplementedError


class OutputFormat:
    """Writes a compressed model into a directory, and loads it back the way its runtime does.

    Lifecycle: ``squeeze check`` validates the ``output { … }`` options (everything but ``format``)
    against ``schema`` and calls ``check`` with what each stage stores (``Technique.stores_for``),
    so that a recipe whose model the format cannot hold is refused at the stage's position before
    anything runs. ``squeeze run`` calls ``save`` on the final model, then ``load`` on the saved
    directory: every metric and constraint is measured on what ``load`` returns, the artifact as
    the format's own runtime runs it (an ONNX Runtime session, llama.cpp), and ``size`` counts the
    files that match ``model_files``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: JSON Schema of the output block's options besides ``format``.
    schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {},
                                        "additionalProperties": False}
    #: Globs (relative to the artifact) of the files ``size`` counts: the model, not the tokenizer.
    model_files: ClassVar[tuple[str, ...]] = ("config.json", "squeeze.json", "*.safetensors")
    #: What runs the artifact in ``load`` (shown in reports): ``"torch"``, ``"onnxruntime"`` …
    runtime: ClassVar[str] = "torch"
    #: Whether the planner's size estimates (``Technique.estimate``) are this format's sizes; only
    #: then are fixed settings refused before running when they cannot meet a size constraint.
    predicts_size: ClassVar[bool] = False
    #: Whether ``save`` writes an offloaded model (``offload = true``) unit by unit, through
    #: ``save_model``; otherwise the executor loads the whole model into memory for the save.
    streams: ClassVar[bool] = False
    #: An example ``output`` statement for ``squeeze plugins``.
    example: ClassVar[str] = ""

    def validate_definition(self) -> None:
        check_param_schema(self.schema)

    def defaults(self) -> dict[str, Any]:
        from squeezelang.hooks.schema import schema_defaults

        return schema_defaults(self.schema)

    def check(self, options: dict[str, Any], stages: list[tuple[str, frozenset[str]]], task: str,
              config: dict[str, Any] | None) -> list[tuple[str | None, str]]:
        """What this format cannot hold, found before anything runs: ``[(stage or None, message)]``.

        ``options`` are the output options with defaults filled; ``stages`` lists each stage's name
        with what it stores (``Technique.stores_for``: ``"int8"``, ``"int4"``, ``"group:128"``,
        ``"sparse"``, ``"n:m"``, ``"low-rank"`` …); ``config`` is the model's ``config.json``
        (``None`` when the source cannot tell before loading). A message naming a stage is
        reported at that stage; ``None`` reports it at the output statement. None by default.
        """
        return []

    def save(self, handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
        """Write the model's files into ``directory``; return their relative paths."""
        raise NotImplementedError

    def load(self, directory: Path, task: str, options: dict[str, Any], threads: int) -> ModelHandle:
        """The saved artifact as its runtime runs it, for the run's measurements. The default reads
        it back with ``squeezelang.load`` (torch); a format for another runtime returns a handle
        whose model is a ``RuntimeModel`` driving that runtime on ``threads`` CPU threads."""
        from squeezelang.models.load import load_model

        return load_model(directory, task=task)

    def require_extra(self, extra: str, *modules: str) -> None:
        """``SqueezeError`` naming the pip extra to install unless every one of ``modules`` (the
        runtime this format writes or loads with) can be imported; imports none of them."""
        missing = [m for m in modules if not installed(m)]
        if missing:
            raise SqueezeError(f"output format '{self.name}' needs the '{extra}' extra "
                               f"({', '.join(missing)} missing): pip install 'squeezelang[{extra}]'")

    # ------------------------------------------------------------------ engine side
    def write(self, handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
        """``save``, also for a format written before options existed (``save(handle, directory)``)."""
        import inspect

        if len(inspect.signature(self.save).parameters) < 3:
            return self.save(handle, directory)  # type: ignore[call-arg]
        return self.save(handle, directory, options)
