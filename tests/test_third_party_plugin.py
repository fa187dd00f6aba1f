"""A third-party plugin distribution (tests/plugins_example) registered through a real entry point."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import squeezelang
from squeezelang.hooks.manager import build_registries, plugin_manager, reset_default_registries

EXAMPLE = Path(__file__).resolve().parent / "plugins_example"


@pytest.fixture()
def installed_example(tmp_path: Path, monkeypatch):
    """Make the example distribution importable *and* discoverable through its entry point."""
    dist = tmp_path / "squeeze_stripe-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: squeeze-stripe\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[squeezelang]\nstripe = squeeze_stripe\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    reset_default_registries()
    yield
    sys.modules.pop("squeeze_stripe", None)
    reset_default_registries()


def test_entry_point_registers_technique(installed_example):
    regs = build_registries(plugin_manager())
    assert "stripe" in regs.techniques
    assert regs.techniques.owner("stripe") == "stripe"
    assert regs.plugins["stripe"] == "squeeze-stripe"


def test_recipe_uses_third_party_technique_end_to_end(installed_example, tmp_path, tiny_bert_dir):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''
use "squeeze-stripe"
model = hf("{tiny_bert_dir}", task = "embedding")
stage s: stripe {{ period = 2 }}
constraints {{ size <= 95% }}
''')
    planned = squeezelang.plan(recipe)
    predicted = planned.prediction.final_size
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    saved = result.report["metrics"]["size"]["final"]
    assert abs(predicted - saved) / saved < 0.05
    weight = result.model.encoder.layer[0].intermediate.dense.weight
    assert (weight[:, ::2] == 0).all() and (weight[:, 1::2] != 0).any()


def test_missing_distribution_is_a_check_error(tmp_path, tiny_bert_dir):
    from squeezelang.errors import RecipeErrors

    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'use "squeeze-stripe"\nmodel = hf("{tiny_bert_dir}")\nstage s: stripe {{ }}\n')
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    messages = [e.message for e in info.value.errors]
    assert any("'squeeze-stripe' is not installed" in m for m in messages)
    assert any("unknown technique 'stripe'" in m for m in messages)
