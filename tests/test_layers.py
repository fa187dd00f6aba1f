"""The floors of the architecture hold: face -> search -> executor -> planner -> hooks -> models, lang.

Checked on the source (imports anywhere in a module, lazy ones included), so a shortcut taken inside
a function is caught as well as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "squeezelang"
#: what each package must never import (packages above it)
NEVER = {
    "planner": ("squeezelang.executor", "squeezelang.search", "squeezelang.cli", "squeezelang.api"),
    "hooks": ("squeezelang.executor", "squeezelang.search", "squeezelang.planner", "squeezelang.cli",
              "squeezelang.api"),
    "executor": ("squeezelang.search", "squeezelang.cli", "squeezelang.api"),
    "models": ("squeezelang.executor", "squeezelang.search", "squeezelang.cli", "squeezelang.api"),
    "lang": ("squeezelang.executor", "squeezelang.search", "squeezelang.planner", "squeezelang.models",
             "squeezelang.cli", "squeezelang.api"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


@pytest.mark.parametrize("package", sorted(NEVER))
def test_a_package_never_imports_the_floors_above_it(package):
    bad = [f"{path.relative_to(ROOT)}:{line}: {module}"
           for path in sorted((PACKAGE / package).rglob("*.py"))
           for line, module in _imports(path)
           if module.startswith(NEVER[package])]
    assert bad == []
