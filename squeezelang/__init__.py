"""squeezelang: declarative compression of neural language models.

The public API: ``parse``, ``load_recipe``, ``check``, ``plan``, ``run``, ``load`` and ``hookimpl``
(for plugin authors). Importing this package does not import torch.
"""
from __future__ import annotations

from typing import Any

from squeezelang.hooks.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["parse", "load_recipe", "check", "plan", "run", "load", "hookimpl", "__version__"]

_LAZY = {
    "parse": ("squeezelang.api", "parse"),
    "load_recipe": ("squeezelang.api", "load_recipe"),
    "plan": ("squeezelang.api", "plan"),
    "run": ("squeezelang.api", "run"),
    "load": ("squeezelang.api", "load"),
    "check": ("squeezelang.api", "check"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'squeezelang' has no attribute {name!r}")
