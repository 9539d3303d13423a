"""The one-round transfer (docs/DESIGN.md): the sender asks the receiver to complete
on acceptance; the receiver credits, books −CA and records COMPLETED in the
transaction that accepts, and the sender debits, books +CA and records COMPLETED in
the one that records that acceptance, sending no completion. Two engines in memory
with a hand-moved clock (rules S1 to S6 and R1 to R4 of the design brief)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging

import pytest
from google.protobuf.message import Message

from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.node.convert import to_us
from itmolink.node.engine import Engine, Partner, ReplyError
from itmolink.node.operations import BatchItemRequest
from itmolink.node.requests import Requests
from itmolink.store import open_store
from itmolink.store import postgres as postgres_module
from itmolink.store import sqlite as sqlite_module
from itmolink.store.migrate import latest_version, migrations
from itmolink.v1 import reply_pb2, transfer_pb2

from ..conftest import Databases
from .conftest import START, Pair
from .test_engine import held, issued, ledger, pending, state
from .test_onward import network
from .test_onward import pump as pump_three

COMPLETION = "itmolink.v1.TransferCompletion"
PROPOSAL = "itmolink.v1.TransferProposal"
BATCH = "itmolink.v1.TransferBatchProposal"
SKEW = dt.timedelta(minutes=5)  # Limits.max_clock_skew, the default


def ask(engine: Engine, partner: str) -> None:
    """Configure ``engine`` to propose one-round transfers to ``partner`` (as node.toml
    [[partners]] complete_on_acceptance = true does)."""
    engine.partners[partner] = dataclasses.replace(
        engine.partners[partner], complete_on_acceptance=True
    )


@pytest.fixture
def one_round(pair: Pair) -> Pair:
    ask(pair.lao, "KOR")
    return pair


def transfer(pair: Pair, quantity: int = 600) -> str:
    authorisation_id = issued(pair)
    return pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=quantity,
        now=pair.now,
    )  # fmt: skip


def _authorisation_of(pair: Pair) -> str:
    with pair.lao.store.transaction() as tx:
        return tx.authorisations()[0].authorisation_id


def two_phase_beside(pair: Pair) -> str:
    """LAO stops asking KOR to complete on acceptance and proposes 100 tCO2e more: a
    two-phase transfer beside the one-round ones. Returns its id."""
    pair.lao.partners["KOR"] = dataclasses.replace(
        pair.lao.partners["KOR"], complete_on_acceptance=False
    )
    return pair.lao.start_transfer(
        to_party="KOR", authorisation_id=_authorisation_of(pair), vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip


def outbox_count(engine: Engine, payload_type: str, subject_id: str) -> int:
    with engine.store.transaction() as tx:
        return tx.outbox_count_of(payload_type=payload_type, subject_id=subject_id)


def reserved(engine: Engine) -> int:
    with engine.store.transaction() as tx:
        return sum(h.block.quantity for h in tx.holdings() if h.status == "reserved")


def parse(engine: Engine, envelope: bytes) -> Message:
    verified = open_envelope(envelope, engine.trust)
    message: Message = {
        "itmolink.v1.TransferAcceptance": transfer_pb2.TransferAcceptance,
        "itmolink.v1.TransferCompletionReceipt": transfer_pb2.TransferCompletionReceipt,
        "itmolink.v1.TransferStatusReport": transfer_pb2.TransferStatusReport,
        "itmolink.v1.Rejection": reply_pb2.Rejection,
    }[verified.payload_type]()
    message.ParseFromString(verified.payload)
    return message


def as_an_older_build(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make KOR answer as a build that predates complete_on_acceptance: it never
    reads the field, and accepts in two phases."""

    def accept(
        tx: object, sender: str, msg: transfer_pb2.TransferProposal, payload: bytes,
        blocks: object, journal_id: int, now_us: int,
    ) -> bytes:  # fmt: skip
        msg.complete_on_acceptance = False  # unknown to it: never read
        return Requests._on_proposal(pair.kor, tx, sender, msg, payload, journal_id, now_us)  # type: ignore[arg-type]

    monkeypatch.setattr(pair.kor, "_accept_completed", accept)


def completed_on_both(pair: Pair, transfer_id: str) -> None:
    """Both sides hold the transfer COMPLETED, with +600 at LAO and −600 at KOR."""
    assert state(pair.lao, transfer_id) is state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]


def the_proposal(pair: Pair) -> tuple[str, bytes]:
    """(message id, envelope) of LAO's one pending message, a transfer proposal."""
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    assert open_envelope(envelope, pair.kor.trust).payload_type == PROPOSAL
    return message_id, envelope


# -- S1, S2, R1, R4: the one-round transfer ---------------------------------------------


def test_a_completed_acceptance_completes_both_sides_in_one_round_trip(one_round: Pair) -> None:
    pair = one_round
    transfer_id = transfer(pair)
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
        assert record is not None
        assert record.complete_on_acceptance  # S1: recorded
    message_id, envelope = the_proposal(pair)
    proposal = transfer_pb2.TransferProposal()
    proposal.ParseFromString(open_envelope(envelope, pair.kor.trust).payload)
    assert proposal.complete_on_acceptance

    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    acceptance = parse(pair.lao, reply)
    assert isinstance(acceptance, transfer_pb2.TransferAcceptance)
    assert (acceptance.completed, acceptance.adjustment_year) == (True, 2025)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED  # R1, before any reply
    pair.lao.handle_reply(message_id, reply, pair.now)
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED

    assert pair.pump() == 0  # nothing more to say: one round trip
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 0  # S2: no completion
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert (held(pair.lao), held(pair.kor)) == (400, 600)
    assert reserved(pair.lao) == 0
    assert pending(pair.lao) == pending(pair.kor) == 0
    # Each side's adjustment references the partner's signed message that triggered
    # it: the sender's the acceptance, the receiver's the proposal (R1).
    with pair.lao.store.transaction() as tx:
        [sender_entry] = [a for a in tx.adjustments() if a.entry.transfer_id == transfer_id]
    with pair.kor.store.transaction() as tx:
        [receiver_entry] = [a for a in tx.adjustments() if a.entry.transfer_id == transfer_id]
        kor_actions = [(a["action_type"], a["transfer_id"]) for a in tx.actions()]
    assert sender_entry.evidence_message_id == acceptance.header.message_id
    assert receiver_entry.evidence_message_id == proposal.header.message_id
    assert ("acquisition", transfer_id) in kor_actions
    # R4: the reconciliation leaves agree (blocks, both adjustments, both digests).
    snapshot = to_us(pair.now) + 1
    for view in ("blocks", "journal"):
        with pair.lao.store.transaction() as tx:
            lao_leaves = tx.reconcile_leaves("KOR", snapshot, view, "")
        with pair.kor.store.transaction() as tx:
            kor_leaves = tx.reconcile_leaves("LAO", snapshot, view, "")
        assert transfer_id in lao_leaves
        assert lao_leaves == kor_leaves, view


def test_the_choice_recorded_with_the_proposal_counts_not_the_configuration_later(
    one_round: Pair,
) -> None:
    """S1: the partner's setting changes between the proposal and its answer; the
    proposal's flag decides (no completion is sent for a completed acceptance). A
    transfer proposed after the change is a two-phase one, as without the setting."""
    pair = one_round
    transfer_id = transfer(pair)
    pair.lao.partners["KOR"] = dataclasses.replace(
        pair.lao.partners["KOR"], complete_on_acceptance=False
    )
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 0
    two_phase = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=_authorisation_of(pair), vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    _, envelope = the_proposal(pair)
    proposal = transfer_pb2.TransferProposal()
    proposal.ParseFromString(open_envelope(envelope, pair.kor.trust).payload)
    assert not proposal.complete_on_acceptance
    pair.pump()
    assert state(pair.kor, two_phase) is TransferState.COMPLETED
    assert outbox_count(pair.lao, COMPLETION, two_phase) == 1


# -- S3: a receiver that answers with an ordinary acceptance ----------------------------


def test_a_receiver_that_does_not_complete_on_acceptance_gets_a_completion(
    one_round: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver on an older build ignores field 9 and accepts as always; the sender
    completes and sends the completion (S3)."""
    pair = one_round
    as_an_older_build(pair, monkeypatch)
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    acceptance = parse(pair.lao, reply)
    assert isinstance(acceptance, transfer_pb2.TransferAcceptance)
    assert not acceptance.completed
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    pair.lao.handle_reply(message_id, reply, pair.now)
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 1
    pair.pump()
    completed_on_both(pair, transfer_id)


# -- S4: no void on the sender's clock; the receiver's expiry settles it ----------------


def test_a_proposal_that_asked_is_never_voided_and_an_expired_one_is_refused_3011(
    one_round: Pair,
) -> None:
    """S4: the link is down past the time-out; the time-out pass leaves the transfer
    PROPOSED, its blocks reserved and its proposal in the outbox (no void). Once the
    link works, the receiver refuses the expired proposal with 3011, recorded, and
    the sender releases the blocks (R2)."""
    pair = one_round
    transfer_id = transfer(pair)
    two_phase = two_phase_beside(pair)
    pair.network = lambda sender, receiver, envelope: None  # the link is down
    pair.advance(60 + SKEW.total_seconds() + 1)  # past expires_at + skew
    assert pair.lao.expire_transfers(pair.now) == [two_phase]  # only the two-phase one
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    assert outbox_count(pair.lao, "itmolink.v1.TransferVoid", transfer_id) == 0
    with pair.lao.store.transaction() as tx:
        assert tx.outbox_pending_of(payload_type=PROPOSAL, subject_id=transfer_id) == 1
    # The status a partner asking about it gets: PROPOSED.
    query = transfer_pb2.TransferStatusQuery(transfer_id=transfer_id)
    report = _from_kor(pair, query)
    assert isinstance(report, transfer_pb2.TransferStatusReport)
    assert report.state == transfer_pb2.TRANSFER_STATE_PROPOSED

    pair.network = lambda sender, receiver, envelope: envelope
    pair.advance(3_600)  # the backoff of the failed attempts
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.REJECTED
    assert state(pair.lao, transfer_id) is TransferState.REJECTED
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.rejection_code == RejectionCode.PROPOSAL_EXPIRED
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 1_000, 0)
    assert ledger(pair.lao) == ledger(pair.kor) == []


# -- S5: an unrecorded rejection ----------------------------------------------------------


def _refused_unrecorded(pair: Pair, envelope: bytes) -> bytes:
    """KOR's answer to ``envelope`` with its clock 10 minutes behind the proposal's
    sent_at (START): refused before anything is recorded there (sequence 0)."""
    reply = pair.kor.handle_delivery("LAO", envelope, START - dt.timedelta(minutes=10))
    rejection = parse(pair.lao, reply)
    assert isinstance(rejection, reply_pb2.Rejection)
    assert rejection.header.sequence == 0
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SENT_AT_OUT_OF_WINDOW
    return reply


def test_an_unrecorded_rejection_before_the_deadline_is_a_failed_attempt(
    one_round: Pair,
) -> None:
    """S5: before expires_at + 2 × skew, an unrecorded refusal settles nothing: the
    same bytes delivered again may still pass, and complete at the receiver."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.advance(60 + 2 * SKEW.total_seconds() - 1)  # one second before the deadline
    with pair.lao.store.transaction() as tx:
        journaled = len(list(tx.journal_entries()))
    pair.lao.handle_reply(message_id, _refused_unrecorded(pair, envelope), pair.now)
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED  # (two-phase: REJECTED)
    with pair.lao.store.transaction() as tx:  # a failed attempt: nothing journaled
        assert len(list(tx.journal_entries())) == journaled
    assert reserved(pair.lao) == 600
    with pair.lao.store.transaction() as tx:
        message = tx.outbox_get(message_id)
        assert message is not None
        assert message.state == "pending"
        assert message.next_attempt_at > to_us(pair.now)  # retried with the backoff
        assert (
            "REJECTION_CODE_SENT_AT_OUT_OF_WINDOW"
            in tx._one("SELECT last_error FROM outbox WHERE message_id = ?", (message_id,))[0]
        )
    # The same bytes again, the receiver's clock a skew behind the sender's: the
    # proposal has not expired there (expires_at + skew), it completes, and so does
    # the sender. Releasing on the refusal would have left KOR's credit unmatched.
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now - SKEW)
    assert parse(pair.lao, reply).completed  # type: ignore[attr-defined]
    pair.lao.handle_reply(message_id, reply, pair.now)
    completed_on_both(pair, transfer_id)


def test_an_unrecorded_rejection_exactly_at_the_deadline_is_a_failed_attempt(
    one_round: Pair,
) -> None:
    """S5 releases only strictly after expires_at + 2 × skew. At that very instant the
    receiver, its clock a skew behind (allowed), is at expires_at + skew, where T1b
    still accepts (it refuses only when expires_at + skew < now): a replay in flight
    completes there, so releasing on the refusal would break atomicity."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.advance(60 + 2 * SKEW.total_seconds())  # exactly expires_at + 2 × skew
    assert to_us(pair.now) == _expires_at(pair, transfer_id) + 2 * to_us_delta(SKEW)
    pair.lao.handle_reply(message_id, _refused_unrecorded(pair, envelope), pair.now)
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now - SKEW)  # a replay in flight
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    pair.lao.handle_reply(message_id, reply, pair.now)
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]


def test_an_unrecorded_rejection_just_after_the_deadline_settles_the_proposal(
    one_round: Pair,
) -> None:
    """S5: the attempt sent one microsecond after expires_at + 2 × skew: no replay
    can complete at the receiver any more, so its unrecorded refusal rejects the
    transfer and releases the blocks. (The exact instant is retried, as above.)"""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.advance(60 + 2 * SKEW.total_seconds())
    pair.lao.handle_reply(message_id, _refused_unrecorded(pair, envelope), pair.now)
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED  # the boundary: retried
    pair.now += dt.timedelta(microseconds=1)
    pair.lao.handle_reply(message_id, _refused_unrecorded(pair, envelope), pair.now)
    assert state(pair.lao, transfer_id) is TransferState.REJECTED
    assert (reserved(pair.lao), held(pair.lao)) == (0, 1_000)
    assert pending(pair.lao) == 0
    # The receiver, a skew behind, now refuses the same bytes: expired there.
    pair.kor.handle_delivery("LAO", envelope, pair.now - SKEW)
    assert state(pair.kor, transfer_id) is TransferState.REJECTED


def test_s5_decides_on_when_the_refused_attempt_was_sent_not_when_its_reply_is_applied(
    one_round: Pair,
) -> None:
    """A slow call: the attempt leaves a second before expires_at + 2 × skew, its
    unrecorded refusal is applied after that deadline. Meanwhile the lease ran out
    and a second attempt of the same bytes was accepted and completed by the
    receiver (its clock a skew behind). The stale refusal must not release: it is a
    failed attempt because of when it was sent (``sent_at``); the second attempt's
    acceptance then completes the sender."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.advance(60 + 2 * SKEW.total_seconds() - 1)
    first_sent = pair.now
    stale = _refused_unrecorded(pair, envelope)
    second = pair.kor.handle_delivery("LAO", envelope, pair.now - SKEW)  # completes
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    pair.advance(30)  # the refusal of the first attempt is applied after the deadline
    assert not pair.lao.handle_reply(message_id, stale, pair.now, sent_at=first_sent)
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert pair.lao.handle_reply(message_id, second, pair.now)
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]


def test_s5_settles_on_a_refused_attempt_sent_after_the_deadline(one_round: Pair) -> None:
    """The same refusal, its attempt sent after expires_at + 2 × skew: it settles,
    and ``handle_reply`` says it applied the reply."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.advance(60 + 2 * SKEW.total_seconds() + 1)
    sent = pair.now
    refusal = _refused_unrecorded(pair, envelope)
    pair.advance(5)
    assert pair.lao.handle_reply(message_id, refusal, pair.now, sent_at=sent)
    assert state(pair.lao, transfer_id) is TransferState.REJECTED
    assert reserved(pair.lao) == 0


@pytest.mark.parametrize("late", [False, True])
def test_t1b_is_judged_when_the_delivery_holds_the_ledger_not_when_it_arrived(
    one_round: Pair, late: bool
) -> None:
    """S5's ordering: a delivery that arrived before expires_at + skew but reaches the
    ledger after it (queued behind a group commit, or behind another process) is
    judged at the later instant, read with the ledger's write lock held: refused
    with 3011, recorded, as every delivery recorded after it would be. A clock
    reading earlier than the arrival changes nothing."""
    pair = one_round
    transfer_id = transfer(pair)
    _, envelope = the_proposal(pair)
    arrival = START + dt.timedelta(seconds=60) + SKEW - dt.timedelta(seconds=1)
    locked = arrival + (dt.timedelta(seconds=2) if late else -dt.timedelta(seconds=30))
    pair.kor.ledger_clock = lambda: locked
    answer = parse(pair.lao, pair.kor.handle_delivery("LAO", envelope, arrival))
    if late:
        assert isinstance(answer, reply_pb2.Rejection)
        assert answer.header.sequence > 0  # recorded
        assert RejectionCode(answer.reasons[0].code) is RejectionCode.PROPOSAL_EXPIRED
        assert state(pair.kor, transfer_id) is TransferState.REJECTED
    else:
        assert isinstance(answer, transfer_pb2.TransferAcceptance)
        assert answer.completed
        assert state(pair.kor, transfer_id) is TransferState.COMPLETED


def _expires_at(pair: Pair, transfer_id: str) -> int:
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    return record.expires_at


def to_us_delta(delta: dt.timedelta) -> int:
    return delta // dt.timedelta(microseconds=1)


# -- S5: a refusal before the receiver's look-up never settles ------------------------


def _drop_trust(engine: Engine, party: str) -> None:
    """``engine``'s operator unpins ``party``'s keys (a card replaced by mistake, a
    trust store rebuilt): its messages fail verification there (1003) until the
    keys are pinned again (``engine.reload_trust()``)."""
    trust = TrustStore([k for k in engine.trust.all() if k.party != party])
    for key_id, since in engine.trust.revocations().items():
        trust.revoke(key_id, since)
    engine.trust = trust


def _refused_before_lookup(pair: Pair, envelope: bytes, code: RejectionCode) -> bytes:
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    rejection = parse(pair.lao, reply)
    assert isinstance(rejection, reply_pb2.Rejection)
    assert rejection.header.sequence == 0
    assert rejection.header.in_reply_to == ""  # D1b to D5a
    assert RejectionCode(rejection.reasons[0].code) is code
    return reply


def _alarms(caplog: pytest.LogCaptureFixture, transfer_id: str) -> int:
    return sum(
        r.getMessage().startswith("ALARM") and transfer_id in r.getMessage() for r in caplog.records
    )


def test_key_revoked_at_receiver_after_it_completed_one_round(
    one_round: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR completes the one-round proposal; its reply is lost; KOR's operator then
    revokes LAO's key. Every later delivery of the same bytes is refused at D2,
    before KOR looks the message up: an unrecorded rejection with an empty
    in_reply_to. Even long after expires_at + 2 × skew it settles nothing: LAO keeps
    the units reserved (KOR holds them and booked −CA), delivers the proposal again,
    and raises one ALARM for the transfer, not one per attempt."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # completed; the reply is lost
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    [key_id] = open_envelope(envelope, pair.kor.trust).key_ids
    pair.kor.revoke_signing_key(key_id, pair.now, partner="LAO")
    pair.advance(60 + 2 * SKEW.total_seconds() + 1)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            again = _refused_before_lookup(pair, envelope, RejectionCode.SIGNING_KEY_REVOKED)
            assert not pair.lao.handle_reply(message_id, again, pair.now)
            pair.advance(3_600)
    assert _alarms(caplog, transfer_id) == 1
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert (reserved(pair.lao), ledger(pair.lao)) == (600, [])
    with pair.lao.store.transaction() as tx:
        assert tx.outbox_pending_of(payload_type=PROPOSAL, subject_id=transfer_id) == 1
        error = tx._one("SELECT last_error FROM outbox WHERE message_id = ?", (message_id,))[0]
    assert "REJECTION_CODE_SIGNING_KEY_REVOKED" in error
    assert pair.lao.expire_transfers(pair.now) == []  # and no void either


def test_a_receiver_that_pins_the_key_again_answers_with_its_stored_acceptance(
    one_round: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR completes, the reply is lost, then KOR unpins LAO's key: refusals before
    the look-up (1003), past every deadline, settle nothing. Once KOR pins the key
    again, the next delivery gets KOR's stored acceptance and LAO completes."""
    pair = one_round
    transfer_id = transfer(pair)
    _, envelope = the_proposal(pair)
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # completed; the reply is lost
    _drop_trust(pair.kor, "LAO")
    pair.advance(60 + 2 * SKEW.total_seconds() + 1)
    with caplog.at_level(logging.INFO):
        pair.pump()
        pair.advance(3_600)
        pair.pump()
    assert _alarms(caplog, transfer_id) == 1
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert reserved(pair.lao) == 600
    pair.kor.reload_trust()  # the operator pins LAO's key again
    pair.advance(3_600)
    pair.pump()
    completed_on_both(pair, transfer_id)
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 400, 600)


def test_a_proposal_the_receiver_never_read_is_refused_3011_once_it_can(one_round: Pair) -> None:
    """KOR never read the proposal (LAO's key unpinned there from the start): the
    refusals before the look-up settle nothing past the deadline; once the key is
    pinned again, KOR refuses the expired proposal with 3011, recorded, and LAO
    releases the units."""
    pair = one_round
    authorisation_id = issued(pair)
    _drop_trust(pair.kor, "LAO")
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=600,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    pair.advance(60 + 2 * SKEW.total_seconds() + 1)
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert state(pair.kor, transfer_id) is None
    pair.kor.reload_trust()
    pair.advance(3_600)
    pair.pump()
    assert state(pair.lao, transfer_id) is state(pair.kor, transfer_id) is TransferState.REJECTED
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.rejection_code == RejectionCode.PROPOSAL_EXPIRED
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 1_000, 0)


def test_a_recorded_rejection_settles_a_proposal_that_asked_at_once(one_round: Pair) -> None:
    pair = one_round
    authorisation_id = issued(pair)
    with pair.kor.store.transaction() as tx:  # KOR no longer knows the authorisation
        tx._exec("DELETE FROM authorisation_parties")
        tx._exec("DELETE FROM authorisations")
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=600,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.REJECTED  # R2, nothing credited
    assert state(pair.lao, transfer_id) is TransferState.REJECTED
    assert (reserved(pair.lao), held(pair.lao), held(pair.kor)) == (0, 1_000, 0)


# -- what the one-round setting leaves alone: batches, older ledgers, older receivers --


def test_a_batch_to_a_partner_asked_one_round_carries_no_flag_and_is_voided_on_time_out(
    one_round: Pair,
) -> None:
    """Batches get no flag (TransferBatchProposal has no such field): a batch
    proposed to a partner configured one-round is an ordinary two-phase batch, its
    transfers recorded without the flag on both sides and voided on the sender's
    time-out when the acceptance is lost."""
    assert (
        "complete_on_acceptance" not in transfer_pb2.TransferBatchProposal.DESCRIPTOR.fields_by_name
    )
    pair = one_round
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=[BatchItemRequest(authorisation_id, 2025, q) for q in (10, 20)],
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(_, _, envelope)] = pair.lao.due_messages(pair.now)
    assert open_envelope(envelope, pair.kor.trust).payload_type == BATCH
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # accepted, but the reply is lost
    for engine in (pair.lao, pair.kor):
        with engine.store.transaction() as tx:
            records = [tx.transfer_get(t) for t in ids]
        assert [r is not None and r.complete_on_acceptance for r in records] == [False, False]
    assert [state(pair.kor, t) for t in ids] == [TransferState.ACCEPTED] * 2
    pair.advance(31)
    assert sorted(pair.lao.expire_transfers(pair.now)) == sorted(ids)
    pair.pump()
    for engine in (pair.lao, pair.kor):
        assert [state(engine, t) for t in ids] == [TransferState.VOIDED] * 2
    assert (held(pair.lao), held(pair.kor), reserved(pair.lao)) == (1_000, 0, 0)


def test_a_transfer_proposed_under_schema_8_is_still_timed_out_after_migration_0009(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger of schema version 8, from before the one-round transfer, with a
    PROPOSED transfer (blocks reserved, proposal in the outbox): opening it runs
    migration 0009, the transfer reads as two-phase and is voided on its time-out
    as it would have been."""
    transfer_id = transfer(pair)
    store = pair.lao.store
    database = getattr(store, "url", None) or store.path  # type: ignore[attr-defined]
    with store.transaction() as tx:  # back to what schema version 8 wrote
        tx._exec("ALTER TABLE transfers DROP COLUMN complete_on_acceptance")
        tx._exec("DROP TABLE transfer_completions")  # schema version 10
        tx._exec("DELETE FROM schema_migrations WHERE version >= 9")
    store.close()
    with monkeypatch.context() as patch:  # a node of schema version 8 opens it
        patch.setattr(sqlite_module, "migrations", lambda: migrations()[:8])
        patch.setattr(postgres_module, "migrations", lambda: migrations()[:8])
        old = open_store(database, party="LAO", registry="LAO-NR")
        assert old.schema_version() == 8
        with old.transaction() as tx:
            [(proposed,)] = tx._exec(
                "SELECT state FROM transfers WHERE transfer_id = ?", (transfer_id,)
            )
        assert proposed == int(TransferState.PROPOSED)
        old.close()
    upgraded = open_store(database, party="LAO", registry="LAO-NR")
    assert upgraded.schema_version() == latest_version() >= 9
    counter = itertools.count(1)
    pair.lao = Engine(
        party="LAO", registry="LAO-NR", signing_key=pair.keys["LAO"],
        trust=TrustStore([pair.keys["KOR"].verifying_key()]),
        partners=[Partner("KOR", "KOR-NR", "in-memory", complete_on_acceptance=True)],
        store=upgraded, default_timeout=dt.timedelta(seconds=60),
        new_id=lambda: f"LAO-upgraded-{next(counter)}",
    )  # fmt: skip
    with upgraded.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert (record.state, record.complete_on_acceptance) == (TransferState.PROPOSED, False)
    pair.advance(61)
    assert pair.lao.expire_transfers(pair.now) == [transfer_id]  # even though KOR is one-round now
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.VOIDED
    assert (reserved(pair.lao), held(pair.lao)) == (0, 1_000)
    assert outbox_count(pair.lao, "itmolink.v1.TransferVoid", transfer_id) == 1


def test_an_older_receivers_acceptance_lost_past_expires_at_is_waited_for(
    one_round: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver on an older build accepts the proposal that asked as an ordinary
    one; the acceptance is lost and the link stays down past expires_at. The sender
    does not void on its time-out (the proposal asked, S4); the receiver's status
    query is answered PROPOSED, so it keeps the transfer ACCEPTED. Once the link heals
    the proposal's retry gets the stored acceptance, and the completion completes both
    sides."""
    pair = one_round
    as_an_older_build(pair, monkeypatch)
    transfer_id = transfer(pair)
    _, envelope = the_proposal(pair)
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # an ordinary acceptance, lost
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    pair.network = lambda sender, receiver, envelope: None  # the link is down
    pair.advance(60 + 60)  # past expires_at, before S7's withdrawal
    assert pair.lao.expire_transfers(pair.now) == []
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    # KOR asked LAO about it (its status query, lost so far; delivered by hand once
    # the link works): PROPOSED.
    pair.advance(60)
    [(query_id, _, query)] = pair.kor.due_messages(pair.now)
    assert open_envelope(query, pair.lao.trust).payload_type == "itmolink.v1.TransferStatusQuery"
    report_envelope = pair.lao.handle_delivery("KOR", query, pair.now)
    report = parse(pair.kor, report_envelope)
    assert isinstance(report, transfer_pb2.TransferStatusReport)
    assert report.state == transfer_pb2.TRANSFER_STATE_PROPOSED
    pair.kor.handle_reply(query_id, report_envelope, pair.now)
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED  # still waiting
    pair.network = lambda sender, receiver, envelope: envelope  # healed
    pair.advance(60)
    pair.pump()
    assert state(pair.lao, transfer_id) is state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 1  # two-phase to its end
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert (held(pair.lao), held(pair.kor), reserved(pair.lao)) == (400, 600, 0)


def test_an_older_receivers_acceptance_after_the_withdrawal_is_not_completed(
    one_round: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, with the link down past expires_at + 2 × skew: the sender withdraws
    the proposal with a void (S7). When the link heals, the stored ordinary acceptance
    and the void cross: the void voids KOR's ACCEPTED transfer (V4), so LAO must not
    complete on the acceptance, which would debit 600 that KOR never credits; the
    void's receipt settles both sides VOIDED, nothing moved."""
    pair = one_round
    as_an_older_build(pair, monkeypatch)
    transfer_id = transfer(pair)
    _, envelope = the_proposal(pair)
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # an ordinary acceptance, lost
    pair.network = lambda sender, receiver, envelope: None  # the link is down
    pair.advance(3_600)  # far past expires_at + 2 × skew
    pair.pump()
    assert outbox_count(pair.lao, "itmolink.v1.TransferVoid", transfer_id) == 1
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    pair.network = lambda sender, receiver, envelope: envelope  # healed
    pair.advance(3_600)
    pair.pump()
    assert state(pair.lao, transfer_id) is state(pair.kor, transfer_id) is TransferState.VOIDED
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 0
    assert ledger(pair.lao) == ledger(pair.kor) == []
    assert (held(pair.lao), held(pair.kor), reserved(pair.lao)) == (1_000, 0, 0)


# -- S6: an acceptance the sender cannot apply ----------------------------------------


def _forged_acceptance(pair: Pair, reply: bytes, **changes: object) -> bytes:
    """KOR's acceptance ``reply`` with ``changes``, signed by KOR."""
    acceptance = parse(pair.lao, reply)
    for name, value in changes.items():
        setattr(acceptance, name, value)
    return seal("itmolink.v1.TransferAcceptance", acceptance.SerializeToString(), pair.keys["KOR"])


def test_a_completed_acceptance_of_a_proposal_that_did_not_ask_is_refused(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    forged = _forged_acceptance(pair, reply, completed=True, adjustment_year=2025)
    with pytest.raises(ReplyError) as caught, caplog.at_level(logging.ERROR):
        pair.lao.handle_reply(message_id, forged, pair.now)
    assert caught.value.code is RejectionCode.UNEXPECTED_REPLY
    assert any(
        r.getMessage().startswith("ALARM") and transfer_id in r.getMessage() for r in caplog.records
    )
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert (reserved(pair.lao), ledger(pair.lao)) == (600, [])
    pair.lao.handle_reply(message_id, reply, pair.now)  # the genuine answer still applies
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED


@pytest.mark.parametrize("asked", [False, True])
def test_an_ordinary_acceptance_with_an_adjustment_year_is_refused(
    pair: Pair, asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if asked:
        ask(pair.lao, "KOR")
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    forged = _forged_acceptance(pair, reply, completed=False, adjustment_year=2025)
    with pytest.raises(ReplyError) as caught:
        pair.lao.handle_reply(message_id, forged, pair.now)
    assert caught.value.code is RejectionCode.UNEXPECTED_REPLY
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert ledger(pair.lao) == []


# -- R3: later messages about a transfer completed on acceptance ------------------------


def _from_lao(pair: Pair, msg: Message, subject_id: str) -> Message:
    """LAO sends ``msg`` to KOR; KOR's answer, parsed (LAO applies it too)."""
    with pair.lao._transaction() as tx:
        pair.lao._send(tx, "KOR", msg, subject_id, to_us(pair.now))
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.lao.handle_reply(message_id, reply, pair.now)
    return parse(pair.lao, reply)


def _from_kor(pair: Pair, msg: Message) -> Message:
    """KOR asks LAO ``msg`` (a status query); LAO's answer, parsed."""
    msg.header.CopyFrom(pair.kor._header(None, "LAO", to_us(pair.now)))  # type: ignore[attr-defined]
    msg.header.sequence = 10_000  # type: ignore[attr-defined]
    envelope = seal(msg.DESCRIPTOR.full_name, msg.SerializeToString(), pair.keys["KOR"])
    reply = pair.lao.handle_delivery("KOR", envelope, pair.now)
    return parse(pair.kor, reply)


def test_later_messages_about_a_transfer_completed_on_acceptance(one_round: Pair) -> None:
    """R3: a completion naming the acceptance gets a receipt with the year booked and
    changes nothing; a void is refused 3008; a status query answers COMPLETED. The
    receiver never asks the sender about it."""
    pair = one_round
    transfer_id = transfer(pair)
    pair.pump()
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    completion = transfer_pb2.TransferCompletion(
        transfer_id=transfer_id, acceptance_digest=record.acceptance_digest, adjustment_year=2025
    )
    receipt = _from_lao(pair, completion, transfer_id)
    assert isinstance(receipt, transfer_pb2.TransferCompletionReceipt)
    assert receipt.adjustment_year == 2025
    void = transfer_pb2.TransferVoid(transfer_id=transfer_id, reason="too late")
    refusal = _from_lao(pair, void, transfer_id)
    assert isinstance(refusal, reply_pb2.Rejection)
    assert RejectionCode(refusal.reasons[0].code) is RejectionCode.TRANSFER_STATE_CONFLICT
    report = _from_lao(pair, transfer_pb2.TransferStatusQuery(transfer_id=transfer_id), "")
    assert isinstance(report, transfer_pb2.TransferStatusReport)
    assert report.state == transfer_pb2.TRANSFER_STATE_COMPLETED
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert held(pair.kor) == 600
    pair.advance(3_600)
    assert pair.kor.query_pending_transfers(pair.now) == []


def test_a_status_query_about_it_gets_a_report_and_no_completion(one_round: Pair) -> None:
    """S2: the sender of a transfer completed on a completed acceptance never sends a
    completion, not even when the receiver asks about the transfer (a completion is
    sealed again on a query only where one was sent before)."""
    pair = one_round
    transfer_id = transfer(pair)
    pair.pump()
    report = _from_kor(pair, transfer_pb2.TransferStatusQuery(transfer_id=transfer_id))
    assert isinstance(report, transfer_pb2.TransferStatusReport)
    assert report.state == transfer_pb2.TRANSFER_STATE_COMPLETED
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 0
    assert pair.lao.due_messages(pair.now) == []


# -- idempotence, crashes -------------------------------------------------------------


def test_a_proposal_delivered_again_gets_the_stored_acceptance_and_applies_nothing_twice(
    one_round: Pair,
) -> None:
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)
    first = pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.advance(5)
    again = pair.kor.handle_delivery("LAO", envelope, pair.now)
    assert again == first  # byte for byte
    pair.lao.handle_reply(message_id, first, pair.now)
    pair.lao.handle_reply(message_id, again, pair.now)  # answered already: ignored
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert (held(pair.lao), held(pair.kor)) == (400, 600)
    with pair.kor.store.transaction() as tx:
        assert len([a for a in tx.actions() if a["transfer_id"] == transfer_id]) == 1


class Crash(Exception):
    pass


def test_a_crash_after_the_receivers_commit_before_the_sender_records_the_answer(
    one_round: Pair,
) -> None:
    """The receiver completed; the sender crashes before its commit, so nothing of
    the answer is recorded there and the proposal is still due. Delivered again, the
    receiver answers with its stored acceptance and the sender completes."""
    pair = one_round
    transfer_id = transfer(pair)
    message_id, envelope = the_proposal(pair)

    def crash() -> None:
        raise Crash("LAO crashed before commit")

    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.lao.store.before_commit = crash
    with pytest.raises(Crash):
        pair.lao.handle_reply(message_id, reply, pair.now)
    pair.lao.store.before_commit = None
    assert state(pair.lao, transfer_id) is TransferState.PROPOSED
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    pair.advance(120)  # the time-out passes meanwhile: no void
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert (held(pair.lao), held(pair.kor), reserved(pair.lao)) == (400, 600, 0)
    assert outbox_count(pair.lao, COMPLETION, transfer_id) == 0


def test_a_crash_of_the_receiver_before_its_commit_leaves_nothing_there(
    one_round: Pair,
) -> None:
    pair = one_round
    transfer_id = transfer(pair)
    _, envelope = the_proposal(pair)

    def crash() -> None:
        raise Crash("KOR crashed before commit")

    pair.kor.store.before_commit = crash
    with pytest.raises(Crash):
        pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.kor.store.before_commit = None
    assert state(pair.kor, transfer_id) is None
    assert (ledger(pair.kor), held(pair.kor)) == ([], 0)
    pair.pump()
    assert state(pair.lao, transfer_id) is state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]


# -- an onward one-round transfer ------------------------------------------------------


def test_an_onward_transfer_completes_on_acceptance(databases: Databases) -> None:
    engines = network(databases)
    lao, kor, jpn = engines["LAO"], engines["KOR"], engines["JPN"]
    ask(lao, "KOR")
    ask(kor, "JPN")
    blocked = {("LAO", "JPN")}  # JPN learns the authorisation from the evidence
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR-JPN", acquiring_parties=["KOR", "JPN"],
        purposes=[Purpose.NDC], oimp_detail="",
        first_transfer_definition=FirstTransferDefinition.UNSPECIFIED, vintage_from=2021,
        vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=START,
    )  # fmt: skip
    lao.issue(authorisation_id=terms.authorisation_id, vintage=2025, quantity=1_000, now=START)
    pump_three(engines, START, blocked=blocked)
    first = lao.start_transfer(
        to_party="KOR", authorisation_id=terms.authorisation_id, vintage=2025, quantity=600,
        now=START,
    )  # fmt: skip
    pump_three(engines, START, blocked=blocked)
    onward = kor.start_transfer(
        to_party="JPN", host_party="LAO", authorisation_id=terms.authorisation_id,
        vintage=2025, quantity=250, now=START,
    )  # fmt: skip
    pump_three(engines, START, blocked=blocked)
    for engine in (kor, jpn):
        assert state(engine, onward) is TransferState.COMPLETED
        assert outbox_count(engine, COMPLETION, onward) == 0
    assert outbox_count(lao, COMPLETION, first) == 0
    assert sorted((t, a) for t, _, a in ledger(kor)) == sorted([(first, -600), (onward, 250)])
    assert [(t, a) for t, _, a in ledger(jpn)] == [(onward, -250)]
    with jpn.store.transaction() as tx:
        assert [(h.block.first_transferring_party, h.block.quantity) for h in tx.holdings()] == [
            ("LAO", 250)
        ]
        record = tx.transfer_get(onward)
    assert record is not None
    assert record.complete_on_acceptance
