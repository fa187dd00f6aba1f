"""``report.json``, ``report.md`` and ``recipe.lock.squeeze``: what a run measured and decided."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from squeezelang.executor.artifacts import write_json, write_text
from squeezelang.hooks.registry import Registries
from squeezelang.planner.constraints import Verdict
from squeezelang.planner.plan import Plan

REPORT_VERSION = 1


def build_report(plan: Plan, registries: Registries, original: dict[str, float],
                 stages: list[dict[str, Any]], final: dict[str, float], verdicts: list[Verdict],
                 files: list[str], timings: dict[str, float], trials: list[dict[str, Any]],
                 resumed_after: str | None) -> dict[str, Any]:
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
    return {
        "report_version": REPORT_VERSION,
        "recipe": {"name": plan.name, "file": plan.recipe_file},
        "status": "met" if all(v.met for v in verdicts) else "not met",
        "model": {"source": plan.model.source, "task": plan.model.task,
                  "path": plan.model.args.get("path")},
        "output": {"dir": plan.output_dir, "format": plan.output_format, "files": sorted(files)},
        "metrics": metrics,
        "stages": [
            {"name": s.name, "technique": s.technique, "plugin": s.plugin, "method": s.method,
             "params": s.params, "solved": {k: s.params[k] for k in s.autos},
             "metrics": rec["metrics"], "seconds": rec["seconds"],
             "measure_seconds": rec.get("measure_seconds")}
            for s, rec in zip(plan.stages, stages)
        ],
        "constraints": [v.to_json() for v in verdicts],
        "trials": trials,
        "resumed_after": resumed_after,
        "timings": timings,
        "environment": {"squeezelang": squeezelang.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }


# ---------------------------------------------------------------- human-readable
_UNITS = {"bytes": "B", "time": "s", "count": "", "score": ""}


def fmt_value(value: float | None, dimension: str) -> str:
    """A value in a readable unit (MB, ms, M params)."""
    if value is None:
        return "—"
    if dimension == "bytes":
        return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} KB"
    if dimension == "time":
        return f"{value * 1e3:.2f} ms"
    if dimension == "count":
        return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: metrics, stages, constraints, trials."""
    lines = [f"# squeeze report: {report['recipe']['name']}", ""]
    status = report["status"]
    lines.append(f"**Constraints: {'all met' if status == 'met' else 'NOT MET'}** · "
                 f"model `{report['model']['path']}` ({report['model']['task']}) · "
                 f"output `{report['output']['dir']}` ({report['output']['format']})")
    if report.get("resumed_after"):
        lines.append(f"Resumed after stage '{report['resumed_after']}'.")
    lines += ["", "## Metrics (final = measured on the saved, reloaded artifact)", "",
              "| metric | original | final | final / original | drop |", "| --- | --- | --- | --- | --- |"]
    for name, m in report["metrics"].items():
        ratio = f"{m['ratio'] * 100:.1f}%" if m["ratio"] is not None else "—"
        drop = fmt_value(m["drop"], m["dimension"]) if m["dimension"] == "score" else "—"
        lines.append(f"| {name} | {fmt_value(m['original'], m['dimension'])} | "
                     f"{fmt_value(m['final'], m['dimension'])} | {ratio} | {drop} |")
    if report["stages"]:
        names = list(report["metrics"])
        lines += ["", "## After each stage", "",
                  "| stage | technique | seconds | " + " | ".join(names) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for s in report["stages"]:
            tech = s["technique"] + (f" ({s['method']})" if s["method"] else "")
            vals = [fmt_value(s["metrics"].get(n), report["metrics"][n]["dimension"]) for n in names]
            lines.append(f"| {s['name']} | {tech} | {s['seconds']:.1f} | " + " | ".join(vals) + " |")
    if report["constraints"]:
        lines += ["", "## Constraints", "", "| constraint | measured | bound | verdict |",
                  "| --- | --- | --- | --- |"]
        for c in report["constraints"]:
            dim = report["metrics"][c["metric"]]["dimension"]
            verdict = "met" if c["met"] else f"**NOT MET** (off by {fmt_value(-c['margin'], dim)})"
            lines.append(f"| `{c['constraint']}` | {fmt_value(c['value'], dim)} | "
                         f"{fmt_value(c['bound'], dim)} | {verdict} |")
    if report["trials"]:
        lines += ["", "## Search trials", "", "| # | values | feasible |", "| --- | --- | --- |"]
        for i, trial in enumerate(report["trials"], 1):
            lines.append(f"| {i} | {trial.get('values')} | {trial.get('feasible')} |")
    t = report["timings"]
    lines += ["", f"Total {t.get('total', 0):.1f} s (load {t.get('load', 0):.1f} s, save "
                  f"{t.get('save', 0):.1f} s)."]
    return "\n".join(lines) + "\n"


def write_reports(directory: Path, plan: Plan, report: dict[str, Any], registries: Registries,
                  final_dir: Path) -> None:
    """Write the three report files into ``directory``, which will become ``final_dir``."""
    from squeezelang.executor.lock import lock_text

    write_json(directory / "report.json", report)
    write_text(directory / "report.md", markdown(report))
    write_text(directory / "recipe.lock.squeeze", lock_text(plan, registries, final_dir))
