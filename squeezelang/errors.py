"""The error hierarchy: every failure a user can cause or meet is one of these."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squeezelang.lang.ast import Span


class SqueezeError(Exception):
    """Root of every error squeezelang raises on purpose."""


class RecipeError(SqueezeError):
    """A problem in a recipe, located at a span of its source."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 file: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.file = file


class RecipeErrors(SqueezeError):
    """Several recipe problems found in one pass (``squeeze check`` reports them all)."""

    def __init__(self, errors: list[RecipeError], source: str = "", file: str | None = None) -> None:
        super().__init__(f"{len(errors)} error(s) in {file or 'recipe'}")
        self.errors = errors
        self.source = source
        self.file = file


class PluginError(SqueezeError):
    """A plugin broke the plugin contract (bad schema, duplicate name, missing hook)."""


class PlanError(SqueezeError):
    """The recipe is valid but cannot be planned against this model or these plugins."""


class Infeasible(PlanError):
    """The estimates show a size-type constraint cannot hold for any setting the recipe allows;
    refused before any expensive step, with the best reachable figure."""


class ExecutionError(SqueezeError):
    """A failure while running; names the stage and the plugin at fault when there is one."""

    def __init__(self, message: str, stage: str | None = None, plugin: str | None = None) -> None:
        where = ""
        if stage:
            where = f"stage '{stage}'" + (f" (plugin '{plugin}')" if plugin else "") + ": "
        elif plugin:
            where = f"plugin '{plugin}': "
        super().__init__(where + message)
        self.stage = stage
        self.plugin = plugin


class OutputError(SqueezeError):
    """The output directory cannot be used (exists, other recipe's run, unwritable)."""
