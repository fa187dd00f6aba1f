"""Where a run computes: ``device`` and ``dtype`` in the recipe (engine arguments of the model
source), on the command line and in the API. Without a GPU, the CUDA path is checked as far as a
CPU machine allows: ``auto`` resolves to the CPU and ``cuda`` is refused before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import squeezelang
from squeezelang.cli import main
from squeezelang.errors import RecipeErrors
from squeezelang.models.placement import place_, resolve_device
from squeezelang.plugin import ModelHandle

RECIPE = '''recipe "placed"
model = hf("{model}", task = "embedding"{placement})
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = 0.3 }}
stage heal: distill {{ teacher = original, data = calib, steps = 3, batch_size = 4 }}
stage int8: quantize {{ scheme = "int8" }}
output "out"
'''


def write(tmp_path: Path, model: Path, sentences: Path, placement: str = "") -> Path:
    (tmp_path / "calib.txt").write_text(sentences.read_text())
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model, placement=placement))
    return recipe


def saved_dtypes(directory: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return out


def test_the_recipe_names_device_and_dtype_and_the_plan_keeps_them(tmp_path, tiny_bert_dir,
                                                                   sentences_file):
    plan = squeezelang.check(write(tmp_path, tiny_bert_dir, sentences_file,
                                   ', device = "auto", dtype = "bfloat16"'))
    assert (plan.model.device, plan.model.dtype) == ("auto", "bfloat16")
    assert "device" not in plan.model.args and "dtype" not in plan.model.args  # not the source's
    default = squeezelang.check(write(tmp_path, tiny_bert_dir, sentences_file))
    assert (default.model.device, default.model.dtype) == ("cpu", "auto")
    assert default.placed("auto", None).model.device == "auto"


def test_an_unknown_device_is_an_error_at_its_column(tmp_path, tiny_bert_dir, sentences_file):
    recipe = write(tmp_path, tiny_bert_dir, sentences_file, ', device = "gpu"')
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    (error,) = info.value.errors
    line = recipe.read_text().splitlines()[error.span.line - 1]
    assert line[error.span.column - 1:].startswith('"gpu"')
    assert "cpu" in error.message and "cuda" in error.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, tiny_bert_dir,
                                                                  sentences_file, capsys):
    recipe = write(tmp_path, tiny_bert_dir, sentences_file)
    code = main(["run", str(recipe), "--device", "cuda", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "device 'cuda'" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_runs_on_the_cpu_here_and_the_report_says_where(tmp_path, tiny_bert_dir,
                                                             sentences_file):
    result = squeezelang.run(write(tmp_path, tiny_bert_dir, sentences_file), device="auto")
    assert result.report["model"]["device"] == "cpu"
    assert 'device = "auto"' in (result.output_dir / "recipe.lock.squeeze").read_text()


def test_bfloat16_computes_and_saves_in_bfloat16(tmp_path, tiny_bert_dir, sentences_file):
    recipe = write(tmp_path, tiny_bert_dir, sentences_file, ', dtype = "bfloat16"')
    result = squeezelang.run(recipe)
    assert result.report["model"]["dtype"] == "bfloat16"
    assert "BF16" in saved_dtypes(result.output_dir)  # the float weights; scales stay F32
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert 0.5 < result.report["metrics"]["faithful"]["final"] <= 1.0
    assert 'dtype = "bfloat16"' in (result.output_dir / "recipe.lock.squeeze").read_text()


def test_the_command_line_dtype_overrides_the_recipe(tmp_path, tiny_bert_dir, sentences_file):
    recipe = write(tmp_path, tiny_bert_dir, sentences_file, ', dtype = "bfloat16"')
    assert main(["run", str(recipe), "--dtype", "float32", "-q"]) in (0, 1)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["dtype"] == "float32"
    assert "BF16" not in saved_dtypes(tmp_path / "out")


def test_place_casts_floating_tensors_only_and_names_the_dtype(tiny_bert_dir, registries):
    from squeezelang.models.load import load_model

    handle = load_model(tiny_bert_dir, registries, task="embedding")
    ids_before = [b.dtype for b in handle.model.buffers() if not b.is_floating_point()]
    place_(handle, resolve_device("cpu"), "float16")
    assert {p.dtype for p in handle.model.parameters()} == {torch.float16}
    assert [b.dtype for b in handle.model.buffers() if not b.is_floating_point()] == ids_before
    assert handle.model.config.dtype == torch.float16
    assert isinstance(handle, ModelHandle)


def test_float16_distills_on_float32_master_weights_and_saves_float16(tmp_path, tiny_bert_dir,
                                                                      sentences_file):
    result = squeezelang.run(write(tmp_path, tiny_bert_dir, sentences_file, ', dtype = "float16"'))
    assert "F16" in saved_dtypes(result.output_dir) and "BF16" not in saved_dtypes(result.output_dir)
    heal = next(s for s in result.report["stages"] if s["name"] == "heal")
    assert any("float32 (master weights)" in line for line in heal["log"])
    assert 0.5 < result.report["metrics"]["faithful"]["final"] <= 1.0
