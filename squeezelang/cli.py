"""The ``squeeze`` command line: check, plan, run, plugins, explain, fmt.

Exit codes: 0 success (all constraints met); 1 the run finished but a constraint is not met (the
artifacts are written and the report says which and by how much); 2 a bad recipe or bad usage;
3 a runtime failure (the message names the stage and plugin at fault); 130 interrupted (rerun the
same command to resume).
"""
from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from squeezelang.errors import (Infeasible, OutputError, PlanError, PluginError, RecipeError,
                                RecipeErrors, SqueezeError)

EXIT_OK, EXIT_NOT_MET, EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _registries(args: argparse.Namespace) -> Any:
    from squeezelang.hooks.manager import default_registries

    return default_registries(args.plugin or ())


def _load(path: str) -> Any:
    from squeezelang.lang.parser import parse_file

    return parse_file(path)


def _print_errors(exc: RecipeErrors) -> None:
    from squeezelang.lang.diagnostics import format_errors

    print(format_errors(exc), file=sys.stderr)
    n = len(exc.errors)
    print(f"{n} error{'s' if n != 1 else ''} in {exc.file or 'recipe'}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from squeezelang.planner.resolve import resolve

    regs = _registries(args)
    status = EXIT_OK
    for path in args.recipes:
        try:
            resolve(_load(path), regs)
        except RecipeErrors as exc:
            _print_errors(exc)
            status = EXIT_USAGE
            continue
        if not args.quiet:
            print(f"{path}: ok")
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from squeezelang.planner.estimate import predict
    from squeezelang.planner.resolve import resolve
    from squeezelang.lang.units import fmt_value

    from squeezelang.planner.estimate import planning_context
    from squeezelang.planner.levels import refuse_fixed_unreachable, solved_floor

    regs = _registries(args)
    plan = resolve(_load(args.recipe), regs)
    ctx = planning_context(plan, regs)
    pred = predict(plan, regs, ctx=ctx)
    ranked = None
    if plan.compose is not None:
        from squeezelang.planner.compose import pipelines, refuse_if_unreachable

        ranked = pipelines(plan, regs, ctx)
        refuse_if_unreachable(plan, ranked, pred.original_size)
    floors = solved_floor(plan, regs, ctx) if plan.has_auto else {}
    if args.json:
        out = {"plan": plan.to_json(), "prediction": pred.to_json(),
               "solved": {f"{s}.{k}": v for (s, k), v in floors.items()}}
        if ranked is not None:
            out["composition"] = [p.to_json() for p in ranked]
        print(json.dumps(out, indent=2, default=str))
        refuse_fixed_unreachable(plan, regs, ctx)
        return EXIT_OK
    print(f"recipe '{plan.name}': model {plan.model.args.get('path')} ({plan.model.task})")
    print(f"  original: {fmt_value(pred.original_params, 'count')} params, "
          f"{fmt_value(pred.original_size, 'bytes')}")
    for i, (stage, sp) in enumerate(zip(plan.stages, pred.stages), 1):
        tech = stage.technique + (f" ({stage.method})" if stage.method else "")
        print(f"\nstage {i} '{stage.name}': {tech}   [plugin {stage.plugin}]")
        for key, value in stage.params.items():
            auto = ""
            if key in stage.autos:
                lo, hi = stage.autos[key]
                floor = floors.get((stage.name, key))
                op = ">=" if regs.techniques.get(stage.technique).knob(key).compresses == "up" else "<="
                auto = f"   <- auto {lo:g} .. {hi:g} (shown at mid-range)" if floor is None else \
                    (f"   <- auto {lo:g} .. {hi:g}; solved from the estimates: the size constraints "
                     f"need {key} {op} {floor:.4g}, the search measures from there")
            print(f"    {key} = {json.dumps(value)}{auto}")
        ratio = sp.size_bytes / pred.original_size if pred.original_size else 0
        print(f"  -> predicted {fmt_value(sp.params_count, 'count')} params, "
              f"{fmt_value(sp.size_bytes, 'bytes')} ({ratio * 100:.1f}% of the original size)")
    if plan.constraints:
        print("\nconstraints:")
        predicted = {v.constraint: v for v in pred.constraints}
        for c in plan.constraints:
            v = predicted.get(c.describe())
            if v is not None and plan.compose is not None:
                print(f"  {c.describe():32s} decides which composed pipelines can reach it (below)")
            elif v is None:
                print(f"  {c.describe():32s} measured after the run")
            else:
                dim = "bytes" if c.metric == "size" or plan.metric(c.metric).kind == "size" else "count"
                state = "predicted met" if v.met else "PREDICTED NOT MET"
                print(f"  {c.describe():32s} {state}: {fmt_value(v.value, dim)} vs bound {fmt_value(v.bound, dim)}")
    if ranked is not None:
        reachable = [p for p in ranked if p.feasible]
        print(f"\ncompose: {len(ranked)} pipelines of {', '.join(plan.compose.allow)} "
              f"(at most {plan.compose.stages} stages); {len(reachable)} can meet the size "
              "constraints; the search tries them in this order:")
        for i, p in enumerate(reachable[:10], 1):
            ratio = p.best_size / pred.original_size if pred.original_size else 0
            knobs = ", ".join(f"{s.name}.{k}" for s in p.stages for k in s.autos)
            print(f"  {i:2d}. {p.label:40s} risk {p.risk:4.1f}   down to "
                  f"{fmt_value(p.best_size, 'bytes')} ({ratio:.1%})" + (f"   auto: {knobs}" if knobs else ""))
        if len(reachable) > 10:
            print(f"  … and {len(reachable) - 10} more")
    for note in pred.notes:
        print(f"\nnote: {note}")
    options = "".join(f", {k} = {json.dumps(v)}" for k, v in plan.output_options.items())
    print(f"\noutput: {plan.output_dir} (format {plan.output_format}{options})")
    runtime = regs.output_formats.get(plan.output_format).runtime
    if runtime != "torch":
        print(f"  sizes above are predicted for the squeeze format; the run measures the "
              f"{plan.output_format} file's size, and every metric on it as {runtime} runs it")
    refuse_fixed_unreachable(plan, regs, ctx)  # exit 1, after the table that shows why
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from squeezelang.executor.run import execute
    from squeezelang.planner.resolve import resolve
    from squeezelang.executor.report import fmt_verdict, markdown

    regs = _registries(args)
    plan = resolve(_load(args.recipe), regs).placed(args.device, args.dtype, args.offload)
    args.output_dir = Path(args.output or plan.output_dir).resolve()  # for the interrupt message
    if not plan.needs_search:  # fixed settings that cannot meet a size bound: refused, nothing run
        from squeezelang.planner.estimate import planning_context
        from squeezelang.planner.levels import refuse_fixed_unreachable

        refuse_fixed_unreachable(plan, regs, planning_context(plan, regs))
    if plan.needs_search:
        from squeezelang.search.solve import solve
        result = solve(plan, regs, output=args.output, force=args.force, quiet=args.quiet)
    else:
        result = execute(plan, regs, output=args.output, force=args.force, quiet=args.quiet)
    if result.rank:  # another torchrun rank: rank 0 saves and reports
        return EXIT_OK
    if not args.quiet:
        print()
        print(markdown(result.report))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"artifacts written to {result.output_dir}")
    if not result.ok:
        for c, v in zip(result.plan.constraints, result.verdicts):
            if not v.met:
                print(f"constraint not met: {v.constraint} "
                      f"({fmt_verdict(v, c, result.report['metrics'][v.metric])})", file=sys.stderr)
        return EXIT_NOT_MET
    print("all constraints met")
    return EXIT_OK


def _param_lines(schema: dict[str, Any]) -> list[str]:
    lines = []
    for key, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or ("one of " + ", ".join(map(str, prop["enum"])) if "enum" in prop else "")
        if isinstance(kind, list):
            kind = " | ".join(kind)
        default = f" = {json.dumps(prop['default'])}" if "default" in prop else ""
        desc = f"  {prop['description']}" if prop.get("description") else ""
        lines.append(f"      {key}: {kind}{default}{desc}")
    return lines


def cmd_plugins(args: argparse.Namespace) -> int:
    regs = _registries(args)
    if args.json:
        out = {
            "plugins": regs.plugins,
            "techniques": [{"name": t.name, "plugin": regs.techniques.owner(t.name), "methods": list(t.methods),
                            "schema": t.schema, "description": t.description,
                            "knobs": [vars(k) if hasattr(k, "__dict__") else k.__dict__ for k in t.knobs]}
                           for t in regs.techniques],
            "metrics": [{"name": m.name, "plugin": regs.metrics.owner(m.name), "dimension": m.dimension,
                         "higher_is_better": m.higher_is_better, "schema": m.schema} for m in regs.metrics],
            "data_sources": [{"name": d.name, "plugin": regs.data_sources.owner(d.name), "schema": d.schema}
                             for d in regs.data_sources],
            "model_sources": [{"name": d.name, "plugin": regs.model_sources.owner(d.name), "schema": d.schema}
                              for d in regs.model_sources],
            "output_formats": [{"name": f.name, "plugin": regs.output_formats.owner(f.name),
                                "runtime": f.runtime, "schema": f.schema, "description": f.description}
                               for f in regs.output_formats],
            "model_families": [{"name": f.name, "plugin": regs.families.owner(f.name),
                                "model_types": list(f.model_types)} for f in regs.families],
        }
        print(json.dumps(out, indent=2, default=lambda o: o.__dict__))
        return EXIT_OK
    print("plugins:")
    for name, dist in sorted(regs.plugins.items()):
        print(f"  {name}" + (f"  ({dist})" if dist else ""))
    print("\ntechniques:")
    for t in regs.techniques:
        methods = f"  methods: {', '.join(t.methods)}" if t.methods else ""
        print(f"  {t.name} [{regs.techniques.owner(t.name)}]{methods}\n      {t.description}")
        if t.knobs:
            print("    knobs: " + ", ".join(f"{k.name} {k.lo:g}..{k.hi:g} (compresses {k.compresses})"
                                          for k in t.knobs))
        print("    parameters:")
        print("\n".join(_param_lines(t.schema)))
    for title, reg in (("metrics", regs.metrics), ("data sources", regs.data_sources),
                       ("model sources", regs.model_sources), ("output formats", regs.output_formats)):
        print(f"\n{title}:")
        for item in reg:
            extra = ""
            if title == "metrics":
                extra = f" ({item.dimension}, {'higher' if item.higher_is_better else 'lower'} is better" \
                        f"{', always available' if item.implicit else ''})"
            print(f"  {item.name} [{reg.owner(item.name)}]{extra}  {item.description}")
            if title == "output formats" and item.schema.get("properties"):
                print("    options:")
                print("\n".join(_param_lines(item.schema)))
    print("\nmodel families (what structured techniques can reshape):")
    for fam in regs.families:
        print(f"  {fam.name} [{regs.families.owner(fam.name)}]  model_type: {', '.join(fam.model_types)}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from squeezelang.lang.diagnostics import did_you_mean

    regs = _registries(args)
    tech = regs.techniques.get(args.technique)
    if tech is None:
        print(f"error: unknown technique '{args.technique}'"
              f"{did_you_mean(args.technique, regs.techniques.names())}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{tech.name} [{regs.techniques.owner(tech.name)}]: {tech.description}")
    if tech.methods:
        print(f"methods: {', '.join(tech.methods)} (default {tech.methods[0]})")
    print("parameters:")
    print("\n".join(_param_lines(tech.schema)))
    if tech.knobs:
        print("knobs (may be auto):")
        for k in tech.knobs:
            print(f"      {k.name}: {k.lo:g} .. {k.hi:g}, compresses {k.compresses}"
                  + (f"  {k.description}" if k.description else ""))
    if tech.refuses:
        print(f"refuses a model that is: {', '.join(sorted(tech.refuses))}")
    if tech.example:
        print(f"example:\n    {tech.example}")
    return EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.recipes:
        try:
            text = _formatted(path)
        except RecipeErrors as exc:
            _print_errors(exc)
            status = EXIT_USAGE
            continue
        if args.write:
            Path(path).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    return status


def _formatted(path: str) -> str:
    """Return the canonical text of a recipe file, having made sure it means the same recipe and
    keeps every comment: ``fmt -w`` must never lose what a user wrote."""
    from squeezelang.lang.fmt import format_recipe
    from squeezelang.lang.parser import parse

    recipe = _load(path)
    text = format_recipe(recipe)
    again = parse(text, file=path)
    if again != recipe or sorted(c.text for c in again.comments) != sorted(c.text for c in recipe.comments):
        raise SqueezeError(f"{path}: formatting would change the recipe or lose a comment, so it is "
                           "left as it is (a bug in squeeze fmt: please report it)")
    return text


def build_parser() -> argparse.ArgumentParser:
    from squeezelang.models.placement import DEVICES, DTYPES  # torch-free names

    parser = argparse.ArgumentParser(prog="squeeze", description="Compress language models from .squeeze recipes.",
                                     epilog="exit codes: 0 ok, 1 constraints not met, 2 bad recipe or usage, "
                                            "3 runtime failure, 130 interrupted (rerun to resume)")
    parser.add_argument("--version", action="version", version=f"squeeze {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate recipes without running anything")
    p.add_argument("recipes", nargs="+")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("plan", help="show resolved stages and predicted size, without loading weights")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("run", help="compress, measure, save and verify")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", type=os.path.expanduser,
                   help="output directory (default: the recipe's output)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--device", choices=DEVICES,
                   help="where stages and metrics compute (default: the recipe's, else cpu; auto: "
                        "cuda when torch sees a GPU)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the model's floating tensors during the run and as saved "
                        "(default: the recipe's, else auto: the checkpoint's)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="read the weights from their files one block at a time as they are used "
                        "(memory about one block; slower): for models larger than memory "
                        "(default: the recipe's offload, else off)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("plugins", help="list installed plugins, their parameters and knobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("explain", help="show one technique's parameters, knobs and an example")
    p.add_argument("technique")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("fmt", help="print recipes in canonical form")
    p.add_argument("recipes", nargs="+")
    p.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    p.set_defaults(func=cmd_fmt)
    for name in ("check", "plan", "run", "plugins", "explain", "fmt"):
        sub.choices[name].add_argument(
            "--plugin", action="append", metavar="MODULE",
            help="also load this plugin module (repeatable); plugins otherwise come only from "
                 "installed entry points")
    return parser


def version() -> str:
    """The installed distribution's version (``squeezelang.__version__`` when not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("squeezelang")
    except importlib.metadata.PackageNotFoundError:
        from squeezelang import __version__

        return __version__


def interrupted(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What an interrupted command kept and the exact command that resumes it."""
    from squeezelang.executor.checkpoint import saved_work

    output_dir = getattr(args, "output_dir", None)
    kept = saved_work(output_dir) if output_dir is not None else None
    return (f"interrupted: {'kept ' + kept if kept else 'nothing was completed yet'}; "
            f"run the same command again to resume:\n    {shlex.join(['squeeze', *argv])}")


#: Commands that finish in a few seconds and hold little memory (see ``main``).
_SHORT_COMMANDS = frozenset({"check", "plan", "plugins", "explain", "fmt"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; ``argv`` defaults to the process's own command line.

    Run as the process's own command line (the ``squeeze`` script, ``python -m squeezelang.cli``),
    it spares the garbage collector work that only slows a short process down: importing torch and
    transformers makes millions of long-lived objects, which every full collection walks again
    (about 0.6 s of a ``squeeze plan``) and the interpreter walks once more as it exits (about as
    long). The short commands collect young cyclic garbage less often, and every command freezes
    what is left before exiting, so the exit does not walk it. ``squeeze run`` keeps the usual
    collection while it works: its memory is what matters there.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    own_process = argv is None
    if own_process and args.command in _SHORT_COMMANDS:
        gc.set_threshold(100_000, 20, 10)
    try:
        return args.func(args)
    except RecipeErrors as exc:
        _print_errors(exc)
        return EXIT_USAGE
    except RecipeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except Infeasible as exc:
        print(f"error: cannot be met: {exc}", file=sys.stderr)
        return EXIT_NOT_MET
    except (OutputError, PluginError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SqueezeError as exc:  # ExecutionError included: it names the stage and plugin
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a full disk, an unwritable or vanished file: the path and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "; free some space and run the same command again to resume" \
            if exc.errno == errno.ENOSPC else ""
        print(f"error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    except MemoryError:
        print("error: out of memory; completed stages are checkpointed, so the same command resumes "
              "after them", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\n" + interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if own_process:
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
