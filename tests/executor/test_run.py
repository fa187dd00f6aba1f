"""End to end on a tiny BERT: run, artifacts, reload, verdicts, lock file, refusal, resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import squeezelang
from squeezelang.errors import ExecutionError, OutputError
from squeezelang.hooks.technique import Technique

RECIPE = '''
recipe "tiny"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = 0.5 }}
stage int8: quantize {{ scheme = "int8" }}
constraints {{
    size <= {size}
    faithful >= 0.5
}}
'''


def tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert_dir: Path, sentences_file: Path) -> Path:
    (tmp_path / "calib.txt").write_text(sentences_file.read_text())
    return tmp_path


def write(workspace: Path, size: str = "60%", name: str = "r.squeeze") -> Path:
    path = workspace / name
    path.write_text(RECIPE.format(model=MODEL_DIR[0], size=size))
    return path


MODEL_DIR: list[str] = []


@pytest.fixture(autouse=True)
def _model_dir(tiny_bert_dir: Path):
    MODEL_DIR[:] = [str(tiny_bert_dir)]


def test_run_writes_verified_artifacts(workspace: Path, tiny_bert_dir: Path):
    before = tree_hash(tiny_bert_dir)
    recipe = write(workspace)
    result = squeezelang.run(recipe, output=workspace / "out")
    out = workspace / "out"
    assert result.ok, result.report["constraints"]
    for name in ("model.safetensors", "config.json", "squeeze.json", "report.json", "report.md",
                 "recipe.lock.squeeze", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[2] / "specs/schemas/report.schema.json").read_text())
    jsonschema.validate(report, schema)
    size = report["metrics"]["size"]
    assert size["final"] < 0.6 * size["original"]
    from squeezelang.models.size import artifact_bytes
    assert size["final"] == artifact_bytes(out)  # measured on the saved files
    assert 0.5 < report["metrics"]["faithful"]["final"] < 1.0
    assert [s["name"] for s in report["stages"]] == ["sparse", "int8"]
    assert report["stages"][0]["metrics"]["size"] > report["stages"][1]["metrics"]["size"]
    assert tree_hash(tiny_bert_dir) == before  # the input model is never modified
    assert not list(workspace.glob(".out*"))   # no staging or work directories left behind
    # the result loads back with the original's forward signature
    model = squeezelang.load(out)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape == (1, 5, 32)


def test_constraint_not_met_is_reported_not_raised(workspace: Path):
    recipe = write(workspace)
    recipe.write_text(recipe.read_text().replace("faithful >= 0.5", "faithful >= 0.99999"))
    result = squeezelang.run(recipe, output=workspace / "out")
    assert not result.ok
    failed = result.failed
    assert [v.constraint for v in failed] == ["faithful >= 0.99999"]
    assert failed[0].margin < 0
    assert (workspace / "out" / "report.json").is_file()
    assert json.loads((workspace / "out/report.json").read_text())["status"] == "not met"


def test_lock_file_reproduces_the_run(workspace: Path):
    result = squeezelang.run(write(workspace), output=workspace / "out")
    lock = workspace / "out" / "recipe.lock.squeeze"
    text = lock.read_text()
    assert 'method = "magnitude"' in text and "scope" in text  # defaults made explicit
    again = squeezelang.run(lock, output=workspace / "again")
    for name in ("size", "faithful", "params"):
        assert again.report["metrics"][name]["final"] == pytest.approx(
            result.report["metrics"][name]["final"], rel=1e-6)


def test_existing_output_is_refused_without_force(workspace: Path):
    out = workspace / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        squeezelang.run(write(workspace), output=out)
    assert (out / "keep.txt").read_text() == "mine"
    squeezelang.run(write(workspace), output=out, force=True)
    assert not (out / "keep.txt").exists() and (out / "report.json").is_file()


class Flaky(Technique):
    """Fails the first time it runs, to simulate a crash between stages."""

    name = "flaky"
    schema = {"type": "object", "additionalProperties": False, "properties": {}}
    calls = 0

    def estimate(self, meta, params):
        return meta

    def apply_(self, handle, params, ctx):
        type(self).calls += 1
        if type(self).calls == 1:
            raise RuntimeError("simulated crash")


class FlakyPlugin:
    @squeezelang.hookimpl
    def register_techniques(self, registry):
        registry.add(Flaky())


def test_failure_names_stage_and_plugin_then_resume(workspace: Path, capsys):
    Flaky.calls = 0
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model=MODEL_DIR[0], size="60%").replace(
        'stage int8:', 'stage boom: flaky { }\nstage int8:'))
    plugin = FlakyPlugin()
    with pytest.raises(ExecutionError) as info:
        squeezelang.run(recipe, output=workspace / "out", plugins=[plugin], quiet=False)
    assert "stage 'boom'" in str(info.value) and "simulated crash" in str(info.value)
    assert not (workspace / "out").exists()  # nothing presented as a result
    result = squeezelang.run(recipe, output=workspace / "out", plugins=[plugin], quiet=False)
    assert result.resumed_after == "sparse"
    assert "resuming after stage 'sparse'" in capsys.readouterr().out
    assert result.ok


def test_different_recipe_for_same_output_is_refused(workspace: Path):
    Flaky.calls = 0
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model=MODEL_DIR[0], size="60%").replace(
        'stage int8:', 'stage boom: flaky { }\nstage int8:'))
    with pytest.raises(ExecutionError):
        squeezelang.run(recipe, output=workspace / "out", plugins=[FlakyPlugin()])
    other = write(workspace, size="70%", name="other.squeeze")
    with pytest.raises(OutputError, match="different recipe"):
        squeezelang.run(other, output=workspace / "out")
    assert squeezelang.run(other, output=workspace / "out", force=True).ok


def test_in_memory_model(workspace: Path, tiny_bert_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert_dir)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = squeezelang.run(write(workspace), output=workspace / "out", model=model, tokenizer=tok)
    assert result.ok
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not modified
    assert result.report["metrics"]["size"]["final"] < result.report["metrics"]["size"]["original"]
