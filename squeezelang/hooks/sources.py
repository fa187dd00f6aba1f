"""What data-source, model-source and output-format plugins provide."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.hooks.schema import check_param_schema

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta


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
    """Writes a compressed model into a directory."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def validate_definition(self) -> None:
        pass

    def save(self, handle: ModelHandle, directory: Path) -> list[str]:
        """Write the model's files into ``directory``; return their relative paths."""
        raise NotImplementedError
