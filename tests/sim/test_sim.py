"""The deterministic simulation sweep: every seed must keep every invariant.

CI runs ITMOLINK_SIM_SEEDS seeds (2,000 by default); ``make sim`` runs a long
sweep. A failing seed's message says how to replay it.
"""

from __future__ import annotations

import os

import pytest

from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import TransferState
from tests.sim.simulator import HOST, ONE_ROUND_BUYER, InvariantViolation, Simulation

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


def test_the_faults_reach_the_settlements_of_one_round_transfers() -> None:
    """The sweep exercises what settles a one-round proposal: within a few seeds the
    buyer refuses one before looking it up (trust churn) and the host keeps it as a
    failed attempt (S5), the buyer refuses expired ones (3011, recorded), and the
    host withdraws one past its deadline, settled by the buyer's receipt of the void (S7)."""
    seen = {"kept": False, "expired": False, "completed": False, "withdrawn": False}
    for seed in range(50):
        simulation = Simulation(seed)
        simulation.run()
        seen["kept"] |= simulation.faults["refusal kept as a failed attempt"] > 0
        with simulation.nodes[HOST].store.transaction() as tx:
            one_round = [
                t for t in tx.transfers()
                if t.partner == ONE_ROUND_BUYER and t.complete_on_acceptance
            ]  # fmt: skip
        seen["expired"] |= any(
            t.state is TransferState.REJECTED and t.rejection_code == RejectionCode.PROPOSAL_EXPIRED
            for t in one_round
        )
        seen["completed"] |= any(t.state is TransferState.COMPLETED for t in one_round)
        seen["withdrawn"] |= any(
            t.state is TransferState.VOIDED and t.rejection_detail.startswith("withdrawn:")
            for t in one_round
        )
        if all(seen.values()):
            return
    raise AssertionError(f"not reached in 50 seeds: {seen}")
