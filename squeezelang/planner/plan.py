"""The plan: a recipe resolved against the installed plugins, as immutable JSON-able data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from squeezelang.lang.ast import Span


@dataclass(frozen=True)
class ModelPlan:
    source: str
    args: dict[str, Any]
    task: str
    #: ``(module, subdir)`` when the path was written as ``package("module", "subdir")``.
    package: tuple[str, str] | None = None
    #: Where the run computes (``models.placement``): ``cpu``, ``cuda`` or ``auto``, and the dtype.
    device: str = "cpu"
    dtype: str = "auto"
    #: Weights read from their files one block at a time (``models.offload``).
    offload: bool = False


@dataclass(frozen=True)
class DataPlan:
    name: str
    source: str
    args: dict[str, Any]


@dataclass(frozen=True)
class MetricPlan:
    name: str
    kind: str
    data: str | None
    args: dict[str, Any]
    dimension: str
    higher_is_better: bool
    implicit: bool = False
    #: Measured after every stage too: the metric's own default (``Metric.each_stage``) unless
    #: the recipe gave ``each_stage = true|false``.
    each_stage: bool = False
    #: The recipe gave ``each_stage`` (the lock file writes it back).
    each_stage_given: bool = False


@dataclass(frozen=True)
class StagePlan:
    """One stage: ``params`` complete (defaults filled, units converted); ``autos`` the knobs to solve."""

    name: str
    technique: str
    plugin: str
    method: str | None
    params: dict[str, Any]
    autos: dict[str, tuple[float, float]] = field(default_factory=dict)
    span: Span | None = None


@dataclass(frozen=True)
class ConstraintPlan:
    """``metric OP bound``; ``relative`` bounds are fractions of the original's value."""

    metric: str
    drop: bool
    op: str
    bound: float
    relative: bool
    text: str
    span: Span | None = None

    @property
    def subject(self) -> str:
        return f"drop({self.metric})" if self.drop else self.metric

    def describe(self) -> str:
        return f"{self.subject} {self.op} {self.text}"


@dataclass(frozen=True)
class ComposePlan:
    """``compose { … }``: the planner builds the stages from ``allow``ed techniques' candidates."""

    allow: tuple[str, ...]
    data: str | None = None
    stages: int = 3


@dataclass(frozen=True)
class SearchPlan:
    strategy: str = "bisect"
    trials: int = 12
    timeout: float = 1800.0
    seed: int = 0
    #: trials run at once, by ``backend`` ("serial", "process" or "ray" at ``address``)
    workers: int = 1
    backend: str = "serial"
    address: str | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    recipe_file: str | None
    recipe_dir: str
    model: ModelPlan
    data: tuple[DataPlan, ...]
    metrics: tuple[MetricPlan, ...]
    stages: tuple[StagePlan, ...]
    constraints: tuple[ConstraintPlan, ...]
    search: SearchPlan
    output_dir: str
    output_format: str
    uses: tuple[str, ...] = ()
    #: Set when the recipe gives ``compose { … }`` instead of stages (``stages`` is then empty).
    compose: ComposePlan | None = None
    #: The output block's options besides ``format``, defaults filled (``OutputFormat.schema``).
    output_options: dict[str, Any] = field(default_factory=dict)

    @property
    def has_auto(self) -> bool:
        return any(s.autos for s in self.stages)

    @property
    def needs_search(self) -> bool:
        """Whether running takes a search: auto knobs to solve or a pipeline to compose."""
        return self.has_auto or self.compose is not None

    def placed(self, device: str | None = None, dtype: str | None = None,
               offload: bool | None = None) -> Plan:
        """This plan computing on ``device`` and in ``dtype`` where given (the command line's
        ``--device``/``--dtype``/``--offload`` over the recipe's); an unknown name is a
        ``SqueezeError``."""
        from dataclasses import replace

        from squeezelang.errors import SqueezeError
        from squeezelang.models.placement import DEVICES, DTYPES

        for value, allowed, what in ((device, DEVICES, "device"), (dtype, DTYPES, "dtype")):
            if value is not None and value not in allowed:
                raise SqueezeError(f"unknown {what} '{value}': use one of {', '.join(allowed)}")
        return replace(self, model=replace(self.model, device=device or self.model.device,
                                           dtype=dtype or self.model.dtype,
                                           offload=self.model.offload if offload is None
                                           else bool(offload)))

    def metric(self, name: str) -> MetricPlan | None:
        return next((m for m in self.metrics if m.name == name), None)

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON data (spans dropped)."""
        def clean(obj: Any) -> Any:
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items() if k != "span"}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            if isinstance(obj, Path):
                return str(obj)
            return obj
        return clean(asdict(self))
