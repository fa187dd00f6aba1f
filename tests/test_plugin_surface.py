"""The plugin-author surface: one module, every name real, no torch on import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import squeezelang.plugin as surface


@pytest.mark.parametrize("name", surface.__all__)
def test_every_listed_name_resolves_and_is_documented(name):
    assert getattr(surface, name) is not None
    assert f"``{name}``" in surface.__doc__


def test_an_unlisted_name_is_refused_with_a_pointer_to_the_list():
    with pytest.raises(AttributeError, match="docs/plugins.md"):
        surface.reshape  # noqa: B018 - the engine's own name, not the surface's


def test_importing_the_surface_imports_no_torch():
    code = ("import sys, squeezelang.plugin as p; from squeezelang.plugin import Technique, merge; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


ROOT = Path(__file__).resolve().parent.parent


def engine_imports(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, module, name)`` of every import of a ``squeezelang`` module in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "squeezelang":
                yield from ((node.lineno, node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, "") for alias in node.names
                        if alias.name.split(".")[0] == "squeezelang")


@pytest.mark.parametrize("folder", ["plugins", "tests/plugins_example"])
def test_plugins_import_the_engine_only_through_the_surface(folder):
    """Built-in and example plugins use ``squeezelang.plugin`` as a third-party plugin must."""
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    wrong = [f"{path.relative_to(ROOT)}:{line}: {module} {name}".rstrip()
             for path in files for line, module, name in engine_imports(path)
             if module != "squeezelang.plugin" or not name or name.startswith("_")]
    assert wrong == [], "import these from squeezelang.plugin (add them to it if missing)"
