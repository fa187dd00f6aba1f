"""Scale: peak memory and wall time of ``squeeze run`` against model size, on Llama-family models
with random weights built from configs of about 0.1B, 0.5B and 1.1B parameters (random weights are
enough for memory and time; no quality is judged).

Every run is offloaded (``offload = true``: weights read from the files one block at a time,
``models.offload``), as a model larger than memory would be run. Each model is built once in a
child process (bfloat16, as Llama checkpoints ship) and cached under
``benchmarks/cache/scale/<name>`` with a character tokenizer. Three recipes run on each, each in a
fresh ``squeeze run`` process whose peak RSS the operating system reports (``wait4``; the benchmark
process itself stays small: it never imports torch):

- ``int8``: ``quantize { scheme = "int8" }`` (round to nearest, per channel);
- ``int4-gptq``: ``quantize { scheme = "int4", method = "gptq", group_size = 128 }`` on 32
  calibration texts;
- ``depth``: ``prune { method = "depth", ratio = 0.25 }`` on the same texts.

The recipes declare no metric besides the implicit ones (size, params, latency at batch 1 and 64
tokens); the report's phases split the wall time, and its memory at the end of each phase (the
peak so far and the resident size then: ``phase_max_rss_bytes``, ``phase_rss_bytes``) is kept in
each row and printed below the table. Targets: the 1.1B model compressed with int4
GPTQ in a peak RSS of at most 30% of its float32 size plus 1 GB, and wall time growing linearly
with parameters (seconds per parameter of the largest model at most ``LINEAR_SLACK`` times the
0.5B model's). ``--only`` takes row names (``int8 0.1B``) or a size (``0.5B``).
Writes ``benchmarks/results/scale.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.rows import save_and_print
from benchmarks.targets import Target, report

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "scale"
RESULTS = ROOT / "benchmarks" / "results"
KIB = 1 if sys.platform == "darwin" else 1024

#: Llama configurations (vocabulary 32,000, untied head, grouped-query attention).
SIZES: dict[str, dict[str, int]] = {
    "0.1B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4},
    "0.5B": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16,
             "num_attention_heads": 12, "num_key_value_heads": 4},
    "1.1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4},  # TinyLlama-1.1B's shape
}
#: A size small enough for the tests to build and run in seconds.
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
VOCAB, CONTEXT = 32000, 2048
STAGES = {
    "int8": 'quantize { scheme = "int8" }',
    "int4-gptq": 'quantize { scheme = "int4", method = "gptq", group_size = 128, data = calib }',
    "depth": 'prune { method = "depth", ratio = 0.25, data = calib }',
}
CALIB_TEXTS = 32
RSS_SHARE, RSS_EXTRA = 0.30, 1e9
LINEAR_SLACK = 1.3

BUILD = r"""
import json, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from benchmarks.charlm import build_tokenizer

shape, out = json.loads(sys.argv[1]), Path(sys.argv[2])
config = LlamaConfig(vocab_size=int(sys.argv[3]), max_position_embeddings=int(sys.argv[4]),
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **shape)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
model = LlamaForCausalLM(config).eval()
model.save_pretrained(str(out), safe_serialization=True)
chars = [chr(c) for c in range(32, 127)]
build_tokenizer(chars, int(sys.argv[4])).save_pretrained(str(out))
print(sum(p.numel() for p in model.parameters()))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["SQUEEZE_CACHE_DIR"] = "off"  # every run measures what it measures, nothing cached
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed(argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` from the repository root: wall seconds, peak RSS, exit code, output tail."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        out.seek(0)
        return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
                "max_rss_bytes": usage.ru_maxrss * KIB,
                "output": out.read().decode(errors="replace")[-1500:]}


def model_dir(name: str, shape: dict[str, int]) -> tuple[Path, int]:
    """The cached random model of ``shape`` (built on first use) and its parameter count."""
    directory = CACHE / name
    done = directory / "params.json"
    key = json.dumps({"shape": shape, "vocab": VOCAB, "context": CONTEXT}, sort_keys=True)
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return directory, int(json.loads(done.read_text())["params"])
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    built = timed([sys.executable, "-c", BUILD, json.dumps(shape), str(directory), str(VOCAB),
                   str(CONTEXT)])
    if built["rc"] != 0:
        raise RuntimeError(f"building the {name} model failed: {built['output']}")
    params = int(built["output"].strip().splitlines()[-1])
    done.write_text(json.dumps({"key": key, "params": params}))
    return directory, params


def calibration(directory: Path) -> Path:
    """``CALIB_TEXTS`` lines of pseudo-text (about 200 characters each) beside the model."""
    import random

    rng = random.Random(0)
    words = ["the", "model", "of", "a", "run", "weights", "layer", "compress", "token", "and",
             "memory", "time", "block", "quantize", "prune", "scale", "data", "in", "to", "is"]
    path = directory / "calib.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40))
                              for _ in range(CALIB_TEXTS)) + "\n")
    return path


def recipe(directory: Path, stage: str, out: Path) -> Path:
    path = directory / f"{out.name}.squeeze"
    path.write_text(f'model = hf("{directory}", task = "causal-lm", offload = true)\n'
                    f'data calib = text("{calibration(directory)}")\n'
                    "metric latency = latency(seq = 64, repeats = 3)\n"
                    f"stage s: {stage}\noutput \"{out}\"\n")
    return path


def run_row(size: str, shape: dict[str, int], technique: str) -> dict[str, Any]:
    """One ``squeeze run`` of ``technique`` on the ``size`` model, in a fresh process."""
    name = f"{technique} {size}"
    directory, params = model_dir(size, shape)
    out = RESULTS / "scale" / name.replace(" ", "-")
    squeeze = Path(sys.executable).with_name("squeeze")
    argv = ([str(squeeze)] if squeeze.is_file() else [sys.executable, "-m", "squeezelang.cli"]) + [
        "run", str(recipe(directory, STAGES[technique], out)), "--force", "-q"]
    done = timed(argv)
    row: dict[str, Any] = {"name": name, "size": size, "technique": technique, "params": params,
                           "fp32_bytes": 4 * params, "wall_s": done["wall_s"],
                           "max_rss_bytes": done["max_rss_bytes"]}
    if done["rc"] not in (0, 1):
        row["error"] = f"exit {done['rc']}: {done['output'].strip()[-600:]}"
        return row
    rep = json.loads((out / "report.json").read_text())
    used = rep.get("resources") or {}
    row.update({"timings": rep["timings"], "stage_s": sum(s["seconds"] for s in rep["stages"]),
                "engine_max_rss_bytes": used.get("max_rss_bytes"),
                "phase_max_rss_bytes": used.get("phase_max_rss_bytes") or {},
                "phase_rss_bytes": used.get("phase_rss_bytes") or {},
                "final_size_bytes": rep["metrics"]["size"]["final"],
                "original_size_bytes": rep["metrics"]["size"]["original"]})
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':16s} {'params':>8s} {'fp32 GB':>8s} {'wall s':>7s} {'stage s':>8s} "
             f"{'peak GB':>8s} {'peak/fp32':>9s} {'size':>7s}"]
    for r in rows:
        lines.append(f"{r['name']:16s} {r['params'] / 1e9:7.2f}B {r['fp32_bytes'] / 1e9:8.2f} "
                     f"{r['wall_s']:7.1f} {r['stage_s']:8.1f} {r['max_rss_bytes'] / 1e9:8.2f} "
                     f"{r['max_rss_bytes'] / r['fp32_bytes']:9.2f} "
                     f"{r['final_size_bytes'] / r['original_size_bytes']:7.1%}")
    lines.append("(peak = the run's peak RSS as the operating system counts it; size = saved "
                 "size over the bfloat16 original's)")
    return "\n".join(lines + phase_table(rows))


def phase_table(rows: list[dict[str, Any]]) -> list[str]:
    """The engine's memory as each phase of a row's run ended: the peak so far / resident then."""
    rows = [r for r in rows if r.get("phase_max_rss_bytes")]
    if not rows:
        return []
    phases = list(dict.fromkeys(p for r in rows for p in r["phase_max_rss_bytes"]))
    lines = ["", "GB at the end of each phase (peak so far / resident then):",
             f"{'row':16s} " + " ".join(f"{p:>17s}" for p in phases)]
    for r in rows:
        peaks, now = r["phase_max_rss_bytes"], r.get("phase_rss_bytes") or {}
        lines.append(f"{r['name']:16s} " + " ".join(
            f"{_gb(peaks[p]) + ' / ' + _gb(now.get(p)) if p in peaks else '':>17s}" for p in phases))
    return lines


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def targets(rows: list[dict[str, Any]]) -> list[Target]:
    got = {r["name"]: r for r in rows if "error" not in r}
    out = []
    name = (f"int4 GPTQ of the 1.1B model: peak RSS <= {RSS_SHARE:.0%} of its float32 size + "
            f"{RSS_EXTRA / 1e9:g} GB")
    r = got.get("int4-gptq 1.1B")
    if r is None:
        out.append(Target(name, None, "the row did not run"))
    else:
        bound = RSS_SHARE * r["fp32_bytes"] + RSS_EXTRA
        out.append(Target(name, r["max_rss_bytes"] <= bound,
                          f"{r['max_rss_bytes'] / 1e9:.2f} GB against {bound / 1e9:.2f} GB "
                          f"({r['max_rss_bytes'] / r['fp32_bytes']:.2f}x float32)"))
    for technique in STAGES:
        name = (f"{technique}: seconds per parameter at 1.1B <= {LINEAR_SLACK:g}x those at 0.5B "
                "(linear in parameters)")
        big, mid = got.get(f"{technique} 1.1B"), got.get(f"{technique} 0.5B")
        if big is None or mid is None:
            out.append(Target(name, None, "a row did not run"))
            continue
        ratio = (big["wall_s"] / big["params"]) / (mid["wall_s"] / mid["params"])
        out.append(Target(name, ratio <= LINEAR_SLACK,
                          f"x{ratio:.2f} ({big['wall_s']:.0f} s at {big['params'] / 1e9:.2f}B, "
                          f"{mid['wall_s']:.0f} s at {mid['params'] / 1e9:.2f}B)"))
    return out


def main(only: list[str] | None = None) -> int:
    sizes = {"smoke": SMOKE} if os.environ.get("SQUEEZE_BENCH_SMOKE") else SIZES
    rows = []
    for size, shape in sizes.items():
        for technique in STAGES:
            name = f"{technique} {size}"
            if only and name not in only and size not in only and technique not in only:
                continue
            print(f"{name} …", flush=True)
            try:
                rows.append(run_row(size, shape, technique))
            except Exception as exc:  # one broken row must not hide the others
                rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    path = RESULTS / ("scale-smoke.json" if "smoke" in sizes else "scale.json")
    goals = targets(rows if not only or not path.is_file() else
                    [r for r in json.loads(path.read_text()) if r.get("name") != "targets"
                     and r["name"] not in {x["name"] for x in rows}] + rows)
    save_and_print(path, rows + [{"name": "targets", "targets": [vars(t) for t in goals]}], only,
                   lambda rs: table([r for r in rs if r.get("name") != "targets"]))
    report(goals)
    return 0
