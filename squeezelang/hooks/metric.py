"""What a metric plugin provides: a unit, a direction, the columns it reads, and ``measure``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.hooks.schema import check_param_schema
from squeezelang.errors import PluginError

if TYPE_CHECKING:
    from squeezelang.hooks.context import MeasureContext
    from squeezelang.models.handle import ModelHandle

#: Unit dimensions and the units a bound on such a metric may carry (besides ``%`` and ``x``).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "bytes": ("B", "KB", "MB", "GB", "KiB", "MiB", "GiB"),
    "count": ("K", "M", "G"),
    "time": ("ms", "s", "min", "h"),
    "score": (),
}

#: The argument every metric takes, handled by the engine: measure it after every stage as well.
EACH_STAGE = "each_stage"


class Metric:
    """Base class of metric plugins.

    ``dimension`` is one of ``DIMENSIONS``; values are reported in base units (bytes, a plain count,
    seconds, or the score's own units). ``columns`` lists the column roles read from the data set
    (``text``, ``a``, ``b``, ``score``, ``label``): ``,`` joins columns that are all needed,
    ``|`` separates alternatives (``"text|a,b"`` = a ``text`` column, or both ``a`` and ``b``), and
    ``;`` separates groups that are each required (``"text|a,b;label"`` = ``label`` plus either
    ``text`` or ``a`` and ``b``); ``|`` binds tighter than ``;``, ``,`` tighter than ``|``. A metric
    argument named after a role renames its column (``a = "s1"``).
    ``squeezelang_plugins.metrics.required_columns(metric, args)`` expands a spec, renames applied,
    into the alternative column sets.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    dimension: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    columns: ClassVar[str] = ""
    #: Measured on the saved artifact directory rather than the in-memory model (``size``).
    on_artifact: ClassVar[bool] = False
    #: Declared in every recipe without a ``metric`` statement.
    implicit: ClassVar[bool] = False
    #: Load-sensitive (a time): the saved artifact's value is measured side by side with the
    #: original's, alternating calls (``executor.measure.measure_paired``), and the constraint is
    #: judged on that pair rather than on a figure of the original taken minutes earlier.
    paired: ClassVar[bool] = False
    #: Measured after every stage as well as on the original and the saved artifact. Only for
    #: metrics that run no forward pass (size, parameter counts): a stage's effect on the others
    #: is measured when the recipe asks for it, ``metric q = spearman(sts, each_stage = true)``.
    each_stage: ClassVar[bool] = False
    #: Distributions whose code computes the value besides squeezelang, torch and transformers (an
    #: evaluation harness): their installed versions are part of the original's cache key, so an
    #: upgrade that changes a task's prompt or scoring measures the original again.
    packages: ClassVar[tuple[str, ...]] = ()
    schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {},
                                        "additionalProperties": False}

    def validate_definition(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise PluginError(f"unknown dimension '{self.dimension}'")
        check_param_schema(self.schema)

    # A metric whose columns or direction follow an argument (``lm_eval``: the task, the harness
    # metric read) overrides these. ``squeeze check`` calls ``check`` with arguments the schema
    # accepted, the other two with the recipe's arguments as they are (read them defensively).
    def check(self, args: dict[str, Any]) -> list[tuple[str | None, str]]:
        """Problems the schema cannot express, found before anything runs (a missing optional
        runtime, arguments that do not go together): ``[(key or None, message)]``. Imports
        neither torch nor the runtime. None by default."""
        return []

    def columns_for(self, args: dict[str, Any]) -> str:
        """The ``columns`` spec this metric reads with ``args``; ``columns`` by default."""
        return self.columns

    def higher_is_better_for(self, args: dict[str, Any]) -> bool:
        """Whether a higher value is better with ``args``; ``higher_is_better`` by default."""
        return self.higher_is_better

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        """Return the metric's value for ``handle`` (``data`` names the declared data set)."""
        raise NotImplementedError
