"""A compressed model as standard transformers modules, for formats that other runtimes read."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.errors import SqueezeError
from squeezelang.models.load import AFTER_LOAD

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


def standard_model(handle: ModelHandle, fmt: str) -> Any:
    """``handle.model`` built from standard transformers modules, holding the same weights.

    Runtime-only swaps (``"when": "after_load"`` edits, such as int8 kernels) are undone by
    rebuilding the model from its config and loading the state dict; a structural edit (low-rank
    factors) has no standard form, and is refused with a ``SqueezeError`` naming output format
    ``fmt``.
    """
    structural = sorted({r["technique"] for r in handle.edits if r.get("when") != AFTER_LOAD})
    if structural:
        raise SqueezeError(f"output format '{fmt}' cannot hold a model changed by "
                           f"{', '.join(structural)} (its modules are not a standard transformers "
                           "architecture); use format = \"squeeze\"")
    if not handle.edits:
        return handle.model
    from squeezelang.models.hf import from_config

    model = from_config(handle.model.config, handle.task)
    model.load_state_dict(handle.model.state_dict(), strict=True)
    return model.eval()
