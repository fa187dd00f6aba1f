"""The report as people read it: verdict figures in human units, where the wall time went."""
from __future__ import annotations

from squeezelang.executor.report import fmt_verdict, markdown, time_lines
from squeezelang.planner.constraints import Verdict
from squeezelang.planner.plan import ConstraintPlan

LATENCY = {"dimension": "time", "original": 0.0208360}


def test_a_relative_bound_shows_the_ratio_and_the_values():
    c = ConstraintPlan("latency", False, "<=", 0.8, True, "latency <= 80%")
    v = Verdict("latency <= 80%", "latency", 0.0210233, 0.0166688, False, -0.0043545)
    assert fmt_verdict(v, c, LATENCY) == ("measured 21.02 ms = 100.9% of the original 20.84 ms; "
                                          "bound 16.67 ms = 80.0%")


def test_an_absolute_bound_shows_the_values():
    c = ConstraintPlan("size", False, "<=", 12e6, False, "size <= 12MB")
    v = Verdict("size <= 12MB", "size", 13.5e6, 12e6, False, -1.5e6)
    assert fmt_verdict(v, c, {"dimension": "bytes", "original": 90e6}) == \
        "measured 13.50 MB, bound 12.00 MB"


def test_the_total_includes_the_search_shown_on_its_own_line():
    report = {"trials": [{}] * 12, "timings": {"total": 778.0, "search": 559.0, "load": 1.0,
                                               "save": 0.5}, "resources": {}}
    assert time_lines(report) == ["Search 559.0 s (12 trials), then the final run 219.0 s.", "",
                                  "Total 778.0 s, search included (load 1.0 s, save 0.5 s)."]


def test_a_run_without_search_has_no_search_line():
    report = {"recipe": {"name": "r"}, "status": "met", "model": {"path": "m", "task": "embedding"},
              "output": {"dir": "o", "format": "squeeze"}, "metrics": {}, "stages": [],
              "constraints": [], "trials": [], "timings": {"total": 3.0}, "resources": {}}
    text = markdown(report)
    assert "Search" not in text and text.endswith("Total 3.0 s (load 0.0 s, save 0.0 s).\n")
