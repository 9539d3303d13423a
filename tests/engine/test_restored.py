"""A ledger restored from a backup older than its last transaction (docs/OPERATIONS.md
§7, DESIGN.md decision 57): the partner's SEQUENCE_REUSED, and what the node says."""

from __future__ import annotations

import logging

import pytest

from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.node.base import ID_COUNTERS, serial_counter
from itmolink.node.convert import to_us

from .conftest import Pair
from .test_engine import issued, state


def _rolled_back(pair: Pair) -> str:
    """LAO completes a transfer to KOR, then its link's sequence goes back to where a
    backup of the start left it, as a restore would; LAO proposes again. Returns the
    new transfer's id (its proposal sealed with a number KOR has seen, not yet sent)."""
    authorisation_id = issued(pair)
    pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.lao.store.transaction() as tx:
        tx._exec("UPDATE links SET next_out_sequence = 2 WHERE partner = 'KOR'")
    return pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=50,
        now=pair.now,
    )  # fmt: skip


def _alarms(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALARM")]


def test_a_reused_sequence_names_the_step_to_take(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    transfer_id = _rolled_back(pair)
    with caplog.at_level(logging.INFO):
        pair.pump()
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.REJECTED
    assert record.rejection_code == RejectionCode.SEQUENCE_REUSED
    [alarm] = _alarms(caplog)
    assert "run `itmolink node restored`" in alarm
    assert transfer_id in alarm


def test_a_message_sealed_before_the_step_is_refused_once_more_without_sending_back(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """The step does not renumber what was sealed before it: that message is refused
    again, and the ALARM says so instead of asking for the step a second time."""
    transfer_id = _rolled_back(pair)
    with pair.lao.store.transaction() as tx:
        raised = tx.raise_counters(
            to_us(pair.now), [*ID_COUNTERS, serial_counter(pair.lao.registry)], ["KOR"]
        )
    assert ("sequence to KOR", 3, to_us(pair.now)) in raised
    with caplog.at_level(logging.INFO):
        pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.REJECTED
    [alarm] = _alarms(caplog)
    assert "sealed on the restored ledger before `itmolink node restored`" in alarm
    assert "run `itmolink node restored`" not in alarm
    # What is sealed from now on goes through.
    later = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=_authorisation(pair), vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    assert state(pair.lao, later) is TransferState.COMPLETED
    assert state(pair.kor, later) is TransferState.COMPLETED


def _authorisation(pair: Pair) -> str:
    with pair.lao.store.transaction() as tx:
        [(authorisation_id, *_)] = tx._exec("SELECT authorisation_id FROM authorisations")
    return str(authorisation_id)
