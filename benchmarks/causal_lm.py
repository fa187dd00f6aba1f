"""Small-data causal LM: a character-level GPT-2 trained on tiny-shakespeare, then compressed.

The setting of the AfriBERTa compression study and of Minitron's prune + distill, at CPU scale. The
benchmark trains the model itself (``benchmarks.charlm``: a 4-layer GPT-2 on the first 90% of the
characters of ``../shared/data/tinyshakespeare.txt``, early-stopped on the last 10%; cached under
``benchmarks/cache/charlm/`` with the data files the recipes read), then compresses it with the
engine — every compressed row is a recipe run by ``squeezelang.run``, and every figure is read from
the engine's report, measured on the saved and reloaded artifact.

Rows:

- ``original``: the trained model (a recipe without stages: saved, reloaded, measured);
- ``control``: the original trained for exactly as many extra optimizer steps as one ``distill``
  stage takes, with the same batches, optimizer and schedule, on the real next character
  (``charlm.continue_training``). Distillation is extra training; if the control gains as much,
  the distilled rows only finished the original's training. ``control-final-lr``: the same at the
  learning rate the original's training ended with (distillation's higher rate may first undo
  some of a converged model's fit); the loss changes and target (a) compare with the better one;
- ``width-half``: Minitron-style width pruning (``prune`` ``activation``, MLP neurons and embedding
  channels, one ratio for both, as Minitron pruned its 8B from 15B; heads kept) to at most 50% of
  the parameters; ``width-eq-depth``: the same at the parameter count of ``depth-half``;
- ``depth-half``: half of the layers removed (``prune`` ``depth``, block importance on calibration
  windows); embeddings stay, so it keeps slightly more than half of the parameters;
- each of those ``+distill``: then distilled from the original (KL on the logits, ``DISTILL``);
- ``width-half+distill+int8``: then int8 weights (the whole pipeline run again: it is seeded).

Validation loss is ``ln(perplexity)``: the engine's ``perplexity`` metric reports the exponential of
the token-weighted mean next-character NLL over the validation windows (``val.jsonl``; every
window is one text of at most ``context`` characters, scored alone), so the loss is derived from
it — the same windows and the same tokens for every row, equal to ``charlm.mean_nll`` (the loss
training early-stopped on). Size is the saved weights and config. Latency is one forward
pass at batch 1, seq = the context, median: every row's saved artifact is reloaded at the end of
the suite and all of them are timed *interleaved* with the trained original
(``encoder_eval.latency_ms``), so each ratio is taken side by side under the same load — at 2
threads (the suites' convention) and at 1 thread (``lat1``). Timing each row's original and result
inside its own run gave ratios that moved with the load between runs (×0.53–1.02 for the same
architecture). Calibration and distillation read ``train.jsonl`` (random windows of
the training split only). ``sec`` is the seconds of the row's engine run (the controls' training is
cached with the model and not included).

Targets: (a) half the parameters with validation loss within 3% of the original after
distillation, judged on the best distilled row with at most 50.5% of the parameters, and also
against the better control; (b) width + distillation beating depth + distillation at equal parameter
count. Writes ``benchmarks/results/causal_lm.json`` (rows), ``causal_lm-targets.json`` (targets,
the width/depth comparison, the training record) and ``causal_lm.png``; prints a table.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import charlm
from benchmarks.rows import pyplot, save_and_print

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results"
HYPER = charlm.Hyper()

#: The one distillation every distilled row uses; the controls train as many steps, as large batches.
#: The embeddings train too: the reason ``distill`` freezes them by default (a large matrix few
#: texts touch) does not hold for 66 characters, and width pruning shrinks their channels.
DISTILL = {"steps": 1000, "batch_size": 16, "lr": 1e-3, "train_embeddings": True}
#: Width pruning's targets (Minitron 8B: MLP and embedding channels; attention heads kept).
WIDTH = ["mlp", "embedding"]
#: "Half the parameters", with room for the rounding of structured sizes.
HALF = 0.505
#: The largest validation-loss increase target (a) allows.
WITHIN = 0.03

HEADER = '''recipe "{name}"
model = hf("{model}", task = "causal-lm")
data val = jsonl("{val}", fields = ["text"])
data train = jsonl("{train}", fields = ["text"])
metric ppl = perplexity(val, batch_size = 32)
'''


def _distill(d: dict[str, Any] = DISTILL, context: int = HYPER.context) -> str:
    return (f'stage heal: distill {{ teacher = original, data = train, steps = {d["steps"]}, '
            f'batch_size = {d["batch_size"]}, lr = {d["lr"]}, max_length = {context}, '
            f'train_embeddings = {str(d["train_embeddings"]).lower()} }}')


def _width(ratio: float) -> str:
    targets = ", ".join(f'"{t}"' for t in WIDTH)
    return (f'stage width: prune {{ method = "activation", target = [{targets}], ratio = {ratio}, '
            f'data = train }}')


DEPTH = 'stage depth: prune { method = "depth", ratio = 0.5, data = train }'
INT8 = 'stage q: quantize { scheme = "int8" }'


def row_stages(ratios: dict[str, float], distill: dict[str, Any] = DISTILL,
               context: int = HYPER.context) -> dict[str, str]:
    """Every row's stages (``original`` and the controls have none: they are measured as trained);
    ``distill`` and ``context`` are this suite's unless another suite passes its own."""
    half, eq, heal = _width(ratios["half"]), _width(ratios["eq"]), _distill(distill, context)
    return {
        "original": "",
        "control": "",
        "control-final-lr": "",
        "width-half": half,
        "width-half+distill": f"{half}\n{heal}",
        "width-eq-depth": eq,
        "width-eq-depth+distill": f"{eq}\n{heal}",
        "depth-half": DEPTH,
        "depth-half+distill": f"{DEPTH}\n{heal}",
        "width-half+distill+int8": f"{half}\n{heal}\n{INT8}",
    }


def _recipe(name: str, model: Path, prepared: charlm.Prepared, stages: str) -> str:
    return HEADER.format(name=name, model=model, val=prepared.val, train=prepared.train,
                         context=prepared.hyper.context) + stages + "\n"


def predicted_params(prepared: charlm.Prepared, stages: str) -> int:
    """The engine's predicted parameter count after ``stages`` (``squeeze plan``; no weights)."""
    import squeezelang

    return squeezelang.plan(_recipe("plan", prepared.model, prepared, stages)).prediction.final_params


def width_ratios(prepared: charlm.Prepared,
                 allowed: Callable[[float], bool] | None = None) -> dict[str, Any]:
    """The width-pruning ratios: the least that keeps at most ``HALF`` of the parameters, and the
    one whose parameter count is nearest depth pruning's (both from the engine's estimates), among
    the ratios ``allowed`` accepts (all by default)."""
    original = predicted_params(prepared, "")
    depth = predicted_params(prepared, DEPTH)
    ok = allowed or (lambda r: True)
    grid = [r for r in (round(0.01 * i, 2) for i in range(1, 96)) if ok(r)]
    counts = {r: predicted_params(prepared, _width(r)) for r in grid}

    def refine(pick: Any) -> float:  # to the nearest 0.001 around the grid's choice
        best = pick(grid)
        fine = [r for r in (round(best + 0.001 * i, 3) for i in range(-10, 11))
                if 0 < r < 0.96 and ok(r)]
        counts.update({r: predicted_params(prepared, _width(r)) for r in fine if r not in counts})
        return pick(fine)

    half = refine(lambda rs: min((r for r in rs if counts[r] <= HALF * original), default=max(rs)))
    eq = refine(lambda rs: min(rs, key=lambda r: (abs(counts[r] - depth), r)))
    return {"half": half, "eq": eq, "original": original, "depth": depth,
            "half_params": counts[half], "eq_params": counts[eq]}


def run_row(name: str, stages: str, model: Path, prepared: charlm.Prepared, workdir: Path) -> dict:
    import squeezelang

    recipe = workdir / f"{name.replace('+', '_')}.squeeze"
    recipe.write_text(_recipe(name, model, prepared, stages), encoding="utf-8")
    out = workdir / "out" / recipe.stem
    started = time.perf_counter()
    result = squeezelang.run(recipe, output=out, force=True)
    return row_from_report(name, stages, model, result.report, out, time.perf_counter() - started)


def row_from_report(name: str, stages: str, model: Path, report: dict[str, Any], out: Path,
                    seconds: float) -> dict[str, Any]:
    """A row's figures, all read from the engine's report of its run (``out`` is its artifact)."""
    m = report["metrics"]
    row = {
        "name": name, "stages": stages, "model": str(model),
        "size_bytes": m["size"]["final"], "size_mb": m["size"]["final"] / 1e6,
        "params": int(m["params"]["final"]),
        "perplexity": m["ppl"]["final"], "val_loss": math.log(m["ppl"]["final"]),
        "input": {"size_bytes": m["size"]["original"], "params": int(m["params"]["original"]),
                  "perplexity": m["ppl"]["original"],
                  "val_loss": math.log(m["ppl"]["original"])},
        "log": [line for s in report.get("stages", []) for line in s.get("log", [])],
        "seconds": seconds, "path": str(out),
    }
    return row


class _Forward:
    """One forward pass of a causal LM, in the shape ``encoder_eval.latency_ms`` times."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def forward_once(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def measure_latency(rows: list[dict[str, Any]], prepared: charlm.Prepared) -> None:
    """Reload every row's saved artifact and time all of them interleaved with the trained
    original (the reference of every ratio), at 2 threads and at 1; then delete the artifacts."""
    import squeezelang
    from benchmarks.encoder_eval import latency_ms

    models = {"(reference)": _Forward(squeezelang.load(prepared.model, task="causal-lm"))}
    for r in rows:
        if "path" in r and "error" not in r:
            models[r["name"]] = _Forward(squeezelang.load(r["path"], task="causal-lm"))
    vocab = {name: int(prepared.info["vocab"]) for name in models}
    context = prepared.hyper.context
    two = latency_ms(models, seq=context, threads=2, rounds=200, warmup=20, vocab=vocab)
    one = latency_ms(models, seq=context, threads=1, rounds=200, warmup=20, vocab=vocab)
    for r in rows:
        if r["name"] in two:
            r["latency_ms"], r["latency1_ms"] = two[r["name"]], one[r["name"]]
            r["latency_ratio"] = two[r["name"]] / two["(reference)"]
            r["latency1_ratio"] = one[r["name"]] / one["(reference)"]
        shutil.rmtree(r.pop("path", ""), ignore_errors=True)


CONTROLS = ("control", "control-final-lr")


def best_control(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The control row with the lower validation loss: the stronger baseline of the two."""
    controls = [r for r in rows if r["name"] in CONTROLS and "error" not in r]
    return min(controls, key=lambda r: r["val_loss"]) if controls else None


def relate(rows: list[dict[str, Any]]) -> None:
    """Add each row's ratios to the original and its loss change against the original and the
    better control.

    Compressed rows take the original from their own run (its input); a control's run has the
    control as input, so its size and parameter ratios are to the original row's (the same
    architecture) and its latency ratios are to itself.
    """
    by_name = {r["name"]: r for r in rows if "error" not in r}
    original, control = by_name.get("original"), best_control(rows)
    for r in by_name.values():
        base = original["input"] if r["name"] in CONTROLS and original else r["input"]
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        r["params_ratio"] = r["params"] / base["params"]
        loss0 = original["val_loss"] if original else r["input"]["val_loss"]
        r["loss_change"] = r["val_loss"] / loss0 - 1
        r["loss_change_vs_control"] = r["val_loss"] / control["val_loss"] - 1 if control else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':26s} {'size MB':>8s} {'size %':>7s} {'params':>8s} {'params %':>8s} "
             f"{'lat ms':>7s} {'lat x':>6s} {'lat1 ms':>7s} {'lat1 x':>6s} {'val loss':>8s} "
             f"{'ppl':>6s} {'Δ orig':>7s} {'Δ ctrl':>7s} {'sec':>5s}"]

    def cell(value: float | None, spec: str, width: int) -> str:  # "-" where not measured
        return format(value, spec) if value is not None else f"{'-':>{width}s}"

    for r in rows:
        if "val_loss" not in r:
            continue
        ctrl = r.get("loss_change_vs_control")
        lines.append(f"{r['name']:26s} {r['size_mb']:8.3f} {r['size_ratio'] * 100:6.1f}% "
                     f"{r['params']:8d} {r['params_ratio'] * 100:7.1f}% "
                     f"{cell(r.get('latency_ms'), '7.2f', 7)} {cell(r.get('latency_ratio'), '6.2f', 6)} "
                     f"{cell(r.get('latency1_ms'), '7.2f', 7)} {cell(r.get('latency1_ratio'), '6.2f', 6)} "
                     f"{r['val_loss']:8.4f} {r['perplexity']:6.3f} {r['loss_change'] * 100:+6.2f}% "
                     + (f"{ctrl * 100:+6.2f}%" if ctrl is not None else f"{'':>7s}")
                     + f" {r['seconds']:5.0f}")
    return "\n".join(lines)


def comparison(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Minitron's comparison: width against depth at (nearly) equal parameters, before and after
    distillation."""
    by_name = {r["name"]: r for r in rows if "error" not in r}
    pairs = {"pruned": ("width-eq-depth", "depth-half"),
             "distilled": ("width-eq-depth+distill", "depth-half+distill")}
    out: dict[str, Any] = {}
    for when, (w, d) in pairs.items():
        if w in by_name and d in by_name:
            out[when] = {"width": w, "depth": d, "width_params": by_name[w]["params"],
                         "depth_params": by_name[d]["params"],
                         "width_val_loss": by_name[w]["val_loss"],
                         "depth_val_loss": by_name[d]["val_loss"],
                         "width_better": by_name[w]["val_loss"] < by_name[d]["val_loss"]}
    return out or None


def targets(rows: list[dict[str, Any]]) -> list[Any]:
    from benchmarks.targets import Target, best

    by_name = {r["name"]: r for r in rows if "error" not in r}
    original, control = by_name.get("original"), best_control(rows)
    distilled = [r for r in rows if "error" not in r and "distill" in r["name"]
                 and not r["name"].endswith("int8")]
    half = best(distilled, lambda r: r["params_ratio"] <= HALF, lambda r: r["val_loss"])

    def judged(versus: dict[str, Any] | None, label: str) -> Target:
        name = f"(a) params <= {HALF:.1%}, val loss within {WITHIN:.0%} of the {label} after distill"
        if half is None or versus is None:
            return Target(name, None, "no distilled half-size row, or no " + label + " row")
        change = half["val_loss"] / versus["val_loss"] - 1
        return Target(name, change <= WITHIN,
                      f"{half['val_loss']:.4f} vs {versus['val_loss']:.4f} ({versus['name']}, "
                      f"{change:+.2%}), params {half['params']} = {half['params_ratio']:.1%} "
                      f"({half['name']})")

    out = [judged(original, "original"), judged(control, "better control")]
    comp = (comparison(rows) or {}).get("distilled")
    name = "(b) width + distill beats depth + distill at equal params"
    if comp is None:
        out.append(Target(name, None, "a row of the pair did not run"))
    else:
        out.append(Target(name, comp["width_better"],
                          f"val loss {comp['width_val_loss']:.4f} ({comp['width']}, "
                          f"{comp['width_params']} params) vs {comp['depth_val_loss']:.4f} "
                          f"({comp['depth']}, {comp['depth_params']} params)"))
    return out


def plot(rows: list[dict[str, Any]], path: Path, training: dict[str, Any],
         model: str = "character-level GPT-2") -> None:
    """Parameters against validation loss for every row, the same zoomed on the rows near the
    original, and the original's training curve."""
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if "val_loss" in r]
    by_name = {r["name"]: r for r in ok}
    fig, (full, zoom, curve) = plt.subplots(1, 3, figsize=(18, 5.5))
    near = [r for r in ok if "distill" in r["name"] or not r["name"].startswith(("width", "depth"))]
    for ax, shown in ((full, ok), (zoom, near)):
        for i, r in enumerate(sorted(shown, key=lambda r: (r["params"], r["val_loss"]))):
            color = ("tab:gray" if r["name"] == "original" or r["name"] in CONTROLS else
                     "tab:blue" if r["name"].startswith("width") else "tab:red")
            pruned_only = r["name"].startswith(("width", "depth")) and "distill" not in r["name"]
            ax.scatter(r["params"] / 1e3, r["val_loss"], color=color, marker="x" if pruned_only
                       else "o", s=30)
            ax.annotate(r["name"], (r["params"] / 1e3, r["val_loss"]), fontsize=7,
                        xytext=(5, 9 * (i % 3) - 9), textcoords="offset points")
        if "original" in by_name:
            ax.axhline(by_name["original"]["val_loss"] * (1 + WITHIN), color="gray", ls="--",
                       lw=0.7, label=f"original + {WITHIN:.0%}")
            ax.axvline(by_name["original"]["params"] * HALF / 1e3, color="gray", ls=":", lw=0.7,
                       label=f"{HALF:.1%} of the parameters")
        ax.set_xlabel("parameters (thousands)")
        ax.set_ylabel("validation loss (nats per character, saved artifact)")
        ax.legend(fontsize=7, loc="upper right")
    full.set_title("every row (x: pruned only, o: distilled; blue width, red depth)")
    zoom.set_title("the distilled rows, the original and the controls")
    points = training.get("curve", [])
    curve.plot([p["step"] for p in points], [p["val_loss"] for p in points], label="validation")
    curve.plot([p["step"] for p in points], [p["train_loss"] for p in points], label="train batch",
               alpha=0.6)
    curve.axvline(training.get("best_step", 0), color="gray", ls=":", lw=0.7, label="best (kept)")
    curve.set_xlabel("optimizer step")
    curve.set_ylabel("loss (nats per character)")
    curve.set_title(f"training of the original (stopped: {training.get('stopped')})")
    curve.legend(fontsize=7)
    fig.suptitle(f"{model} on tiny-shakespeare: width vs depth pruning, with distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(only: list[str] | None = None, threads: int = 2) -> int:
    if not DATA.is_file():
        print(f"skipped: the tiny-shakespeare file is not at {DATA}", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    prepared = charlm.prepare(DATA, HYPER)
    print(f"original: {prepared.info['params']} parameters, best val loss "
          f"{prepared.info['best_val_loss']:.4f} at step {prepared.info['best_step']} of "
          f"{prepared.info['steps']} (stopped: {prepared.info['stopped']}; "
          f"{prepared.info['train_seconds']:.0f} s of training)", flush=True)
    ratios = width_ratios(prepared)
    print(f"width ratio {ratios['half']} -> {ratios['half_params']} params (<= {HALF:.1%} of "
          f"{ratios['original']}); width ratio {ratios['eq']} -> {ratios['eq_params']} params vs "
          f"depth {ratios['depth']} (predicted)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "causal_lm"
    workdir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name, stages in row_stages(ratios).items():
        if only and name not in only:
            continue
        print(f"{name} …", flush=True)
        try:
            model = prepared.model
            if name in CONTROLS:
                lr = DISTILL["lr"] if name == "control" else prepared.info["final_lr"]
                model = charlm.continue_training(prepared, DISTILL["steps"], DISTILL["batch_size"],
                                                 lr, train_embeddings=DISTILL["train_embeddings"])
            rows.append(run_row(name, stages, model, prepared, workdir))
        except Exception as exc:  # one broken row must not hide the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    finish(rows, only, prepared, ratios, started)
    return 0


def finish(rows: list[dict[str, Any]], only: list[str] | None, prepared: charlm.Prepared,
           ratios: dict[str, Any], started: float) -> None:
    """Time the rows' artifacts side by side, relate the rows, write the JSON, the targets and
    the plot, and print them."""
    training = prepared.info
    measure_latency(rows, prepared)
    path = RESULTS / "causal_lm.json"
    merged = rows
    if only and path.is_file():  # a partial re-run: relate the fresh rows to the kept ones
        kept = {r["name"]: r for r in json.loads(path.read_text())}
        kept.update({r["name"]: r for r in rows})
        merged = list(kept.values())
    relate(merged)
    save_and_print(path, rows, only, table)
    rows = json.loads(path.read_text())  # every row, those of earlier runs included
    from benchmarks.targets import report

    result = report(targets(rows))
    (RESULTS / "causal_lm-targets.json").write_text(json.dumps(
        {"targets": result, "width_vs_depth": comparison(rows), "width_ratios": ratios,
         "distill": DISTILL, "training": training, "cache": str(prepared.dir)}, indent=2))
    plot(rows, RESULTS / "causal_lm.png", prepared.info)
    print(f"\ncausal_lm: {time.perf_counter() - started:.0f} s", flush=True)
