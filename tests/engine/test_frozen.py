"""Frozen blocks (PROTOCOL §11.8): a block a reconciliation discrepancy froze cannot
be reserved for a transfer, used or cancelled, blocks the revocation of its
authorisation, and still counts as held for T4; until an operator releases it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from itmolink.core.authorisation import Revocation
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.node.engine import Engine
from itmolink.node.operations import BatchItemRequest

from .conftest import Pair
from .test_limits import code, deliver, proposal


def _freeze(engine: Engine, partner: str, transfer_id: str, now: dt.datetime) -> int:
    """What a reconciliation with ``partner`` does on a blocks discrepancy."""
    return engine.record_discrepancy(
        reconciliation_id="R-1", partner=partner, phase="blocks", subject=transfer_id,
        detail="the two registries record different blocks for it", freeze=True, now=now,
    )  # fmt: skip


def _holdings(engine: Engine) -> dict[str, list[tuple[int, int]]]:
    """Serial ranges by status (held, reserved, frozen) in the holding account."""
    found: dict[str, list[tuple[int, int]]] = {}
    with engine.store.transaction() as tx:
        for h in tx.holdings():
            if h.account == "holding":
                found.setdefault(h.status, []).append((h.block.serial_start, h.block.serial_end))
    return {status: sorted(ranges) for status, ranges in found.items()}


def _refused(call: Callable[[], object]) -> RejectionCode:
    with pytest.raises(Rejected) as caught:
        call()
    return caught.value.code


@pytest.fixture
def frozen_at_host(pair: Pair) -> tuple[Pair, str]:
    """LAO holds serials 1-100 of LAO-A-0001, of which 1-10 frozen: they went out in
    a proposal that timed out and was voided, and a reconciliation with KOR then
    found a discrepancy about that transfer (such as PROTOCOL §11.9's first, with a
    receiver that predates TransferVoid.proposal_sent_at)."""
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    pair.network = lambda sender, receiver, envelope: None  # the proposal never arrives
    pair.pump()
    pair.advance(120)
    pair.pump()  # LAO voids it
    pair.network = lambda sender, receiver, envelope: envelope
    pair.pump()  # the void reaches KOR
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
        assert record is not None
        assert record.state is TransferState.VOIDED
    assert _holdings(pair.lao) == {"held": [(1, 10), (11, 100)]}
    assert _freeze(pair.lao, "KOR", transfer_id, pair.now) == 1
    assert _holdings(pair.lao) == {"frozen": [(1, 10)], "held": [(11, 100)]}
    return pair, transfer_id


def test_a_frozen_block_is_not_reserved_for_a_transfer(frozen_at_host: tuple[Pair, str]) -> None:
    pair, _ = frozen_at_host
    lao = pair.lao

    def transfer(quantity: int) -> str:
        return lao.start_transfer(
            to_party="KOR", authorisation_id="LAO-A-0001", vintage=2025, quantity=quantity,
            now=pair.now,
        )  # fmt: skip

    assert _refused(lambda: transfer(91)) is RejectionCode.INSUFFICIENT_HOLDINGS
    transfer_id = transfer(90)
    assert _holdings(lao) == {"frozen": [(1, 10)], "reserved": [(11, 100)]}
    with lao.store.transaction() as tx:
        assert [(b.serial_start, b.serial_end) for b in tx.blocks_of_transfer(transfer_id)] == [
            (11, 100)
        ]
    pair.pump()
    with pair.kor.store.transaction() as tx:
        assert [h.block.serial_start for h in tx.holdings()] == [11]


def test_a_frozen_block_is_not_reserved_for_a_batch(frozen_at_host: tuple[Pair, str]) -> None:
    pair, _ = frozen_at_host

    def batch(*quantities: int) -> tuple[str, list[str]]:
        return pair.lao.start_transfer_batch(
            to_party="KOR", now=pair.now,
            items=[BatchItemRequest("LAO-A-0001", 2025, q) for q in quantities],
        )  # fmt: skip

    assert _refused(lambda: batch(50, 41)) is RejectionCode.INSUFFICIENT_HOLDINGS
    assert _holdings(pair.lao) == {"frozen": [(1, 10)], "held": [(11, 100)]}
    _, ids = batch(50, 40)
    with pair.lao.store.transaction() as tx:
        taken = [(b.serial_start, b.serial_end) for t in ids for b in tx.blocks_of_transfer(t)]
    assert taken == [(11, 60), (61, 100)]
    assert _holdings(pair.lao)["frozen"] == [(1, 10)]


def test_a_frozen_block_is_not_cancelled(frozen_at_host: tuple[Pair, str]) -> None:
    pair, _ = frozen_at_host

    def retire(quantity: int) -> object:
        return pair.lao.retire(
            action="voluntary-cancellation", host_party="LAO", authorisation_id="LAO-A-0001",
            vintage=2025, quantity=quantity, now=pair.now,
        )  # fmt: skip

    assert _refused(lambda: retire(91)) is RejectionCode.INSUFFICIENT_HOLDINGS
    assert _holdings(pair.lao) == {"frozen": [(1, 10)], "held": [(11, 100)]}


def test_a_frozen_block_blocks_the_revocation_until_released(
    frozen_at_host: tuple[Pair, str],
) -> None:
    pair, transfer_id = frozen_at_host
    lao = pair.lao

    def revoke() -> Revocation:
        return lao.revoke_authorisation("LAO-A-0001", pair.now)

    assert _refused(revoke) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert _holdings(lao) == {"frozen": [(1, 10)], "held": [(11, 100)]}
    released = lao.unfreeze(transfer_id, "voided at both ends: PROTOCOL §11.9")
    assert [(h.block.serial_start, h.block.serial_end) for h in released] == [(1, 10)]
    assert revoke().revoked_quantity == 100


def test_released_blocks_can_be_cancelled_again(frozen_at_host: tuple[Pair, str]) -> None:
    pair, transfer_id = frozen_at_host
    pair.lao.unfreeze(transfer_id, "resolved with KOR")
    pair.lao.retire(
        action="voluntary-cancellation", host_party="LAO", authorisation_id="LAO-A-0001",
        vintage=2025, quantity=100, now=pair.now,
    )  # fmt: skip
    assert _holdings(pair.lao) == {}


@pytest.fixture
def frozen_at_receiver(pair: Pair) -> tuple[Pair, str]:
    """KOR received serials 1-10 of LAO-A-0001 in a completed transfer, then froze
    them on a discrepancy about it."""
    authorisation_id = pair.authorise(
        purposes=[Purpose.OIMP], oimp_detail="CORSIA",
        first_transfer_definition=FirstTransferDefinition.AT_AUTHORISATION,
    )  # fmt: skip
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
        assert record is not None
        assert record.state is TransferState.COMPLETED
    # A discrepancy reported by another partner cannot freeze blocks of this link.
    assert _freeze(pair.kor, "JPN", transfer_id, pair.now) == 0
    assert _freeze(pair.kor, "LAO", transfer_id, pair.now) == 1
    assert _holdings(pair.kor) == {"frozen": [(1, 10)]}
    return pair, transfer_id


@pytest.mark.parametrize("action", ["voluntary-cancellation", "use-oimp"])
def test_received_units_frozen_are_not_used_or_cancelled(
    frozen_at_receiver: tuple[Pair, str], action: str
) -> None:
    pair, transfer_id = frozen_at_receiver

    def retire() -> object:
        return pair.kor.retire(
            action=action, host_party="LAO", authorisation_id="LAO-A-0001", vintage=2025,
            quantity=1, now=pair.now, oimp_purpose="CORSIA",
        )  # fmt: skip

    assert _refused(retire) is RejectionCode.INSUFFICIENT_HOLDINGS
    pair.kor.unfreeze(transfer_id, "resolved with LAO")
    retire()
    assert _holdings(pair.kor) == {"held": [(2, 10)]}


@pytest.mark.parametrize("serials", [(1, 14), (5, 14), (10, 10), (1, 1)])
def test_frozen_units_still_count_as_held_for_t4(
    frozen_at_receiver: tuple[Pair, str], serials: tuple[int, int]
) -> None:
    """A partner cannot have this registry accept serials it holds frozen, whether
    the frozen block starts inside the proposed range or before it."""
    pair, _ = frozen_at_receiver
    block = proposal(pair).blocks[0]
    block.serial_start, block.serial_end = serials
    quantity = block.serial_end - block.serial_start + 1
    again = proposal(pair, transfer_id="LAO-T-77", blocks=[block], quantity=quantity)
    assert code(deliver(pair, again)) is RejectionCode.SERIALS_ALREADY_HELD
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get("LAO-T-77")
        assert record is not None
        assert record.state is TransferState.REJECTED
