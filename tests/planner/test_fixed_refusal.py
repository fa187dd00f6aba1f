"""A recipe without ``auto`` whose fixed settings cannot meet a size bound is refused by
``squeeze plan`` and ``squeeze run`` before anything is loaded: exit 1, the predicted figure and
the bound, no output and no work directory."""
from __future__ import annotations

import pytest

import squeezelang
from squeezelang.cli import main
from squeezelang.errors import Infeasible

RECIPE = '''recipe "fixed"
model = hf("{model}", task = "embedding")
stage q: quantize {{ scheme = "int8" }}
constraints {{ size <= {bound} }}
output "out"{fmt}
'''


def _write(tmp_path, model, bound, fmt=""):
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, bound=bound, fmt=fmt))
    return path


def test_plan_and_run_refuse_a_size_the_fixed_settings_cannot_reach(tmp_path, tiny_bert_dir, capsys):
    recipe = _write(tmp_path, tiny_bert_dir, "1%")
    assert main(["plan", str(recipe)]) == 1
    out, err = capsys.readouterr()
    assert "PREDICTED NOT MET" in out  # the table that shows why comes first
    assert "error: cannot be met: size <= 1%: the stages as written are predicted to reach" in err
    assert "the bound is" in err and "Nothing was run" in err
    assert main(["run", str(recipe)]) == 1
    assert "Nothing was run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    with pytest.raises(Infeasible, match="predicted to reach"):
        squeezelang.run(recipe, output=tmp_path / "api-out")
    assert not (tmp_path / "api-out").exists()


def test_a_reachable_or_unpredicted_size_is_run(tmp_path, tiny_bert_dir, capsys):
    assert main(["plan", str(_write(tmp_path, tiny_bert_dir, "40%"))]) == 0
    # the dense format stores float weights: the estimates do not predict its size, so it runs
    recipe = _write(tmp_path, tiny_bert_dir, "1%", ' { format = "dense" }')
    assert main(["plan", str(recipe)]) == 0
    assert main(["run", "-q", str(recipe)]) == 1  # measured, and not met
    assert (tmp_path / "out" / "report.json").is_file()
