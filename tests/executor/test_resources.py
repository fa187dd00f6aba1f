"""Every run records what it used: peak memory (max RSS) and wall time, in report.json and report.md."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import squeezelang

RECIPE = '''
recipe "tiny-resources"
model = hf("{model}", task = "embedding")
data calib = text("{calib}")
metric faithful = fidelity(calib)
stage int8: quantize {{ scheme = "int8" }}
constraints {{
    faithful >= 0.5
}}
'''

KIB = 1 if sys.platform == "darwin" else 1024  # ru_maxrss unit


def _recipe(tmp_path: Path, model: Path, sentences: Path) -> Path:
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model, calib=sentences), encoding="utf-8")
    return recipe


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def test_report_records_the_peak_memory_of_the_run(tmp_path: Path, tiny_bert_dir: Path,
                                                     sentences_file: Path):
    import jsonschema

    before = _peak()
    result = squeezelang.run(_recipe(tmp_path, tiny_bert_dir, sentences_file), output=tmp_path / "out")
    after = _peak()
    used = result.report["resources"]
    # the process's peak so far, read during the run: between the peaks before and after it
    assert isinstance(used["self_max_rss_bytes"], int)
    assert before <= used["self_max_rss_bytes"] <= after
    assert used["max_rss_bytes"] >= used["self_max_rss_bytes"] > 50e6  # torch alone takes more
    assert used["cpu_seconds"] > 0
    assert used["wall_seconds"] == pytest.approx(result.report["timings"]["total"])
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["resources"] == used
    schema = json.loads((Path(__file__).parents[2] / "specs/schemas/report.schema.json").read_text())
    jsonschema.validate(written, schema)
    assert f"peak memory {used['max_rss_bytes'] / 1e9:.2f} GB (max RSS)" in \
        (tmp_path / "out" / "report.md").read_text()


def test_squeeze_run_reports_its_own_peak_memory(tmp_path: Path, tiny_bert_dir: Path,
                                                 sentences_file: Path):
    """The figure in the report of a ``squeeze run`` is the command's: the operating system's
    count for the finished process (``wait4``) is no smaller, and not much larger (the reports are
    written after the figure is taken)."""
    recipe = _recipe(tmp_path, tiny_bert_dir, sentences_file)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with (tmp_path / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "squeezelang.cli", "run", str(recipe), "-q",
                                 "-o", str(tmp_path / "out")], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    reported = json.loads((tmp_path / "out" / "report.json").read_text())["resources"]["max_rss_bytes"]
    measured = usage.ru_maxrss * KIB
    assert 0.8 * measured <= reported <= measured
