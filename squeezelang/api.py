"""The Python API: parse and check recipes, plan them, run them, load results back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from squeezelang.lang.ast import Recipe

if TYPE_CHECKING:
    from squeezelang.executor.run import RunResult
    from squeezelang.hooks.registry import Registries
    from squeezelang.planner.estimate import Prediction
    from squeezelang.planner.plan import Plan


def parse(text: str, file: str | None = None) -> Recipe:
    """Parse recipe text; raise ``RecipeErrors`` (with positions) if it is not valid syntax."""
    from squeezelang.lang.parser import parse as _parse

    return _parse(text, file)


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a ``.squeeze`` file (relative paths inside it resolve against its directory)."""
    from squeezelang.lang.parser import parse_file

    return parse_file(str(path))


def registries(plugins: Iterable[Any] = ()) -> Registries:
    """The installed plugins' registries, plus ``plugins`` (modules, objects or dotted names)."""
    from squeezelang.hooks.manager import default_registries

    return default_registries(plugins)


def _recipe(recipe: Recipe | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe
                                    and recipe.endswith(".squeeze")):
        return load_recipe(recipe)
    return parse(str(recipe))


def check(recipe: Recipe | str | Path, plugins: Iterable[Any] = ()) -> Plan:
    """Validate a recipe against the installed plugins; return its plan or raise ``RecipeErrors``."""
    from squeezelang.planner.resolve import resolve

    return resolve(_recipe(recipe), registries(plugins))


@dataclass
class PlanResult:
    plan: Plan
    prediction: Prediction


def plan(recipe: Recipe | str | Path, plugins: Iterable[Any] = ()) -> PlanResult:
    """The resolved plan and its predictions (params and size after each stage), without weights."""
    from squeezelang.planner.estimate import predict
    from squeezelang.planner.resolve import resolve

    regs = registries(plugins)
    resolved = resolve(_recipe(recipe), regs)
    return PlanResult(resolved, predict(resolved, regs))


def run(recipe: Recipe | str | Path, output: str | Path | None = None, *, force: bool = False,
        model: Any = None, tokenizer: Any = None, plugins: Iterable[Any] = (),
        quiet: bool = True, device: str | None = None, dtype: str | None = None,
        offload: bool | None = None) -> RunResult:
    """Run a recipe; ``model`` (a transformers model, with ``tokenizer``) replaces the recipe's model.
    ``device`` (``cpu``, ``cuda``, ``auto``) and ``dtype`` (``auto``, ``float32``, ``bfloat16``,
    ``float16``) and ``offload`` override the recipe's ``model = hf(…, device = …, dtype = …,
    offload = …)``.

    Returns a ``RunResult`` with ``report``, ``verdicts``, ``ok`` and ``model`` (the saved artifact,
    loaded back). Constraints not met are reported in the result, not raised. Under ``torchrun``
    every rank runs the stages and rank 0 alone saves and measures: on the other ranks ``rank`` is
    nonzero, the report empty and ``model`` the unsaved result of the stages.
    """
    from squeezelang.executor.run import execute
    from squeezelang.planner.resolve import resolve

    regs = registries(plugins)
    resolved = resolve(_recipe(recipe), regs).placed(device, dtype, offload)
    handle = None
    if model is not None:
        from squeezelang.models.handle import ModelHandle

        handle = ModelHandle(model.eval(), tokenizer, resolved.model.task)
    from squeezelang.search.solve import solve

    if handle is None and not resolved.needs_search:  # fixed settings known to miss a size bound
        from squeezelang.planner.estimate import planning_context
        from squeezelang.planner.levels import refuse_fixed_unreachable

        refuse_fixed_unreachable(resolved, regs, planning_context(resolved, regs))
    return solve(resolved, regs, output=output, force=force, handle=handle, quiet=quiet) \
        if resolved.needs_search else execute(resolved, regs, output=output, force=force, handle=handle,
                                           quiet=quiet)


def load(directory: str | Path, task: str | None = None, *, sentence_transformer: bool = False) -> Any:
    """Load a model saved by ``squeeze run`` (any technique) back as a torch module.

    With ``sentence_transformer=True`` the result of a sentence-transformers input (its directory
    has ``modules.json``) comes back as a ``SentenceTransformer``, pooling and normalisation
    included, so ``.encode(texts)`` gives the embeddings the report measured.
    """
    from squeezelang.models.load import load_model

    directory = Path(directory).expanduser()
    model = load_model(directory, task=task).model
    if not sentence_transformer:
        return model
    from squeezelang.models.sentence import sentence_transformer as build

    return build(directory, model)
