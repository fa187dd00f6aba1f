"""Hook specifications: every extension point a plugin distribution can implement.

A plugin is a module (or object) with functions marked ``@squeezelang.hookimpl`` whose names match
the specs below. Distributions expose it under the entry-point group ``squeezelang``; the built-ins in
``plugins/`` do exactly that. Each hook receives a *registrar*: call ``registrar.add(thing)`` once per
thing the plugin provides. The registrar records which plugin added what, and refuses a name that
another plugin already took (``PluginError`` naming both).

Plugin modules are imported by ``squeeze check``, which must stay fast and must not import torch:
import heavy libraries inside ``apply_``/``measure``/``load``, never at module level.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("squeezelang")
hookimpl = pluggy.HookimplMarker("squeezelang")


@hookspec
def register_techniques(registry):  # type: ignore[no-untyped-def]
    """Add compression techniques (``Technique`` instances) with ``registry.add(technique)``.

    A technique is what a ``stage NAME: TECHNIQUE { … }`` names. Its JSON Schema is checked when it
    is added; a broken schema is a ``PluginError`` at start-up, not a surprise mid-run.
    """


@hookspec
def register_metrics(registry):  # type: ignore[no-untyped-def]
    """Add metric kinds (``Metric`` instances) with ``registry.add(metric)``.

    A metric kind is what ``metric NAME = KIND(data, …)`` names; ``size``, ``params`` and ``latency``
    exist in every recipe without being declared.
    """


@hookspec
def register_data_sources(registry):  # type: ignore[no-untyped-def]
    """Add data-set readers (``DataSource`` instances) with ``registry.add(source)``.

    A data source is what ``data NAME = SOURCE(path, …)`` names; it reports its columns cheaply
    (``squeeze check`` verifies the columns a metric or stage needs) and loads rows as dicts.
    """


@hookspec
def register_model_sources(registry):  # type: ignore[no-untyped-def]
    """Add model loaders (``ModelSource`` instances) with ``registry.add(source)``.

    A model source is what ``model = SOURCE(…)`` names, such as the built-in ``hf``.
    """


@hookspec
def register_output_formats(registry):  # type: ignore[no-untyped-def]
    """Add artifact writers (``OutputFormat`` instances) with ``registry.add(fmt)``.

    An output format is what ``output "dir" { format = NAME }`` names.
    """


@hookspec
def register_model_families(registry):  # type: ignore[no-untyped-def]
    """Add model families (``squeezelang.hooks.family.ModelFamily`` instances) with ``registry.add``.

    A model family describes a transformer architecture as data: which ``config.model_type`` values
    it covers, where its blocks are, the role of each module (attention projections, fused or not,
    key/value groups, head dimension, plain or gated MLP, norms, embeddings) and the config keys that
    change when a dimension shrinks or a layer goes. The structured techniques (``prune`` methods
    ``activation`` and ``depth``, ``shrink``, ``task_prune``) work on every registered family; a
    model type claimed by two families is a ``PluginError`` naming both plugins.
    """


HOOK_NAMES = (
    "register_techniques",
    "register_metrics",
    "register_data_sources",
    "register_model_sources",
    "register_output_formats",
    "register_model_families",
)
