"""The built-in metrics.

``model``: size, params, nonzero, memory, latency (no data). ``quality``: perplexity, accuracy, f1,
ece, spearman, fidelity (read a data set). ``columns``: the format of ``Metric.columns`` and
``required_columns``, which ``squeeze check`` uses to verify a data set has what a metric reads.
None of these modules imports torch at import time.
"""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import hookimpl
from squeezelang_plugins.metrics.columns import parse_columns, required_columns
from squeezelang_plugins.metrics.model import Latency, Memory, Nonzero, Params, Size, model_tensors
from squeezelang_plugins.metrics.quality import (Accuracy, Ece, F1, Fidelity, Perplexity,
                                                 Spearman)

__all__ = ["required_columns", "parse_columns", "model_tensors", "Size", "Params", "Nonzero",
           "Memory", "Latency", "Perplexity", "Accuracy", "F1", "Ece", "Spearman", "Fidelity"]

METRICS = (Size, Params, Nonzero, Memory, Latency, Perplexity, Accuracy, F1, Ece, Spearman,
           Fidelity)


@hookimpl
def register_metrics(registry: Any) -> None:
    for metric in METRICS:
        registry.add(metric())
