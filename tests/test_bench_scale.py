"""The scale suite's targets are judged on its rows: peak RSS of the 1.1B int4 GPTQ run against
30% of the float32 size plus 1 GB, and seconds per parameter from 0.5B to 1.1B."""
from benchmarks.scale import targets

B = 1e9


def _row(technique: str, size: str, params: float, wall: float, rss: float = 1.0 * B) -> dict:
    return {"name": f"{technique} {size}", "technique": technique, "size": size, "params": params,
            "fp32_bytes": 4 * params, "wall_s": wall, "max_rss_bytes": rss}


def _named(rows: list[dict], start: str):
    (target,) = [t for t in targets(rows) if t.name.startswith(start)]
    return target


def test_peak_memory_is_judged_against_the_float32_size():
    assert _named([_row("int4-gptq", "1.1B", 1.1 * B, 900, rss=2.0 * B)], "int4 GPTQ").met is True
    over = _named([_row("int4-gptq", "1.1B", 1.1 * B, 900, rss=8.9 * B)], "int4 GPTQ")
    assert over.met is False and "8.90 GB against 2.32 GB" in over.measured


def test_time_is_linear_when_seconds_per_parameter_hold():
    rows = [_row("int8", "0.5B", 0.5 * B, 100), _row("int8", "1.1B", 1.1 * B, 240)]
    assert _named(rows, "int8:").met is True
    rows[1]["wall_s"] = 400  # x1.82 per parameter
    assert _named(rows, "int8:").met is False


def test_a_missing_or_failed_row_is_not_measured():
    rows = [_row("depth", "0.5B", 0.5 * B, 100), {"name": "depth 1.1B", "error": "exit 3"}]
    assert _named(rows, "depth:").met is None
    assert _named([], "int4 GPTQ").met is None


def test_the_table_shows_the_memory_at_the_end_of_each_phase():
    from benchmarks.scale import table

    row = dict(_row("int8", "1.1B", 1.1 * B, 100, rss=9.1 * B), stage_s=20.0,
               final_size_bytes=1.1 * B, original_size_bytes=2.2 * B,
               phase_max_rss_bytes={"load": 2.5 * B, "stage:s": 4.0 * B},
               phase_rss_bytes={"load": 2.4 * B, "stage:s": 2.6 * B})
    text = table([row, _row("int8", "0.5B", 0.5 * B, 50) | {
        "stage_s": 9.0, "final_size_bytes": 1.0, "original_size_bytes": 2.0}])
    header, line = text.splitlines()[-2:]
    assert header.split() == ["row", "load", "stage:s"]
    assert line.split() == ["int8", "1.1B", "2.50", "/", "2.40", "4.00", "/", "2.60"]
