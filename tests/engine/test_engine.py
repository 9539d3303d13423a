"""Protocol engine behaviour, two engines in memory with a hand-moved clock."""

from __future__ import annotations

import datetime as dt

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Role, TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import EngineBase
from itmolink.node.convert import to_us
from itmolink.node.engine import ReplyError
from itmolink.v1 import reply_pb2, transfer_pb2

from ..conftest import Databases
from .conftest import Pair, make_engine


def issued(pair: Pair, quantity: int = 1_000) -> str:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=quantity, now=pair.now)
    pair.pump()
    return authorisation_id


def state(engine: EngineBase, transfer_id: str) -> TransferState | None:
    with engine.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    return None if record is None else record.state


def ledger(engine: EngineBase) -> list[tuple[str, int, int]]:
    with engine.store.transaction() as tx:
        return [(a.entry.transfer_id, a.entry.year, a.entry.amount) for a in tx.adjustments()]


def held(engine: EngineBase) -> int:
    with engine.store.transaction() as tx:
        return sum(h.block.quantity for h in tx.holdings())


def pending(engine: EngineBase) -> int:
    with engine.store.transaction() as tx:
        return tx.outbox_pending_count()


def test_two_engines_complete_a_transfer_in_memory(pair: Pair) -> None:
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=600, now=pair.now
    )
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.lao) == [(transfer_id, 2025, 600)]
    assert ledger(pair.kor) == [(transfer_id, 2025, -600)]
    assert (held(pair.lao), held(pair.kor)) == (400, 600)
    assert pending(pair.lao) == pending(pair.kor) == 0


def test_a_request_the_partner_cannot_authenticate_gets_a_final_answer(
    databases: Databases,
) -> None:
    """KOR pins a different LAO key: it refuses LAO's authorisation before it
    can read the message id. The signed rejection is bound to the request by
    the digest of its envelope, so LAO records the refusal instead of retrying
    forever."""
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"])
    kor = make_engine(databases, "KOR", "LAO", keys, SigningKey.generate("LAO"))
    pair = Pair(lao=lao, kor=kor, keys=keys)
    authorisation_id = pair.authorise()
    assert pair.pump() == 1
    with lao.store.transaction() as tx:
        terms = tx.authorisation_get("LAO", authorisation_id)
        assert terms is not None
        assert tx.authorisation_party_states("LAO", authorisation_id, terms.version) == {
            "KOR": "rejected"
        }
        assert tx.outbox_pending_count() == 0
    with kor.store.transaction() as tx:
        assert tx.authorisations() == []


def test_a_rejection_about_another_envelope_is_not_accepted_as_the_answer(pair: Pair) -> None:
    pair.authorise()
    [(message_id, _, _envelope)] = pair.lao.due_messages(pair.now)
    other = seal("itmolink.v1.TransferVoid", b"\x12\x05LAO-X", pair.keys["LAO"])
    reply = pair.kor.handle_delivery("LAO", other, pair.now)  # a rejection of `other`
    with pytest.raises(ReplyError) as caught:
        pair.lao.handle_reply(message_id, reply, pair.now)
    assert caught.value.code is RejectionCode.UNEXPECTED_REPLY
    assert pending(pair.lao) == 1  # still waiting for the real answer


def test_a_reply_signed_by_another_party_is_not_applied(pair: Pair) -> None:
    pair.authorise()
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    forged = seal(verified.payload_type, verified.payload, pair.keys["LAO"])
    with pytest.raises(ReplyError) as caught:
        pair.lao.handle_reply(message_id, forged, pair.now)
    assert caught.value.code is RejectionCode.UNKNOWN_SIGNING_KEY  # LAO pins only KOR's key
    pair.lao.handle_reply(message_id, reply, pair.now)
    assert pending(pair.lao) == 0


@pytest.mark.parametrize(
    ("transfer_id", "code"),
    [("KOR-T-1", RejectionCode.INVALID_IDENTIFIER), ("LAO-", RejectionCode.INVALID_IDENTIFIER),
     ("", RejectionCode.MISSING_FIELD)],
)  # fmt: skip
def test_a_transfer_id_must_belong_to_its_sender(
    pair: Pair, transfer_id: str, code: RejectionCode
) -> None:
    """A partner cannot take (and so block) a transfer id of another registry."""
    issued(pair)
    void = transfer_pb2.TransferVoid(transfer_id=transfer_id, reason="squatting")
    reply = _deliver_from_lao(pair, void, sequence=77)
    assert RejectionCode(reply.reasons[0].code) is code
    with pair.kor.store.transaction() as tx:
        assert tx.transfers() == []


def _deliver_from_lao(pair: Pair, msg: object, sequence: int) -> reply_pb2.Rejection:
    msg.header.CopyFrom(pair.lao._header(None, "KOR", to_us(pair.now)))  # type: ignore[attr-defined]
    msg.header.sequence = sequence  # type: ignore[attr-defined]
    payload = msg.SerializeToString()  # type: ignore[attr-defined]
    envelope = seal(msg.DESCRIPTOR.full_name, payload, pair.keys["LAO"])  # type: ignore[attr-defined]
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    verified = open_envelope(reply, pair.lao.trust)
    assert verified.payload_type == "itmolink.v1.Rejection"
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return rejection


def test_an_unanswered_proposal_is_voided_on_the_senders_clock_and_a_late_acceptance_ignored(
    pair: Pair,
) -> None:
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(message_id, _, proposal)] = pair.lao.due_messages(pair.now)
    acceptance = pair.kor.handle_delivery("LAO", proposal, pair.now)  # reply lost in transit
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED

    pair.advance(31)
    assert pair.lao.expire_transfers(pair.now) == [transfer_id]
    pair.lao.handle_reply(message_id, acceptance, pair.now)  # arrives too late: ignored
    assert state(pair.lao, transfer_id) is TransferState.VOIDED
    assert held(pair.lao) == 1_000
    pair.pump()  # the void reaches KOR
    assert state(pair.kor, transfer_id) is TransferState.VOIDED
    assert ledger(pair.lao) == ledger(pair.kor) == []
    assert held(pair.kor) == 0


def test_a_void_of_a_rejected_transfer_keeps_the_rejection(pair: Pair) -> None:
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(_message_id, _, proposal)] = pair.lao.due_messages(pair.now)
    # KOR rejects it: it already expects these serials from an earlier proposal.
    with pair.lao.store.transaction() as tx:
        blocks = tx.blocks_of_transfer(transfer_id)
    with pair.kor.store.transaction() as tx:
        tx.transfer_put(
            transfer_id="LAO-T-EARLIER", direction=Role.RECEIVER, partner="LAO",
            state=TransferState.ACCEPTED, quantity=100, authorisation_id=authorisation_id,
            first_transfer=True, proposal_message_id="m", proposal_digest=b"", expires_at=0,
            blocks=blocks, now=0,
        )  # fmt: skip
    pair.kor.handle_delivery("LAO", proposal, pair.now)  # rejection lost in transit
    assert state(pair.kor, transfer_id) is TransferState.REJECTED
    pair.advance(31)
    pair.pump()  # LAO voids; KOR answers the void and keeps its rejection
    assert state(pair.lao, transfer_id) is TransferState.VOIDED
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.REJECTED
    assert record.rejection_code == RejectionCode.SERIALS_ALREADY_HELD


def _proposed_at(engine: EngineBase, transfer_id: str) -> int | None:
    with engine.store.transaction() as tx:
        return tx.transfer_proposed_at(transfer_id)


async def test_a_void_that_overtakes_its_proposal_leaves_its_tombstone_where_the_proposal_was(
    pair: Pair,
) -> None:
    """The proposal never reaches KOR; LAO times it out and its void carries the
    proposal's sent_at (PROTOCOL §5.10 V3): KOR's tombstone has LAO's proposed_at,
    not the void's arrival, so a reconciliation whose cut falls between the proposal
    and the void finds both sides alike and freezes nothing; the proposal, arriving
    after all, is refused (T2)."""
    from itmolink.node.reconciliation import Reconciliation

    from .test_reconcile import LinkedNode, frozen

    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    proposed = pair.now
    [(_, _, proposal)] = pair.lao.due_messages(pair.now)  # lost in transit
    pair.advance(90)
    assert pair.lao.expire_transfers(pair.now) == [transfer_id]
    pair.pump()  # only the void: the time-out withdrew the proposal
    assert state(pair.kor, transfer_id) is TransferState.VOIDED
    assert _proposed_at(pair.kor, transfer_id) == _proposed_at(pair.lao, transfer_id)
    assert _proposed_at(pair.lao, transfer_id) == to_us(proposed)
    pair.advance(1)
    cut = proposed + dt.timedelta(seconds=45)
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        node = LinkedNode(pair, party)
        report = await Reconciliation(node, partner, cut).run()  # type: ignore[arg-type]
        assert report.discrepancies == []
        assert report.transfers_here == 1
    assert frozen(pair.lao) == frozen(pair.kor) == []
    late = open_envelope(pair.kor.handle_delivery("LAO", proposal, pair.now), pair.lao.trust)
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(late.payload)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.TRANSFER_STATE_CONFLICT


def test_a_void_without_the_proposals_sent_at_leaves_its_tombstone_at_its_arrival(
    pair: Pair,
) -> None:
    """A sender that predates the field: the tombstone is placed when the void arrived."""
    issued(pair)
    void = transfer_pb2.TransferVoid(transfer_id="LAO-T-OLD", reason="no acceptance")
    void.header.CopyFrom(pair.lao._header(None, "KOR", to_us(pair.now) - 5_000_000))
    void.header.sequence = 79
    envelope = seal("itmolink.v1.TransferVoid", void.SerializeToString(), pair.keys["LAO"])
    reply = open_envelope(pair.kor.handle_delivery("LAO", envelope, pair.now), pair.lao.trust)
    assert reply.payload_type == "itmolink.v1.TransferVoidReceipt"
    assert state(pair.kor, "LAO-T-OLD") is TransferState.VOIDED
    assert _proposed_at(pair.kor, "LAO-T-OLD") == to_us(pair.now)


def test_a_void_cannot_place_its_proposal_after_itself(pair: Pair) -> None:
    issued(pair)
    void = transfer_pb2.TransferVoid(transfer_id="LAO-T-LATE", reason="no acceptance")
    void.proposal_sent_at.FromDatetime(pair.now + dt.timedelta(seconds=1))
    reply = _deliver_from_lao(pair, void, sequence=78)
    assert RejectionCode(reply.reasons[0].code) is RejectionCode.INVALID_FIELD
    assert "proposal_sent_at" in reply.reasons[0].detail
    assert state(pair.kor, "LAO-T-LATE") is None


def test_rejected_carries_its_code() -> None:
    error = Rejected(RejectionCode.WRONG_AUDIENCE, "for JPN")
    assert error.code is RejectionCode.WRONG_AUDIENCE
    assert "REJECTION_CODE_WRONG_AUDIENCE" in str(error)


@pytest.mark.parametrize("sender_outcome", ["voided", "forgotten"])
def test_a_receiver_left_waiting_asks_the_sender_and_resolves_without_crediting(
    pair: Pair, sender_outcome: str
) -> None:
    """KOR accepted, but neither the acceptance nor the void ever reached it
    or LAO: after the time-out KOR asks LAO and voids on LAO's answer."""
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(_, _, proposal)] = pair.lao.due_messages(pair.now)
    pair.kor.handle_delivery("LAO", proposal, pair.now)  # the acceptance is lost
    pair.advance(31)
    pair.lao.expire_transfers(pair.now)
    with pair.lao.store.transaction() as tx:  # the void is lost too
        tx.outbox_cancel(payload_type="itmolink.v1.TransferVoid", subject_id=transfer_id)
        if sender_outcome == "forgotten":  # e.g. LAO restored from an old backup
            tx._exec("DELETE FROM transfer_blocks WHERE transfer_id = ?", (transfer_id,))
            tx._exec("DELETE FROM transfers WHERE transfer_id = ?", (transfer_id,))
    assert pair.kor.query_pending_transfers(pair.now) == []  # within the grace period
    pair.advance(30)
    assert pair.kor.query_pending_transfers(pair.now) == [transfer_id]
    assert pair.kor.query_pending_transfers(pair.now) == []  # one question at a time
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.VOIDED
    assert ledger(pair.kor) == []
    assert held(pair.kor) == 0


def test_a_receiver_keeps_waiting_while_the_sender_has_completed(pair: Pair) -> None:
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    dropping = {"on": True}

    def network(sender: str, receiver: str, envelope: bytes) -> bytes | None:
        completion = b"itmolink.v1.TransferCompletion" in envelope
        return None if dropping["on"] and completion else envelope

    pair.network = network
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    pair.advance(120)
    pair.pump()  # KOR asks; LAO says COMPLETED; the completion is still being dropped
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    dropping["on"] = False
    pair.advance(60)
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(transfer_id, 2025, -100)]


def test_a_completion_the_receiver_could_not_record_is_sealed_again_until_it_lands(
    pair: Pair,
) -> None:
    """The completion is stuck for longer than the receiver's message-age window;
    when it finally arrives the receiver refuses it unrecorded (too old), and the
    sender re-seals it: the units and the -CA still land, once."""
    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    blocked = {"on": True}

    def network(sender: str, receiver: str, envelope: bytes) -> bytes | None:
        stuck = b"itmolink.v1.TransferCompletion" in envelope and blocked["on"]
        return None if stuck else envelope

    pair.network = network
    pair.pump()
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    pair.advance(31 * 24 * 3600)  # past the 30-day message age
    blocked["on"] = False
    pair.pump()  # refused (too old): sealed again, due 0.2 s later
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    pair.advance(0.2)
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(transfer_id, 2025, -100)]
    assert held(pair.kor) == 100


def test_completions_refused_again_and_again_are_sealed_again_with_backoff(pair: Pair) -> None:
    """A receiver whose clock is a month ahead refuses every completion unrecorded
    (5003): each one sealed again waits longer than the one before, up to 30 s,
    instead of looping at once (SECURITY.md known problem 6)."""
    from itmolink.node.base import retry_delay_us

    authorisation_id = issued(pair)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    [(proposal_id, _, proposal)] = pair.lao.due_messages(pair.now)
    pair.lao.handle_reply(
        proposal_id, pair.kor.handle_delivery("LAO", proposal, pair.now), pair.now
    )
    ahead = dt.timedelta(days=31)
    waits = []
    for _ in range(9):
        [(completion_id, _, completion)] = pair.lao.due_messages(pair.now)
        refusal = pair.kor.handle_delivery("LAO", completion, pair.now + ahead)
        pair.lao.handle_reply(completion_id, refusal, pair.now)
        assert pair.lao.due_messages(pair.now) == []  # the next one is not due at once
        waited = 0.0
        while not pair.lao.due_messages(pair.now):
            pair.advance(0.1)
            waited += 0.1
        waits.append(round(waited, 1))
    delays = [retry_delay_us(n) / 1e6 for n in range(9)]  # 0.2, 0.4, ..., 25.6, 30
    assert delays[-1] == 30.0  # the ceiling
    for waited, delay in zip(waits, delays, strict=True):
        assert delay - 0.01 <= waited <= delay + 0.11  # polled every 0.1 s
    pair.pump()  # the receiver's clock is right again: the completion lands, once
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(transfer_id, 2025, -100)]


def test_a_key_still_signing_undelivered_messages_cannot_be_revoked(pair: Pair) -> None:
    from itmolink.crypto.keys import SigningKey

    authorisation_id = issued(pair)
    old = pair.lao.signing_key
    pair.lao.start_transfer(
        to_party="KOR",
        authorisation_id=authorisation_id,
        vintage=2025,
        quantity=100,
        now=pair.now,
    )  # fmt: skip  (the proposal, sealed with the old key, is not delivered yet)
    pair.lao.rotate_signing_key(SigningKey.generate("LAO"), pair.now)
    [(rotation_id, _, rotation)] = [
        m for m in pair.lao.due_messages(pair.now) if b"KeyRotation" in m[2]
    ]
    pair.lao.handle_reply(rotation_id, pair.kor.handle_delivery("LAO", rotation, pair.now),
                          pair.now)  # fmt: skip
    assert pair.lao.signing_key.key_id != old.key_id
    with pytest.raises(Rejected) as caught:
        pair.lao.revoke_signing_key(old.key_id, pair.now)
    assert caught.value.code is RejectionCode.TRANSFER_STATE_CONFLICT
    pair.pump()
    pair.lao.revoke_signing_key(old.key_id, pair.now)  # once delivered, it can be
