"""Two real nodes over mutual TLS: the transfer and what must never happen to it."""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope
from itmolink.crypto.keys import SigningKey
from itmolink.node.convert import timestamp, to_us
from itmolink.node.engine import REQUEST_TYPES
from itmolink.node.runtime import GC_THRESHOLD
from itmolink.store import read_only
from itmolink.store.tx import Tx
from itmolink.v1 import common_pb2, envelope_pb2, reply_pb2, transfer_pb2

from .conftest import (
    PartnerClient,
    Registry,
    acknowledged,
    authorise,
    eventually,
    final_state,
    header,
    signed,
    start_registry,
    stop_registry,
    trailers,
)

COMPLETED = transfer_pb2.TRANSFER_STATE_COMPLETED
REJECTED = transfer_pb2.TRANSFER_STATE_REJECTED
VOIDED = transfer_pb2.TRANSFER_STATE_VOIDED
ACCEPTED = transfer_pb2.TRANSFER_STATE_ACCEPTED


async def issued(lao: Registry, quantity: int = 100_000, vintage: int = 2025) -> str:
    authorisation_id = await authorise(lao)
    await acknowledged(lao, authorisation_id)
    await lao.call(
        "Issue",
        admin_pb2.IssueRequest(
            authorisation_id=authorisation_id, vintage=vintage, quantity=quantity
        ),
    )
    await settled(lao)  # the issuance notice has been acknowledged
    return authorisation_id


async def settled(registry: Registry) -> None:
    """Wait until the node has nothing left to deliver."""

    def pending() -> int:
        with registry.node.engine.store.transaction() as tx:
            return tx.outbox_pending_count()

    async def empty() -> bool:
        return await registry.node.db(pending) == 0

    await eventually(empty)


async def transfer(lao: Registry, authorisation_id: str, quantity: int, **kw: Any) -> str:
    response = await lao.call(
        "Transfer",
        admin_pb2.TransferRequest(
            to_party="KOR",
            authorisation_id=authorisation_id,
            vintage=kw.pop("vintage", 2025),
            quantity=quantity,
            **kw,
        ),
    )
    return str(response.transfer_id)


def journal_rows(registry: Registry) -> list[tuple[Any, ...]]:
    with read_only(registry.node.config.database) as tx:
        return [
            tuple(row)
            for row in tx._exec(
                "SELECT id, direction, partner, message_id, payload_type FROM journal ORDER BY id"
            ).fetchall()
        ]


def evidence_of_adjustments(registry: Registry) -> list[tuple[Any, ...]]:
    """For every CA entry: the journal entry it cites (direction, partner, payload type)."""
    with read_only(registry.node.config.database) as tx:
        return [
            tuple(row)
            for row in tx._exec(
                "SELECT a.transfer_id, a.amount, j.direction, j.partner, j.payload_type "
                "FROM adjustments a JOIN journal j ON j.id = a.evidence_journal_id ORDER BY a.id"
            ).fetchall()
        ]


def reply_rejection(reply: bytes, registry: Registry) -> reply_pb2.Rejection:
    """Verify a node's reply with its pinned key and return the Rejection inside."""
    key = registry.signing_key().verifying_key()
    verified = open_envelope(reply, TrustStore([key]))
    assert verified.payload_type == "itmolink.v1.Rejection", verified.payload_type
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return rejection


def code_of(rejection: reply_pb2.Rejection) -> RejectionCode:
    return RejectionCode(rejection.reasons[0].code)


async def test_happy_path_moves_units_and_applies_opposite_adjustments(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    transfer_id = await transfer(lao, authorisation_id, 60_000)

    assert (await final_state(lao, transfer_id)).state == COMPLETED
    view = await final_state(kor, transfer_id)
    assert view.state == COMPLETED
    assert view.quantity == 60_000

    assert await lao.held() == 40_000
    assert await kor.held() == 60_000
    lao_ca = [(a.year, a.amount, a.partner) for a in await lao.adjustments()]
    kor_ca = [(a.year, a.amount, a.partner) for a in await kor.adjustments()]
    assert lao_ca == [(2025, 60_000, "KOR")]
    assert kor_ca == [(2025, -60_000, "LAO")]

    # Each adjustment cites the partner's signed acknowledgement that was
    # journaled in the same transaction: the acceptance for the host, the
    # completion for the buyer.
    assert evidence_of_adjustments(lao) == [
        (transfer_id, 60_000, "in", "KOR", "itmolink.v1.TransferAcceptance")
    ]
    assert evidence_of_adjustments(kor) == [
        (transfer_id, -60_000, "in", "LAO", "itmolink.v1.TransferCompletion")
    ]


async def test_serials_move_exactly_and_the_block_splits(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    first = await transfer(lao, authorisation_id, 300)
    await final_state(kor, first)
    second = await transfer(lao, authorisation_id, 200)
    await final_state(kor, second)

    def ranges(response: Any) -> list[tuple[int, int]]:
        return sorted((h.block.serial_start, h.block.serial_end) for h in response.blocks)

    lao_blocks = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    kor_blocks = await kor.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    assert ranges(lao_blocks) == [(501, 1000)]
    assert ranges(kor_blocks) == [(1, 300), (301, 500)]
    assert sum(a.amount for a in await lao.adjustments()) == 500
    assert sum(a.amount for a in await kor.adjustments()) == -500


async def test_insufficient_holdings_is_refused_with_its_code_and_reserves_nothing(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await transfer(lao, authorisation_id, 1_001)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metadata = trailers(caught.value)
    assert metadata["itmolink-rejection-code"] == "REJECTION_CODE_INSUFFICIENT_HOLDINGS"
    holdings = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    assert [(h.status, h.block.serial_end) for h in holdings.blocks] == [("held", 1_000)]
    assert await lao.transfers() == {}
    assert await kor.transfers() == {}


async def test_a_transfer_the_receiver_rejects_leaves_no_adjustment_on_either_side(
    lao_kor: tuple[Registry, Registry],
) -> None:
    """KOR already expects serials 1-500 from an earlier proposal, so LAO's
    second proposal of the same serials is rejected (SERIALS_ALREADY_HELD)."""
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    # A hand-made proposal of serials 1-500 signed with LAO's real key, as a
    # compromised or buggy host registry might send.
    lao_files = lao.keys
    client = PartnerClient(kor, lao_files, kor.keys.ca_certificate.read_bytes())
    try:
        blocks = (await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())).blocks
        block = blocks[0].block
        block.serial_end = 500
        proposal = transfer_pb2.TransferProposal(
            header=header("LAO", "KOR", sequence=10_000),
            transfer_id="LAO-T-HANDMADE",
            authorisation_id=authorisation_id,
            quantity=500,
            blocks=[block],
            first_transfer=True,
            # Far enough ahead that KOR does not yet ask LAO about it (LAO,
            # which never sent it, would answer UNKNOWN and KOR would void it).
            expires_at=timestamp(to_us(dt.datetime.now(dt.UTC)) + 3_600_000_000),
        )
        _, envelope = signed(proposal, lao.signing_key())
        reply = await client.deliver(envelope)
        key = kor.signing_key().verifying_key()
        assert open_envelope(reply, TrustStore([key])).payload_type == (
            "itmolink.v1.TransferAcceptance"
        )
    finally:
        await client.close()

    transfer_id = await transfer(lao, authorisation_id, 400)
    view = await final_state(lao, transfer_id)
    assert view.state == REJECTED
    assert view.rejection_code == RejectionCode.SERIALS_ALREADY_HELD
    rejected_at_kor = (await kor.transfers())[transfer_id]
    assert rejected_at_kor.state == REJECTED
    assert rejected_at_kor.rejection_code == RejectionCode.SERIALS_ALREADY_HELD

    assert await lao.adjustments() == []
    assert await kor.adjustments() == []
    # The reserved units went back to LAO's holding account.
    holdings = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    assert {h.status for h in holdings.blocks} == {"held"}
    assert await lao.held() == 1_000
    assert await kor.held() == 0


async def _handmade_proposal(
    lao: Registry, authorisation_id: str, sequence: int
) -> transfer_pb2.TransferProposal:
    return transfer_pb2.TransferProposal(
        header=header("LAO", "KOR", sequence=sequence),
        transfer_id=f"LAO-T-HAND-{sequence}",
        authorisation_id=authorisation_id,
        quantity=10,
        blocks=[
            common_pb2.UnitBlock(
                originating_registry="LAO-NR",
                serial_start=1,
                serial_end=10,
                unit_type=common_pb2.UNIT_TYPE_ITMO,
                vintage=2025,
                activity_id="LAO-SOLAR-WIND-1GW",
                authorisation_id=authorisation_id,
                cooperative_approach_id="LAO-KOR-A6.2",
                first_transferring_party="LAO",
            )
        ],
        first_transfer=True,
        expires_at=timestamp(to_us(dt.datetime.now(dt.UTC)) + 3_600_000_000),
    )


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("payload", RejectionCode.BAD_SIGNATURE),
        ("payload_type", RejectionCode.BAD_SIGNATURE),
        ("signature", RejectionCode.BAD_SIGNATURE),
        ("unpinned_key", RejectionCode.UNKNOWN_SIGNING_KEY),
        ("garbage", RejectionCode.MALFORMED_ENVELOPE),
    ],
)
async def test_tampered_or_unpinned_messages_are_rejected_and_apply_nothing(
    lao_kor: tuple[Registry, Registry], tamper: str, expected: RejectionCode
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    proposal = await _handmade_proposal(lao, authorisation_id, sequence=500)
    key = SigningKey.generate("LAO") if tamper == "unpinned_key" else lao.signing_key()
    _, raw = signed(proposal, key)
    envelope = envelope_pb2.Envelope()
    envelope.ParseFromString(raw)
    if tamper == "payload":
        envelope.payload = envelope.payload.replace(b"LAO-T-HAND", b"LAO-T-EVIL")
    elif tamper == "payload_type":
        envelope.payload_type = "itmolink.v1.TransferVoid"
    elif tamper == "signature":
        signature = bytearray(envelope.signatures[0].sig)
        signature[0] ^= 0x01
        envelope.signatures[0].sig = bytes(signature)
    raw = b"\xff\x00not an envelope" if tamper == "garbage" else envelope.SerializeToString()

    journal_before = journal_rows(kor)
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    try:
        reply = await client.deliver(raw)
    finally:
        await client.close()
    assert code_of(reply_rejection(reply, kor)) == expected
    assert await kor.transfers() == {}
    assert await kor.adjustments() == []
    assert journal_rows(kor) == journal_before  # unauthenticated input is not recorded


async def test_a_message_for_another_audience_is_rejected(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    proposal = await _handmade_proposal(lao, authorisation_id, sequence=600)
    proposal.header.audience = "JPN"
    _, raw = signed(proposal, lao.signing_key())
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    try:
        reply = await client.deliver(raw)
    finally:
        await client.close()
    assert code_of(reply_rejection(reply, kor)) == RejectionCode.WRONG_AUDIENCE
    assert await kor.transfers() == {}


async def test_a_retried_message_is_applied_once_and_a_reused_id_is_an_alarm(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    proposal = await _handmade_proposal(lao, authorisation_id, sequence=700)
    _, raw = signed(proposal, lao.signing_key())
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    try:
        first = await client.deliver(raw)
        second = await client.deliver(raw)
        assert first == second  # the stored reply, byte for byte
        assert list(await kor.transfers()) == [proposal.transfer_id]

        proposal.quantity = 11  # same message id, different content
        _, changed = signed(proposal, lao.signing_key())
        reply = await client.deliver(changed)
    finally:
        await client.close()
    assert code_of(reply_rejection(reply, kor)) == RejectionCode.DUPLICATE_MESSAGE_CONFLICT
    assert (await kor.transfers())[proposal.transfer_id].quantity == 10


async def test_a_client_without_a_pinned_certificate_never_reaches_the_handler(
    lao_kor: tuple[Registry, Registry], pki: Any
) -> None:
    lao, kor = lao_kor
    pki("JPN", [])  # key material of a party KOR does not pin
    jpn_files = type(lao.keys)(lao.keys.directory.parent.parent / "jpn" / "pki")
    client = PartnerClient(kor, jpn_files, kor.keys.ca_certificate.read_bytes())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.deliver(b"anything")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()

    # Without any client certificate at all.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kor.keys.ca_certificate.read_bytes()
    )
    channel = grpc.aio.secure_channel(f"127.0.0.1:{kor.node.partner_port}", credentials)
    try:
        from itmolink.v1 import partner_service_pb2, partner_service_pb2_grpc

        stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Deliver(partner_service_pb2.DeliverRequest(envelope=b"x"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close(None)
    assert journal_rows(kor) == []


async def test_an_unanswered_proposal_is_voided_by_the_sender_and_releases_the_units(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    lao.node.set_partner_endpoint("KOR", "127.0.0.1:1")  # KOR unreachable from now on
    transfer_id = await transfer(lao, authorisation_id, 100, timeout_seconds=1)
    view = await final_state(lao, transfer_id)
    assert view.state == VOIDED
    assert await lao.held() == 1_000
    assert await lao.adjustments() == []

    # When the link heals, the void reaches KOR, which never saw the proposal
    # and now refuses it if it ever arrives.
    lao.node.set_partner_endpoint("KOR", f"127.0.0.1:{kor.node.partner_port}")
    lao.node.kick()

    async def voided_at_kor() -> bool:
        view = (await kor.transfers()).get(transfer_id)
        return view is not None and view.state == VOIDED

    await eventually(voided_at_kor)
    assert await kor.adjustments() == []
    assert await kor.held() == 0


class Boom(Exception):
    pass


async def test_a_failure_while_recording_the_acceptance_leaves_no_adjustment_then_completes_once(
    lao_kor: tuple[Registry, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LAO's +CA is written in the transaction that records KOR's acceptance.
    While that transaction keeps failing after the CA rows were inserted, neither
    the CA nor the acceptance exists at LAO; once it succeeds, the retried
    delivery gets KOR's stored acceptance and the CA is applied exactly once."""
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    fault = _inject_failure_before_commit(monkeypatch, direction="out")
    transfer_id = await transfer(lao, authorisation_id, 100)
    await eventually(lambda: _at_least(fault, 2))  # failed, retried, failed again

    assert evidence_of_adjustments(lao) == []
    assert (await lao.transfers())[transfer_id].state == transfer_pb2.TRANSFER_STATE_PROPOSED
    holdings = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    assert sorted(
        (h.status, h.block.serial_end - h.block.serial_start + 1) for h in holdings.blocks
    ) == [
        ("held", 900),
        ("reserved", 100),
    ]
    assert not [r for r in journal_rows(lao) if r[4] == "itmolink.v1.TransferAcceptance"]
    assert (await kor.transfers())[transfer_id].state == ACCEPTED
    assert await kor.adjustments() == []

    fault["on"] = False
    lao.node.kick()
    assert (await final_state(lao, transfer_id)).state == COMPLETED
    assert (await final_state(kor, transfer_id)).state == COMPLETED
    assert [(a.amount, a.transfer_id) for a in await lao.adjustments()] == [(100, transfer_id)]
    assert [(a.amount, a.transfer_id) for a in await kor.adjustments()] == [(-100, transfer_id)]
    acceptances = [r for r in journal_rows(lao) if r[4] == "itmolink.v1.TransferAcceptance"]
    assert len(acceptances) == 1


async def test_a_failure_while_recording_the_completion_leaves_no_adjustment_then_completes_once(
    lao_kor: tuple[Registry, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KOR's -CA is written in the transaction that records LAO's completion:
    while it fails, KOR has neither the units nor the CA, and LAO keeps
    redelivering the same completion until KOR applies it, once."""
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    fault = _inject_failure_before_commit(monkeypatch, direction="in")
    transfer_id = await transfer(lao, authorisation_id, 100)
    await eventually(lambda: _at_least(fault, 2))

    assert (await lao.transfers())[transfer_id].state == COMPLETED
    assert evidence_of_adjustments(kor) == []
    assert (await kor.transfers())[transfer_id].state == ACCEPTED
    assert await kor.held() == 0
    assert not [r for r in journal_rows(kor) if r[4] == "itmolink.v1.TransferCompletion"]

    fault["on"] = False
    lao.node.kick()
    assert (await final_state(kor, transfer_id)).state == COMPLETED
    assert await kor.held() == 100
    assert [(a.amount, a.transfer_id) for a in await kor.adjustments()] == [(-100, transfer_id)]
    completions = [r for r in journal_rows(kor) if r[4] == "itmolink.v1.TransferCompletion"]
    assert len(completions) == 1


def _inject_failure_before_commit(
    monkeypatch: pytest.MonkeyPatch, *, direction: str
) -> dict[str, Any]:
    """Make the transaction that completes a transfer fail at its very end.

    The failure is raised where the transfer is marked COMPLETED, after the
    CA rows, the block moves and the journal entry were written in that
    transaction: a node that committed any of them separately would keep them.
    """
    original, original_many = Tx.transfer_set_state, Tx.transfers_set_state
    fault: dict[str, Any] = {"on": True, "hits": 0}

    def check(self: Tx, transfer_id: str, state: Any) -> None:
        record = self.transfer_get(transfer_id)
        if (
            fault["on"]
            and state == TransferState.COMPLETED
            and record is not None
            and record.direction.value == direction
        ):
            fault["hits"] += 1
            raise Boom("simulated failure before commit")

    def failing(self: Tx, transfer_id: str, state: Any, **kw: Any) -> None:
        original(self, transfer_id, state, **kw)
        check(self, transfer_id, state)

    def failing_many(self: Tx, transfer_ids: Any, state: Any, **kw: Any) -> None:
        original_many(self, transfer_ids, state, **kw)
        for transfer_id in transfer_ids:
            check(self, transfer_id, state)

    monkeypatch.setattr(Tx, "transfer_set_state", failing)
    # Completions mark their transfers COMPLETED with the set-oriented call.
    monkeypatch.setattr(Tx, "transfers_set_state", failing_many)
    return fault


async def _at_least(fault: dict[str, Any], hits: int) -> bool:
    return bool(fault["hits"] >= hits)


def test_every_request_type_is_a_known_message() -> None:
    assert set(REQUEST_TYPES) == {
        "itmolink.v1.AuthorisationStatement",
        "itmolink.v1.IssuanceNotice",
        "itmolink.v1.TransferProposal",
        "itmolink.v1.TransferCompletion",
        "itmolink.v1.TransferVoid",
        "itmolink.v1.TransferStatusQuery",
        "itmolink.v1.ReconciliationQuery",
        "itmolink.v1.KeyRotation",
        "itmolink.v1.FirstTransferNotice",
        "itmolink.v1.TransferBatchProposal",
        "itmolink.v1.TransferBatchCompletion",
    }


async def test_a_partner_can_ask_for_the_status_of_a_transfer(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    transfer_id = await transfer(lao, authorisation_id, 10)
    await final_state(kor, transfer_id)
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    key = kor.signing_key().verifying_key()
    try:
        states = {}
        for sequence, asked in ((900, transfer_id), (901, "LAO-T-NEVER")):
            query = transfer_pb2.TransferStatusQuery(
                header=header("LAO", "KOR", sequence=sequence), transfer_id=asked
            )
            reply = await client.deliver(signed(query, lao.signing_key())[1])
            verified = open_envelope(reply, TrustStore([key]))
            assert verified.payload_type == "itmolink.v1.TransferStatusReport"
            report = transfer_pb2.TransferStatusReport()
            report.ParseFromString(verified.payload)
            assert report.header.in_reply_to == query.header.message_id
            assert report.header.audience == "LAO"
            states[asked] = report.state
    finally:
        await client.close()
    assert states == {
        transfer_id: COMPLETED,
        "LAO-T-NEVER": transfer_pb2.TRANSFER_STATE_UNKNOWN,
    }


async def test_a_started_node_collects_young_garbage_less_often(
    pki: Callable[..., Path],
) -> None:
    """A protocol step allocates thousands of short-lived objects: the node raises
    the collector's first threshold (Python's default is 700) once it has started."""
    previous = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        lao = await start_registry(pki("LAO", ["KOR"]))
        try:
            assert gc.get_threshold() == GC_THRESHOLD
        finally:
            await stop_registry(lao)
    finally:
        gc.set_threshold(*previous)
