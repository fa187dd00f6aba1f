"""``report.json``, ``report.md`` and ``recipe.lock.squeeze``: what a run measured and decided."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from squeezelang.executor.artifacts import write_json, write_text
from squeezelang.hooks.registry import Registries
from squeezelang.lang.units import fmt_value
from squeezelang.planner.constraints import Verdict
from squeezelang.planner.plan import ConstraintPlan, Plan

REPORT_VERSION = 1
SEARCH_PNG = "search.png"


def _device(plan: Plan) -> str:
    """The device type the run computed on (``auto`` resolved)."""
    from squeezelang.models.placement import resolve_device

    return resolve_device(plan.model.device)


def build_report(plan: Plan, registries: Registries, original: dict[str, float],
                 stages: list[dict[str, Any]], final: dict[str, float], verdicts: list[Verdict],
                 files: list[str], timings: dict[str, float], trials: list[dict[str, Any]],
                 resumed_after: str | None, composition: dict[str, Any] | None = None,
                 resources: dict[str, Any] | None = None,
                 paired: dict[str, dict[str, Any]] | None = None,
                 runtime: str | None = None,
                 notes: dict[str, list[str]] | None = None) -> dict[str, Any]:
    import torch
    import transformers

    import squeezelang

    metrics = {}
    for m in plan.metrics:
        o, f = original[m.name], final[m.name]
        metrics[m.name] = {
            "kind": m.kind, "data": m.data, "dimension": m.dimension,
            "higher_is_better": m.higher_is_better, "original": o, "final": f,
            "ratio": (f / o) if o else None,
            "drop": (o - f) if m.higher_is_better else (f - o),
        }
        if paired and m.name in paired:  # measured side by side: the figures alone, for reference
            metrics[m.name]["paired"] = paired[m.name]
        if notes and notes.get(m.name):  # what the metric said measuring the saved artifact
            metrics[m.name]["notes"] = list(notes[m.name])
    return {
        "report_version": REPORT_VERSION,
        "recipe": {"name": plan.name, "file": plan.recipe_file},
        "status": "met" if all(v.met for v in verdicts) else "not met",
        "model": {"source": plan.model.source, "task": plan.model.task,
                  "path": plan.model.args.get("path"), "device": _device(plan),
                  "dtype": plan.model.dtype, "offload": plan.model.offload},
        "output": {"dir": plan.output_dir, "format": plan.output_format,
                   "options": dict(plan.output_options),
                   "runtime": runtime or registries.output_formats.get(plan.output_format).runtime,
                   "files": sorted(files)},
        "metrics": metrics,
        "stages": [
            {"name": s.name, "technique": s.technique, "plugin": s.plugin, "method": s.method,
             "params": s.params, "solved": {k: s.params[k] for k in s.autos},
             "metrics": rec["metrics"], "seconds": rec["seconds"],
             "measure_seconds": rec.get("measure_seconds"), "log": rec.get("log", [])}
            for s, rec in zip(plan.stages, stages)
        ],
        "constraints": [v.to_json() for v in verdicts],
        "trials": trials,
        "composition": composition,
        "resumed_after": resumed_after,
        "timings": timings,
        "resources": resources or {},
        "environment": {"squeezelang": squeezelang.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }


# ---------------------------------------------------------------- human-readable
_UNITS = {"bytes": "B", "time": "s", "count": "", "score": ""}


def fmt_verdict(verdict: Verdict, constraint: ConstraintPlan, metric: dict[str, Any]) -> str:
    """A verdict's figures in the metric's unit (``metric``: its entry in the report); against a
    relative bound, each also as a share of the original, e.g. "measured 21.02 ms = 105.1% of the
    original 20.00 ms; bound 16.00 ms = 80.0%"."""
    dim, original = metric["dimension"], metric["original"]
    measured, bound = fmt_value(verdict.value, dim), fmt_value(verdict.bound, dim)
    if constraint.relative and original:
        return (f"measured {measured} = {verdict.value / abs(original):.1%} of the original "
                f"{fmt_value(original, dim)}; bound {bound} = {constraint.bound:.1%}")
    return f"measured {measured}, bound {bound}"


def chosen_trial(report: dict[str, Any]) -> int | None:
    """The index of the trial whose pipeline and knob values the final run used, if any."""
    solved = {s["name"]: s["solved"] for s in report["stages"] if s.get("solved")}
    pipeline = (report.get("composition") or {}).get("chosen")
    for i, trial in enumerate(report["trials"]):
        if (trial.get("values") or {}) == solved and trial.get("pipeline") == pipeline:
            return i
    return None


def trials_table(report: dict[str, Any]) -> list[str]:
    """The search trials as Markdown table rows: knob values, every metric, every verdict."""
    trials = report["trials"]
    knobs = list(dict.fromkeys((stage, k) for t in trials
                                for stage, vals in (t.get("values") or {}).items() for k in vals))
    metrics = report["metrics"]
    verdicts = list(dict.fromkeys(c for t in trials for c in t.get("verdicts", {})))
    pipelines = any("pipeline" in t for t in trials)
    head = (["pipeline"] * pipelines + [f"{stage}.{k}" for stage, k in knobs] + list(metrics)
            + ["predicted size"] + [f"`{c}`" for c in verdicts] + ["feasible", "seconds"])
    rows = ["| # | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    chosen = chosen_trial(report)
    for i, t in enumerate(trials):
        number = f"**{i + 1}** (chosen)" if i == chosen else str(i + 1)
        values = [(t.get("values") or {}).get(stage, {}).get(k) for stage, k in knobs]
        cells = ([_cell(t.get("pipeline", "—"))] * pipelines
                 + [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values]
                 + [fmt_value((t.get("metrics") or {}).get(n), m["dimension"]) for n, m in metrics.items()]
                 + [fmt_value(t.get("predicted_size"), "bytes")]
                 + [{True: "met", False: "**not met**"}.get(t.get("verdicts", {}).get(c), "—")
                    for c in verdicts]
                 + [_cell(f"failed: {t['error']}") if t.get("error")
                    else "yes" if t.get("feasible") else "no", f"{t.get('seconds', 0):.1f}"])
        rows.append(f"| {number} | " + " | ".join(cells) + " |")
    return rows


def _cell(text: Any) -> str:
    """``text`` fit for one Markdown table cell: its first line, pipes escaped."""
    return (str(text).splitlines() or [""])[0].replace("|", "\\|")


def markdown(report: dict[str, Any], plot_note: str | None = None) -> str:
    """The report as Markdown: metrics, stages, constraints, trials (``plot_note`` under them)."""
    lines = [f"# squeeze report: {report['recipe']['name']}", ""]
    status = report["status"]
    lines.append(f"**Constraints: {'all met' if status == 'met' else 'NOT MET'}** · "
                 f"model `{report['model']['path']}` ({report['model']['task']}) · "
                 f"output `{report['output']['dir']}` ({report['output']['format']}"
                 + (f", run by {report['output']['runtime']}" if report['output'].get('runtime', 'torch') != 'torch' else "")
                 + ")")
    if report.get("resumed_after"):
        lines.append(f"Resumed after stage '{report['resumed_after']}'.")
    lines += ["", "## Metrics (final = measured on the saved, reloaded artifact)", "",
              "| metric | original | final | final / original | drop |", "| --- | --- | --- | --- | --- |"]
    for name, m in report["metrics"].items():
        ratio = f"{m['ratio'] * 100:.1f}%" if m["ratio"] is not None else "—"
        drop = fmt_value(m["drop"], m["dimension"]) if m["dimension"] == "score" else "—"
        lines.append(f"| {name} | {fmt_value(m['original'], m['dimension'])} | "
                     f"{fmt_value(m['final'], m['dimension'])} | {ratio} | {drop} |")
    for name, m in report["metrics"].items():
        for note in m.get("notes", []):
            lines.append(f"\n{name}: {note}")
    for name, m in report["metrics"].items():
        if "paired" in m:
            pair = m["paired"]
            lines.append(f"\n{name}: the original and the saved artifact measured side by side "
                         f"({pair['rounds']} alternating calls each, medians); measured alone, the "
                         f"original gave {fmt_value(pair['original_at_start'], m['dimension'])} at "
                         f"the start of the run and the artifact "
                         f"{fmt_value(pair['final_alone'], m['dimension'])}.")
    if report["stages"]:
        names = list(report["metrics"])
        lines += ["", "## After each stage", "",
                  "| stage | technique | seconds | " + " | ".join(names) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for s in report["stages"]:
            tech = s["technique"] + (f" ({s['method']})" if s["method"] else "")
            vals = [fmt_value(s["metrics"].get(n), report["metrics"][n]["dimension"]) for n in names]
            lines.append(f"| {s['name']} | {tech} | {s['seconds']:.1f} | " + " | ".join(vals) + " |")
        unmeasured = [n for n in names if all(n not in s["metrics"] for s in report["stages"])]
        if unmeasured:
            lines += ["", "— : not measured after each stage (" + ", ".join(unmeasured) + "); "
                      "a metric is measured there when it needs no forward pass or the recipe "
                      "asks for it: `metric q = kind(data, each_stage = true)`."]
        notes = [f"- {s['name']}: {message}" for s in report["stages"] for message in s.get("log", [])]
        if notes:
            lines += ["", "Stage log:", ""] + notes
    composition = report.get("composition")
    if composition:
        lines += ["", "## Composition", "",
                  f"Chosen pipeline: **{composition['chosen']}** (from `compose {{ … }}`; the "
                  "pipelines the estimates allow were tried in this order).", "",
                  "| pipeline | risk | smallest predicted size | reachable |", "| --- | --- | --- | --- |"]
        for p in composition["considered"]:
            reach = "yes" if not p["unreachable"] else "no: " + "; ".join(p["unreachable"])
            lines.append(f"| {p['pipeline']} | {p['risk']:g} | {fmt_value(p['best_size'], 'bytes')} | "
                         f"{reach} |")
        if composition.get("skipped"):
            lines += [""] + [f"- {note}" for note in composition["skipped"]]
    if report["constraints"]:
        lines += ["", "## Constraints", "", "| constraint | measured | bound | verdict |",
                  "| --- | --- | --- | --- |"]
        for c in report["constraints"]:
            dim = report["metrics"][c["metric"]]["dimension"]
            verdict = "met" if c["met"] else f"**NOT MET** (off by {fmt_value(-c['margin'], dim)})"
            lines.append(f"| `{c['constraint']}` | {fmt_value(c['value'], dim)} | "
                         f"{fmt_value(c['bound'], dim)} | {verdict} |")
    if report["trials"]:
        lines += ["", "## Search trials", ""] + trials_table(report)
        if SEARCH_PNG in report.get("plots", ()):
            lines += ["", f"![saved size against quality for every trial]({SEARCH_PNG})"]
        if plot_note:
            lines += ["", plot_note]
    return "\n".join(lines + [""] + time_lines(report)) + "\n"


def time_lines(report: dict[str, Any]) -> list[str]:
    """Where the run's wall time went: the search (if any) on its own line, then the total."""
    t = report["timings"]
    peak = (report.get("resources") or {}).get("max_rss_bytes")
    lines = []
    if "search" in t:
        n = len(report["trials"])
        lines += [f"Search {t['search']:.1f} s ({n} trial{'s' if n != 1 else ''}), then the final "
                  f"run {t.get('total', 0) - t['search']:.1f} s.", ""]
    lines.append(f"Total {t.get('total', 0):.1f} s{', search included' if 'search' in t else ''} "
                 f"(load {t.get('load', 0):.1f} s, save {t.get('save', 0):.1f} s)"
                 + (f"; peak memory {peak / 1e9:.2f} GB (max RSS)." if peak else "."))
    return lines


def write_reports(directory: Path, plan: Plan, report: dict[str, Any], registries: Registries,
                  final_dir: Path) -> None:
    """Write the three report files (and ``search.png`` after a search) into ``directory``.

    ``directory`` is the staging directory that will become ``final_dir``.
    """
    from squeezelang.executor.lock import lock_text

    report["plots"] = []
    plot_note = _plot_search(report, directory) if report["trials"] else None
    write_json(directory / "report.json", report)
    write_text(directory / "report.md", markdown(report, plot_note))
    write_text(directory / "recipe.lock.squeeze", lock_text(plan, registries, final_dir))


def _plot_search(report: dict[str, Any], directory: Path) -> str | None:
    """Draw ``search.png`` into ``directory`` and list it in ``report["plots"]``; a note if not drawn."""
    from squeezelang.executor.plot import write_search_plot

    try:
        png = write_search_plot(report, directory)
    except Exception as exc:  # a plot is never worth the run's artifact
        return f"_{SEARCH_PNG} could not be drawn: {type(exc).__name__}: {exc}_"
    if png is None:
        return f"_Install squeezelang[plot] (matplotlib) for {SEARCH_PNG}, a plot of these trials._"
    report["plots"].append(png.name)
    return None
