"""The built-in metrics.

``model``: size, params, nonzero, memory, latency (no data). ``quality``: perplexity, accuracy, f1,
ece, spearman, fidelity (read a data set). ``lm_eval`` and ``mteb``: a task of lm-evaluation-harness
or MTEB run on a data set (optional extras; ``lm_eval_model``/``lm_eval_tasks`` and ``mteb_tasks``
import those libraries, only while measuring, inside ``contained``). ``columns``: the format of
``Metric.columns`` and ``required_columns``, which ``squeeze check`` uses to verify a data set has
what a metric reads. None of the modules imported here imports torch at import time.
"""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import hookimpl
from squeezelang_plugins.metrics.columns import parse_columns, required_columns
from squeezelang_plugins.metrics.lm_eval import LmEval
from squeezelang_plugins.metrics.model import Latency, Memory, Nonzero, Params, Size, model_tensors
from squeezelang_plugins.metrics.mteb import Mteb
from squeezelang_plugins.metrics.quality import (Accuracy, Ece, F1, Fidelity, Perplexity,
                                                 Spearman)

__all__ = ["required_columns", "parse_columns", "model_tensors", "Size", "Params", "Nonzero",
           "Memory", "Latency", "Perplexity", "Accuracy", "F1", "Ece", "Spearman", "Fidelity",
           "LmEval", "Mteb"]

METRICS = (Size, Params, Nonzero, Memory, Latency, Perplexity, Accuracy, F1, Ece, Spearman,
           Fidelity, LmEval, Mteb)


@hookimpl
def register_metrics(registry: Any) -> None:
    for metric in METRICS:
        registry.add(metric())
