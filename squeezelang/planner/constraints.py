"""Evaluate a constraint against measured (or predicted) values, direction-aware."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from squeezelang.planner.plan import ConstraintPlan, MetricPlan

_CMP = {
    "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b, "==": lambda a, b: abs(a - b) <= 1e-9 * max(1.0, abs(b)),
}


@dataclass(frozen=True)
class Verdict:
    """One constraint checked: ``value`` is what was compared (the drop for ``drop(m)``)."""

    constraint: str
    metric: str
    value: float
    bound: float
    met: bool
    margin: float  # how far inside (positive) or outside (negative) the bound

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def drop(metric: MetricPlan, original: float, value: float) -> float:
    """How much worse than the original: a rise is a drop for lower-is-better metrics."""
    return (original - value) if metric.higher_is_better else (value - original)


def absolute_bound(c: ConstraintPlan, original: float) -> float:
    """The bound in the metric's units (a relative bound scaled by the original's value)."""
    return c.bound * abs(original) if c.relative else c.bound


def evaluate(c: ConstraintPlan, metric: MetricPlan, original: float, value: float) -> Verdict:
    subject = drop(metric, original, value) if c.drop else value
    bound = absolute_bound(c, original)
    met = bool(_CMP[c.op](subject, bound))
    margin = (bound - subject) if c.op in ("<=", "<") else (subject - bound) if c.op in (">=", ">") \
        else -abs(subject - bound)
    return Verdict(c.describe(), c.metric, float(subject), float(bound), met, float(margin))


SIZE_METRICS = ("size", "params", "nonzero")
