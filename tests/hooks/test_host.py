"""The plugin host: registration policy, schema checks, documented hookspecs, a lean import."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import squeezelang
from squeezelang.errors import PluginError
from squeezelang.hooks import hookspecs
from squeezelang.hooks.manager import build_registries, plugin_manager
from squeezelang.hooks.technique import Knob, Technique

ROOT = Path(__file__).resolve().parents[2]


class Dup(Technique):
    name = "prune"
    schema = {"type": "object", "additionalProperties": False, "properties": {}}


class Open(Technique):
    name = "open_schema"
    schema = {"type": "object", "properties": {"x": {"type": "number"}}}


class BadKnob(Technique):
    name = "bad_knob"
    schema = {"type": "object", "additionalProperties": False, "properties": {"x": {"type": "number"}}}
    knobs = (Knob("y", 0, 1),)


def plugin_of(tech):
    class P:
        @squeezelang.hookimpl
        def register_techniques(self, registry):
            registry.add(tech)
    return P()


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError) as info:
        build_registries(plugin_manager([plugin_of(Dup())]))
    msg = str(info.value)
    assert "'prune'" in msg and "builtin_prune" in msg


@pytest.mark.parametrize("tech, message", [(Open(), "additionalProperties"), (BadKnob(), "knob 'y'")])
def test_bad_definitions_are_refused_at_registration(tech, message):
    with pytest.raises(PluginError, match=message):
        build_registries(plugin_manager([plugin_of(tech)], entry_points=False))


def test_unknown_hook_is_refused():
    class Typo:
        @squeezelang.hookimpl
        def register_technique(self, registry):
            pass
    with pytest.raises(PluginError):
        plugin_manager([Typo()], entry_points=False)


def test_every_hookspec_is_documented_and_tested():
    names = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]
    assert sorted(names) == sorted(hookspecs.HOOK_NAMES)
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 60, f"{name} needs a full docstring"
    regs = build_registries(plugin_manager())
    for hook, registry in regs.by_hook().items():
        assert len(registry) > 0, f"no built-in implements {hook}"
    assert "register_techniques" in tests


def test_builtins_register_like_third_party():
    regs = build_registries(plugin_manager())
    owners = {regs.techniques.owner(n) for n in regs.techniques.names()}
    assert all(o.startswith("builtin_") for o in owners)
    assert set(regs.plugins) >= {"builtin_prune", "builtin_metrics"}


def test_import_is_lean():
    code = ("import sys, squeezelang, squeezelang.cli, squeezelang.planner.resolve, squeezelang.lang.parser; "
            "from squeezelang.hooks.manager import default_registries; default_registries(); "
            "print([m for m in ('torch', 'transformers', 'numpy', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
