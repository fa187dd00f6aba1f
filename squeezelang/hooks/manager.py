"""Build a fresh plugin manager from entry points (plus explicit extras) and fill the registries."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable

import pluggy

from squeezelang.errors import PluginError
from squeezelang.hooks import hookspecs
from squeezelang.hooks.registry import Registrar, Registries

ENTRY_POINT_GROUP = "squeezelang"


def plugin_manager(extra: Iterable[Any] = (), entry_points: bool = True) -> pluggy.PluginManager:
    """Return a new manager with every installed plugin and ``extra`` (modules or dotted names)."""
    pm = pluggy.PluginManager("squeezelang")
    pm.add_hookspecs(hookspecs)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must not be a traceback
            raise PluginError(f"cannot load a plugin of entry-point group '{ENTRY_POINT_GROUP}': "
                              f"{type(exc).__name__}: {exc}") from exc
    for plugin in extra:
        if isinstance(plugin, str):
            try:
                plugin = importlib.import_module(plugin)
            except ImportError as exc:
                raise PluginError(f"cannot import plugin module '{plugin}': {exc}") from exc
        if pm.is_registered(plugin):
            continue
        name = plugin.__name__ if isinstance(plugin, ModuleType) else None
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def build_registries(pm: pluggy.PluginManager) -> Registries:
    """Call every ``register_*`` hook with a registrar that names the calling plugin."""
    regs = Registries()
    dists = {pm.get_name(plugin): dist.project_name for plugin, dist in pm.list_plugin_distinfo()}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        regs.plugins[name] = dists.get(name, "")
    regs.extra = tuple(name for name, plugin in pm.list_name_plugin()
                       if isinstance(plugin, ModuleType) and name not in dists)
    for hook_name, registry in regs.by_hook().items():
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            try:
                impl.function(registry=Registrar(registry, impl.plugin_name))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin '{impl.plugin_name}' failed in {hook_name}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return regs


_default: Registries | None = None


def default_registries(extra: Iterable[Any] = ()) -> Registries:
    """The registries of every installed plugin (cached), or a fresh set when ``extra`` is given."""
    global _default
    extra = tuple(extra)
    if extra:
        return build_registries(plugin_manager(extra))
    if _default is None:
        _default = build_registries(plugin_manager())
    return _default


def reset_default_registries() -> None:
    """Forget the cached registries (tests that install or remove plugins call this)."""
    global _default
    _default = None
