"""The planner's meta-data cache: a cached plan equals a fresh one, skips torch, and survives a
damaged or unwritable cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from squeezelang.models import meta_cache
from squeezelang.models.meta import ModelMeta

RECIPE = '''recipe "cached"
model = hf("{model}")
stage q: quantize {{ scheme = "int8" }}
'''
#: Estimates that build resized models (``surgery.config_meta``) and tokenize data (``vocab_trim``).
RESIZING = '''recipe "cached-resizing"
model = hf("{model}")
data calib = text("{data}")
stage trim: vocab_trim {{ data = calib, keep_frequent = 7 }}
stage mlp: prune {{ method = "activation", target = "mlp", ratio = 0.5, data = calib }}
stage heads: prune {{ method = "activation", target = "heads", ratio = 0.5, data = calib }}
'''


def _plan_json(recipe: Path, cache: Path | str) -> tuple[dict, list[str]]:
    """``squeeze plan --json`` in a fresh process, and the heavy modules that process imported."""
    code = ("import sys, json\n"
            "from squeezelang import cli\n"
            "code = cli.main(['plan', sys.argv[1], '--json'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "SQUEEZE_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True,
                          env=env, check=True)
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")][-1]
    return json.loads(done.stdout), [m for m in heavy.removeprefix("HEAVY=").split(",") if m]


@pytest.fixture(scope="module")
def unlisted_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with relative position embeddings: a layout ``layout_meta`` leaves to
    transformers, so planning it builds the model on the meta device and uses the cache."""
    import shutil

    directory = tmp_path_factory.mktemp("relative") / "model"
    shutil.copytree(tiny_bert_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture()
def recipe(tmp_path, unlisted_dir) -> Path:
    path = tmp_path / "cached.squeeze"
    path.write_text(RECIPE.format(model=unlisted_dir), encoding="utf-8")
    return path


@pytest.fixture()
def resizing(tmp_path, unlisted_dir, sentences_file) -> Path:
    path = tmp_path / "resizing.squeeze"
    path.write_text(RESIZING.format(model=unlisted_dir, data=sentences_file), encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["recipe", "resizing"])
def test_a_cached_plan_equals_a_fresh_one_and_imports_no_torch(which, request, tmp_path):
    recipe = request.getfixturevalue(which)
    cache = tmp_path / "cache"
    first, heavy_first = _plan_json(recipe, cache)
    assert "torch" in heavy_first  # the first plan builds the model on the meta device
    assert (len(list((cache / "meta").glob("*.json"))) == 1) == (which == "recipe")
    assert (cache / "vocab_trim").is_dir() == (which == "resizing")
    second, heavy_second = _plan_json(recipe, cache)
    assert heavy_second == []
    fresh, _ = _plan_json(recipe, "off")
    assert first == second == fresh


def test_a_damaged_entry_is_rebuilt(recipe, tmp_path):
    cache = tmp_path / "cache"
    good, _ = _plan_json(recipe, cache)
    (entry,) = (cache / "meta").glob("*.json")
    for damage in ("", "{not json", json.dumps({"task": "embedding"}), "[1, 2]",
                   json.dumps({"value": {"task": "embedding"}}), json.dumps({"value": [1]})):
        entry.write_text(damage, encoding="utf-8")
        again, heavy = _plan_json(recipe, cache)
        assert again == good
        assert "torch" in heavy
        assert meta_cache.from_json(json.loads(entry.read_text())["value"]).tensors  # rewritten


def test_the_key_follows_every_part_and_the_versions(tiny_bert_dir, monkeypatch):
    config = (tiny_bert_dir / "config.json").read_bytes()
    key = meta_cache.cache_key("meta", "embedding", config)
    assert key == meta_cache.cache_key("meta", "embedding", config)
    assert key != meta_cache.cache_key("meta", "classification", config)
    assert meta_cache.cache_key("ab", "c") != meta_cache.cache_key("a", "bc")  # parts, not their join
    changed = json.loads(config)
    changed["intermediate_size"] += 1
    assert key != meta_cache.cache_key("meta", "embedding", json.dumps(changed).encode())
    monkeypatch.setattr(meta_cache, "_version", lambda package: "0.0-other")
    assert key != meta_cache.cache_key("meta", "embedding", config)


def test_an_unwritable_cache_still_plans(tmp_path, tiny_bert_dir, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(blocked))
    built: list[int] = []

    def build() -> ModelMeta:
        built.append(1)
        from squeezelang.models.meta import ModuleMeta, TensorMeta
        return ModelMeta("embedding", {"a": [1, 2]}, {"m": ModuleMeta("m", "Linear", ["m.weight"])},
                         {"m.weight": TensorMeta((2, 3))})

    meta = meta_cache.cached_meta((tiny_bert_dir / "config.json").read_bytes(), "embedding", build)
    again = meta_cache.cached_meta((tiny_bert_dir / "config.json").read_bytes(), "embedding", build)
    assert meta == again and meta.params() == 6 and len(built) == 2


def test_round_trip_keeps_every_field():
    from squeezelang.models.meta import ModuleMeta, TensorMeta

    meta = ModelMeta("causal-lm", {"n_layer": 2, "id2label": {"0": "x"}},
                     {"h.0": ModuleMeta("h.0", "Conv1D", ["h.0.weight", "h.0.bias"])},
                     {"h.0.weight": TensorMeta((4, 12), "float16", {"quant": {"bits": 4}}),
                      "h.0.bias": TensorMeta((12,))}, states={"quantized"}, notes=["n"])
    assert meta_cache.from_json(json.loads(json.dumps(meta_cache.to_json(meta)))) == meta


def test_off_never_writes(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    meta_cache.cached_meta((tiny_bert_dir / "config.json").read_bytes(), "embedding",
                           lambda: ModelMeta("embedding", {}))
    assert not any(tmp_path.iterdir())
