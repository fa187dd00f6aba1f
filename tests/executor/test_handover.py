"""A model past ``HANDOVER_BYTES`` is held once: the first stage takes the loaded original over,
and the original is loaded again only where a teacher or the end of the run needs it. The results
are those of a run that kept both."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import squeezelang
from squeezelang.executor import run as run_module

RECIPE = '''model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = 0.3 }}
{extra}stage int8: quantize {{ scheme = "int8" }}
output "{out}"
'''
DISTILL = "stage heal: distill { teacher = original, data = calib, steps = 3, batch_size = 4 }\n"


def run(tmp_path: Path, model: Path, sentences: Path, out: str, extra: str = ""):
    (tmp_path / "calib.txt").write_text(sentences.read_text())
    recipe = tmp_path / f"{out}.squeeze"
    recipe.write_text(RECIPE.format(model=model, extra=extra, out=out))
    return squeezelang.run(recipe)


@pytest.mark.parametrize("extra", ["", DISTILL], ids=["no-teacher", "teacher"])
def test_a_handed_over_original_gives_the_same_run(tmp_path, tiny_bert_dir, sentences_file,
                                                   monkeypatch, extra):
    loads = []
    real = run_module.load_original

    def counted(plan, registries):
        loads.append(1)
        return real(plan, registries)

    monkeypatch.setattr(run_module, "load_original", counted)
    kept = run(tmp_path, tiny_bert_dir, sentences_file, "kept", extra)
    kept_loads, loads[:] = len(loads), []
    monkeypatch.setattr(run_module, "HANDOVER_BYTES", 0)
    handed = run(tmp_path, tiny_bert_dir, sentences_file, "handed", extra)
    # kept: the original, then a copy for the stages; handed over: the original, then again for
    # the teacher (when there is one) and for the end's side-by-side comparison
    assert kept_loads == 2 and len(loads) == (3 if extra else 2)
    a = load_file(str(kept.output_dir / "model.safetensors"))
    b = load_file(str(handed.output_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in ("faithful", "size", "params"):
        assert kept.report["metrics"][name]["original"] == handed.report["metrics"][name]["original"]
        assert kept.report["metrics"][name]["final"] == pytest.approx(
            handed.report["metrics"][name]["final"])
