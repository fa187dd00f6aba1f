"""The original's metrics are measured once per model, data and code: a second run reads them back;
a changed data set or model file, or ``SQUEEZE_CACHE_DIR=off``, measures again; times never come
from the cache."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

import squeezelang
from squeezelang import hookimpl
from squeezelang.hooks.metric import Metric

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Counted(Metric):
    """The model's parameter count, counting every call by the model it measured."""

    name = "counted"
    dimension = "count"
    higher_is_better = False
    needs_data = True
    columns = "text"
    calls: list[int] = []

    def measure(self, handle, ctx, data, args):
        params = sum(p.numel() for p in handle.model.parameters())
        type(self).calls.append(params)
        return float(params + len(ctx.data.rows(data)))


@hookimpl
def register_metrics(registry):
    registry.add(Counted())


PLUGINS = [sys.modules[__name__]]
RECIPE = '''recipe "cached"
model = hf("{model}", task = "embedding")
data calib = text("{data}")
metric c = counted(calib)
metric faithful = fidelity(calib)
stage p: prune {{ method = "activation", target = "mlp", ratio = 0.5, data = calib }}
'''


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(tmp_path, model, data, out):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model, data=data))
    Counted.calls = []
    result = squeezelang.run(recipe, output=tmp_path / out, plugins=PLUGINS)
    return result, list(Counted.calls)


def test_a_second_run_reads_the_originals_metrics(tmp_path, tiny_bert_dir, sentences_file, cache):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    first, calls = _run(tmp_path, model, sentences_file, "a")
    original = max(calls)
    assert calls.count(original) == 1  # the original once; the stage's and the saved model after
    second, calls = _run(tmp_path, model, sentences_file, "b")
    assert original not in calls and calls  # only the pruned model was measured
    for name in ("c", "faithful"):
        assert second.report["metrics"][name]["original"] == first.report["metrics"][name]["original"]
    assert list((cache / "original").glob("*.json"))
    # latency, a time, is measured again (side by side with the artifact) on every run
    assert second.report["metrics"]["latency"]["paired"]["rounds"] == 3

    # other data: measured again
    more = tmp_path / "more.txt"
    more.write_text(sentences_file.read_text() + "one more sentence\n")
    third, calls = _run(tmp_path, model, more, "c")
    assert original in calls
    assert third.report["metrics"]["c"]["original"] == first.report["metrics"]["c"]["original"] + 1

    # a changed model file: measured again
    config = json.loads((model / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(config))
    _, calls = _run(tmp_path, model, sentences_file, "d")
    assert original in calls


def test_the_cache_can_be_turned_off(tmp_path, tiny_bert_dir, sentences_file, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", "off")
    _run(tmp_path, tiny_bert_dir, sentences_file, "a")
    _, calls = _run(tmp_path, tiny_bert_dir, sentences_file, "b")
    assert max(calls) in calls and calls.count(max(calls)) == 1


def test_another_version_of_a_metrics_harness_measures_again(tmp_path, tiny_bert_dir,
                                                             sentences_file, cache, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(Counted, "packages", ("pluggy",))
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    _, calls = _run(tmp_path, model, sentences_file, "a")
    original = max(calls)
    _, calls = _run(tmp_path, model, sentences_file, "b")
    assert original not in calls  # same version: read back
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0.1" if name == "pluggy" else real(name))
    _, calls = _run(tmp_path, model, sentences_file, "c")
    assert original in calls  # another version of the harness: measured again
