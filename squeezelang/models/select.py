"""Module selection on torch models: by kind and by ``include``/``exclude`` globs on dotted names.

Kinds are class names (``"Linear"``) or classes. GPT-2's ``transformers.pytorch_utils.Conv1D`` is a
linear layer with its weight stored ``[in, out]``; ``LINEAR_KINDS`` counts it as one, and
``output_axis`` says which weight axis holds the output channels. Torch-free at import, like
``meta.matches`` which it reuses, so plugin modules may import it at module level.
"""
from __future__ import annotations

from typing import Any, Iterable

from squeezelang.models.meta import matches

#: Linear layers: ``torch.nn.Linear`` ``[out, in]`` and GPT-2's ``Conv1D`` ``[in, out]``.
LINEAR_KINDS = ("Linear", "Conv1D")
#: Default ``include`` of technique stages: modules inside numbered transformer blocks
#: (``encoder.layer.3.…``, ``transformer.h.0.…``, ``model.layers.11.…``) — not the embeddings,
#: the pooler, ``lm_head`` or a classification head.
BLOCKS = ("*.[0-9]*",)


#: Kinds that a subclass keeps: modeling code subclasses them to change how they are called (Gemma's
#: ``…ScaledWordEmbedding`` multiplies its rows by ``sqrt(hidden)``) while the weight is the same.
BASE_KINDS = ("Linear", "Conv1D", "Embedding")


def kind_of(module: Any) -> str:
    """The kind of a module: its class name, or the name of the ``BASE_KINDS`` class it extends."""
    for cls in type(module).__mro__:
        if cls.__name__ in BASE_KINDS:
            return cls.__name__
    return type(module).__name__


def output_axis(kind: str) -> int:
    """The weight axis of the output channels (``Embedding``: one row per token)."""
    return 1 if kind == "Conv1D" else 0


def _kind_names(kinds: Iterable[Any]) -> tuple[str, ...]:
    return tuple(k if isinstance(k, str) else k.__name__ for k in kinds)


def select_modules(model: Any, kinds: Iterable[Any] = LINEAR_KINDS,
                   include: Iterable[str] | None = None,
                   exclude: Iterable[str] = ()) -> list[tuple[str, Any]]:
    """``[(dotted name, module)]`` of the modules of ``kinds`` matching the globs, in model order.

    A module shared under several names (a tied ``lm_head``) is listed once, under its first name.
    """
    names = _kind_names(kinds)
    include = list(include) if include is not None else None
    exclude = list(exclude)
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if not name or kind_of(module) not in names or id(module) in seen:
            continue
        if matches(name, include, exclude):
            seen.add(id(module))
            out.append((name, module))
    return out


def get_module(model: Any, name: str) -> Any:
    """The submodule at a dotted name; ``SqueezeError`` if there is none."""
    from squeezelang.errors import SqueezeError

    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SqueezeError(f"the model has no module '{name}'") from None


def set_module(model: Any, name: str, module: Any) -> None:
    """Replace the submodule at a dotted name."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(parent, child, module)
