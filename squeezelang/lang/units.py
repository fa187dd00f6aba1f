"""Units of the recipe language: which dimension each measures and its factor to base units.

Base units are bytes, a plain count, seconds, and a fraction of the original model's value
(``20%`` is 0.2, ``0.5x`` is 0.5). ``fmt_value`` writes a measured value back in a readable unit
for the reports and the terminal.
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squeezelang.lang.ast import Num

BYTES = "bytes"
COUNT = "count"
TIME = "time"
RELATIVE = "relative"

UNITS: dict[str, tuple[str, float]] = {
    "B": (BYTES, 1.0),
    "KB": (BYTES, 1e3),
    "MB": (BYTES, 1e6),
    "GB": (BYTES, 1e9),
    "KiB": (BYTES, 1024.0),
    "MiB": (BYTES, 1024.0**2),
    "GiB": (BYTES, 1024.0**3),
    "K": (COUNT, 1e3),
    "M": (COUNT, 1e6),
    "G": (COUNT, 1e9),
    "ms": (TIME, 1e-3),
    "s": (TIME, 1.0),
    "min": (TIME, 60.0),
    "h": (TIME, 3600.0),
    "%": (RELATIVE, 0.01),
    "x": (RELATIVE, 1.0),
}

# Spellings people reach for that are not units of the language.
_ALIASES = {
    "sec": "s", "secs": "s", "second": "s", "seconds": "s",
    "mins": "min", "minute": "min", "minutes": "min",
    "hr": "h", "hrs": "h", "hour": "h", "hours": "h",
    "msec": "ms", "millis": "ms",
    "bytes": "B", "byte": "B",
    "percent": "%", "pct": "%",
}


def dimension_of(unit: str | None) -> str | None:
    """Return the dimension a unit measures, or None for a plain number or an unknown unit."""
    if unit is None:
        return None
    entry = UNITS.get(unit)
    return entry[0] if entry else None


def factor_of(unit: str | None) -> float:
    """Return the factor that converts a value in ``unit`` to base units (1 for a plain number)."""
    if unit is None:
        return 1.0
    try:
        return UNITS[unit][1]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}") from None


def to_base(num: Num) -> float:
    """Convert a number to base units: bytes, count, seconds, or a fraction for ``%``/``x``."""
    return float(num.value) * factor_of(num.unit)


def is_relative(num: Num) -> bool:
    """Tell whether a number is relative to the original model's value (``%`` or ``x``)."""
    return dimension_of(num.unit) == RELATIVE


def units_for(dimension: str) -> tuple[str, ...]:
    """Return the units of a dimension, in table order."""
    return tuple(unit for unit, (dim, _) in UNITS.items() if dim == dimension)


def spelled_unit(text: str) -> str | None:
    """Return the unit ``text`` spells, exactly, in another case (``mb``) or as a word (``sec``)."""
    if text in UNITS:
        return text
    folded = [unit for unit in UNITS if unit.lower() == text.lower()]
    if folded:
        return folded[0]
    return _ALIASES.get(text.lower())


def suggest_unit(text: str) -> str | None:
    """Return the known unit closest to a mistyped one (``mb`` -> ``MB``), or None."""
    spelled = spelled_unit(text)
    if spelled is not None:
        return spelled
    by_lower = {unit.lower(): unit for unit in UNITS}
    close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


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
