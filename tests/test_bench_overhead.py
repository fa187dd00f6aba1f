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


def _repeat(wall: float, **phases: float) -> dict:
    t = {"load_s": 3.0, "stages_s": 0.5, "save_s": 0.2, "reload_s": 0.5, "measure_final_s": 10.0,
         "measure_original_s": 0.9}
    t.update(phases)
    unavoidable = sum(t[k] for k in ("load_s", "stages_s", "save_s", "reload_s", "measure_final_s"))
    return {"name": "second run minilm-int8", "kind": "repeat", "wall_s": wall,
            "unavoidable_s": unavoidable, "over_unavoidable": wall / unavoidable, **t}


def _repeated(rows: list[dict]):
    (target,) = [t for t in targets(rows) if "repeated run" in t.name]
    return target


def test_a_repeated_run_is_judged_on_its_wall_time_over_what_it_cannot_avoid():
    assert _repeated([_repeat(15.0)]).met is True  # 14.2 s unavoidable: x1.06
    slow = _repeated([_repeat(20.0)])  # x1.41: the original measured again, say
    assert slow.met is False and "x1.41" in slow.measured


def test_a_repeated_run_that_failed_or_did_not_run_is_not_judged():
    assert _repeated([]).met is None
    failed = _repeated([{"name": "second run minilm-int8", "kind": "repeat", "error": "exit 2: boom"}])
    assert failed.met is None and "boom" in failed.measured
