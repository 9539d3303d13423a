"""The one-round transfer between two real nodes over mutual TLS, LAO configured with
``complete_on_acceptance = true`` for KOR; and how node.toml takes the setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from itmolink.cli.main import main
from itmolink.node.config import ConfigError, load_config

from .conftest import Registry, final_state, running_pair
from .test_transfer import COMPLETED, issued, settled, transfer

# Written after the [[partners]] entries of write_node: it lands in the last one, KOR's.
ASK = "complete_on_acceptance = true\n"
COMPLETION = "itmolink.v1.TransferCompletion"


def _journaled(registry: Registry, payload_type: str) -> int:
    with registry.node.engine.store.transaction() as tx:
        return sum(1 for entry in tx.journal_entries() if entry.payload_type == payload_type)


async def test_two_nodes_complete_a_transfer_in_one_round_trip(
    pki: Callable[..., Path],
) -> None:
    async with running_pair(pki, lao_extra=ASK) as (lao, kor):
        assert lao.node.engine.partners["KOR"].complete_on_acceptance
        assert not kor.node.engine.partners["LAO"].complete_on_acceptance
        authorisation_id = await issued(lao, quantity=1_000)
        transfer_id = await transfer(lao, authorisation_id, 600)
        assert (await final_state(lao, transfer_id)).state == COMPLETED
        assert (await final_state(kor, transfer_id)).state == COMPLETED
        await settled(lao)
        await settled(kor)
        assert [(a.transfer_id, a.amount) for a in await lao.adjustments()] == [(transfer_id, 600)]
        assert [(a.transfer_id, a.amount) for a in await kor.adjustments()] == [(transfer_id, -600)]
        assert (await lao.held(), await kor.held()) == (400, 600)
        # One round trip: the proposal and its acceptance; no completion either way.
        assert await lao.node.db(_journaled, lao, COMPLETION) == 0
        assert await kor.node.db(_journaled, kor, COMPLETION) == 0


def _partner_config(pki: Callable[..., Path], extra: str) -> Path:
    return pki("LAO", ["KOR"], extra=extra)


def test_complete_on_acceptance_is_read_per_partner_and_false_by_default(
    pki: Callable[..., Path],
) -> None:
    [plain] = load_config(_partner_config(pki, "")).partners
    assert plain.complete_on_acceptance is False
    [asking] = load_config(_partner_config(pki, ASK)).partners
    assert asking.complete_on_acceptance is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('complete_on_acceptance = "yes"\n', r"'complete_on_acceptance' must be true or false"),
        ("complete_on_acceptance = 1\n", r"'complete_on_acceptance' must be true or false"),
        ("complete_on_acceptence = true\n", r"unknown field\(s\): complete_on_acceptence"),
    ],
)
def test_a_bad_complete_on_acceptance_is_refused(
    pki: Callable[..., Path], extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_partner_config(pki, extra))


def test_check_config_shows_the_one_round_partner(
    pki: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    main(["node", "check-config", str(_partner_config(pki, ASK))])
    [line] = [line for line in capsys.readouterr().out.splitlines() if "partner KOR" in line]
    assert "one-round (complete_on_acceptance)" in line
