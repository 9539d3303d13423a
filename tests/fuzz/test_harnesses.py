"""The atheris harnesses in fuzz/ stay runnable: their seeds decode as intended and every
seed passes the harness' property checks (a replay of the seed corpus, not a fuzz run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (Linux x86_64 wheels only)")

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


def harness(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"fuzz_{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["envelope", "delivery"])
def test_every_seed_passes_its_harness(name: str) -> None:
    module = harness(name)
    seeds = module.seeds()
    assert seeds
    for data in seeds.values():
        module.test_one_input(data)
    # A few degenerate inputs too.
    for data in (b"", b"\x00", b"\xff" * 64, bytes(range(256))):
        module.test_one_input(data)
