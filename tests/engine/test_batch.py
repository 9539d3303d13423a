"""Batched transfers (docs/PROTOCOL.md §5.15): one signed proposal, acceptance and
completion for many transfers, each of which is an ordinary transfer afterwards."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from itmolink.core.accounting import AccountingConfig, AccountingMethod, NdcPeriod
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Role, TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import MAX_BATCH_ITEMS, digest
from itmolink.node.convert import timestamp, to_us
from itmolink.node.engine import ReplyError
from itmolink.node.operations import BatchItemRequest
from itmolink.v1 import common_pb2, envelope_pb2, reply_pb2, transfer_pb2

from ..conftest import Databases
from .conftest import Pair, make_engine
from .test_engine import held, ledger, pending, state
from .test_reconcile import reconcile

BATCH = "itmolink.v1.TransferBatchProposal"
BATCH_COMPLETION = "itmolink.v1.TransferBatchCompletion"


def issued(pair: Pair, quantity: int = 1_000, vintages: tuple[int, ...] = (2025,)) -> str:
    authorisation_id = pair.authorise()
    for vintage in vintages:
        pair.lao.issue(
            authorisation_id=authorisation_id, vintage=vintage, quantity=quantity, now=pair.now
        )
    pair.pump()
    return authorisation_id


def items(authorisation_id: str, *quantities: int, vintage: int = 2025) -> list[BatchItemRequest]:
    return [BatchItemRequest(authorisation_id, vintage, q) for q in quantities]


def payload_type(envelope: bytes) -> str:
    parsed = envelope_pb2.Envelope()
    parsed.ParseFromString(envelope)
    return parsed.payload_type


def record(engine: object, transfer_id: str) -> object:
    with engine.store.transaction() as tx:  # type: ignore[attr-defined]
        return tx.transfer_get(transfer_id)


def test_a_batch_completes_each_transfer_as_if_proposed_alone(pair: Pair) -> None:
    authorisation_id = issued(pair)
    batch_id, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 100, 200, 300), now=pair.now
    )
    assert batch_id == "LAO-B-000001"
    assert len(ids) == 3
    # Three messages for three transfers: proposal, completion, and nothing else.
    assert pair.pump() == 2
    for transfer_id in ids:
        assert state(pair.lao, transfer_id) is TransferState.COMPLETED
        assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert sorted(ledger(pair.lao)) == sorted(zip(ids, [2025] * 3, [100, 200, 300], strict=True))
    assert sorted(ledger(pair.kor)) == sorted(zip(ids, [2025] * 3, [-100, -200, -300], strict=True))
    assert (held(pair.lao), held(pair.kor)) == (400, 600)
    assert pending(pair.lao) == pending(pair.kor) == 0
    # Each side stores the batch's digests on each of its transfers: they agree.
    for transfer_id in ids:
        lao, kor = record(pair.lao, transfer_id), record(pair.kor, transfer_id)
        assert lao.batch_id == kor.batch_id == batch_id  # type: ignore[attr-defined]
        assert lao.proposal_digest == kor.proposal_digest  # type: ignore[attr-defined]
        assert lao.acceptance_digest == kor.acceptance_digest != b""  # type: ignore[attr-defined]
    with pair.lao.store.transaction() as tx:
        actions = [a for a in tx.actions() if a["transfer_id"] in ids]
    assert [a["action_type"] for a in actions] == ["first-transfer"] * 3


async def test_batched_transfers_reconcile_clean(pair: Pair) -> None:
    authorisation_id = issued(pair)
    pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20, 30, 40), now=pair.now
    )
    pair.pump()
    pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=5, now=pair.now
    )
    pair.pump()
    pair.advance(1)
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        report = await reconcile(pair, party, partner)
        assert report.discrepancies == []
        assert report.transfers_here == 5


@pytest.fixture
def ndc_receiver(databases: Databases) -> Pair:
    """KOR books adjustments only for vintages 2021 to 2025 (its NDC period)."""
    keys = {p: SigningKey.generate(p) for p in ("LAO", "KOR")}
    kor_accounting = AccountingConfig(
        party="KOR", method=AccountingMethod.AVERAGING, ndc_period=NdcPeriod(1, 2021, 2025),
        target_emissions=62_000_000, target_year=2025,
    )  # fmt: skip
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"])
    kor = make_engine(databases, "KOR", "LAO", keys, keys["LAO"], accounting=kor_accounting)
    return Pair(lao=lao, kor=kor, keys=keys)


def test_one_bad_item_does_not_sink_the_others(ndc_receiver: Pair) -> None:
    pair = ndc_receiver
    authorisation_id = issued(pair, vintages=(2025, 2027))
    requests = [
        BatchItemRequest(authorisation_id, 2025, 100),
        BatchItemRequest(authorisation_id, 2027, 50),  # outside KOR's NDC period: T5
        BatchItemRequest(authorisation_id, 2025, 200),
    ]
    _, ids = pair.lao.start_transfer_batch(to_party="KOR", items=requests, now=pair.now)
    pair.pump()
    assert [state(pair.lao, t) for t in ids] == [
        TransferState.COMPLETED, TransferState.REJECTED, TransferState.COMPLETED,
    ]  # fmt: skip
    assert [state(pair.kor, t) for t in ids] == [
        TransferState.COMPLETED, TransferState.REJECTED, TransferState.COMPLETED,
    ]  # fmt: skip
    for engine in (pair.lao, pair.kor):
        rejected = record(engine, ids[1])
        assert rejected.rejection_code == RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD  # type: ignore[attr-defined]
    # The rejected item's units are back in LAO's holdings; only the others moved.
    assert (held(pair.lao), held(pair.kor)) == (2_000 - 300, 300)
    assert sorted(t for t, _, _ in ledger(pair.lao)) == sorted([ids[0], ids[2]])
    assert pending(pair.lao) == pending(pair.kor) == 0


def test_a_batch_refused_as_a_whole_rejects_every_item_on_both_sides(pair: Pair) -> None:
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now,
        timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    pair.advance(600)  # it arrives long after expires_at (B2)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.lao.handle_reply(message_id, reply, pair.now)
    for engine in (pair.lao, pair.kor):
        for transfer_id in ids:
            refused = record(engine, transfer_id)
            assert refused.state is TransferState.REJECTED  # type: ignore[attr-defined]
            assert refused.rejection_code == RejectionCode.PROPOSAL_EXPIRED  # type: ignore[attr-defined]
    assert held(pair.lao) == 1_000
    assert held(pair.kor) == 0


def test_a_redelivered_batch_gets_the_same_reply_and_applies_once(pair: Pair) -> None:
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    first = pair.kor.handle_delivery("LAO", envelope, pair.now)
    pair.advance(5)
    assert pair.kor.handle_delivery("LAO", envelope, pair.now) == first
    pair.lao.handle_reply(message_id, first, pair.now)
    pair.lao.handle_reply(message_id, first, pair.now)  # a duplicate reply: discarded
    [(completion_id, _, completion)] = pair.lao.due_messages(pair.now)
    assert payload_type(completion) == BATCH_COMPLETION
    receipt = pair.kor.handle_delivery("LAO", completion, pair.now)
    assert pair.kor.handle_delivery("LAO", completion, pair.now) == receipt
    pair.lao.handle_reply(completion_id, receipt, pair.now)
    assert sorted(ledger(pair.kor)) == sorted(zip(ids, [2025, 2025], [-10, -20], strict=True))
    assert held(pair.kor) == 30
    assert pending(pair.lao) == 0


def test_a_batched_transfer_is_completed_on_its_own_when_asked_about(pair: Pair) -> None:
    """The batch completion never arrives; the receiver asks about each transfer and
    the sender answers with a TransferCompletion of that transfer alone, which
    verifies against the batch's acceptance digest stored on the item."""
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    pair.network = lambda s, r, envelope: (
        None if payload_type(envelope) == BATCH_COMPLETION else envelope
    )
    pair.pump()
    assert [state(pair.kor, t) for t in ids] == [TransferState.ACCEPTED] * 2
    # The sender gives up on the batch completion (e.g. an operator cancels it).
    with pair.lao.store.transaction() as tx:
        tx.outbox_cancel(payload_type=BATCH_COMPLETION, subject_id="LAO-B-000001")
    pair.advance(60 + 31)  # past expires_at and the status-query grace
    pair.pump()
    assert [state(pair.kor, t) for t in ids] == [TransferState.COMPLETED] * 2
    assert sorted(ledger(pair.kor)) == sorted(zip(ids, [2025, 2025], [-10, -20], strict=True))
    with pair.kor.store.transaction() as tx:
        entries = list(tx.journal_entries())
    kinds = [e.payload_type for e in entries if e.direction == "in"]
    assert kinds.count("itmolink.v1.TransferCompletion") == 2


def test_a_batch_left_unanswered_is_voided_item_by_item(pair: Pair) -> None:
    """The acceptance is lost; on time-out the sender voids each transfer with its
    own TransferVoid, which the receiver applies to each accepted item."""
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now,
        timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(_message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    pair.kor.handle_delivery("LAO", envelope, pair.now)  # accepted, but the reply is lost
    assert [state(pair.kor, t) for t in ids] == [TransferState.ACCEPTED] * 2
    pair.advance(31)
    assert sorted(pair.lao.expire_transfers(pair.now)) == sorted(ids)
    pair.pump()
    assert [state(pair.lao, t) for t in ids] == [TransferState.VOIDED] * 2
    assert [state(pair.kor, t) for t in ids] == [TransferState.VOIDED] * 2
    assert held(pair.lao) == 1_000
    assert held(pair.kor) == 0
    assert ledger(pair.lao) == ledger(pair.kor) == []
    assert pending(pair.lao) == pending(pair.kor) == 0  # the batch proposal was withdrawn


def _sealed(pair: Pair, msg: transfer_pb2.TransferBatchProposal, sequence: int = 99) -> bytes:
    msg.header.CopyFrom(
        common_pb2.Header(
            protocol_version=1, message_id=f"forged-{sequence}", sender_party="LAO",
            sender_registry="LAO-NR", audience="KOR", sent_at=timestamp(to_us(pair.now)),
            sequence=sequence,
        )
    )  # fmt: skip
    return seal(BATCH, msg.SerializeToString(), pair.keys["LAO"])


def _rejection(pair: Pair, reply: bytes) -> reply_pb2.Rejection:
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    assert verified.payload_type == "itmolink.v1.Rejection"
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return rejection


def test_a_tampered_batch_is_refused_unrecorded(pair: Pair) -> None:
    authorisation_id = issued(pair)
    pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    [(_, _, envelope)] = pair.lao.due_messages(pair.now)
    parsed = envelope_pb2.Envelope()
    parsed.ParseFromString(envelope)
    proposal = transfer_pb2.TransferBatchProposal()
    proposal.ParseFromString(parsed.payload)
    proposal.items[1].quantity = 2_000  # more than was reserved
    parsed.payload = proposal.SerializeToString()
    rejection = _rejection(
        pair, pair.kor.handle_delivery("LAO", parsed.SerializeToString(), pair.now)
    )
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.BAD_SIGNATURE
    assert rejection.header.sequence == 0
    with pair.kor.store.transaction() as tx:
        assert [t for t in tx.transfers() if t.batch_id] == []


def test_an_acceptance_that_does_not_answer_the_batch_is_not_applied(pair: Pair) -> None:
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    genuine = open_envelope(
        pair.kor.handle_delivery("LAO", envelope, pair.now),
        TrustStore([pair.keys["KOR"].verifying_key()]),
    )
    acceptance = transfer_pb2.TransferBatchAcceptance()
    acceptance.ParseFromString(genuine.payload)
    del acceptance.items[1]  # answers one item of two
    acceptance.header.message_id = "KOR-forged-1"
    forged = seal(genuine.payload_type, acceptance.SerializeToString(), pair.keys["KOR"])
    with pytest.raises(ReplyError) as caught:
        pair.lao.handle_reply(message_id, forged, pair.now)
    assert caught.value.code is RejectionCode.DIGEST_MISMATCH
    assert [state(pair.lao, t) for t in ids] == [TransferState.PROPOSED] * 2
    assert pending(pair.lao) == 1
    pair.pump()  # the retry gets the genuine, stored acceptance
    assert [state(pair.lao, t) for t in ids] == [TransferState.COMPLETED] * 2


def test_an_over_limit_batch_is_refused_with_its_code(pair: Pair) -> None:
    authorisation_id = issued(pair, quantity=MAX_BATCH_ITEMS + 1)
    with pytest.raises(Rejected) as caught:
        pair.lao.start_transfer_batch(
            to_party="KOR", items=items(authorisation_id, *[1] * (MAX_BATCH_ITEMS + 1)),
            now=pair.now,
        )  # fmt: skip
    assert caught.value.code is RejectionCode.TOO_MANY_ITEMS
    assert held(pair.lao) == MAX_BATCH_ITEMS + 1  # nothing reserved
    # On the wire: a partner's batch of 1,001 transfers is refused before it is recorded.
    block = common_pb2.UnitBlock(
        originating_registry="LAO-NR", serial_start=1, serial_end=1,
        unit_type=common_pb2.UNIT_TYPE_ITMO, vintage=2025,
        activity_id="LAO-SOLAR-WIND-1GW", authorisation_id=authorisation_id,
        cooperative_approach_id="LAO-KOR-A6.2", first_transferring_party="LAO",
    )  # fmt: skip
    proposal = transfer_pb2.TransferBatchProposal(
        batch_id="LAO-B-9", expires_at=timestamp(to_us(pair.now) + 60_000_000),
        items=[
            transfer_pb2.TransferBatchItem(
                transfer_id=f"LAO-T-9{n:04d}", authorisation_id=authorisation_id, quantity=1,
                blocks=[block],
            )
            for n in range(MAX_BATCH_ITEMS + 1)
        ],
    )  # fmt: skip
    rejection = _rejection(pair, pair.kor.handle_delivery("LAO", _sealed(pair, proposal), pair.now))
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.TOO_MANY_ITEMS
    assert rejection.header.sequence == 0


def test_items_that_cannot_be_recorded_are_answered_without_a_record(pair: Pair) -> None:
    """Within one batch: an id of another party (T1), an id given twice, and serials
    given twice (T4 within the batch) are each refused; the rest is accepted."""
    authorisation_id = issued(pair)
    block = common_pb2.UnitBlock(
        originating_registry="LAO-NR", serial_start=1, serial_end=10,
        unit_type=common_pb2.UNIT_TYPE_ITMO, vintage=2025,
        activity_id="LAO-SOLAR-WIND-1GW", authorisation_id=authorisation_id,
        cooperative_approach_id="LAO-KOR-A6.2", first_transferring_party="LAO",
    )  # fmt: skip
    other = common_pb2.UnitBlock()
    other.CopyFrom(block)
    other.serial_start, other.serial_end = 11, 20

    def item(transfer_id: str, unit_block: common_pb2.UnitBlock) -> transfer_pb2.TransferBatchItem:
        return transfer_pb2.TransferBatchItem(
            transfer_id=transfer_id, authorisation_id=authorisation_id, quantity=10,
            blocks=[unit_block], first_transfer=True,
        )  # fmt: skip

    proposal = transfer_pb2.TransferBatchProposal(
        batch_id="LAO-B-7", expires_at=timestamp(to_us(pair.now) + 60_000_000),
        items=[item("LAO-T-71", block), item("KOR-T-72", other), item("LAO-T-71", other),
               item("LAO-T-73", block), item("LAO-T-74", other)],
    )  # fmt: skip
    envelope = _sealed(pair, proposal)
    reply = open_envelope(
        pair.kor.handle_delivery("LAO", envelope, pair.now),
        TrustStore([pair.keys["KOR"].verifying_key()]),
    )
    acceptance = transfer_pb2.TransferBatchAcceptance()
    acceptance.ParseFromString(reply.payload)
    assert acceptance.proposal_digest == digest(proposal.SerializeToString())
    assert [(o.transfer_id, o.rejection.code) for o in acceptance.items] == [
        ("LAO-T-71", 0),
        ("KOR-T-72", RejectionCode.INVALID_IDENTIFIER),
        ("LAO-T-71", RejectionCode.TRANSFER_STATE_CONFLICT),
        ("LAO-T-73", RejectionCode.SERIALS_ALREADY_HELD),
        ("LAO-T-74", 0),
    ]
    with pair.kor.store.transaction() as tx:
        found = {t.transfer_id: t.state for t in tx.transfers() if t.direction is Role.RECEIVER}
    assert found == {
        "LAO-T-71": TransferState.ACCEPTED,
        "LAO-T-73": TransferState.REJECTED,
        "LAO-T-74": TransferState.ACCEPTED,
    }
    # The same batch id again, in a new message: refused as a whole (B4).
    proposal.items[0].transfer_id, proposal.items[4].transfer_id = "LAO-T-75", "LAO-T-76"
    rejection = _rejection(
        pair, pair.kor.handle_delivery("LAO", _sealed(pair, proposal, sequence=100), pair.now)
    )
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert rejection.subject_id == "LAO-B-7"


def _unit_block(
    authorisation_id: str, start: int, end: int, vintage: int = 2025
) -> common_pb2.UnitBlock:
    return common_pb2.UnitBlock(
        originating_registry="LAO-NR", serial_start=start, serial_end=end,
        unit_type=common_pb2.UNIT_TYPE_ITMO, vintage=vintage, activity_id="LAO-SOLAR-WIND-1GW",
        authorisation_id=authorisation_id,
        cooperative_approach_id="LAO-KOR-A6.2", first_transferring_party="LAO",
    )  # fmt: skip


def test_a_rejected_item_does_not_hold_its_serials_against_later_items(
    ndc_receiver: Pair,
) -> None:
    """T4 within a batch counts only the items accepted before (§5.15): an item refused
    at T5 leaves its serials free for a later item."""
    pair = ndc_receiver
    authorisation_id = issued(pair)

    def item(transfer_id: str, vintage: int) -> transfer_pb2.TransferBatchItem:
        return transfer_pb2.TransferBatchItem(
            transfer_id=transfer_id, authorisation_id=authorisation_id, quantity=10,
            blocks=[_unit_block(authorisation_id, 5_000_001, 5_000_010, vintage)],
            first_transfer=True,
        )  # fmt: skip

    proposal = transfer_pb2.TransferBatchProposal(
        batch_id="LAO-B-R1", expires_at=timestamp(to_us(pair.now) + 60_000_000),
        items=[item("LAO-T-R1", 2027), item("LAO-T-R2", 2025)],  # 2027: outside the NDC period
    )  # fmt: skip
    reply = open_envelope(
        pair.kor.handle_delivery("LAO", _sealed(pair, proposal, sequence=501), pair.now),
        TrustStore([pair.keys["KOR"].verifying_key()]),
    )
    acceptance = transfer_pb2.TransferBatchAcceptance()
    acceptance.ParseFromString(reply.payload)
    assert [(o.transfer_id, o.rejection.code) for o in acceptance.items] == [
        ("LAO-T-R1", RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD),
        ("LAO-T-R2", 0),
    ]


def test_a_batch_is_checked_against_the_expected_serials_in_its_ranges(pair: Pair) -> None:
    """Serials expected from an accepted transfer refuse an item of a later batch (T4),
    whether they lie inside the later batch's serial range or at its edge."""
    authorisation_id = issued(pair)

    def proposal(batch_id: str, *spans: tuple[str, int, int]) -> transfer_pb2.TransferBatchProposal:
        return transfer_pb2.TransferBatchProposal(
            batch_id=batch_id, expires_at=timestamp(to_us(pair.now) + 60_000_000),
            items=[
                transfer_pb2.TransferBatchItem(
                    transfer_id=t, authorisation_id=authorisation_id, quantity=end - start + 1,
                    blocks=[_unit_block(authorisation_id, start, end)], first_transfer=True,
                )
                for t, start, end in spans
            ],
        )  # fmt: skip

    def outcomes(msg: transfer_pb2.TransferBatchProposal, sequence: int) -> list[int]:
        reply = open_envelope(
            pair.kor.handle_delivery("LAO", _sealed(pair, msg, sequence=sequence), pair.now),
            TrustStore([pair.keys["KOR"].verifying_key()]),
        )
        acceptance = transfer_pb2.TransferBatchAcceptance()
        acceptance.ParseFromString(reply.payload)
        return [int(o.rejection.code) for o in acceptance.items]

    # Accepted, never completed: their serials are expected here.
    assert outcomes(proposal("LAO-B-E1", ("LAO-T-E1", 100, 109), ("LAO-T-E2", 900, 909)), 601) == [
        0, 0
    ]  # fmt: skip
    held = RejectionCode.SERIALS_ALREADY_HELD
    assert outcomes(
        proposal("LAO-B-E2", ("LAO-T-E3", 105, 105), ("LAO-T-E4", 300, 399),
                 ("LAO-T-E5", 909, 950)), 602,
    ) == [held, 0, held]  # fmt: skip


def test_a_receipt_that_leaves_out_a_completed_transfer_raises_an_alarm(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    authorisation_id = issued(pair)
    _, ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    pair.lao.handle_reply(message_id, pair.kor.handle_delivery("LAO", envelope, pair.now), pair.now)
    [(message_id, _, completion)] = pair.lao.due_messages(pair.now)
    genuine = open_envelope(
        pair.kor.handle_delivery("LAO", completion, pair.now),
        TrustStore([pair.keys["KOR"].verifying_key()]),
    )
    receipt = transfer_pb2.TransferBatchCompletionReceipt()
    receipt.ParseFromString(genuine.payload)
    assert [o.transfer_id for o in receipt.items] == ids
    del receipt.items[1]  # says nothing of the second transfer
    forged = seal(genuine.payload_type, receipt.SerializeToString(), pair.keys["KOR"])
    with caplog.at_level("ERROR"):
        pair.lao.handle_reply(message_id, forged, pair.now)
    alarms = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert alarms == [
        f"ALARM: KOR's receipt of the completion of batch LAO-B-000001 does not answer the "
        f"transfers completed (missing {[ids[1]]}, not asked none); reconcile with the partner"
    ]
    assert pending(pair.lao) == 0  # answered: nothing more to send


def test_what_a_refused_request_put_in_the_outbox_is_not_sent(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that sends a request and then refuses: the savepoint undoes the outbox
    row, and the request must not be delivered after the commit either."""
    from itmolink.node.requests import Requests

    def sends_then_refuses(engine: Any, tx: Any, sender: str, msg: Any, *rest: Any) -> bytes:
        query = transfer_pb2.TransferStatusQuery(transfer_id="LAO-T-999999")
        engine._send(tx, sender, query, "LAO-T-999999", to_us(pair.now))
        raise Rejected(RejectionCode.UNKNOWN_TRANSFER, "refused after sending")

    monkeypatch.setitem(Requests._request_handlers, BATCH, sends_then_refuses)
    authorisation_id = issued(pair)
    proposal = transfer_pb2.TransferBatchProposal(
        batch_id="LAO-B-S1", expires_at=timestamp(to_us(pair.now) + 60_000_000),
        items=[
            transfer_pb2.TransferBatchItem(
                transfer_id="LAO-T-S1", authorisation_id=authorisation_id, quantity=10,
                blocks=[_unit_block(authorisation_id, 1, 10)], first_transfer=True,
            )
        ],
    )  # fmt: skip
    pair.kor.claim_sent_us = 11_000_000  # as a node does: what is sent goes out after commit
    pair.kor.sent = []
    reply = pair.kor.handle_delivery("LAO", _sealed(pair, proposal, sequence=801), pair.now)
    assert RejectionCode(_rejection(pair, reply).reasons[0].code) is RejectionCode.UNKNOWN_TRANSFER
    assert pair.kor.sent == []  # nothing to deliver once committed
    assert pair.kor.due_messages(pair.now) == []  # nor in the outbox


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"max_blocks": 2}, RejectionCode.TOO_MANY_BLOCKS),
        ({"max_message_bytes": 1_100}, RejectionCode.MESSAGE_TOO_LARGE),
    ],
)
def test_a_batch_the_partner_would_refuse_whole_reserves_nothing(
    pair: Pair, limits: dict[str, Any], code: RejectionCode
) -> None:
    """Too many blocks in all (B3) or too large an envelope (D1b): refused before
    anything is reserved, not proposed and left reserved until its time-out."""
    import dataclasses

    authorisation_id = issued(pair)
    before = held(pair.lao)
    pair.lao.limits = dataclasses.replace(pair.lao.limits, **limits)
    with pytest.raises(Rejected) as caught:
        pair.lao.start_transfer_batch(
            to_party="KOR", items=items(authorisation_id, 10, 20, 30), now=pair.now
        )
    assert caught.value.code is code
    assert "split it" in caught.value.detail
    assert held(pair.lao) == before
    assert pending(pair.lao) == 0
    with pair.lao.store.transaction() as tx:
        assert [t for t in tx.transfers() if t.direction is Role.SENDER] == []


def test_proposals_count_their_transfers_against_the_partners_budget(pair: Pair) -> None:
    """A batch spends one token per item, a single proposal one (PROTOCOL.md §2.5):
    over the budget a proposal is refused unrecorded and goes through once it refills."""
    from dataclasses import replace

    from itmolink.node.ratelimit import RateLimited, TokenBucket

    pair.kor.limits = replace(
        pair.kor.limits, transfer_items_per_second=2, transfer_items_burst=MAX_BATCH_ITEMS
    )
    budget = pair.kor._transfer_items["LAO"] = TokenBucket(
        2, MAX_BATCH_ITEMS, to_us(pair.now) / 1e6
    )
    budget.tokens = 3.0  # three transfers left now
    authorisation_id = issued(pair)
    _, batch_ids = pair.lao.start_transfer_batch(
        to_party="KOR", items=items(authorisation_id, 10, 20), now=pair.now
    )
    [(batch_message, _, batch)] = pair.lao.due_messages(pair.now)
    pair.lao.handle_reply(batch_message, pair.kor.handle_delivery("LAO", batch, pair.now), pair.now)
    single_ids = [
        pair.lao.start_transfer(
            to_party="KOR",
            authorisation_id=authorisation_id,
            vintage=2025,
            quantity=5,
            now=pair.now,
        )
        for _ in range(2)
    ]
    due = pair.lao.due_messages(pair.now)
    proposals = [m for m in due if payload_type(m[2]) != BATCH_COMPLETION]
    assert len(proposals) == 2
    (first_id, _, first), (second_id, _, second) = proposals
    pair.lao.handle_reply(first_id, pair.kor.handle_delivery("LAO", first, pair.now), pair.now)
    with pytest.raises(RateLimited):  # 2 + 1 tokens spent of 3
        pair.kor.handle_delivery("LAO", second, pair.now)
    assert state(pair.kor, single_ids[1]) is None  # nothing of it recorded
    with pair.kor.store.transaction() as tx:
        assert tx.inbox_get("LAO", _message_id(second)) is None
        assert not tx.journal_has("in", "LAO", _message_id(second))  # its insert rolled back
    pair.advance(0.5)  # one token back
    pair.lao.handle_reply(second_id, pair.kor.handle_delivery("LAO", second, pair.now), pair.now)
    pair.pump()
    for transfer_id in [*batch_ids, *single_ids]:
        assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    # A retry of a recorded proposal costs nothing: the budget is spent (0.5 s ago).
    assert pair.kor.handle_delivery("LAO", batch, pair.now) == pair.kor.handle_delivery(
        "LAO", batch, pair.now
    )


def _message_id(envelope: bytes) -> str:
    parsed = envelope_pb2.Envelope()
    parsed.ParseFromString(envelope)
    proposal = transfer_pb2.TransferProposal()
    proposal.ParseFromString(parsed.payload)
    return proposal.header.message_id
