"""``models.allocate``: the MILP's choice is the brute-force optimum, within budget, deterministic."""
from __future__ import annotations

import itertools
import random

import pytest

from squeezelang.errors import SqueezeError
from squeezelang.models.allocate import allocate, describe, total


def _brute_force(costs, sizes, budget):
    feasible = [p for p in itertools.product(*(range(len(c)) for c in costs))
                if total(sizes, p) <= budget]
    return min(sum(c[i] for c, i in zip(costs, p)) for p in feasible)


@pytest.mark.parametrize("seed", range(40))
def test_milp_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 6)
    options = [rng.randint(1, 4) for _ in range(groups)]
    # costs over six orders of magnitude, like 8-bit against 2-bit errors
    costs = [[rng.random() * 10 ** rng.randint(-3, 3) for _ in range(o)] for o in options]
    sizes = [[rng.randint(1, 10 ** 6) for _ in range(o)] for o in options]
    lo, hi = sum(map(min, sizes)), sum(map(max, sizes))
    budget = rng.randint(lo, hi)
    choice = allocate(costs, sizes, budget)
    assert len(choice) == groups and all(0 <= i < o for i, o in zip(choice, options))
    assert total(sizes, choice) <= budget
    got = sum(c[i] for c, i in zip(costs, choice))
    assert got == pytest.approx(_brute_force(costs, sizes, budget), rel=1e-9, abs=1e-12)
    assert allocate(costs, sizes, budget) == choice  # deterministic


def test_budget_that_binds_nothing_takes_the_cheapest():
    costs = [[3.0, 1.0, 2.0], [0.5, 0.5]]
    sizes = [[10, 30, 20], [5, 4]]
    assert allocate(costs, sizes, 1000) == [1, 1]  # a tie goes to the smaller option


def test_budget_moves_bytes_to_the_sensitive_group():
    # two equal-sized layers; the first suffers far more when squeezed
    costs = [[0.0, 10.0], [0.0, 0.1]]
    sizes = [[100, 50], [100, 50]]
    assert allocate(costs, sizes, 150) == [0, 1]


def test_infeasible_budget_names_the_smallest_reachable_size():
    with pytest.raises(SqueezeError, match=r"budget of 99 bytes; the smallest reachable is 120 bytes"):
        allocate([[1.0, 2.0], [1.0]], [[100, 70], [50]], 99, what="test")


@pytest.mark.parametrize("costs, sizes, message", [
    ([[1.0], [2.0]], [[1]], "2 cost lists for 1 size lists"),
    ([[1.0, 2.0]], [[1]], "as many costs as sizes"),
    ([[]], [[]], "at least one"),
    ([[float("nan")]], [[1]], "not a finite number"),
])
def test_malformed_input(costs, sizes, message):
    with pytest.raises(SqueezeError, match=message):
        allocate(costs, sizes, 10)


def test_larger_instance_is_fast_and_uses_the_budget():
    rng = random.Random(1)
    # 36 layers x 20 sparsities, costs convex and decreasing in size, like pruning
    sizes = [[(20 - j) * 1000 * (1 + i % 3) for j in range(20)] for i in range(36)]
    costs = [[(j / 20) ** 2 * rng.uniform(0.1, 10) for j in range(20)] for _ in range(36)]
    budget = sum(s[10] for s in sizes)
    choice = allocate(costs, sizes, budget)
    assert budget - 3000 <= total(sizes, choice) <= budget
    uniform = sum(c[10] for c in costs)
    assert sum(c[i] for c, i in zip(costs, choice)) <= uniform


def test_describe_drops_the_common_prefix():
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    assert describe(names, ["50%", "70%"]) == \
        "0.attention.self.query 50%, 1.output.dense 70% (under encoder.layer)"
    assert describe(["lm_head"], ["4"]) == "lm_head 4"
