"""The recipe's data sets as a ``DataStore``: each loaded on first use through its source plugin.

Planning (estimates that read data, such as ``vocab_trim``'s exact kept count) and the executor both
build their context's data this way.
"""
from __future__ import annotations

from squeezelang.hooks.context import DataStore
from squeezelang.hooks.registry import Registries
from squeezelang.planner.plan import Plan


def data_origin(args: dict, source: object) -> str | None:
    """The file(s) a data set is read from, for messages about its rows."""
    paths = [str(args[k]) for k in getattr(source, "path_params", ()) if args.get(k)]
    return ", ".join(paths) or None


def data_store(plan: Plan, registries: Registries) -> DataStore:
    """A ``DataStore`` of every ``data`` declaration of ``plan``, read lazily."""
    store = DataStore()
    for d in plan.data:
        source = registries.data_sources.get(d.source)
        store.add(d.name, (lambda s=source, a=dict(d.args): s.load(a)), origin=data_origin(d.args, source))
    return store
