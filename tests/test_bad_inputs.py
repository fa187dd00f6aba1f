"""Bad models and bad data: each is a clear error before any stage runs, naming the file at fault.

Every case goes through the real command line (``squeeze run``) and checks: the exit code (2 for
what ``squeeze check`` finds, 3 for what only reading the weights or the data finds), a message that
names the file (and the line or tensor where there is one), no traceback, no stage started, no
output/staging/work directory left behind, and the input model directory byte for byte unchanged.
A few cases also go through the Python API, which raises the same errors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

import squeezelang
from squeezelang.cli import main
from squeezelang.errors import ExecutionError, RecipeErrors, SqueezeError
from squeezelang.hooks.technique import Technique

RECIPE = '''recipe "bad"
model = hf("{model}", task = "{task}")
data d = {data}
metric m = {metric}
stage q: quantize {{ scheme = "int8" }}
'''
SENTENCES = "a man is playing a guitar\nthe cat sits on the mat\na dog runs in the park\n"
LINES = "the cat sits\n" * 2000  # well past the first chunk a text file is decoded in
JSON_LINES = '{"text": "the cat sits"}\n' * 2000


def tree_hash(directory: Path) -> str:
    """A digest of every name, symlink target and file content under ``directory``."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        h.update(p.relative_to(directory).as_posix().encode() + b"\0")
        if p.is_symlink():
            h.update(b"link:" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def squeeze_run(capsys, recipe: Path, *extra: str) -> tuple[int, str, str]:
    """``squeeze run RECIPE -o <recipe dir>/out``: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(["run", str(recipe), "-o", str(recipe.parent / "out"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, expected: int, workspace: Path,
                   *named: str) -> None:
    """The run failed cleanly: exit code, message naming the file, nothing left behind."""
    assert code == expected, err
    assert "Traceback" not in err + out
    for text in named:
        assert text in err, f"{text!r} not in {err!r}"
    assert "stage 1/" not in out, "a stage started before the bad input was found"
    assert not (workspace / "out").exists()
    leftovers = [p.name for p in workspace.iterdir() if p.name.startswith(".out")]
    assert not leftovers, leftovers  # no staging, trials or work directory


@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A recipe directory with a copy of the tiny BERT in ``model/`` and a good data file."""
    shutil.copytree(tiny_bert_dir, tmp_path / "model")
    (tmp_path / "good.txt").write_text(SENTENCES, encoding="utf-8")
    return tmp_path


def write_recipe(workspace: Path, model: str = "model", task: str = "embedding",
                 data: str = 'text("good.txt")', metric: str = "fidelity(d)") -> Path:
    path = workspace / "bad.squeeze"
    path.write_text(RECIPE.format(model=model, task=task, data=data, metric=metric),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- bad models
def _set_weight(value: float) -> Callable[[Path], str]:
    def mutate(model: Path) -> str:
        from safetensors.torch import load_file, save_file

        path = model / "model.safetensors"
        tensors = load_file(str(path))
        name = "encoder.layer.1.attention.self.query.weight"
        assert name in tensors
        tensors[name][3, 5] = value
        save_file(tensors, str(path), metadata={"format": "pt"})
        return name
    return mutate


def _truncate(model: Path) -> str:
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "model.safetensors"


def _garbage(model: Path) -> str:
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    return "model.safetensors"


def _no_config(model: Path) -> str:
    (model / "config.json").unlink()
    return "no config.json"


def _config_not_json(model: Path) -> str:
    (model / "config.json").write_text('{"model_type": "bert",', encoding="utf-8")
    return "config.json: not valid JSON"


def _config_a_list(model: Path) -> str:
    (model / "config.json").write_text("[1, 2]", encoding="utf-8")
    return "config.json: expected a JSON object"


def _bin_only(model: Path) -> str:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return "pytorch_model.bin: pickle-based weights are never read"


def _no_weights(model: Path) -> str:
    (model / "model.safetensors").unlink()
    return "model.safetensors"


BAD_MODELS = [
    # (id, mutate -> text the message must contain, exit code)
    pytest.param(_no_config, 2, id="no-config"),
    pytest.param(_config_not_json, 2, id="config-not-json"),
    pytest.param(_config_a_list, 2, id="config-not-an-object"),
    pytest.param(_bin_only, 2, id="pickle-weights-only"),
    pytest.param(_no_weights, 3, id="no-weights"),
    pytest.param(_truncate, 3, id="truncated-safetensors"),
    pytest.param(_garbage, 3, id="garbage-safetensors"),
    pytest.param(_set_weight(float("nan")), 3, id="nan-weight"),
    pytest.param(_set_weight(float("inf")), 3, id="inf-weight"),
    pytest.param(_set_weight(float("-inf")), 3, id="minus-inf-weight"),
]


@pytest.mark.parametrize("mutate, expected", BAD_MODELS)
def test_bad_model_is_refused_before_any_stage(capsys, workspace: Path, mutate, expected: int):
    model = workspace / "model"
    detail = mutate(model)
    before = tree_hash(model)
    code, out, err = squeeze_run(capsys, write_recipe(workspace))
    assert_refused(code, out, err, expected, workspace, str(model), detail)
    assert tree_hash(model) == before


def test_nan_weight_message_names_file_and_tensor(capsys, workspace: Path):
    name = _set_weight(float("nan"))(workspace / "model")
    code, out, err = squeeze_run(capsys, write_recipe(workspace))
    assert code == 3
    assert f"{workspace / 'model' / 'model.safetensors'}: tensor '{name}' holds 1 NaN of" in err


@pytest.mark.parametrize("mutate", [_truncate, _set_weight(float("inf"))], ids=["truncated", "inf"])
def test_bad_weights_through_the_api(workspace: Path, mutate):
    mutate(workspace / "model")
    with pytest.raises(SqueezeError, match=r"model\.safetensors"):
        squeezelang.run(write_recipe(workspace), output=workspace / "out")
    assert not (workspace / "out").exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".out")]


def test_bad_weights_through_load(workspace: Path):
    from squeezelang.models.load import load_model

    _set_weight(float("nan"))(workspace / "model")
    with pytest.raises(SqueezeError, match="holds 1 NaN"):
        squeezelang.load(workspace / "model")
    with pytest.raises(SqueezeError, match="holds 1 NaN"):
        load_model(workspace / "model")


@pytest.mark.parametrize("model, expected", [("missing", "does not exist"),
                                             ("good.txt", "is a file, not a model directory")])
def test_missing_model_directory(capsys, workspace: Path, model: str, expected: str):
    recipe = write_recipe(workspace, model=model)
    code, out, err = squeeze_run(capsys, recipe)
    assert_refused(code, out, err, 2, workspace, str(workspace / model), expected,
                   f"{recipe}:2:")  # FILE:LINE:COL of the model's path in the recipe
    capsys.readouterr()
    assert main(["check", str(recipe)]) == 2
    assert str(workspace / model) in capsys.readouterr().err
    with pytest.raises(RecipeErrors):
        squeezelang.run(recipe, output=workspace / "out")


def test_check_finds_model_problems_without_torch_weights(capsys, workspace: Path):
    """``squeeze check`` reads config.json and the listing, never the weights: those are run time."""
    _config_not_json(workspace / "model")
    recipe = write_recipe(workspace)
    capsys.readouterr()
    assert main(["check", str(recipe)]) == 2
    assert f"{workspace / 'model' / 'config.json'}: not valid JSON" in capsys.readouterr().err


class Poison(Technique):
    """Writes a NaN into one weight, as a diverging stage would."""

    name = "poison"
    schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def estimate(self, meta, params):
        return meta

    def apply_(self, handle, params, ctx):
        next(handle.model.parameters()).data[0, 0] = float("nan")


class PoisonPlugin:
    @squeezelang.hookimpl
    def register_techniques(self, registry):
        registry.add(Poison())


def test_a_stage_that_makes_nan_is_named(workspace: Path):
    """NaN that a stage produces is that stage's failure, not a corrupt file found at reload."""
    recipe = workspace / "p.squeeze"
    recipe.write_text('model = hf("model")\nstage p: poison {}\n', encoding="utf-8")
    with pytest.raises(ExecutionError, match=r"stage 'p'.*left weight 'embeddings\.word_embeddings"
                                             r"\.weight' holding 1 NaN"):
        squeezelang.run(recipe, output=workspace / "out", plugins=[PoisonPlugin()])
    assert not (workspace / "out").exists()


# ---------------------------------------------------------------------------- bad data
BAD_DATA = [
    # id, file name, content, data declaration, exit code, texts the message must contain
    pytest.param("cols.csv", "x,y\n1,2\n", 'csv("cols.csv")', 2,
                 ["needs column 'text'", "has columns x, y (read from {file})"], id="csv-wrong-columns"),
    pytest.param("count.csv", "text,score\na cat,1\na dog,2\nthe man,3,4\n", 'csv("count.csv")', 3,
                 ["{file}:4: expected 2 fields (text, score), found 3"], id="csv-wrong-field-count"),
    pytest.param("count2.csv", "a cat,1\nbad\n", 'csv("count2.csv", columns = ["text", "n"])', 3,
                 ["{file}:2: expected 2 fields"], id="csv-too-few-fields"),
    pytest.param("quote.csv", 'text\na cat\n"a dog\nthe man\n', 'csv("quote.csv")', 3,
                 ["{file}:3: bad CSV", "never closed"], id="csv-unclosed-quote"),
    pytest.param("empty.txt", "", 'text("empty.txt")', 2,
                 ["{file}: holds no example"], id="empty-text"),
    pytest.param("blank.txt", "\n  \n\n", 'text("blank.txt")', 2,
                 ["{file}: holds no example"], id="blank-text"),
    pytest.param("empty.csv", "", 'csv("empty.csv")', 2, ["{file}: the file is empty"], id="empty-csv"),
    pytest.param("header.csv", "text,label\n", 'csv("header.csv")', 2,
                 ["{file}: holds no data row after the header"], id="header-only-csv"),
    pytest.param("empty.jsonl", "\n", 'jsonl("empty.jsonl")', 2,
                 ["{file}: holds no JSON object"], id="empty-jsonl"),
    pytest.param("limit.txt", SENTENCES, 'text("limit.txt", limit = 0)', 2,
                 ["bad.squeeze:3:", "'limit' must be at least 1"], id="limit-zero"),
    pytest.param("broken.jsonl", '{"text": "a cat"}\n{"text": "a dog"}\n{"text": "the man"\n',
                 'jsonl("broken.jsonl")', 3, ["{file}:3: not valid JSON"], id="jsonl-broken-line"),
    pytest.param("array.jsonl", '{"text": "a cat"}\n[1, 2]\n', 'jsonl("array.jsonl")', 3,
                 ["{file}:2: expected a JSON object"], id="jsonl-not-an-object"),
    pytest.param("field.jsonl", '{"text": "a cat"}\n{"txt": "a dog"}\n',
                 'jsonl("field.jsonl", fields = ["text"])', 3, ["{file}:2: the object has no 'text'"],
                 id="jsonl-missing-field"),
    # Text is decoded in 8 KiB chunks: a bad byte deep in a file is found when the data is read,
    # one near the start already by ``squeeze check``; both name the exact line.
    pytest.param("latin1.txt", (LINES + "caf\xe9 au lait\n").encode("latin-1"), 'text("latin1.txt")',
                 3, ["{file}:2001: not valid UTF-8"], id="text-not-utf8"),
    pytest.param("latin1.csv", ("text\n" + LINES + "caf\xe9\n").encode("latin-1"), 'csv("latin1.csv")',
                 3, ["{file}:2002: not valid UTF-8"], id="csv-not-utf8"),
    pytest.param("latin1.jsonl", (JSON_LINES + '{"text": "caf\xe9"}\n').encode("latin-1"),
                 'jsonl("latin1.jsonl")', 3, ["{file}:2001: not valid UTF-8"], id="jsonl-not-utf8"),
    pytest.param("early.txt", "a cat\na dog\ncaf\xe9\n".encode("latin-1"), 'text("early.txt")', 2,
                 ["{file}:3: not valid UTF-8"], id="early-line-not-utf8"),
    pytest.param("missing.txt", None, 'text("missing.txt")', 2,
                 ["{file}: no such data file"], id="missing-file"),
]


@pytest.mark.parametrize("name, content, data, expected, messages", BAD_DATA)
def test_bad_data_is_refused_before_any_stage(capsys, workspace: Path, name: str,
                                             content: str | bytes | None, data: str, expected: int,
                                             messages: list[str]):
    file = workspace / name
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content, encoding="utf-8")
    before = tree_hash(workspace / "model")
    code, out, err = squeeze_run(capsys, write_recipe(workspace, data=data))
    assert_refused(code, out, err, expected, workspace,
                   *[m.format(file=file) for m in messages])
    assert tree_hash(workspace / "model") == before


def test_bad_data_is_found_before_the_model_loads(workspace: Path, monkeypatch):
    """Data files are read before the model: a broken line costs no model load at all."""
    from squeezelang_plugins import sources

    (workspace / "broken.jsonl").write_text('{"text": "a"}\n{"text":\n', encoding="utf-8")
    loaded = []
    monkeypatch.setattr(sources.HfSource, "load", lambda self, args: loaded.append(args))
    with pytest.raises(SqueezeError, match=r"broken\.jsonl:2: not valid JSON"):
        squeezelang.run(write_recipe(workspace, data='jsonl("broken.jsonl")'),
                        output=workspace / "out")
    assert loaded == []


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_bert_dir: Path) -> Path:
    """The tiny BERT with a two-class sequence classification head."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-classifier")
    for f in tiny_bert_dir.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, directory / f.name)
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    config.num_labels = 2
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    return directory


def test_label_out_of_range_is_named_before_any_stage(capsys, workspace: Path, classifier_dir: Path):
    shutil.rmtree(workspace / "model")
    shutil.copytree(classifier_dir, workspace / "model")
    file = workspace / "labels.csv"
    file.write_text("text,label\nthe cat sits,0\na dog runs,1\na man plays,7\n", encoding="utf-8")
    before = tree_hash(workspace / "model")
    recipe = write_recipe(workspace, task="classification", data='csv("labels.csv")',
                          metric="accuracy(d)")
    code, out, err = squeeze_run(capsys, recipe)
    assert_refused(code, out, err, 3, workspace, str(file), "row 3: label 7 is out of range for 2 classes",
                   "on the original model")
    assert tree_hash(workspace / "model") == before


def test_text_longer_than_the_model_is_truncated_with_a_note(capsys, workspace: Path):
    """Truncation to the model's context is the behaviour (as in sentence-transformers), never silent."""
    file = workspace / "long.txt"
    file.write_text(SENTENCES + "the cat " * 200 + "\n" + "a dog " * 100 + "\n", encoding="utf-8")
    recipe = write_recipe(workspace, data='text("long.txt")')
    code, out, err = squeeze_run(capsys, recipe, "-q")
    assert code == 0, err
    assert "Traceback" not in err
    assert (f"note: data set 'd' ({file}): 2 texts longer than the model's limit of 64 tokens, "
            "truncated to it") in err
    result = squeezelang.run(recipe, output=workspace / "api-out")
    assert any("2 texts longer than the model's limit of 64 tokens" in n for n in result.notes)


def test_short_texts_give_no_note(workspace: Path):
    result = squeezelang.run(write_recipe(workspace), output=workspace / "out")
    assert result.notes == []
    report = json.loads((workspace / "out" / "report.json").read_text())
    assert report["output"]["dir"] == str((workspace / "out").resolve())  # -o, not the recipe's default
