"""What a ``prune`` method provides, and the parameters every method shares."""
from __future__ import annotations

from typing import Any, ClassVar

from squeezelang.plugin import BLOCKS

#: Properties every method accepts.
COMMON: dict[str, Any] = {
    "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.5,
              "description": "fraction removed (0.5 = 50%)"},
    "include": {"type": "array", "items": {"type": "string"}, "default": list(BLOCKS),
                "description": "globs of module names to prune (default: the layers of the "
                               "numbered transformer blocks)"},
    "exclude": {"type": "array", "items": {"type": "string"}, "default": [],
                "description": "globs of module names to leave alone"},
}


class PruneMethod:
    """One algorithm of the ``prune`` technique."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Schema properties this method adds (merged into the technique's schema).
    properties: ClassVar[dict[str, Any]] = {}
    #: Which of the shared properties (``COMMON``) it uses.
    common: ClassVar[tuple[str, ...]] = ("ratio", "include", "exclude")
    #: Model states it adds: unstructured methods leave a "sparse" model; structured ones none.
    produces: ClassVar[frozenset[str]] = frozenset()
    #: Works on an offloaded model block by block (``Technique.blockwise_for``): it reads the
    #: model only through forward passes and ``resident``, and changes it only through
    #: ``reshape_`` (which slices an offloaded model block by block).
    blockwise: ClassVar[bool] = False

    def used(self, all_properties: dict[str, Any], params: dict[str, Any] | None = None) -> set[str]:
        """The properties this method accepts; with ``params``, those that apply to them (a
        property only some settings read gets its default only when it applies)."""
        return {"method", *self.common, *self.properties}

    def stores(self, params: dict[str, Any]) -> frozenset[str]:
        """What the saved model holds (``Technique.stores_for``): unstructured zeros ("sparse") for
        a method that leaves a sparse model, nothing special for a structured one."""
        return frozenset({"sparse"}) if self.produces else frozenset()

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        """What this method needs from the model's family (``Technique.family_needs``)."""
        return []

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        return []

    def estimate(self, meta: Any, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def apply_(self, handle: Any, params: dict[str, Any], ctx: Any) -> None:
        raise NotImplementedError

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        return model
