"""The deterministic simulation sweep: every seed must keep every invariant.

CI runs ITMOLINK_SIM_SEEDS seeds (2,000 by default); ``make sim`` runs a long
sweep. A failing seed's message says how to replay it.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.simulator import InvariantViolation, Simulation

SEEDS = int(os.environ.get("ITMOLINK_SIM_SEEDS", "2000"))
CHUNK = 100


@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK))
def test_seeds(first: int) -> None:
    failures = []
    for seed in range(first, min(first + CHUNK, SEEDS)):
        try:
            Simulation(seed).run()
        except InvariantViolation as violation:
            failures.append(f"{violation}\n  replay: python -m tests.sim --seed {seed} --verbose")
    assert not failures, "\n".join(failures)


def test_a_seed_replays_exactly() -> None:
    first, second = Simulation(7), Simulation(7)
    first.run()
    second.run()
    assert first.log == second.log
    assert first.faults == second.faults
    assert first.faults["crash before commit"] > 0 or first.faults["crash and restart"] > 0
