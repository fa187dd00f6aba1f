"""``search.png``: the search's trials as saved size against quality, and a scatter for benchmarks.

matplotlib is an optional extra (``pip install squeezelang[plot]``): it is imported only when a plot
is drawn, and without it nothing is drawn and nothing fails. Figures are drawn on an Agg canvas of
their own (no pyplot, no global backend), with matplotlib's default style whatever the user's
``matplotlibrc`` says, a fixed size and dpi, and no version or date in the PNG, so the same report
gives the same image.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from squeezelang.executor.report import SEARCH_PNG, chosen_trial
from squeezelang.planner.constraints import SIZE_METRICS

PANEL_INCHES = (7.0, 5.0)
DPI = 100
MAX_COLUMNS = 2

# One scale per metric dimension, so axes read 43.2 MB or 1.25 ms rather than 43200000 or 0.00125.
_SCALES = {"bytes": (1e-6, "MB"), "time": (1e3, "ms"), "count": (1e-6, "M"), "score": (1.0, "")}
# matplotlib's defaults whatever the user's matplotlibrc says; no offset (a "+1" over 0.99986 ticks
# hides the value a quality bound is about).
_STYLE = ["default", {"axes.formatter.useoffset": False}]


def pareto_front(xs: Sequence[float | None], ys: Sequence[float | None],
                 higher_is_better: bool) -> list[int]:
    """The indices of the points no other point beats on both smaller x and better y, by x ascending.

    Points with a missing or non-finite coordinate take no part. Of points equal on both, the first
    is kept.
    """
    def finite(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    sign = -1.0 if higher_is_better else 1.0  # sort best quality first within one x
    order = sorted((i for i in range(len(xs)) if finite(xs[i]) and finite(ys[i])),
                   key=lambda i: (xs[i], sign * ys[i], i))
    front: list[int] = []
    for i in order:
        if not front or sign * ys[i] < sign * ys[front[-1]]:
            front.append(i)
    return front


def constraint_level(constraint: Mapping[str, Any], metric: Mapping[str, Any]) -> float:
    """The value of the metric at which ``constraint`` (a ``report.json`` entry) changes verdict.

    The report's ``bound`` is already absolute (a relative bound scaled by the original's value, see
    ``planner.constraints.absolute_bound``), but for ``drop(m)`` it bounds the drop: the level is
    then ``original - bound`` for a higher-is-better metric and ``original + bound`` otherwise.
    """
    bound = float(constraint["bound"])
    if not constraint["constraint"].startswith("drop("):
        return bound
    original = float(metric["original"])
    return original - bound if metric["higher_is_better"] else original + bound


def _size_metric(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    for test in (lambda m: m["kind"] == "size", lambda m: m["dimension"] == "bytes"):
        for name, m in metrics.items():
            if test(m):
                return name
    return None


def quality_metrics(report: Mapping[str, Any]) -> list[str]:
    """The metrics to plot against size: constrained non-size metrics (scores first), else the scores."""
    metrics = report["metrics"]
    constrained = [c["metric"] for c in report["constraints"]
                   if c["metric"] in metrics and metrics[c["metric"]]["kind"] not in SIZE_METRICS
                   and metrics[c["metric"]]["dimension"] != "bytes"]
    names = list(dict.fromkeys(constrained))
    names.sort(key=lambda n: metrics[n]["dimension"] != "score")  # stable: constraint order kept
    return names or [n for n, m in metrics.items() if m["dimension"] == "score"]


def _knobs(trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    knobs: dict[tuple[str, str], None] = {}
    for t in trials:
        for stage, values in (t.get("values") or {}).items():
            for knob, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    knobs[(stage, knob)] = None
    return list(knobs)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- matplotlib plumbing
def _matplotlib() -> Any | None:
    """The ``matplotlib`` module, or None where the ``plot`` extra is not installed."""
    try:
        import matplotlib
        import matplotlib.style
    except ImportError:
        return None
    return matplotlib


def _figure(panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG through a temporary file and a rename, without version metadata."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)
    return path


def _label_points(ax: Any, xs: Sequence[float | None], ys: Sequence[float | None],
                  labels: Sequence[str]) -> None:
    for x, y, text in zip(xs, ys, labels):
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            ax.annotate(text, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, zorder=5)


def _draw_front(ax: Any, xs: Sequence[float | None], ys: Sequence[float | None], higher_is_better: bool,
                label: str = "Pareto front") -> None:
    front = pareto_front(xs, ys, higher_is_better)
    if len(front) > 1:  # one point is no trade-off to draw
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:blue",
                linewidth=1.2, alpha=0.8, label=label, zorder=1)


# ---------------------------------------------------------------- the search plot
def write_search_plot(report: Mapping[str, Any], out_dir: Path) -> Path | None:
    """Draw the report's trials into ``out_dir/search.png``; None when there are none or no matplotlib.

    One panel per quality metric (see ``quality_metrics``), saved size on x; every trial, feasible or
    not, labelled with its number; the chosen setting (as measured by the final run) and the original
    marked; the Pareto front of the trials as a step line; the size and quality bounds as dashed lines.
    Without any quality metric the panels show the searched knob values against size instead.
    """
    trials = list(report.get("trials") or [])
    if not trials:
        return None
    mpl = _matplotlib()
    if mpl is None:
        return None
    panels: list[tuple[str, Any]] = [("metric", name) for name in quality_metrics(report)]
    if not panels:
        panels = [("knob", knob) for knob in _knobs(trials)] or [("trial", None)]
    with mpl.style.context(_STYLE):
        fig, axes = _figure(len(panels))
        for ax, (kind, what) in zip(axes, panels):
            _search_panel(ax, report, trials, kind, what)
        feasible = sum(bool(t.get("feasible")) for t in trials)
        fig.suptitle(f"{report['recipe']['name']}: search, {len(trials)} trial(s), {feasible} feasible")
        return _save(fig, Path(out_dir) / SEARCH_PNG)


def _search_panel(ax: Any, report: Mapping[str, Any], trials: list[Mapping[str, Any]], kind: str,
                  what: Any) -> None:
    """One panel: size on x; on y the metric ``what`` (kind "metric"), a knob, or the trial number."""
    metrics = report["metrics"]
    size_name = _size_metric(metrics)
    size_scale, size_unit = _SCALES["bytes"]
    size = metrics.get(size_name, {}) if size_name else {}
    xs = []
    for t in trials:
        measured = _number((t.get("metrics") or {}).get(size_name)) if size_name else None
        measured = measured if measured is not None else _number(t.get("predicted_size"))
        xs.append(measured * size_scale if measured is not None else None)
    chosen = chosen_trial(report)
    chosen_xy = None

    if kind == "metric":
        m = metrics[what]
        scale, unit = _SCALES.get(m["dimension"], (1.0, ""))
        ys = [_number((t.get("metrics") or {}).get(what)) for t in trials]
        ys = [y * scale if y is not None else None for y in ys]
        better = "higher is better" if m["higher_is_better"] else "lower is better"
        ax.set_ylabel(f"{what}{f' ({unit})' if unit else ''}: {better}")
        _draw_front(ax, xs, ys, m["higher_is_better"])
        original = (_number(size.get("original")), _number(m.get("original")))
        if None not in original:
            ax.plot([original[0] * size_scale], [original[1] * scale], linestyle="none", marker="D",
                    color="black", label="original", zorder=3)
        for c in report["constraints"]:
            if c["metric"] == what:
                level = constraint_level(c, m) * scale
                ax.axhline(level, linestyle="--", linewidth=1, color="tab:purple",
                           label=f"{c['constraint']} (at {level:.6g}{f' {unit}' if unit else ''})")
        final = (_number(size.get("final")), _number(m.get("final")))
        if chosen is not None and None not in final:
            chosen_xy = (final[0] * size_scale, final[1] * scale)
    elif kind == "knob":
        stage, knob = what
        ys = [_number(((t.get("values") or {}).get(stage) or {}).get(knob)) for t in trials]
        ax.set_ylabel(f"{stage}.{knob} (no quality metric to plot)")
    else:
        ys = [float(i) for i in range(1, len(trials) + 1)]
        ax.set_ylabel("trial")
    if chosen is not None and chosen_xy is None and xs[chosen] is not None and ys[chosen] is not None:
        chosen_xy = (xs[chosen], ys[chosen])

    feasible = [bool(t.get("feasible")) for t in trials]
    _plot_points(ax, [(x, y) for x, y, f in zip(xs, ys, feasible) if f], marker="o", color="tab:green",
                 label="feasible trial")
    _plot_points(ax, [(x, y) for x, y, f in zip(xs, ys, feasible) if not f], marker="x",
                 color="tab:red", label="infeasible trial")
    _label_points(ax, xs, ys, [str(i) for i in range(1, len(trials) + 1)])
    unmeasured = [(i, x) for i, (x, y) in enumerate(zip(xs, ys))
                  if x is not None and (y is None or not math.isfinite(y))]
    if unmeasured:  # a failed trial has no quality: marked at its size along the bottom edge
        at_bottom = ax.get_xaxis_transform()
        ax.plot([x for _, x in unmeasured], [0.02] * len(unmeasured), transform=at_bottom,
                linestyle="none", marker="v", color="tab:gray", label="trial not measured (failed)")
        for i, x in unmeasured:
            ax.annotate(str(i + 1), (x, 0.02), xycoords=at_bottom, xytext=(5, 5),
                        textcoords="offset points", fontsize=8, zorder=5)
    if chosen_xy is not None:
        ax.plot([chosen_xy[0]], [chosen_xy[1]], linestyle="none", marker="*", markersize=18,
                markerfacecolor="gold", markeredgecolor="black", zorder=4,
                label=f"chosen: trial {chosen + 1}, as saved")
    for c in report["constraints"]:
        if size_name and c["metric"] == size_name:
            level = constraint_level(c, size) * size_scale
            ax.axvline(level, linestyle="--", linewidth=1, color="tab:gray",
                       label=f"{c['constraint']} (at {level:.4g} {size_unit})")
    original_size = _number(size.get("original"))
    what_size = "saved size" if size_name else "predicted size (no size metric in the report)"
    if original_size:
        orig = original_size * size_scale
        ax.set_xlabel(f"{what_size} ({size_unit}); original {orig:.4g} {size_unit}")
        top = ax.secondary_xaxis("top", functions=(lambda v: v / orig * 100, lambda p: p * orig / 100))
        top.set_xlabel("% of the original size")
    else:
        ax.set_xlabel(f"{what_size} ({size_unit})")
    ax.grid(True, linewidth=0.5, alpha=0.4)
    ax.legend(loc="best", fontsize="small")


def _plot_points(ax: Any, points: list[tuple[float | None, float | None]], **style: Any) -> None:
    points = [(x, y) for x, y in points if x is not None and y is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="none", zorder=2, **style)


# ---------------------------------------------------------------- a generic scatter
def scatter_png(rows: Iterable[Mapping[str, Any]], x: str, y: str, path: str | Path, *,
                label: str | None = None, group: str | None = None, title: str | None = None,
                xlabel: str | None = None, ylabel: str | None = None, front: str | None = None,
                logx: bool = False) -> Path | None:
    """Draw ``row[x]`` against ``row[y]`` for each row into the PNG ``path``; None without matplotlib.

    ``label`` names the key whose value labels each point, ``group`` the key that splits the rows
    into coloured series with a legend. ``front`` (``"higher"`` or ``"lower"``: which y is better)
    adds the Pareto front of smaller x and better y as a step line. Rows missing x or y are skipped.
    """
    if front not in (None, "higher", "lower"):
        raise ValueError(f"front must be 'higher', 'lower' or None, not {front!r}")
    mpl = _matplotlib()
    if mpl is None:
        return None
    rows = [r for r in rows if _number(r.get(x)) is not None and _number(r.get(y)) is not None]
    path = Path(path)
    with mpl.style.context(_STYLE):
        fig, (ax,) = _figure(1)
        groups = list(dict.fromkeys(str(r.get(group)) for r in rows)) if group else [None]
        for name in groups:
            sub = [r for r in rows if group is None or str(r.get(group)) == name]
            ax.plot([float(r[x]) for r in sub], [float(r[y]) for r in sub], linestyle="none", marker="o",
                    label=name, zorder=2)
        xs = [float(r[x]) for r in rows]
        ys = [float(r[y]) for r in rows]
        if label:
            _label_points(ax, xs, ys, [str(r.get(label, "")) for r in rows])
        if front in ("higher", "lower"):
            _draw_front(ax, xs, ys, front == "higher")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        ax.grid(True, linewidth=0.5, alpha=0.4)
        if group or front:
            ax.legend(loc="best", fontsize="small")
        if title:
            ax.set_title(title)
        return _save(fig, path)
