"""search.png: the Pareto front, constraint levels, the PNG itself, and runs without matplotlib."""
from __future__ import annotations

import copy
import json
import math
import struct
import sys
from pathlib import Path

import pytest

from squeezelang.executor.plot import (constraint_level, pareto_front, quality_metrics, scatter_png,
                                       write_search_plot)
from squeezelang.executor.report import _plot_search, chosen_trial, markdown
from squeezelang.planner.constraints import evaluate
from squeezelang.planner.plan import ConstraintPlan, MetricPlan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG file (which must start with it)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def trial(ratio: float, size: float, faithful: float, ok: bool, seconds: float = 0.1) -> dict:
    return {"levels": {"sparse.ratio": ratio}, "values": {"sparse": {"ratio": ratio}},
            "predicted_size": int(size) - 40,
            "metrics": {"faithful": faithful, "latency": 0.0006, "params": 24032.0, "size": size},
            "verdicts": {"drop(faithful) <= 0.01%": ok, "size <= 90%": size <= 90675.0},
            "feasible": ok and size <= 90675.0, "seconds": seconds}


# The shape of a real run's report.json (tiny BERT, prune ratio = auto(0.05 .. 0.95), random search).
REPORT = {
    "report_version": 1,
    "recipe": {"name": "r", "file": "/tmp/r.squeeze"},
    "status": "met",
    "model": {"source": "hf", "task": "embedding", "path": "/tmp/tiny-bert"},
    "output": {"dir": "/tmp/out", "format": "squeeze", "files": ["config.json", "model.safetensors"]},
    "metrics": {
        "faithful": {"kind": "fidelity", "data": "calib", "dimension": "score", "higher_is_better": True,
                     "original": 1.0, "final": 0.99992519, "ratio": 0.99992519, "drop": 7.481e-05},
        "latency": {"kind": "latency", "data": None, "dimension": "time", "higher_is_better": False,
                    "original": 0.00063, "final": 0.00067, "ratio": 1.05, "drop": 0.00004},
        "params": {"kind": "params", "data": None, "dimension": "count", "higher_is_better": False,
                   "original": 24032.0, "final": 24032.0, "ratio": 1.0, "drop": 0.0},
        "size": {"kind": "size", "data": None, "dimension": "bytes", "higher_is_better": False,
                 "original": 100750.0, "final": 63478.0, "ratio": 0.63, "drop": -37272.0},
    },
    "stages": [{"name": "sparse", "technique": "prune", "plugin": "squeezelang_plugins.prune",
                "method": "magnitude", "params": {"method": "magnitude", "ratio": 0.636434},
                "solved": {"ratio": 0.636434}, "metrics": {}, "seconds": 0.01, "measure_seconds": 0.0}],
    "constraints": [
        {"constraint": "drop(faithful) <= 0.01%", "metric": "faithful", "value": 7.481e-05,
         "bound": 0.0001, "met": True, "margin": 2.519e-05},
        {"constraint": "size <= 90%", "metric": "size", "value": 63478.0, "bound": 90675.0,
         "met": True, "margin": 27197.0},
    ],
    "trials": [
        trial(0.81269, 51942.0, 0.99986243, False),
        trial(0.279562, 86870.0, 0.99999463, True),
        trial(0.495892, 72678.0, 0.99996421, True),
        trial(0.636434, 63478.0, 0.99992519, True),
        trial(0.759851, 55398.0, 0.99988535, False),
    ],
    "composition": None,
    "resumed_after": None,
    "timings": {"total": 1.0, "load": 0.1, "save": 0.1, "search": 0.8},
    "environment": {},
}


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize("xs, ys, higher_is_better, front", [
    # higher is better: quality must rise as size rises
    ([3, 1, 2, 4], [0.9, 0.5, 0.7, 0.8], True, [1, 2, 0]),
    # the same points, lower is better: only the smallest is undominated … until one is lower still
    ([3, 1, 2, 4], [0.9, 0.5, 0.7, 0.8], False, [1]),
    ([1, 2, 3], [30.0, 25.0, 27.0], False, [0, 1]),
    # equal sizes: the better quality of the two; exact duplicates: the first
    ([1, 1, 2], [0.5, 0.6, 0.7], True, [1, 2]),
    ([1, 1], [0.5, 0.5], True, [0]),
    # missing or non-finite points take no part
    ([1, None, 2, 3], [0.5, 0.9, float("nan"), 0.6], True, [0, 3]),
    ([], [], True, []),
])
def test_pareto_front(xs, ys, higher_is_better, front):
    assert pareto_front(xs, ys, higher_is_better) == front


def _metric_json(name: str, hib: bool, original: float) -> dict:
    return {"kind": name, "dimension": "score", "higher_is_better": hib, "original": original}


@pytest.mark.parametrize("metric, hib, drop, op, bound, relative, original, level", [
    ("faithful", True, False, ">=", 0.9, False, 1.0, 0.9),         # faithful >= 0.9
    ("faithful", True, True, "<=", 0.02, False, 0.8, 0.78),        # drop(faithful) <= 0.02
    ("faithful", True, True, "<=", 0.05, True, 0.8, 0.76),         # drop(faithful) <= 5%
    ("ppl", False, True, "<=", 0.5, True, 20.0, 30.0),             # drop(ppl) <= 50%: a rise
    ("ppl", False, True, "<", 2.0, False, 20.0, 22.0),             # drop(ppl) < 2
    ("ppl", False, False, "<=", 1.25, True, 20.0, 25.0),           # ppl <= 125%
    ("size", False, False, "<=", 0.9, True, 100750.0, 90675.0),    # size <= 90%
])
def test_constraint_level_is_where_the_verdict_flips(metric, hib, drop, op, bound, relative, original,
                                                     level):
    c = ConstraintPlan(metric, drop, op, bound, relative, "text")
    m = MetricPlan(metric, metric, None, {}, "score", hib)
    entry = evaluate(c, m, original, original).to_json()  # as report.json stores it
    got = constraint_level(entry, _metric_json(metric, hib, original))
    assert got == pytest.approx(level)
    # the planner's own verdict changes exactly there
    assert evaluate(c, m, original, got).margin == pytest.approx(0.0, abs=1e-9)
    worse = got + (-1e-6 if hib else 1e-6) * max(1.0, abs(got))
    assert not evaluate(c, m, original, worse).met


def test_quality_metrics_prefers_constrained_scores():
    report = copy.deepcopy(REPORT)
    assert quality_metrics(report) == ["faithful"]
    report["constraints"].insert(0, {"constraint": "latency < 1ms", "metric": "latency", "value": 0.0006,
                                     "bound": 0.001, "met": True, "margin": 0.0004})
    assert quality_metrics(report) == ["faithful", "latency"]  # scores first, size-type never
    report["constraints"] = [c for c in report["constraints"] if c["metric"] == "size"]
    assert quality_metrics(report) == ["faithful"]  # unconstrained, but a score
    del report["metrics"]["faithful"]
    assert quality_metrics(report) == []


def test_chosen_trial_is_the_one_the_final_run_used():
    assert chosen_trial(REPORT) == 3
    report = copy.deepcopy(REPORT)
    report["stages"][0]["solved"] = {"ratio": 0.5}
    assert chosen_trial(report) is None


def test_trials_table_shows_values_metrics_and_verdicts():
    report = copy.deepcopy(REPORT)
    report["plots"] = ["search.png"]
    text = markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| # |"))
    for column in ("sparse.ratio", "faithful", "latency", "params", "size", "predicted size",
                   "`drop(faithful) <= 0.01%`", "`size <= 90%`", "feasible"):
        assert column in header
    assert "| **4** (chosen) | 0.636434 | 0.9999 |" in text
    assert "**not met**" in text
    assert "![saved size against quality for every trial](search.png)" in text


# ---------------------------------------------------------------- drawing
@pytest.fixture()
def mpl():
    return pytest.importorskip("matplotlib")


def test_search_png_is_a_valid_deterministic_png(tmp_path, mpl):
    path = write_search_plot(REPORT, tmp_path)
    assert path == tmp_path / "search.png"
    assert png_size(path) == (700, 500)  # one panel: 7 x 5 inches at 100 dpi
    first = path.read_bytes()
    assert b"tEXt" not in first and b"iTXt" not in first  # no version or date embedded
    assert write_search_plot(copy.deepcopy(REPORT), tmp_path).read_bytes() == first
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed into place
    image = pytest.importorskip("PIL.Image")
    with image.open(path) as im:
        im.verify()


def _variants() -> dict[str, dict]:
    two = copy.deepcopy(REPORT)
    two["metrics"]["ppl"] = {"kind": "perplexity", "data": "calib", "dimension": "score",
                             "higher_is_better": False, "original": 20.0, "final": 24.0}
    two["constraints"].append({"constraint": "drop(ppl) <= 50%", "metric": "ppl", "value": 4.0,
                               "bound": 10.0, "met": True, "margin": 6.0})
    for i, t in enumerate(two["trials"]):
        t["metrics"]["ppl"] = 20.0 + i
    knobs_only = copy.deepcopy(REPORT)
    del knobs_only["metrics"]["faithful"]
    knobs_only["constraints"] = knobs_only["constraints"][1:]
    no_size = copy.deepcopy(REPORT)
    del no_size["metrics"]["size"]
    no_size["constraints"] = no_size["constraints"][:1]
    broken = copy.deepcopy(REPORT)
    broken["trials"][0].update(metrics={}, feasible=False, error="RuntimeError: out of memory")
    broken["trials"][1]["metrics"]["faithful"] = None
    broken["trials"][2]["metrics"]["faithful"] = float("nan")
    nothing = copy.deepcopy(REPORT)
    nothing["metrics"] = {"params": REPORT["metrics"]["params"]}
    nothing["constraints"] = []
    for t in nothing["trials"]:
        t["values"] = {}
    one = copy.deepcopy(REPORT)
    one["trials"] = one["trials"][3:4]
    return {"two quality metrics": two, "no quality metric": knobs_only, "no size metric": no_size,
            "failed and missing values": broken, "nothing to plot but trials": nothing, "one trial": one}


@pytest.mark.parametrize("name", list(_variants()))
def test_odd_reports_still_draw(tmp_path, mpl, name):
    report = _variants()[name]
    width, height = png_size(write_search_plot(report, tmp_path))
    two_panels = name == "two quality metrics"  # side by side
    assert (width, height) == ((1400, 500) if two_panels else (700, 500))


def test_no_trials_no_plot(tmp_path):
    assert write_search_plot(dict(REPORT, trials=[]), tmp_path) is None
    assert not (tmp_path / "search.png").exists()


def test_without_matplotlib_a_note_and_no_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report = copy.deepcopy(REPORT)
    assert write_search_plot(report, tmp_path) is None
    report["plots"] = []
    note = _plot_search(report, tmp_path)
    assert "squeezelang[plot]" in note and report["plots"] == []
    assert not (tmp_path / "search.png").exists()
    text = markdown(report, note)
    assert note in text and "](search.png)" not in text
    assert scatter_png([{"x": 1, "y": 2}], "x", "y", tmp_path / "s.png") is None


def test_a_failing_plot_costs_a_note_not_the_run(tmp_path, monkeypatch):
    import squeezelang.executor.plot as plot

    def boom(report, out_dir):
        raise ValueError("bad axis")

    monkeypatch.setattr(plot, "write_search_plot", boom)
    report = copy.deepcopy(REPORT)
    report["plots"] = []
    assert _plot_search(report, tmp_path) == "_search.png could not be drawn: ValueError: bad axis_"
    assert report["plots"] == []


def test_scatter_png(tmp_path, mpl):
    rows = [{"name": "int8", "technique": "quantize", "mb": 23.0, "score": 0.98},
            {"name": "int4", "technique": "quantize", "mb": 12.5, "score": 0.93},
            {"name": "prune 50%", "technique": "prune", "mb": 45.0, "score": 0.95},
            {"name": "no score", "technique": "prune", "mb": 40.0, "score": None}]
    path = scatter_png(rows, "mb", "score", tmp_path / "bench.png", label="name", group="technique",
                       front="higher", title="size against quality", xlabel="MB")
    assert png_size(path) == (700, 500)
    with pytest.raises(ValueError, match="front"):
        scatter_png(rows, "mb", "score", tmp_path / "x.png", front="up")


# ---------------------------------------------------------------- through a real run
def test_a_search_run_writes_and_lists_search_png(tmp_path, tiny_bert_dir, sentences_file, mpl):
    import squeezelang

    (tmp_path / "calib.txt").write_text(sentences_file.read_text())
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''
model = hf("{tiny_bert_dir}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = auto(0.05 .. 0.95) }}
constraints {{ drop(faithful) <= 0.01%, size <= 90% }}
search {{ strategy = "grid", trials = 3 }}
''')
    result = squeezelang.run(recipe, output=tmp_path / "out")
    out = tmp_path / "out"
    assert png_size(out / "search.png") == (700, 500)
    report = json.loads((out / "report.json").read_text())
    assert report["plots"] == ["search.png"] == result.report["plots"]
    assert "](search.png)" in (out / "report.md").read_text()
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[2] / "specs/schemas/report.schema.json").read_text())
    jsonschema.validate(report, schema)
    # what the plot reads is there: a size and a quality value per trial, levels for the bounds
    assert all(math.isfinite(t["metrics"]["size"]) and "faithful" in t["metrics"] for t in report["trials"])
    assert quality_metrics(report) == ["faithful"]
    assert constraint_level(report["constraints"][0], report["metrics"]["faithful"]) == \
        pytest.approx(report["metrics"]["faithful"]["original"] * (1 - 1e-4))
