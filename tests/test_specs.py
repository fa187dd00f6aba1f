"""Every example recipe in specs/ passes ``squeeze check``."""
from __future__ import annotations

from pathlib import Path

import pytest

from squeezelang.lang.parser import parse_file
from squeezelang.planner.resolve import resolve

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.squeeze"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_checks(path: Path):
    if "../../shared/" in path.read_text() and not SHARED.is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, which is absent here")
    plan = resolve(parse_file(str(path)))
    assert plan.stages or plan.constraints


def test_there_are_specs():
    assert len(SPECS) >= 1
