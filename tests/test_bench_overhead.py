"""The overhead suite judges peak memory on the run's own figure, not on ``wait4``'s, which carries
the benchmark process's own peak into every child it starts."""
from benchmarks.overhead import targets

GB = 1e9


def _run(name: str, wait4: float, engine: float | None) -> dict:
    return {"name": name, "kind": "run", "minilm": True, "wall_s": 10.0,
            "max_rss_bytes": wait4, "engine_max_rss_bytes": engine}


def _memory(rows: list[dict]):
    (target,) = [t for t in targets(rows) if "RSS" in t.name]
    return target


def test_memory_is_judged_on_the_runs_own_peak():
    target = _memory([_run("a", 3.4 * GB, 0.75 * GB), _run("b", 3.4 * GB, 1.19 * GB)])
    assert target.met is True
    assert "1.190 GB (b)" in target.measured


def test_a_run_over_the_bound_is_not_met():
    assert _memory([_run("a", 3.4 * GB, 0.75 * GB), _run("b", 3.5 * GB, 3.2 * GB)]).met is False


def test_a_run_without_its_own_figure_is_not_judged():
    target = _memory([_run("a", 0.5 * GB, None)])
    assert target.met is None and "a" in target.measured
