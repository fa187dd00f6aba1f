"""Determinism: with a seed, two runs give byte-identical saved models and identical reports apart
from timings.

Each recipe runs twice into sibling output directories: once in this process through the API, once
in a fresh process through the command line (so that nothing cached in a process, such as the global
RNG state or a loaded model, can make the runs agree). Every file of the artifact must be
byte-identical (``model.safetensors``, ``squeeze.json``, ``config.json``, the tokenizer files and the
lock file); ``report.json`` must be identical once ``normalise`` has removed what is measured by the
clock (timings, seconds, latency, the resources used) and the output path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


import squeezelang

CORPUS = ("a man is playing a guitar\nthe cat sits on the mat\na dog runs in the park\n"
          "the bird flies over the river\na child reads a book\nthe quick brown fox jumps\n"
          "people walk on the street\nthe sun is big and the moon is small\n")

BERT = '''recipe "det-bert"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
metric mem = memory()
stage sparse: prune    {{ method = "magnitude", ratio = 0.5 }}
stage heal:   distill  {{ teacher = original, data = calib, steps = 6, batch_size = 4 }}
stage int8:   quantize {{ scheme = "int8" }}
constraints {{
    size <= 60%
    faithful >= 0.5
}}
search {{ seed = 7 }}
'''

GPT2 = '''recipe "det-gpt2"
model = hf("{model}", task = "causal-lm")
data calib = text("calib.txt")
metric ppl = perplexity(calib)
metric faithful = fidelity(calib)
stage sparse: prune   {{ ratio = 0.3 }}
stage heal:   distill {{ teacher = original, data = calib, steps = 6, batch_size = 4 }}
constraints {{
    drop(ppl) <= 50%
}}
search {{ seed = 3 }}
'''

#: Report keys whose values are durations measured by the clock (and ``resources``: the peak
#: memory and CPU time that the operating system counts, which vary from run to run like timings).
CLOCK_KEYS = {"timings", "resources", "seconds", "measure_seconds", "search_seconds", "elapsed"}


def normalise(report: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """``report`` without what the clock decides: timings, per-stage seconds, and the values of
    time-dimension metrics (latency) wherever they appear; the output path replaced by ``<out>``."""
    clocked = {name for name, m in report["metrics"].items() if m.get("dimension") == "time"}
    out = str(output_dir)

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()
                    if k not in CLOCK_KEYS and not k.endswith("_seconds")
                    and not (key == "metrics" and k in clocked)}
        if isinstance(value, list):  # e.g. a verdict on a latency constraint goes with the latency
            return [walk(v) for v in value
                    if not (isinstance(v, dict) and v.get("metric") in clocked)]
        if isinstance(value, str):
            return value.replace(out, "<out>")
        return value

    return walk(report)


def test_normalise_keeps_what_is_deterministic(tmp_path: Path):
    report = {"metrics": {"size": {"dimension": "bytes", "final": 10},
                          "latency": {"dimension": "time", "final": 0.1}},
              "stages": [{"seconds": 1.0, "metrics": {"size": 9, "latency": 0.2}}],
              "constraints": [{"metric": "latency", "value": 0.1}, {"metric": "size", "value": 10}],
              "timings": {"total": 3.0},
              "resources": {"max_rss_bytes": 123456789, "wall_seconds": 3.0},
              "output": {"dir": str(tmp_path / "a")}}
    assert normalise(report, tmp_path / "a") == {
        "metrics": {"size": {"dimension": "bytes", "final": 10}},
        "stages": [{"metrics": {"size": 9}}],
        "constraints": [{"metric": "size", "value": 10}],
        "output": {"dir": "<out>"}}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_twice(tmp_path: Path, model_dir: Path, template: str) -> tuple[Path, Path]:
    """Run the recipe in this process (API) and in a fresh one (CLI); the two output directories."""
    (tmp_path / "calib.txt").write_text(CORPUS, encoding="utf-8")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(template.format(model=model_dir), encoding="utf-8")
    first, second = tmp_path / "run-1", tmp_path / "run-2"
    assert squeezelang.run(recipe, output=first).ok
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "squeezelang.cli", "run", str(recipe), "-q",
                           "-o", str(second)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return first, second


def assert_same_artifacts(first: Path, second: Path, model_files: set[str]) -> None:
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    assert model_files <= set(a)
    different = [name for name in a if name not in ("report.json", "report.md") and a[name] != b[name]]
    assert not different, f"not byte-identical: {different}"
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (first, second))
    assert normalise(ra, first) == normalise(rb, second)


def test_bert_prune_distill_int8_is_deterministic(tmp_path: Path, tiny_bert_dir: Path):
    first, second = run_twice(tmp_path, tiny_bert_dir, BERT)
    assert_same_artifacts(first, second, {
        "model.safetensors", "squeeze.json", "config.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.txt", "modules.json", "1_Pooling/config.json", "recipe.lock.squeeze"})


def test_gpt2_prune_distill_is_deterministic(tmp_path: Path, tiny_gpt2_dir: Path):
    first, second = run_twice(tmp_path, tiny_gpt2_dir, GPT2)
    assert_same_artifacts(first, second, {
        "model.safetensors", "squeeze.json", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json", "recipe.lock.squeeze"})


def test_the_seed_decides_the_distilled_weights(tmp_path: Path, tiny_bert_dir: Path):
    """The seed is what makes runs agree: it reaches the stages (another seed distils other
    weights), so the agreement above is not merely the absence of randomness."""
    (tmp_path / "calib.txt").write_text(CORPUS, encoding="utf-8")
    weights = []
    for seed in (7, 8):
        recipe = tmp_path / f"r{seed}.squeeze"
        recipe.write_text(BERT.format(model=tiny_bert_dir).replace("seed = 7", f"seed = {seed}"),
                          encoding="utf-8")
        squeezelang.run(recipe, output=tmp_path / f"out-{seed}")
        weights.append((tmp_path / f"out-{seed}" / "model.safetensors").read_bytes())
    assert weights[0] != weights[1]
