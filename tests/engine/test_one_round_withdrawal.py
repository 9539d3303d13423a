"""S7 of the one-round transfer (docs/PROTOCOL.md §6.11): the sender withdraws a
one-round proposal still unanswered past ``expires_at + 2 × max_clock_skew`` (plus
the grace) with a TransferVoid sealed with its current key, and the transfer stays
PROPOSED until the receiver acknowledges the void: its receipt says the transfer is
not completed there and never will be (a tombstone, §5.10 V3); its refusal 3008 says
it completed. The case it is for: the receiver can no longer read the proposal (the
key that signed it was revoked or unpinned there), so it refuses it before looking
it up and S5 never settles it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import STATUS_QUERY_GRACE_US, WITHDRAWAL_INTERVAL_US
from itmolink.node.engine import Engine
from itmolink.store.tx import TransferRecord
from itmolink.v1 import envelope_pb2, reply_pb2

from .conftest import Pair
from .test_engine import held, issued, ledger, state
from .test_one_round import (
    PROPOSAL,
    SKEW,
    _alarms,
    completed_on_both,
    outbox_count,
    parse,
    reserved,
    two_phase_beside,
)

VOID = "itmolink.v1.TransferVoid"
QUERY = "itmolink.v1.TransferStatusQuery"
GRACE = STATUS_QUERY_GRACE_US / 1e6
INTERVAL = WITHDRAWAL_INTERVAL_US / 1e6


def _drop(payload_type: str) -> Callable[[str, str, bytes], bytes | None]:
    """A link that loses every envelope of ``payload_type`` and carries the rest."""

    def network(sender: str, receiver: str, raw: bytes) -> bytes | None:
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(raw)
        return None if envelope.payload_type == payload_type else raw

    return network


def _record(engine: Engine, transfer_id: str) -> TransferRecord:
    with engine.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    return record


def _proposal_envelope(pair: Pair, transfer_id: str) -> bytes:
    with pair.lao.store.transaction() as tx:
        envelope = tx.outbox_last_envelope(payload_type=PROPOSAL, subject_id=transfer_id)
    assert envelope is not None
    return envelope


def _pending(engine: Engine, payload_type: str, transfer_id: str) -> int:
    with engine.store.transaction() as tx:
        return tx.outbox_pending_of(payload_type=payload_type, subject_id=transfer_id)


def _proposed_then_rotated(pair: Pair) -> tuple[str, str]:
    """LAO, asking KOR to complete on acceptance, proposes 600 of its 1,000 units,
    signed with its first key; the link loses the proposal while LAO rotates to a new
    key, which KOR pins and acknowledges. Returns (transfer id, the first key's id)."""
    pair.lao.partners["KOR"] = dataclasses.replace(
        pair.lao.partners["KOR"], complete_on_acceptance=True
    )
    authorisation_id = issued(pair)
    first = pair.lao.signing_key
    pair.network = _drop(PROPOSAL)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=600,
        now=pair.now,
    )  # fmt: skip
    pair.lao.rotate_signing_key(SigningKey.generate("LAO"), pair.now)
    pair.pump()
    assert pair.lao.signing_key is not first  # KOR acknowledged the new key
    assert state(pair.kor, transfer_id) is None
    pair.network = lambda sender, receiver, envelope: envelope
    return transfer_id, first.key_id


def _unpin(engine: Engine, key_id: str) -> None:
    """``engine``'s operator unpins one key (a card rebuilt without it); its messages
    fail verification there until it is pinned again (``engine.reload_trust()``)."""
    trust = TrustStore([k for k in engine.trust.all() if k.key_id != key_id])
    for revoked, since in engine.trust.revocations().items():
        trust.revoke(revoked, since)
    engine.trust = trust


def _deadline(pair: Pair, transfer_id: str) -> dt.datetime:
    """When the sender first asks: expires_at + 2 × max_clock_skew + the grace."""
    expires_at = dt.datetime.fromtimestamp(_record(pair.lao, transfer_id).expires_at / 1e6, dt.UTC)
    return expires_at + 2 * SKEW + dt.timedelta(seconds=GRACE)


def _withdrawn(pair: Pair, transfer_id: str) -> None:
    """LAO settled the transfer on KOR's receipt of its void: VOIDED, its 600 units
    back in holdings, the proposal no longer delivered, nothing booked; KOR holds it
    VOIDED or REJECTED, with nothing credited."""
    record = _record(pair.lao, transfer_id)
    assert record.state is TransferState.VOIDED
    assert record.rejection_detail == "withdrawn: KOR acknowledged the void"
    assert (reserved(pair.lao), held(pair.lao)) == (0, 1_000)
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 0
    assert ledger(pair.lao) == ledger(pair.kor) == []
    assert state(pair.kor, transfer_id) in (TransferState.VOIDED, TransferState.REJECTED)
    assert held(pair.kor) == 0


def _withdrawal_logged(caplog: pytest.LogCaptureFixture, transfer_id: str, text: str) -> int:
    return sum(
        r.levelno == logging.WARNING and transfer_id in r.getMessage() and text in r.getMessage()
        for r in caplog.records
    )


# -- the receiver never recorded it -----------------------------------------------------


def test_a_proposal_the_receiver_cannot_read_is_withdrawn_and_voided_on_both_sides(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR's operator revokes LAO's first key before the proposal it signed arrives:
    every delivery is refused before the look-up and settles nothing (S5, one ALARM).
    Past the deadline LAO withdraws the proposal with a void sealed with its new key;
    KOR records a tombstone and acknowledges it; LAO voids the transfer, stops
    delivering the proposal, and can now revoke the key that signed it."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.revoke_signing_key(first_key, pair.now, partner="LAO")
    deadline = _deadline(pair, transfer_id)
    with caplog.at_level(logging.INFO):
        pair.pump()
        pair.now = deadline - dt.timedelta(seconds=1)
        pair.pump()
    assert _alarms(caplog, transfer_id) == 1  # S5, unchanged
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert outbox_count(pair.lao, VOID, transfer_id) == 0  # not before the deadline
    assert reserved(pair.lao) == 600
    with pytest.raises(Rejected) as guarded:
        pair.lao.revoke_signing_key(first_key, pair.now)
    assert guarded.value.code is RejectionCode.TRANSFER_STATE_CONFLICT

    pair.now = deadline
    with caplog.at_level(logging.INFO):
        pair.pump()
    _withdrawn(pair, transfer_id)
    assert state(pair.kor, transfer_id) is TransferState.VOIDED  # the tombstone
    assert outbox_count(pair.lao, VOID, transfer_id) == 1
    assert _withdrawal_logged(caplog, transfer_id, "KOR acknowledged the void") == 1
    pair.advance(INTERVAL * 2)
    assert pair.lao.query_pending_transfers(pair.now) == []
    assert pair.lao.due_messages(pair.now) == []  # the proposal is no longer delivered
    pair.lao.revoke_signing_key(first_key, pair.now)  # the guard no longer objects
    pair.pump()
    assert pair.kor.trust.is_revoked(first_key)


async def test_a_reconciliation_right_after_a_withdrawal_finds_no_difference(pair: Pair) -> None:
    """The proposal never reaches KOR, and LAO withdraws it past the deadline, more
    than ten minutes after proposing. A reconciliation whose cut falls between the
    proposal and the void (the default cut, five minutes back, run within five minutes
    of the withdrawal) finds the ledgers equal: KOR's tombstone takes the proposal's
    sent_at from the void (PROTOCOL §5.10 V3), so both sides place the transfer alike,
    and LAO freezes none of the units it has just released."""
    from itmolink.node.reconciliation import Reconciliation

    from .test_reconcile import LinkedNode, frozen

    transfer_id, _ = _proposed_then_rotated(pair)
    proposed = dt.datetime.fromtimestamp(_record(pair.lao, transfer_id).created_at / 1e6, dt.UTC)
    pair.network = _drop(PROPOSAL)  # every attempt of the proposal is lost
    pair.now = _deadline(pair, transfer_id)
    pair.pump()
    _withdrawn(pair, transfer_id)
    pair.advance(60)
    cut = pair.now - dt.timedelta(minutes=5)
    assert proposed < cut
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        report = await Reconciliation(LinkedNode(pair, party), partner, cut).run()  # type: ignore[arg-type]
        assert report.discrepancies == []
        assert report.transfers_here == 1
    assert frozen(pair.lao) == frozen(pair.kor) == []
    assert held(pair.lao) == 1_000


async def test_an_outage_past_the_deadline_ends_alike_on_both_sides_and_reconciles_clean(
    pair: Pair,
) -> None:
    """A plain outage: the proposal is lost until after the deadline, then the link
    comes back. Whichever of the proposal (refused 3011, T1b) and the void (a
    tombstone) KOR reads first, both sides end with nothing moved, and a
    reconciliation finds no difference and freezes nothing."""
    from .test_reconcile import frozen, reconcile

    pair.lao.partners["KOR"] = dataclasses.replace(
        pair.lao.partners["KOR"], complete_on_acceptance=True
    )
    authorisation_id = issued(pair)
    pair.network = _drop(PROPOSAL)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=600,
        now=pair.now,
    )  # fmt: skip
    deadline = _deadline(pair, transfer_id)
    while pair.now < deadline - dt.timedelta(seconds=5):
        pair.pump()
        pair.advance(40)
    pair.now = deadline - dt.timedelta(seconds=5)
    pair.pump()  # the proposal's next attempt is due after the deadline
    pair.network = lambda sender, receiver, envelope: envelope
    pair.now = deadline
    pair.pump()
    pair.advance(3_600)
    pair.pump()
    lao, kor = _record(pair.lao, transfer_id), _record(pair.kor, transfer_id)
    assert lao.state in (TransferState.VOIDED, TransferState.REJECTED)
    assert kor.state in (TransferState.VOIDED, TransferState.REJECTED)
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 1_000, 0)
    assert pair.lao.due_messages(pair.now) == []
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        report = await reconcile(pair, party, partner)
        assert report.discrepancies == []
    assert frozen(pair.lao) == frozen(pair.kor) == []


def test_a_receiver_with_a_wider_skew_cannot_complete_a_withdrawn_proposal(pair: Pair) -> None:
    """KOR allows 20 minutes of clock skew, LAO 5: LAO's void leaves at expires_at +
    10 minutes and a half, when KOR's T1b would still take the proposal. An attempt
    of the proposal still in flight reaches KOR after the void: the tombstone refuses
    it (T2), so nothing is credited there while LAO released the units."""
    transfer_id, _ = _proposed_then_rotated(pair)
    pair.kor.limits = dataclasses.replace(pair.kor.limits, max_clock_skew=4 * SKEW)
    in_flight = _proposal_envelope(pair, transfer_id)
    pair.network = _drop(PROPOSAL)
    pair.now = _deadline(pair, transfer_id)
    pair.pump()
    _withdrawn(pair, transfer_id)
    refusal = parse(pair.lao, pair.kor.handle_delivery("LAO", in_flight, pair.now))
    assert isinstance(refusal, reply_pb2.Rejection)
    assert state(pair.kor, transfer_id) is TransferState.VOIDED
    assert (held(pair.kor), ledger(pair.kor)) == (0, [])


# -- the receiver recorded it -----------------------------------------------------------


def test_a_receiver_that_completed_and_lost_trust_refuses_the_void_nothing_settles(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR completed an earlier delivery (its reply lost), then unpinned the key that
    signed the proposal. It refuses the void with 3008 (recorded), and LAO asks it
    which final state it holds: COMPLETED. LAO cannot complete without the acceptance
    (digest, year), keeps the units reserved and delivers the proposal again, sending
    no second void and no second query within the interval. Once KOR pins the key
    again, the next delivery gets the stored acceptance: +600/−600."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.handle_delivery("LAO", _proposal_envelope(pair, transfer_id), pair.now)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED  # the reply is lost
    _unpin(pair.kor, first_key)
    pair.now = _deadline(pair, transfer_id)
    with caplog.at_level(logging.INFO):
        pair.pump()
        pair.advance(INTERVAL - 1)
        pair.pump()
    assert outbox_count(pair.lao, VOID, transfer_id) == 1
    assert outbox_count(pair.lao, QUERY, transfer_id) == 1
    assert _withdrawal_logged(caplog, transfer_id, "it holds it final") == 1
    assert _withdrawal_logged(caplog, transfer_id, "completed: waiting for its acceptance") == 1
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert (reserved(pair.lao), ledger(pair.lao)) == (600, [])
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 1
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED

    pair.kor.reload_trust()  # KOR's operator pins LAO's first key again
    pair.advance(3_600)
    pair.pump()
    completed_on_both(pair, transfer_id)
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 400, 600)


def test_a_void_recorded_then_refused_unread_is_settled_on_the_receivers_report(
    pair: Pair,
) -> None:
    """KOR revoked LAO's first key (the proposal's). LAO's void, signed with its second
    key, is recorded at KOR (a tombstone) but the receipt is lost; KOR unpins the second
    key for a while, so the void's retry is refused before the look-up, which settles
    nothing. An hour later a new void reaches KOR, which holds the transfer VOIDED and
    refuses it with 3008, as it would for a completed one (V4): LAO asks which state,
    KOR reports VOIDED, and LAO settles. (Found by review: LAO had taken every 3008 for
    a completion and kept the units reserved for ever.)"""
    transfer_id, first_key = _proposed_then_rotated(pair)
    second_key = pair.lao.signing_key.key_id
    pair.kor.revoke_signing_key(first_key, pair.now, partner="LAO")
    pair.now = _deadline(pair, transfer_id)
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    with pair.lao.store.transaction() as tx:
        [void] = [m for m in tx.outbox_due(2**62, 100) if m.payload_type == VOID]
    pair.kor.handle_delivery("LAO", void.envelope, pair.now)  # recorded; the receipt is lost
    assert state(pair.kor, transfer_id) is TransferState.VOIDED  # the tombstone
    _unpin(pair.kor, second_key)
    pair.advance(60)
    refused = pair.kor.handle_delivery("LAO", void.envelope, pair.now)  # the retry
    assert pair.lao.handle_reply(void.message_id, refused, pair.now)
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    pair.kor.reload_trust()  # KOR pins LAO's second key again
    pair.advance(INTERVAL + 1)
    pair.pump()
    assert outbox_count(pair.lao, VOID, transfer_id) == 2
    assert outbox_count(pair.lao, QUERY, transfer_id) == 1
    record = _record(pair.lao, transfer_id)
    assert record.state is TransferState.VOIDED
    assert record.rejection_detail == "withdrawn: KOR reports TRANSFER_STATE_VOIDED"
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 1_000, 0)
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 0


def test_a_lost_reply_and_an_outage_complete_as_before(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR completed the transfer, the reply was lost, and the link was down past the
    deadline. The void and the proposal go out together when it comes back: the void
    is refused 3008 and the proposal gets the stored acceptance, in either order, and
    nothing raises an alarm."""
    transfer_id, _ = _proposed_then_rotated(pair)
    pair.kor.handle_delivery("LAO", _proposal_envelope(pair, transfer_id), pair.now)
    pair.network = lambda sender, receiver, envelope: None
    pair.now = _deadline(pair, transfer_id) - dt.timedelta(seconds=5)
    pair.pump()
    pair.network = lambda sender, receiver, envelope: envelope
    pair.now = _deadline(pair, transfer_id) + dt.timedelta(seconds=30)
    with caplog.at_level(logging.INFO):
        pair.pump()
    completed_on_both(pair, transfer_id)
    assert not any(r.getMessage().startswith("ALARM") for r in caplog.records)


def test_a_receiver_that_recorded_a_refusal_acknowledges_the_void(pair: Pair) -> None:
    """KOR recorded a refusal of the proposal (3011: it arrived too late) but the
    reply was lost, then KOR unpinned the key that signed it. The void gets a receipt
    (a rejected transfer keeps its rejection there, V4): VOIDED at LAO, REJECTED at
    KOR, nothing moved on either side."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    expired = _deadline(pair, transfer_id)
    refusal = parse(
        pair.lao, pair.kor.handle_delivery("LAO", _proposal_envelope(pair, transfer_id), expired)
    )
    assert isinstance(refusal, reply_pb2.Rejection)
    assert RejectionCode(refusal.reasons[0].code) is RejectionCode.PROPOSAL_EXPIRED
    _unpin(pair.kor, first_key)
    pair.now = expired
    pair.pump()
    _withdrawn(pair, transfer_id)
    assert state(pair.kor, transfer_id) is TransferState.REJECTED


def test_a_void_refused_unread_settles_nothing_and_is_sent_again_after_the_interval(
    pair: Pair,
) -> None:
    """KOR refuses the void too before reading it (it no longer pins any key of LAO):
    nothing settles, and a new void goes out once the interval has passed."""
    transfer_id, _ = _proposed_then_rotated(pair)
    saved = pair.kor.trust
    pair.kor.trust = TrustStore([k for k in saved.all() if not k.key_id.startswith("LAO-")])
    pair.now = _deadline(pair, transfer_id)
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    assert outbox_count(pair.lao, VOID, transfer_id) == 1
    pair.advance(INTERVAL - 1)
    assert pair.lao.query_pending_transfers(pair.now) == []
    pair.kor.trust = saved
    pair.network = _drop(PROPOSAL)  # (read first, the proposal would be refused 3011)
    pair.advance(2)
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    pair.pump()
    _withdrawn(pair, transfer_id)


# -- when the sender withdraws ----------------------------------------------------------


def test_the_sender_withdraws_only_past_the_deadline_one_void_at_a_time_not_in_two_phases(
    pair: Pair,
) -> None:
    """No void before expires_at + 2 × max_clock_skew + the grace; then one, and no
    other while it is pending. A two-phase transfer past its time-out is voided by
    the time-out pass, not withdrawn here."""
    transfer_id, _ = _proposed_then_rotated(pair)
    two_phase = two_phase_beside(pair)
    deadline = _deadline(pair, transfer_id)
    pair.now = deadline - dt.timedelta(microseconds=1)
    assert pair.lao.query_pending_transfers(pair.now) == []
    pair.now = deadline
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    assert pair.lao.query_pending_transfers(pair.now) == []  # one pending
    pair.advance(INTERVAL * 10)
    assert pair.lao.query_pending_transfers(pair.now) == []  # still pending: none more
    assert outbox_count(pair.lao, VOID, transfer_id) == 1
    assert outbox_count(pair.lao, VOID, two_phase) == 0
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert state(pair.lao, two_phase) is TransferState.PROPOSED  # its time-out pass voids it


def test_the_grace_is_the_engines_withdrawal_grace(pair: Pair) -> None:
    """The grace past expires_at + 2 × max_clock_skew is the engine's withdrawal_grace
    (node.toml withdrawal_grace_seconds), 30 s unless set."""
    assert pair.lao.withdrawal_grace == dt.timedelta(seconds=GRACE) == dt.timedelta(seconds=30)
    pair.lao.withdrawal_grace = dt.timedelta(seconds=5)
    transfer_id, _ = _proposed_then_rotated(pair)
    deadline = _deadline(pair, transfer_id) - dt.timedelta(seconds=GRACE - 5)
    pair.now = deadline - dt.timedelta(microseconds=1)
    assert pair.lao.query_pending_transfers(pair.now) == []
    pair.now = deadline
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]


# -- a crash ----------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_a_crash_while_settling_leaves_nothing_and_the_stored_receipt_settles_it_later(
    pair: Pair,
) -> None:
    """The settle is one transaction with the receipt's journaling: a crash before its
    commit leaves the transfer PROPOSED, the units reserved, the proposal and the void
    pending. Delivered again, the void gets KOR's stored receipt, byte for byte, and
    LAO settles on it."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.revoke_signing_key(first_key, pair.now, partner="LAO")
    pair.network = _drop(PROPOSAL)
    pair.now = _deadline(pair, transfer_id)
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    with pair.lao.store.transaction() as tx:
        [void] = [m for m in tx.outbox_due(2**62, 100) if m.payload_type == VOID]
    reply = pair.kor.handle_delivery("LAO", void.envelope, pair.now)

    def crash() -> None:
        raise Crash("LAO crashed before commit")

    pair.lao.store.before_commit = crash
    with pytest.raises(Crash):
        pair.lao.handle_reply(void.message_id, reply, pair.now)
    pair.lao.store.before_commit = None
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 1
    assert _pending(pair.lao, VOID, transfer_id) == 1

    pair.advance(600)
    again = pair.kor.handle_delivery("LAO", void.envelope, pair.now)
    assert again == reply  # the stored receipt
    assert pair.lao.handle_reply(void.message_id, again, pair.now)
    _withdrawn(pair, transfer_id)
