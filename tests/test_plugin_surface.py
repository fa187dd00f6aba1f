"""The plugin-author surface: one module, every name real, no torch on import."""
from __future__ import annotations

import subprocess
import sys

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
