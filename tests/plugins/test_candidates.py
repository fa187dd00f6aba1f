"""What the built-in techniques offer ``compose { … }``."""
from __future__ import annotations

from squeezelang.hooks.manager import default_registries


def candidates(technique: str) -> dict[str, object]:
    return {c.label: c for c in default_registries().techniques.get(technique).candidates("embedding")}


def test_prune_offers_depth_pruning_as_a_faster_structured_candidate():
    offered = candidates("prune")
    depth = offered["depth"]
    assert depth.params["method"] == "depth" and depth.autos == ("ratio",)
    assert depth.needs_data and depth.speeds_up
    assert depth.risk > max(c.risk for label, c in offered.items() if label != "depth")


def test_vocab_trim_keeps_a_frequent_set_and_ranks_after_int8():
    trim = candidates("vocab_trim")["vocab_trim"]
    assert trim.params["keep_frequent"] >= 8000  # the data's tokens alone cost 6.7 points on STS-B
    assert trim.risk > candidates("quantize")["int8"].risk
