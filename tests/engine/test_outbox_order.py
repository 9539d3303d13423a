"""An amendment of an authorisation and the completions of transfers under it reach
the partner in the order the sender stated their leaves in (docs/DESIGN.md decision
55; PROTOCOL §7.6): both sides then state the receiver's adjustment by the same
version of the authorisation, and reconcile clean."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine
from itmolink.node.operations import BatchItemRequest
from itmolink.v1 import envelope_pb2

from ..conftest import postgres_cluster
from .conftest import Pair, process_engine
from .test_oimp import authorise, ledger
from .test_one_round import ask
from .test_reconcile_adjustments import assert_clean

STATEMENT = "itmolink.v1.AuthorisationStatement"
COMPLETION = "itmolink.v1.TransferCompletion"
BATCH_COMPLETION = "itmolink.v1.TransferBatchCompletion"
NDC_AND_OIMP = frozenset({Purpose.NDC, Purpose.OIMP})


def payload_type(raw: bytes) -> str:
    envelope = envelope_pb2.Envelope()
    envelope.ParseFromString(raw)
    return str(envelope.payload_type)


class Link:
    """LAO to KOR: loses the next ``lose[type]`` envelopes of a type, and lists in
    order the types that reached KOR."""

    def __init__(self, **lose: int) -> None:
        self.lose = dict(lose)
        self.reached: list[str] = []

    def __call__(self, sender: str, receiver: str, raw: bytes) -> bytes | None:
        kind = payload_type(raw)
        if sender == "LAO" and self.lose.get(kind, 0) > 0:
            self.lose[kind] -= 1
            return None
        if sender == "LAO":
            self.reached.append(kind.rsplit(".", 1)[-1])
        return raw


def state(engine: Engine, transfer_id: str) -> TransferState:
    with engine.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    return record.state


def version_at_kor(pair: Pair, authorisation_id: str) -> int:
    with pair.kor.store.transaction() as tx:
        terms = tx.authorisation_get("LAO", authorisation_id)
    assert terms is not None
    return terms.version


def answer_of_kor(pair: Pair, authorisation_id: str, version: int) -> str:
    with pair.lao.store.transaction() as tx:
        return tx.authorisation_party_states("LAO", authorisation_id, version)["KOR"]


def settle(pair: Pair, seconds: int = 5) -> None:
    """Let the clock run, delivering whatever falls due."""
    for _ in range(seconds):
        pair.advance(1)
        pair.pump()


def issued_oimp(pair: Pair) -> str:
    """OIMP units first transferred at issuance: KOR books nothing for them until an
    amendment authorises them for NDC use too (then -CA at the transfer, §6.6)."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now)
    pair.pump()
    return authorisation_id


def start(pair: Pair, authorisation_id: str, *, batch: bool) -> list[str]:
    if batch:
        _, ids = pair.lao.start_transfer_batch(
            to_party="KOR",
            items=[BatchItemRequest(authorisation_id, 2025, q) for q in (150, 250)],
            now=pair.now,
        )
        return ids
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
        now=pair.now,
    )  # fmt: skip
    return [transfer_id]


@pytest.mark.parametrize("batch", [False, True], ids=["alone", "batch"])
async def test_an_amendment_adding_ndc_waits_for_a_completion_made_before_it(
    pair: Pair, batch: bool
) -> None:
    """LAO completes under version 1 (OIMP only: KOR owes no -CA), its completion is
    lost once, and LAO then amends the authorisation to add NDC. Were the amendment
    to overtake the retried completion, KOR would complete under version 2 and book
    -CA that LAO's leaf does not state: a false blocks discrepancy and KOR's units
    frozen. It waits instead."""
    authorisation_id = issued_oimp(pair)
    link = Link(**{BATCH_COMPLETION if batch else COMPLETION: 1})
    pair.network = link
    ids = start(pair, authorisation_id, batch=batch)
    pair.pump()
    assert [state(pair.lao, t) for t in ids] == [TransferState.COMPLETED] * len(ids)
    assert [state(pair.kor, t) for t in ids] == [TransferState.ACCEPTED] * len(ids)
    pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    settle(pair)
    assert [state(pair.kor, t) for t in ids] == [TransferState.COMPLETED] * len(ids)
    await assert_clean(pair)  # without the order: a blocks discrepancy, KOR's units frozen
    assert ledger(pair.kor) == []  # completed under version 1, as LAO stated it
    completion = "TransferBatchCompletion" if batch else "TransferCompletion"
    assert [k for k in link.reached if k in (completion, "AuthorisationStatement")] == [
        completion,
        "AuthorisationStatement",
    ]
    assert version_at_kor(pair, authorisation_id) == 2
    assert answer_of_kor(pair, authorisation_id, 2) == "acknowledged"


async def test_a_held_amendment_goes_out_once_the_completion_is_answered(pair: Pair) -> None:
    """KOR does not take the completion for minutes (down, or refusing it unread): the
    amendment waits all that time, then leaves at the next look once it has it."""
    authorisation_id = issued_oimp(pair)
    link = Link(**{COMPLETION: 1_000})
    pair.network = link
    (transfer_id,) = start(pair, authorisation_id, batch=False)
    pair.pump()
    pair.lao.claim_sent_us = 1  # a runtime's: new requests are sent at once, unless held
    pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    pair.lao.claim_sent_us = 0
    assert [payload_type(raw) for _, _, raw in pair.lao.sent] == []
    for _ in range(10):
        pair.advance(30)
        pair.pump()
        assert version_at_kor(pair, authorisation_id) == 1
        assert answer_of_kor(pair, authorisation_id, 2) == "pending"
        assert STATEMENT not in [payload_type(raw) for _, _, raw in pair.lao.due_messages(pair.now)]
    assert "AuthorisationStatement" not in link.reached
    # Transfers under it wait for KOR's answer to version 2, as for any amendment.
    with pytest.raises(Rejected) as refused:
        start(pair, authorisation_id, batch=False)
    assert refused.value.code is RejectionCode.AUTHORISATION_NOT_ACKNOWLEDGED
    link.lose.clear()
    settle(pair, 35)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    assert answer_of_kor(pair, authorisation_id, 2) == "acknowledged"
    (later,) = start(pair, authorisation_id, batch=False)
    pair.pump()
    assert state(pair.kor, later) is TransferState.COMPLETED
    assert ledger(pair.kor) == [(later, -400)]  # under version 2: NDC
    await assert_clean(pair)


async def test_a_completion_sealed_again_keeps_the_place_of_the_first(pair: Pair) -> None:
    """The completion, lost until KOR's max_message_age had passed, is refused (5003)
    and sealed again after the amendment was made: it was completed under version 1
    all the same, and the amendment still waits for it."""
    pair.kor.limits = dataclasses.replace(pair.kor.limits, max_message_age=dt.timedelta(minutes=10))
    authorisation_id = issued_oimp(pair)
    link = Link(**{COMPLETION: 1_000})
    pair.network = link
    (transfer_id,) = start(pair, authorisation_id, batch=False)
    pair.pump()
    pair.advance(9 * 60)
    pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    pair.pump()
    pair.advance(2 * 60)
    link.lose.clear()
    settle(pair)
    with pair.lao.store.transaction() as tx:
        assert tx.outbox_count_of(payload_type=COMPLETION, subject_id=transfer_id) == 2
    assert [k for k in link.reached if k in ("TransferCompletion", "AuthorisationStatement")] == [
        "TransferCompletion",  # refused unread: 5003
        "TransferCompletion",  # sealed again, taken
        "AuthorisationStatement",
    ]
    assert ledger(pair.kor) == []
    assert answer_of_kor(pair, authorisation_id, 2) == "acknowledged"
    await assert_clean(pair)


async def test_a_completion_made_after_an_amendment_waits_for_it(pair: Pair) -> None:
    """LAO proposed under version 1, amended to add NDC, then completed: its leaf
    states KOR's -CA by version 2. The amendment is lost once; were the completion to
    overtake it, KOR would complete under version 1 and book nothing."""
    authorisation_id = issued_oimp(pair)
    link = Link(**{STATEMENT: 1})
    pair.network = link
    (transfer_id,) = start(pair, authorisation_id, batch=False)
    pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    pair.lao.claim_sent_us = 1  # a runtime's: new requests are sent at once, unless held
    pair.pump()  # the proposal is accepted and LAO completes; the amendment is lost
    pair.lao.claim_sent_us = 0
    sent_at_once = [payload_type(raw) for _, _, raw in pair.lao.sent]
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED
    settle(pair)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    await assert_clean(pair)  # without the order: a blocks discrepancy, KOR's units frozen
    assert ledger(pair.kor) == [(transfer_id, -400)]  # under version 2, as LAO stated it
    assert [k for k in link.reached if k != "TransferProposal"] == [
        "AuthorisationStatement",
        "TransferCompletion",
    ]
    assert COMPLETION not in sent_at_once


async def test_an_amendment_waits_for_the_one_round_transfers_under_it(pair: Pair) -> None:
    """A one-round receiver completes under the version it holds when the proposal
    arrives, its sender when the answer comes: no order of delivery makes the two
    agree across an amendment, so the host amends only once they are answered."""
    authorisation_id = issued_oimp(pair)
    ask(pair.lao, "KOR")
    pair.network = Link(**{"itmolink.v1.TransferProposal": 1})
    (transfer_id,) = start(pair, authorisation_id, batch=False)
    pair.pump()
    with pytest.raises(Rejected) as refused:
        pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    assert refused.value.code is RejectionCode.TRANSFER_STATE_CONFLICT
    assert transfer_id in str(refused.value)
    settle(pair)
    assert state(pair.lao, transfer_id) is TransferState.COMPLETED
    pair.lao.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
    pair.pump()
    assert version_at_kor(pair, authorisation_id) == 2
    await assert_clean(pair)


async def test_a_revocation_is_not_held_behind_a_completion(pair: Pair) -> None:
    """A revocation changes no term a booking depends on (A14) and may stop
    transfers: it leaves at once, whatever is still on its way."""
    authorisation_id = issued_oimp(pair)
    link = Link(**{COMPLETION: 3})
    pair.network = link
    (transfer_id,) = start(pair, authorisation_id, batch=False)
    pair.pump()
    pair.lao.revoke_authorisation(authorisation_id, pair.now)
    pair.pump()
    assert state(pair.kor, transfer_id) is TransferState.ACCEPTED  # its completion lost
    with pair.kor.store.transaction() as tx:
        assert tx.authorisation_details("LAO", authorisation_id)["revoked"]
    settle(pair)
    assert state(pair.kor, transfer_id) is TransferState.COMPLETED
    await assert_clean(pair)


async def test_a_completion_made_by_another_process_after_an_amendment_waits_for_it() -> None:
    """LAO runs as two processes over one PostgreSQL database: A amends (its
    statement lost once), B, which had found no amendment pending, then completes a
    transfer under the authorisation. B learns of the amendment from the shared state
    and keeps its completion back."""
    cluster = postgres_cluster()
    lao_url = cluster.new_database("lao")
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    a, b = (process_engine(lao_url, "LAO", "KOR", keys, name) for name in ("a", "b"))
    kor = process_engine(cluster.new_database("kor"), "KOR", "LAO", keys)
    pair = Pair(lao=b, kor=kor, keys=keys)
    try:
        authorisation_id = issued_oimp(pair)
        start(pair, authorisation_id, batch=False)
        pair.pump()  # B completes a first transfer: no amendment pending, it knows
        link = Link(**{STATEMENT: 1})
        pair.network = link
        (transfer_id,) = start(pair, authorisation_id, batch=False)
        a.claim_sent_us = 1  # as a runtime: A delivers its statement itself, at once
        a.amend_authorisation(authorisation_id, {"purposes": NDC_AND_OIMP}, pair.now)
        a.claim_sent_us = 0
        assert [payload_type(raw) for _, _, raw in a.sent] == [STATEMENT] * 1
        for message_id, _, raw in a.sent:
            assert link("LAO", "KOR", raw) is None
            a.delivery_failed(message_id, "lost", pair.now)
        b.claim_sent_us = 1
        pair.pump()  # B: the proposal is accepted and B completes
        b.claim_sent_us = 0
        assert state(b, transfer_id) is TransferState.COMPLETED
        assert COMPLETION not in [payload_type(raw) for _, _, raw in b.sent]
        settle(pair)
        assert [k for k in link.reached if k in ("TransferCompletion", "AuthorisationStatement")][
            -2:
        ] == ["AuthorisationStatement", "TransferCompletion"]
        assert ledger(kor)[-1] == (transfer_id, -400)  # under version 2, as LAO stated it
        await assert_clean(pair)
    finally:
        for engine in (a, b, kor):
            engine.store.close()


def test_a_held_request_claimed_since_keeps_its_lease_when_others_are_answered(
    pair: Pair,
) -> None:
    """The amendment, held behind a lost completion, goes out once that is answered and
    is claimed (in flight, its answer not back). A completion under another
    authorisation to the same partner answered meanwhile releases held requests; the
    amendment's note still says "held until", but it is in flight: it is not delivered
    again within its lease (PROTOCOL §7.1)."""
    a = issued_oimp(pair)
    b = issued_oimp(pair)
    link = Link(**{COMPLETION: 1})
    pair.network = link
    start(pair, a, batch=False)
    pair.pump()  # the first completion is lost
    pair.lao.amend_authorisation(a, {"purposes": NDC_AND_OIMP}, pair.now)
    pair.advance(5)
    lease = dt.timedelta(seconds=31)
    due = pair.lao.due_messages(pair.now, lease=lease)
    assert [payload_type(e) for _, _, e in due] == [COMPLETION]  # the amendment held
    (completion_id, _, completion) = due[0]
    answer = pair.kor.handle_delivery("LAO", completion, pair.now)
    pair.lao.handle_reply(completion_id, answer, pair.now)
    due = pair.lao.due_messages(pair.now, lease=lease)
    assert [payload_type(e) for _, _, e in due] == [STATEMENT]  # claimed: in flight
    start(pair, b, batch=False)
    pair.pump()  # delivers what is due now, and answers it
    assert link.reached.count("AuthorisationStatement") == 0, link.reached
