"""The unit table: dimensions, factors, conversions and suggestions."""
from __future__ import annotations

import pytest

from squeezelang.lang.ast import Num
from squeezelang.lang.units import UNITS, dimension_of, is_relative, suggest_unit, to_base, units_for


@pytest.mark.parametrize("num, dimension, base", [
    (Num(12, "B"), "bytes", 12.0),
    (Num(12, "KB"), "bytes", 12e3),
    (Num(12, "MB"), "bytes", 12e6),
    (Num(1.5, "GB"), "bytes", 1.5e9),
    (Num(2, "KiB"), "bytes", 2048.0),
    (Num(1, "MiB"), "bytes", 1024.0**2),
    (Num(1, "GiB"), "bytes", 1024.0**3),
    (Num(3, "K"), "count", 3e3),
    (Num(10, "M"), "count", 10e6),
    (Num(1, "G"), "count", 1e9),
    (Num(250, "ms"), "time", 0.25),
    (Num(2, "s"), "time", 2.0),
    (Num(30, "min"), "time", 1800.0),
    (Num(1, "h"), "time", 3600.0),
    (Num(20, "%"), "relative", 0.2),
    (Num(0.5, "x"), "relative", 0.5),
    (Num(0.97), None, 0.97),
])
def test_dimension_and_base(num, dimension, base):
    assert dimension_of(num.unit) == dimension
    assert to_base(num) == pytest.approx(base)
    assert is_relative(num) == (dimension == "relative")


def test_table_is_complete():
    assert set(UNITS) == {"B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "K", "M", "G",
                          "ms", "s", "min", "h", "%", "x"}
    assert units_for("time") == ("ms", "s", "min", "h")
    assert units_for("relative") == ("%", "x")
    assert units_for("nothing") == ()
    assert dimension_of("parsecs") is None


def test_to_base_rejects_unknown_units():
    with pytest.raises(ValueError):
        to_base(Num(1, "mb"))


@pytest.mark.parametrize("text, unit", [
    ("mb", "MB"), ("kib", "KiB"), ("sec", "s"), ("minutes", "min"), ("hours", "h"),
    ("percent", "%"), ("MS", "ms"), ("GIB", "GiB"), ("Mib", "MiB"), ("MB", "MB"), ("zzz", None),
])
def test_suggest_unit(text, unit):
    assert suggest_unit(text) == unit
