"""Allocation under a size budget: one option per group, least total cost, total bytes <= budget.

The problem behind per-layer (mixed) compression: every layer (a *group*) has a few candidate
settings — sparsities, bit widths — each with a measured cost (``models.sensitivity``) and a size in
bytes. ``allocate`` picks exactly one option per group so that the summed size stays within the
budget and the summed cost is least. It is a multiple-choice knapsack, solved exactly as a small
mixed-integer linear program with ``scipy.optimize.milp`` (HiGHS), as HAWQ-V3 and AutoQuantize do:

    minimise   Σ_g Σ_o cost[g][o] · x[g][o]
    subject to Σ_o x[g][o] = 1              for every group g
               Σ_g Σ_o size[g][o] · x[g][o] <= budget
               x[g][o] ∈ {0, 1}

The answer is deterministic (same input, same choice); the budget is checked again in exact integer
arithmetic on the rounded solution, so a solver tolerance can never let a choice exceed it.
"""
from __future__ import annotations

import math
from typing import Sequence

from squeezelang.errors import SqueezeError

#: Seconds HiGHS may search; the problems of a model's layers are solved in well under a second.
TIME_LIMIT = 60.0


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int,
             names: Sequence[str] | None = None, what: str = "allocation") -> list[int]:
    """Return the index of the chosen option of every group (see the module docstring).

    ``costs[g][o]`` and ``sizes[g][o]`` (bytes, integers) describe option ``o`` of group ``g``;
    ``names`` label the groups in messages. Raises ``SqueezeError`` when even the smallest option
    of every group exceeds ``budget`` (the message says the smallest reachable size).
    """
    groups = _checked(costs, sizes, names, what)
    budget = int(math.floor(budget))
    smallest = sum(min(s for _, s in g) for g in groups)
    if smallest > budget:
        raise SqueezeError(f"{what}: no choice fits the budget of {budget:,} bytes; the smallest "
                           f"reachable is {smallest:,} bytes")
    largest = sum(max(s for _, s in g) for g in groups)
    if largest <= budget:  # the budget binds nothing: the cheapest option of each group
        return [_cheapest(g, range(len(g))) for g in groups]
    choice = _solve(groups, budget)
    return _repair(groups, choice, budget)


def total(sizes: Sequence[Sequence[int]], choice: Sequence[int]) -> int:
    """The summed size of a choice."""
    return sum(int(s[i]) for s, i in zip(sizes, choice))


def _checked(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]],
             names: Sequence[str] | None, what: str) -> list[list[tuple[float, int]]]:
    if len(costs) != len(sizes):
        raise SqueezeError(f"{what}: {len(costs)} cost lists for {len(sizes)} size lists")
    groups = []
    for g, (c, s) in enumerate(zip(costs, sizes)):
        label = names[g] if names is not None else f"group {g}"
        if not c or len(c) != len(s):
            raise SqueezeError(f"{what}: '{label}' needs as many costs as sizes, and at least one")
        if not all(math.isfinite(float(x)) for x in c):
            raise SqueezeError(f"{what}: '{label}' has a cost that is not a finite number: {list(c)}")
        groups.append([(float(x), int(y)) for x, y in zip(c, s)])
    return groups


def _cheapest(group: list[tuple[float, int]], options: Sequence[int]) -> int:
    """The least costly option, the smaller one on a tie (then the first)."""
    return min(options, key=lambda o: (group[o][0], group[o][1], o))


def _solve(groups: list[list[tuple[float, int]]], budget: int) -> list[int]:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n = sum(len(g) for g in groups)
    # Only cost differences within a group matter (one option each): subtract each group's least.
    # HiGHS stops within an absolute gap of 1e-6, so the largest is scaled to 1e6, not to 1.
    cost = np.array([c - min(x for x, _ in g) for g in groups for c, _ in g], dtype=float)
    cost *= 1e6 / max(float(cost.max()), 1e-300)
    size = np.array([s for g in groups for _, s in g], dtype=float)
    scale = max(float(size.max()), 1.0)
    one = lil_matrix((len(groups), n))
    start = 0
    for g, group in enumerate(groups):
        one[g, start:start + len(group)] = 1.0
        start += len(group)
    constraints = [LinearConstraint(one.tocsr(), 1.0, 1.0),
                   LinearConstraint(size[None, :] / scale, -np.inf, budget / scale)]
    result = milp(cost, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"time_limit": TIME_LIMIT, "mip_rel_gap": 0.0})
    if result.x is None:
        raise SqueezeError(f"allocation: the solver found no choice within the budget "
                           f"({result.message})")
    x = np.asarray(result.x).reshape(-1)
    choice, start = [], 0
    for group in groups:
        choice.append(int(np.argmax(x[start:start + len(group)])))
        start += len(group)
    return choice


def _repair(groups: list[list[tuple[float, int]]], choice: list[int], budget: int) -> list[int]:
    """Make a rounded solver answer fit the budget exactly (a tolerance may have let it exceed it).

    Moves the group whose smaller option costs least per byte saved, until the sizes fit.
    """
    choice = list(choice)
    used = sum(g[i][1] for g, i in zip(groups, choice))
    while used > budget:
        best = None
        for gi, g in enumerate(groups):
            c0, s0 = g[choice[gi]]
            for o, (c, s) in enumerate(g):
                if s < s0:
                    key = ((c - c0) / (s0 - s), gi, o)
                    best = key if best is None or key < best else best
        if best is None:  # cannot happen: the smallest options fit (checked before solving)
            raise SqueezeError("allocation: no choice fits the budget")
        _, gi, o = best
        used -= groups[gi][choice[gi]][1] - groups[gi][o][1]
        choice[gi] = o
    return choice


def describe(names: Sequence[str], values: Sequence[str]) -> str:
    """A per-layer choice on one line: ``name value`` pairs, without the names' common prefix."""
    import os

    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]  # cut at a dot: "encoder.layer.", not "encoder.layer.1"
    return ", ".join(f"{n[len(prefix):]} {v}" for n, v in zip(names, values)) + (
        f" (under {prefix.rstrip('.')})" if prefix else "")
