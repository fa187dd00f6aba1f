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


def test_the_table_shows_command_seconds_and_the_commands_own_peak():
    from benchmarks.overhead import table

    row = {"name": "check x", "kind": "check", "wall_s": 0.2, "wall_min_s": 0.15, "wall_max_s": 0.25,
           "cpu_s": 0.19, "startup_exit_s": 0.035, "import_cli_s": 0.012, "command_s": 0.125,
           "max_rss_bytes": 3.3 * GB, "peak_bytes": 34e6, "load_avg": 0.6, "heavy_imports": []}
    line = table([row]).splitlines()[1]
    assert line.split()[-4:] == ["0.125", "34", "0.6", "-"]
