"""The column-requirement format of ``Metric.columns`` and ``Technique.data_params``, parsed.

``"text|a,b;label"``: ``;`` separates groups that are all required, ``|`` separates alternatives
within a group, ``,`` joins the columns of one alternative. So ``"text|a,b;label"`` means a ``label``
column and either a ``text`` column or both ``a`` and ``b``. Pure Python: ``squeeze check`` uses it.
"""
from __future__ import annotations

import itertools
from typing import Any

#: The conventional column roles; a metric argument of the same name renames one.
ROLES = ("text", "a", "b", "score", "label")


def parse_columns(spec: str) -> list[list[str]]:
    """Expand a columns spec into its alternatives, each a list of required column roles."""
    groups = []
    for group in spec.split(";"):
        alternatives = [[c.strip() for c in alt.split(",") if c.strip()] for alt in group.split("|")]
        alternatives = [alt for alt in alternatives if alt]
        if alternatives:
            groups.append(alternatives)
    out: list[list[str]] = []
    for combination in itertools.product(*groups):
        out.append(list(dict.fromkeys(c for alt in combination for c in alt)))
    return out if groups else [[]]


def renames(args: dict[str, Any], roles: tuple[str, ...] = ROLES) -> dict[str, str]:
    """The column renames among a metric's arguments (``a = "s1"`` reads column ``s1`` as ``a``)."""
    return {role: args[role] for role in roles if isinstance(args.get(role), str)}


def required_columns(metric: Any, args: dict[str, Any] | None = None) -> list[list[str]]:
    """The alternative sets of column names that ``metric`` needs, after ``args``' renames.

    ``metric`` is a ``Metric`` (the spec of its ``columns_for(args)`` is used) or a spec string. A
    data set satisfies the metric when it has every column of at least one alternative; ``[[]]``
    means no columns.
    """
    spec = metric if isinstance(metric, str) else metric.columns_for(args or {})
    alternatives = parse_columns(spec or "")
    names = renames(args or {}, tuple(dict.fromkeys(c for alt in alternatives for c in alt)))
    return [[names.get(c, c) for c in alt] for alt in alternatives]
