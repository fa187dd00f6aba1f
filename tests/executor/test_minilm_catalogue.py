"""End to end on the real all-MiniLM-L6-v2 for the structural techniques: a recipe run, the saved
artifact reloaded with plain transformers, smaller and measured."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang

pytestmark = pytest.mark.slow
CALIB = Path(__file__).resolve().parents[2] / "specs" / "data" / "calib.txt"

STAGES = {
    "depth": 'stage s: prune { method = "depth", ratio = 0.5, data = calib }',
    "shrink": 'stage s: shrink { layers = 3, intermediate = 768, data = calib }',
    "cross_layer": 'stage s: share { method = "cross_layer", groups = 3 }',
}


@pytest.mark.parametrize("name", list(STAGES))
def test_structural_on_minilm(tmp_path: Path, minilm_dir: Path, name: str):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''
model = hf("{minilm_dir}", task = "embedding")
data calib = text("{CALIB}")
metric faithful = fidelity(calib)
{STAGES[name]}
constraints {{ params <= 90% }}
''')
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    m = result.report["metrics"]
    assert result.ok, result.report["constraints"]
    assert abs(planned.prediction.final_size - m["size"]["final"]) / m["size"]["final"] < 0.02
    assert 0.0 < m["faithful"]["final"] < 1.0
    if name != "cross_layer":  # a standard, smaller architecture: plain transformers loads it
        from transformers import AutoModel
        model = AutoModel.from_pretrained(tmp_path / "out")
        assert sum(p.numel() for p in model.parameters()) == m["params"]["final"]


def test_task_prune_on_minilm(tmp_path: Path, minilm_dir: Path, shared_data: Path):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''
model = hf("{minilm_dir}", task = "embedding")
data sts = csv("{shared_data / 'stsb-en-train.csv'}", columns = ["a", "b", "score"], limit = 200)
stage s: task_prune {{ target = "layers", ratio = 0.34, data = sts, score = "spearman", samples = 200 }}
constraints {{ params <= 90% }}
''')
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok
    from transformers import AutoModel
    assert AutoModel.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4
