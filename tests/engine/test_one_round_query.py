"""S7 of the one-round transfer (docs/PROTOCOL.md §6.11): the sender asks the
receiver about a one-round proposal still unanswered past ``expires_at + 2 ×
max_clock_skew`` (plus the grace), with a TransferStatusQuery sealed with its
current key, and settles on the signed report. The case it is for: the receiver can
no longer read the proposal (the key that signed it was revoked or unpinned there),
so it refuses it before looking it up and S5 never settles it."""

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
from itmolink.node.base import STATUS_QUERY_GRACE_US, STATUS_QUERY_INTERVAL_US
from itmolink.node.engine import Engine
from itmolink.node.requests import Requests
from itmolink.store.tx import TransferRecord
from itmolink.v1 import envelope_pb2, reply_pb2, transfer_pb2

from .conftest import Pair
from .test_engine import held, issued, ledger, state
from .test_one_round import (
    PROPOSAL,
    SKEW,
    _alarms,
    _authorisation_of,
    completed_on_both,
    outbox_count,
    parse,
    reserved,
)

QUERY = "itmolink.v1.TransferStatusQuery"
VOID = "itmolink.v1.TransferVoid"
GRACE = STATUS_QUERY_GRACE_US / 1e6
INTERVAL = STATUS_QUERY_INTERVAL_US / 1e6


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


def _s7_alarms(caplog: pytest.LogCaptureFixture, transfer_id: str) -> int:
    return sum(
        r.getMessage().startswith("ALARM")
        and f"reports one-round transfer {transfer_id}" in r.getMessage()
        for r in caplog.records
    )


def _settled(pair: Pair, transfer_id: str, final: TransferState, reported: str) -> None:
    """LAO settled the transfer on KOR's report: ``final``, its 600 units back in
    holdings, the proposal withdrawn, no void sent, nothing booked."""
    record = _record(pair.lao, transfer_id)
    assert record.state is final
    assert record.rejection_detail == f"the receiver reports {reported}"
    assert (reserved(pair.lao), held(pair.lao)) == (0, 1_000)
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 0
    assert outbox_count(pair.lao, VOID, transfer_id) == 0
    assert ledger(pair.lao) == []


# -- the receiver never recorded it -----------------------------------------------------


def test_a_revoked_proposal_key_the_receiver_reports_unknown_voids_the_transfer(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR's operator revokes LAO's first key before the proposal it signed arrives:
    every delivery is refused before the look-up and settles nothing (S5, one ALARM).
    Past the deadline LAO asks with a query sealed with its new key; KOR answers
    UNKNOWN at an instant past expires_at + max_clock_skew, so it refuses every later
    delivery (3011): LAO voids the transfer without a void, withdraws the proposal,
    and can now revoke the key that signed it."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.revoke_signing_key(first_key, pair.now, partner="LAO")
    deadline = _deadline(pair, transfer_id)
    with caplog.at_level(logging.INFO):
        pair.pump()
        pair.now = deadline - dt.timedelta(seconds=1)
        pair.pump()
    assert _alarms(caplog, transfer_id) == 1  # S5, unchanged
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert outbox_count(pair.lao, QUERY, transfer_id) == 0  # not before the deadline
    assert reserved(pair.lao) == 600
    with pytest.raises(Rejected) as guarded:
        pair.lao.revoke_signing_key(first_key, pair.now)
    assert guarded.value.code is RejectionCode.TRANSFER_STATE_CONFLICT

    pair.now = deadline
    with caplog.at_level(logging.INFO):
        pair.pump()
    _settled(pair, transfer_id, TransferState.VOIDED, "TRANSFER_STATE_UNKNOWN")
    assert outbox_count(pair.lao, QUERY, transfer_id) == 1
    assert any(
        r.levelno == logging.WARNING and "reports TRANSFER_STATE_UNKNOWN" in r.getMessage()
        for r in caplog.records
    )
    assert state(pair.kor, transfer_id) is None  # nothing was sent to it
    assert held(pair.kor) == 0
    pair.advance(3_600)
    assert pair.lao.query_pending_transfers(pair.now) == []
    assert pair.lao.due_messages(pair.now) == []  # the proposal is no longer delivered
    pair.lao.revoke_signing_key(first_key, pair.now)  # the guard no longer objects
    pair.pump()
    assert pair.kor.trust.is_revoked(first_key)


def test_a_report_of_unknown_from_a_clock_not_past_the_deadline_changes_nothing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KOR never gets the proposal, and states its reports at an instant of its own
    clock a minute before, then exactly at, expires_at + max_clock_skew (a lagging
    clock; the reference's own window would refuse a query from so far ahead, so the
    report is sealed at that instant here): such an UNKNOWN does not say that a
    delivery still in flight would be refused. Nothing changes; LAO asks again after
    each interval, and settles on the first report stated strictly later."""
    transfer_id, _ = _proposed_then_rotated(pair)
    limit = _record(pair.lao, transfer_id).expires_at + SKEW // dt.timedelta(microseconds=1)
    stated = iter([limit - 60_000_000, limit, limit + 1])
    answer_as = Requests._on_status_query

    def lagging(
        engine: Engine, tx: object, sender: str, msg: transfer_pb2.TransferStatusQuery,
        payload: bytes, journal_id: int, now_us: int,
    ) -> bytes:  # fmt: skip
        return answer_as(engine, tx, sender, msg, payload, journal_id, next(stated))  # type: ignore[arg-type]

    monkeypatch.setitem(pair.kor._request_handlers, QUERY, lagging)
    pair.network = _drop(PROPOSAL)
    pair.now = _deadline(pair, transfer_id)
    for _ in range(2):
        pair.pump()
        assert outbox_count(pair.lao, QUERY, transfer_id) == 1 + _
        assert state(pair.lao, transfer_id) is TransferState.PROPOSED
        assert (reserved(pair.lao), _pending(pair.lao, PROPOSAL, transfer_id)) == (600, 1)
        assert pair.lao.query_pending_transfers(pair.now) == []  # answered, but just now
        pair.advance(INTERVAL)
    pair.pump()
    with pair.lao.store.transaction() as tx:
        envelopes = [
            raw for _, _, _, _, _, raw in tx.outbox_deliveries_of(payload_type=QUERY) if raw
        ]
    reports = [parse(pair.lao, raw) for raw in envelopes]
    assert [r.state for r in reports] == [transfer_pb2.TRANSFER_STATE_UNKNOWN] * 3  # type: ignore[attr-defined]
    assert [r.header.sent_at.ToMicroseconds() for r in reports] == [  # type: ignore[attr-defined]
        limit - 60_000_000, limit, limit + 1,
    ]  # fmt: skip
    _settled(pair, transfer_id, TransferState.VOIDED, "TRANSFER_STATE_UNKNOWN")


# -- the receiver recorded it -----------------------------------------------------------


def test_a_receiver_that_completed_and_lost_trust_reports_completed_nothing_settles(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR completed an earlier delivery (its reply lost), then unpinned the key that
    signed the proposal. Its report COMPLETED settles nothing: LAO cannot complete
    without the acceptance (digest, year), keeps the units reserved and delivers the
    proposal again, with one ALARM asking for trust to be restored. Once KOR pins
    the key again, the next delivery gets the stored acceptance: +600/−600."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.handle_delivery("LAO", _proposal_envelope(pair, transfer_id), pair.now)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED  # the reply is lost
    _unpin(pair.kor, first_key)
    pair.now = _deadline(pair, transfer_id)
    with caplog.at_level(logging.INFO):
        pair.pump()
        for _ in range(2):  # asked again after each interval: one ALARM in all
            pair.advance(INTERVAL)
            pair.pump()
    assert outbox_count(pair.lao, QUERY, transfer_id) == 3
    assert _s7_alarms(caplog, transfer_id) == 1
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert (reserved(pair.lao), ledger(pair.lao)) == (600, [])
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 1
    assert outbox_count(pair.lao, VOID, transfer_id) == 0

    pair.kor.reload_trust()  # KOR's operator pins LAO's first key again
    pair.advance(3_600)
    pair.pump()
    completed_on_both(pair, transfer_id)
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 400, 600)


def test_a_receiver_that_recorded_a_refusal_and_lost_trust_reports_rejected(
    pair: Pair,
) -> None:
    """KOR recorded a refusal of the proposal (3011: it arrived too late) but the
    reply was lost, then KOR unpinned the key that signed it. Its report REJECTED
    settles the transfer REJECTED at LAO, as the stored refusal would have."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    expired = _deadline(pair, transfer_id)
    refusal = parse(
        pair.lao, pair.kor.handle_delivery("LAO", _proposal_envelope(pair, transfer_id), expired)
    )
    assert isinstance(refusal, reply_pb2.Rejection)
    assert refusal.reasons[0].code == RejectionCode.PROPOSAL_EXPIRED
    assert state(pair.kor, transfer_id) is TransferState.REJECTED  # the reply is lost
    _unpin(pair.kor, first_key)
    pair.now = expired
    pair.pump()
    _settled(pair, transfer_id, TransferState.REJECTED, "TRANSFER_STATE_REJECTED")
    assert state(pair.kor, transfer_id) is TransferState.REJECTED


@pytest.mark.parametrize(
    "reported",
    [
        transfer_pb2.TRANSFER_STATE_PROPOSED,
        transfer_pb2.TRANSFER_STATE_ACCEPTED,
        transfer_pb2.TRANSFER_STATE_VOIDED,
        transfer_pb2.TRANSFER_STATE_UNSPECIFIED,
        None,  # a Rejection of the query
    ],
    ids=["PROPOSED", "ACCEPTED", "VOIDED", "UNSPECIFIED", "refused"],
)
def test_any_other_answer_to_the_query_changes_nothing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, reported: int | None
) -> None:
    """A report of any other state, or a refusal of the query (recorded), settles
    nothing: the units stay reserved and the proposal is delivered again."""
    transfer_id, _ = _proposed_then_rotated(pair)

    def answer(
        engine: Engine, tx: object, sender: str, msg: transfer_pb2.TransferStatusQuery,
        payload: bytes, journal_id: int, now_us: int,
    ) -> bytes:  # fmt: skip
        if reported is None:
            raise Rejected(RejectionCode.INVALID_FIELD, "KOR will not say")
        report = transfer_pb2.TransferStatusReport(transfer_id=msg.transfer_id, state=reported)
        return engine._reply(tx, sender, report, msg.header.message_id, now_us)[1]  # type: ignore[arg-type]

    monkeypatch.setitem(pair.kor._request_handlers, QUERY, answer)
    pair.network = _drop(PROPOSAL)
    pair.now = _deadline(pair, transfer_id) + dt.timedelta(hours=1)
    pair.pump()
    with pair.lao.store.transaction() as tx:
        answers = tx.outbox_answers_of(payload_type=QUERY, subject_id=transfer_id)
    expected = "itmolink.v1.Rejection" if reported is None else "itmolink.v1.TransferStatusReport"
    assert answers == [("KOR", "answered", expected)]
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert (reserved(pair.lao), _pending(pair.lao, PROPOSAL, transfer_id)) == (600, 1)
    assert outbox_count(pair.lao, VOID, transfer_id) == 0


# -- when the sender asks ---------------------------------------------------------------


def test_the_sender_asks_only_past_the_deadline_once_at_a_time_and_not_in_two_phases(
    pair: Pair,
) -> None:
    """No query before expires_at + 2 × max_clock_skew + the grace; then one, and no
    other while it is pending or younger than the interval. A two-phase transfer
    past its time-out (not voided yet) is never asked about: its sender voids it."""
    transfer_id, _ = _proposed_then_rotated(pair)
    pair.lao.partners["KOR"] = dataclasses.replace(
        pair.lao.partners["KOR"], complete_on_acceptance=False
    )
    two_phase = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=_authorisation_of(pair), vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    deadline = _deadline(pair, transfer_id)
    pair.now = deadline - dt.timedelta(microseconds=1)
    assert pair.lao.query_pending_transfers(pair.now) == []
    pair.now = deadline
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    assert pair.lao.query_pending_transfers(pair.now) == []  # one pending
    pair.advance(INTERVAL * 10)
    assert pair.lao.query_pending_transfers(pair.now) == []  # still pending: none more
    assert outbox_count(pair.lao, QUERY, transfer_id) == 1
    assert outbox_count(pair.lao, QUERY, two_phase) == 0
    assert pair.kor.query_pending_transfers(pair.now) == []  # KOR knows of neither


# -- a crash ----------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_a_crash_while_settling_leaves_nothing_and_the_stored_report_settles_it_later(
    pair: Pair,
) -> None:
    """The settle is one transaction with the report's journaling: a crash before its
    commit leaves the transfer PROPOSED, the units reserved, the proposal and the
    query pending. Delivered again, the query gets KOR's stored report, byte for
    byte, with its first sent_at, and LAO settles on it."""
    transfer_id, first_key = _proposed_then_rotated(pair)
    pair.kor.revoke_signing_key(first_key, pair.now, partner="LAO")
    pair.network = _drop(PROPOSAL)
    pair.now = _deadline(pair, transfer_id)
    assert pair.lao.query_pending_transfers(pair.now) == [transfer_id]
    with pair.lao.store.transaction() as tx:
        [query] = [m for m in tx.outbox_due(2**62, 100) if m.payload_type == QUERY]
    reply = pair.kor.handle_delivery("LAO", query.envelope, pair.now)

    def crash() -> None:
        raise Crash("LAO crashed before commit")

    pair.lao.store.before_commit = crash  # type: ignore[attr-defined]
    with pytest.raises(Crash):
        pair.lao.handle_reply(query.message_id, reply, pair.now)
    pair.lao.store.before_commit = None  # type: ignore[attr-defined]
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    assert _pending(pair.lao, PROPOSAL, transfer_id) == 1
    assert _pending(pair.lao, QUERY, transfer_id) == 1

    pair.advance(600)
    again = pair.kor.handle_delivery("LAO", query.envelope, pair.now)
    assert again == reply  # the stored report
    assert pair.lao.handle_reply(query.message_id, again, pair.now)
    _settled(pair, transfer_id, TransferState.VOIDED, "TRANSFER_STATE_UNKNOWN")
