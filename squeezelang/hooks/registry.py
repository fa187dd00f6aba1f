"""Registries that the ``register_*`` hooks fill, and the registrar that enforces policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

from squeezelang.errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things of one kind (techniques, metrics, …) with the plugin that added each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def add(self, item: T, plugin: str) -> None:
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} without a name: {item!r}")
        if name in self._items:
            raise PluginError(
                f"{self.kind} '{name}' is registered by both plugin '{self._owners[name]}' "
                f"and plugin '{plugin}'; uninstall one of them")
        validate = getattr(item, "validate_definition", None)
        if validate is not None:
            try:
                validate()
            except PluginError as exc:
                raise PluginError(f"plugin '{plugin}': {self.kind} '{name}': {exc}") from None
        self._items[name] = item
        self._owners[name] = plugin

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def owner(self, name: str) -> str:
        return self._owners.get(name, "?")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)


class Registrar(Generic[T]):
    """What a hook implementation receives: ``add`` records the calling plugin's name."""

    def __init__(self, registry: Registry[T], plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin

    def add(self, item: T) -> None:
        """Register one item under the calling plugin's name."""
        self._registry.add(item, self.plugin)


@dataclass
class Registries:
    """Everything the installed plugins provide, by kind."""

    techniques: Registry[Any] = field(default_factory=lambda: Registry("technique"))
    metrics: Registry[Any] = field(default_factory=lambda: Registry("metric"))
    data_sources: Registry[Any] = field(default_factory=lambda: Registry("data source"))
    model_sources: Registry[Any] = field(default_factory=lambda: Registry("model source"))
    output_formats: Registry[Any] = field(default_factory=lambda: Registry("output format"))
    families: Registry[Any] = field(default_factory=lambda: _family_registry())
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution ("" if none)
    #: Plugin modules registered by name besides the entry points (``--plugin MODULE``): what a
    #: worker process imports to rebuild these registries (``planner.workers``).
    extra: tuple[str, ...] = ()

    def by_hook(self) -> dict[str, Registry[Any]]:
        return {
            "register_techniques": self.techniques,
            "register_metrics": self.metrics,
            "register_data_sources": self.data_sources,
            "register_model_sources": self.model_sources,
            "register_output_formats": self.output_formats,
            "register_model_families": self.families,
        }


def _family_registry() -> Registry[Any]:
    from squeezelang.hooks.family import FamilyRegistry  # it builds on Registry, defined above

    return FamilyRegistry()
