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
    from squeezelang.executor.usage import high_water_bytes

    own = high_water_bytes()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def test_report_records_the_peak_memory_of_the_run(tmp_path: Path, tiny_bert_dir: Path,
                                                     sentences_file: Path):
    import jsonschema

    before = _peak()
    result = squeezelang.run(_recipe(tmp_path, tiny_bert_dir, sentences_file), output=tmp_path / "out")
    after = _peak()
    used = result.report["resources"]
    # the process's peak so far, read during the run: between the peaks before and after it
    assert isinstance(used["self_max_rss_bytes"], int)
    # (the kernel updates the high-water mark lazily: a reading may lag the current use by a few pages)
    assert before - 1e6 <= used["self_max_rss_bytes"] <= after + 1e6
    assert used["max_rss_bytes"] >= used["self_max_rss_bytes"] > 50e6  # torch alone takes more
    assert used["cpu_seconds"] > 0
    assert used["wall_seconds"] == pytest.approx(result.report["timings"]["total"])
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["resources"] == used
    schema = json.loads((Path(__file__).parents[2] / "specs/schemas/report.schema.json").read_text())
    jsonschema.validate(written, schema)
    assert f"peak memory {used['max_rss_bytes'] / 1e9:.2f} GB (max RSS)" in \
        (tmp_path / "out" / "report.md").read_text()


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="Linux-only: VmHWM, statm")
def test_report_records_the_memory_at_the_end_of_each_phase(tmp_path: Path, tiny_bert_dir: Path,
                                                            sentences_file: Path):
    """Each phase's end: the peak so far (a running maximum, up to the run's peak) and the
    resident memory then (at most the peak), in the order the phases ran."""
    result = squeezelang.run(_recipe(tmp_path, tiny_bert_dir, sentences_file), output=tmp_path / "out")
    used = result.report["resources"]
    phases = ["load", "measure_original", "stage:int8", "checkpoint:int8", "save", "reload",
              "measure_final"]
    peaks, resident = used["phase_max_rss_bytes"], used["phase_rss_bytes"]
    assert list(peaks) == phases and list(resident) == phases
    values = [peaks[p] for p in phases]
    assert all(isinstance(v, int) and v > 50e6 for v in values)
    assert values == sorted(values) and values[-1] <= used["self_max_rss_bytes"]
    # (the high-water mark is updated lazily: a reading may lag the resident size by a few pages)
    assert all(0 < resident[p] <= peaks[p] + 1e6 for p in phases)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resources"] == used


LAUNCHER = """
import os, subprocess, sys
ballast = bytearray(int(sys.argv[1]))  # the launcher's own memory, touched page by page
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(os.environ["ERR"], "wb"))
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux-only: VmHWM")
def test_squeeze_run_reports_its_own_peak_memory(tmp_path: Path, tiny_bert_dir: Path,
                                                 sentences_file: Path):
    """The figure in the report of a ``squeeze run`` is the command's own peak, not that of the
    process that launched it: ``ru_maxrss`` (what ``wait4`` returns) carries a launcher's peak
    across fork and exec, so with a launcher holding 1.5 GB it says at least that, while the
    report gives the run's real peak."""
    recipe = _recipe(tmp_path, tiny_bert_dir, sentences_file)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", ERR=str(tmp_path / "stderr.txt"))
    ballast = 1_500_000_000
    done = subprocess.run([sys.executable, "-c", LAUNCHER, str(ballast), sys.executable, "-m",
                           "squeezelang.cli", "run", str(recipe), "-q", "-o", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, check=True)
    code, maxrss = (int(x) for x in done.stdout.split())
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    inherited = maxrss * KIB
    reported = json.loads((tmp_path / "out" / "report.json").read_text())["resources"]
    assert inherited >= ballast  # the launcher's peak, as the operating system counts it
    assert 100e6 < reported["self_max_rss_bytes"] < ballast * 0.8
    assert reported["max_rss_bytes"] == max(reported["self_max_rss_bytes"],
                                            reported["children_max_rss_bytes"])
