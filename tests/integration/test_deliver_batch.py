"""Several envelopes in one call (PartnerService.DeliverBatch, PROTOCOL.md §2.6), between
real nodes over mutual TLS: each envelope answered as Deliver would answer it, in order;
the envelopes of one call in one group commit; the limits; the fallback to Deliver."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from itmolink.core.codes import RejectionCode
from itmolink.crypto.envelope import TrustStore, open_envelope
from itmolink.crypto.pki import init_party
from itmolink.node import runtime
from itmolink.node.config import load_config
from itmolink.node.runtime import MAX_BATCH, Node
from itmolink.v1 import partner_service_pb2, partner_service_pb2_grpc, transfer_pb2

from .conftest import (
    NOW,
    Registry,
    final_state,
    header,
    link,
    signed,
    start_registry,
    stop_registry,
    write_node,
)
from .test_transfer import code_of, issued, journal_rows, reply_rejection, transfer

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f garbage"
COMPLETED = transfer_pb2.TRANSFER_STATE_COMPLETED


class BatchClient:
    """A hand-driven partner calling DeliverBatch (and Deliver) over mutual TLS."""

    def __init__(self, target: Registry, sender: Registry) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=target.keys.ca_certificate.read_bytes(),
            private_key=sender.keys.node_key.read_bytes(),
            certificate_chain=sender.keys.node_certificate.read_bytes(),
        )
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{target.node.partner_port}", credentials)
        self.stub = partner_service_pb2_grpc.PartnerServiceStub(self.channel)

    async def batch(self, envelopes: list[bytes]) -> list[Any]:
        response = await self.stub.DeliverBatch(
            partner_service_pb2.DeliverBatchRequest(envelopes=envelopes), timeout=10
        )
        return list(response.outcomes)

    async def deliver(self, envelope: bytes) -> bytes:
        response = await self.stub.Deliver(
            partner_service_pb2.DeliverRequest(envelope=envelope), timeout=10
        )
        return bytes(response.envelope)

    async def close(self) -> None:
        await self.channel.close(None)


@contextlib.asynccontextmanager
async def client(target: Registry, sender: Registry) -> AsyncIterator[BatchClient]:
    made = BatchClient(target, sender)
    try:
        yield made
    finally:
        await made.close()


class Queries:
    """Signed status queries from LAO to KOR, each with a sequence of its own (far above
    those LAO's node uses itself)."""

    def __init__(self, lao: Registry) -> None:
        self.key = lao.signing_key()
        self.sequence = 1_000_000

    def make(self, transfer_id: str = "LAO-T-NONE", **overrides: Any) -> tuple[Any, bytes]:
        self.sequence += 1
        query = transfer_pb2.TransferStatusQuery(
            header=header("LAO", "KOR", self.sequence, **overrides), transfer_id=transfer_id
        )
        return query, signed(query, self.key)[1]


def answered(reply: bytes, kor: Registry) -> tuple[str, str]:
    """(payload type, in_reply_to) of a reply KOR signed."""
    verified = open_envelope(reply, TrustStore([kor.signing_key().verifying_key()]))
    if verified.payload_type == "itmolink.v1.TransferStatusReport":
        report = transfer_pb2.TransferStatusReport.FromString(verified.payload)
        return verified.payload_type, report.header.in_reply_to
    return verified.payload_type, reply_rejection(reply, kor).header.in_reply_to


def sample(registry: Registry, name: str, **labels: str) -> float:
    value = registry.node.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def flipped(envelope: bytes) -> bytes:
    from itmolink.conformance.link import flip_signature

    return flip_signature(envelope)


# -- the receiver ----------------------------------------------------------------------


async def test_each_envelope_is_answered_in_its_place_as_deliver_would(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    queries = Queries(lao)
    first, first_envelope = queries.make()
    _, unsigned = queries.make()
    # The same message id with other content: a conflict, as across two calls.
    _, conflicting = queries.make("LAO-T-OTHER", message_id=first.header.message_id)
    envelopes = [first_envelope, GARBAGE, flipped(unsigned), first_envelope, conflicting]
    async with client(kor, lao) as partner:
        outcomes = await partner.batch(envelopes)
        alone = await partner.deliver(first_envelope)

    assert [o.WhichOneof("outcome") for o in outcomes] == ["envelope"] * 5
    replies = [o.envelope for o in outcomes]
    assert answered(replies[0], kor) == (
        "itmolink.v1.TransferStatusReport",
        first.header.message_id,
    )
    assert code_of(reply_rejection(replies[1], kor)) == RejectionCode.MALFORMED_ENVELOPE
    assert code_of(reply_rejection(replies[2], kor)) == RejectionCode.BAD_SIGNATURE
    assert replies[3] == replies[0]  # the repeat gets the stored reply, byte for byte
    conflict = reply_rejection(replies[4], kor)
    assert code_of(conflict) == RejectionCode.DUPLICATE_MESSAGE_CONFLICT
    assert conflict.header.sequence == 0  # not recorded
    assert alone == replies[0]  # Deliver of the same envelope: the same stored reply
    # Recorded once: the query and its report, nothing of the refused envelopes.
    inbound = [r for r in journal_rows(kor) if r[1] == "in" and r[2] == "LAO"]
    assert [r[3] for r in inbound].count(first.header.message_id) == 1
    assert sample(kor, "itmolink_messages_received_total", partner="LAO", outcome="handled") == 6
    assert sample(
        kor, "itmolink_partner_calls_total", direction="received", partner="LAO",
        method="DeliverBatch",
    ) == 1  # fmt: skip


async def test_the_peer_of_the_call_is_the_peer_of_every_envelope(
    pki: Callable[..., Path],
) -> None:
    """KOR pins LAO and JPN. Over LAO's TLS connection, an envelope signed by JPN is
    refused with 1005 (signer not the peer, §5.2 D3) while LAO's own is answered."""
    kor = await start_registry(pki("KOR", ["LAO", "JPN"]))
    lao = await start_registry(pki("LAO", ["KOR"]))
    jpn = await start_registry(pki("JPN", ["KOR"]))
    link(lao, kor)
    try:
        ours, ours_envelope = Queries(lao).make()
        theirs = transfer_pb2.TransferStatusQuery(
            header=header("JPN", "KOR", 1_000_001), transfer_id="JPN-T-NONE"
        )
        _, theirs_envelope = signed(theirs, jpn.signing_key())
        async with client(kor, lao) as partner:
            outcomes = await partner.batch([theirs_envelope, ours_envelope])
    finally:
        for registry in (jpn, lao, kor):
            await stop_registry(registry)
    assert code_of(reply_rejection(outcomes[0].envelope, kor)) == RejectionCode.SIGNER_NOT_PEER
    assert answered(outcomes[1].envelope, kor)[1] == ours.header.message_id


@pytest.mark.parametrize("count", [0, MAX_BATCH + 1])
async def test_an_empty_or_oversized_batch_is_refused_whole_and_records_nothing(
    lao_kor: tuple[Registry, Registry], count: int
) -> None:
    lao, kor = lao_kor
    queries = Queries(lao)
    async with client(kor, lao) as partner:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await partner.batch([queries.make()[1] for _ in range(count)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"1 to {MAX_BATCH} envelopes, not {count}" in (caught.value.details() or "")
    assert [r for r in journal_rows(kor) if r[1] == "in"] == []
    assert sample(kor, "itmolink_messages_received_total", partner="LAO", outcome="handled") == 0


async def test_the_rate_limit_is_taken_per_envelope(pki: Callable[..., Path]) -> None:
    kor = await start_registry(
        pki("KOR", ["LAO"], extra="[limits]\nrate_per_second = 1\nrate_burst = 2\n")
    )
    lao = await start_registry(pki("LAO", ["KOR"]))
    link(lao, kor)
    try:
        async with client(kor, lao) as partner:
            outcomes = await partner.batch([GARBAGE] * 4)
    finally:
        await stop_registry(lao)
        await stop_registry(kor)
    kinds = [o.WhichOneof("outcome") for o in outcomes]
    assert kinds[:2] == ["envelope", "envelope"]
    assert "failure" in kinds[2:]
    for outcome in outcomes:
        if outcome.WhichOneof("outcome") == "failure":
            assert outcome.failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert outcome.failure.rejection_code == "REJECTION_CODE_RATE_LIMITED"
        else:
            code = code_of(reply_rejection(outcome.envelope, kor))
            assert code == RejectionCode.MALFORMED_ENVELOPE


class Boom(Exception):
    pass


async def test_an_internal_failure_is_confined_to_its_envelope(
    lao_kor: tuple[Registry, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    lao, kor = lao_kor
    queries = Queries(lao)
    (before, before_envelope), (failing, failing_envelope), (after, after_envelope) = (
        queries.make(),
        queries.make(),
        queries.make(),
    )
    handle = kor.node.engine.handle_delivery

    def handle_delivery(peer: str, raw: bytes, now: Any) -> bytes:
        if raw == failing_envelope:
            with kor.node.engine.store.transaction() as tx:  # written, then rolled back
                tx.set_meta("half_done", "yes")
                raise Boom("the store broke")
        return handle(peer, raw, now)

    monkeypatch.setattr(kor.node.engine, "handle_delivery", handle_delivery)
    async with client(kor, lao) as partner:
        outcomes = await partner.batch([before_envelope, failing_envelope, after_envelope])
        monkeypatch.setattr(kor.node.engine, "handle_delivery", handle)
        retried = await partner.deliver(failing_envelope)

    assert [o.WhichOneof("outcome") for o in outcomes] == ["envelope", "failure", "envelope"]
    assert outcomes[1].failure.code == grpc.StatusCode.UNKNOWN.value[0]
    assert "Boom" in outcomes[1].failure.message
    assert "the store broke" not in outcomes[1].failure.message  # no internals to the peer
    assert answered(outcomes[0].envelope, kor)[1] == before.header.message_id
    assert answered(outcomes[2].envelope, kor)[1] == after.header.message_id
    # Nothing of the failed one was kept: its retry is handled as new.
    assert answered(retried, kor) == (
        "itmolink.v1.TransferStatusReport",
        failing.header.message_id,
    )
    with kor.node.engine.store.transaction() as tx:
        assert tx.meta_get("half_done") is None
    assert sample(kor, "itmolink_messages_received_total", partner="LAO", outcome="failed") == 1


# -- one group commit per call (SQLite: the store that groups its calls) ----------------


@pytest.fixture
async def sqlite_pair(tmp_path: Path) -> AsyncIterator[tuple[Registry, Registry]]:
    for party in ("LAO", "KOR"):
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
    lao = await start_registry(write_node(tmp_path, "LAO", ["KOR"]))
    kor = await start_registry(write_node(tmp_path, "KOR", ["LAO"]))
    link(lao, kor)
    try:
        yield lao, kor
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


@contextlib.asynccontextmanager
async def db_thread_held(node: Node) -> AsyncIterator[threading.Event]:
    """Keep the node's database thread busy until the block ends, so that the calls
    made meanwhile queue up; then let it go."""
    gate, busy = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        gate.wait(30)

    held = node.run_on_db_thread(hold)
    await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
    try:
        yield gate
    finally:
        gate.set()
        await asyncio.wrap_future(held)


async def queued(node: Node, calls: int) -> None:
    """Wait until ``calls`` calls wait for the database thread."""
    for _ in range(500):
        if sum(len(entry) for entry in node._queue) >= calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {calls} calls queued")


def record_groups(node: Node, monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """The envelopes handled in each group commit of ``node``, group by group."""
    groups: list[list[bytes]] = []
    group = node._group
    assert group is not None

    @contextlib.contextmanager
    def recording() -> Iterator[None]:
        groups.append([])
        with group():
            yield

    handle = node.engine.handle_delivery

    def handle_delivery(peer: str, raw: bytes, now: Any) -> bytes:
        groups[-1].append(raw)
        return handle(peer, raw, now)

    monkeypatch.setattr(node, "_group", recording)
    monkeypatch.setattr(node.engine, "handle_delivery", handle_delivery)
    return groups


async def test_the_envelopes_of_one_call_share_one_group_commit(
    sqlite_pair: tuple[Registry, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the group taking them is almost full: MAX_GROUP - 2 calls wait ahead
    of a call of five envelopes, which must then go whole into the next group."""
    lao, kor = sqlite_pair
    queries = Queries(lao)
    envelopes = [queries.make()[1] for _ in range(5)]
    groups = record_groups(kor.node, monkeypatch)
    ahead = runtime.MAX_GROUP - 2
    async with client(kor, lao) as partner:
        async with db_thread_held(kor.node):
            others = [asyncio.ensure_future(kor.node.db(lambda: None)) for _ in range(ahead)]
            await queued(kor.node, ahead)
            call = asyncio.ensure_future(partner.batch(envelopes))
            await queued(kor.node, ahead + 5)
        outcomes = await call
    await asyncio.gather(*others)
    assert [o.WhichOneof("outcome") for o in outcomes] == ["envelope"] * 5
    holding = [g for g in groups if g]
    assert holding == [envelopes], [len(g) for g in groups]


async def test_no_outcome_of_a_batch_whose_group_commit_fails(
    sqlite_pair: tuple[Registry, Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reply leaves before the commit that recorded it: when the group's commit fails,
    every envelope of the call gets a failure and none of them is recorded."""
    lao, kor = sqlite_pair
    queries = Queries(lao)
    made = [queries.make() for _ in range(3)]
    group = kor.node._group
    assert group is not None

    @contextlib.contextmanager
    def failing() -> Iterator[None]:
        with group():
            yield
            raise Boom("the commit failed")

    monkeypatch.setattr(kor.node, "_group", failing)
    async with client(kor, lao) as partner:
        outcomes = await partner.batch([envelope for _, envelope in made])
        monkeypatch.setattr(kor.node, "_group", group)
        again = await partner.batch([envelope for _, envelope in made])
    assert [o.WhichOneof("outcome") for o in outcomes] == ["failure"] * 3
    assert {o.failure.code for o in outcomes} == {grpc.StatusCode.UNKNOWN.value[0]}
    # Retried, each is new to KOR (recorded now, with a fresh report).
    assert [answered(o.envelope, kor)[1] for o in again] == [q.header.message_id for q, _ in made]


# -- the sender ------------------------------------------------------------------------


async def transfers_at_once(lao: Registry, authorisation_id: str, count: int) -> list[str]:
    """``count`` transfers whose proposals are committed in one group, so that they
    become ready for delivery together."""
    async with db_thread_held(lao.node):
        started = [asyncio.ensure_future(transfer(lao, authorisation_id, 10)) for _ in range(count)]
        await queued(lao.node, count)
    return list(await asyncio.gather(*started))


async def test_proposals_ready_together_go_in_one_call_and_all_complete_once(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    transfer_ids = await transfers_at_once(lao, authorisation_id, 6)
    for transfer_id in transfer_ids:
        assert (await final_state(lao, transfer_id)).state == COMPLETED
        assert (await final_state(kor, transfer_id)).state == COMPLETED
    assert await lao.held() == 1_000 - 60
    assert await kor.held() == 60
    assert sample(
        lao, "itmolink_partner_calls_total", direction="sent", partner="KOR",
        method="DeliverBatch",
    ) >= 1  # fmt: skip
    assert sample(
        kor, "itmolink_partner_calls_total", direction="received", partner="LAO",
        method="DeliverBatch",
    ) >= 1  # fmt: skip
    # Each proposal and completion recorded exactly once at KOR.
    inbound = [r[4] for r in journal_rows(kor) if r[1] == "in"]
    assert inbound.count("itmolink.v1.TransferProposal") == 6
    assert inbound.count("itmolink.v1.TransferCompletion") == 6
    assert sample(lao, "itmolink_deliveries_total", partner="KOR", outcome="unreachable") == 0


class DeliverOnly(runtime.PartnerServicer):
    """A partner of before DeliverBatch: the method is not served (UNIMPLEMENTED)."""

    DeliverBatch = partner_service_pb2_grpc.PartnerServiceServicer.DeliverBatch  # type: ignore[assignment]


async def test_a_partner_without_deliver_batch_gets_each_envelope_by_deliver(
    pki: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "PartnerServicer", DeliverOnly)
        kor = await start_registry(pki("KOR", ["LAO"]))
    lao = await start_registry(pki("LAO", ["KOR"]))
    link(lao, kor)
    try:
        async with client(kor, lao) as partner:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await partner.batch([GARBAGE])
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        authorisation_id = await issued(lao, quantity=1_000)
        first = await transfers_at_once(lao, authorisation_id, 4)
        for transfer_id in first:
            assert (await final_state(kor, transfer_id)).state == COMPLETED
        tried = sample(
            lao, "itmolink_partner_calls_total", direction="sent", partner="KOR",
            method="DeliverBatch",
        )  # fmt: skip
        assert tried == 1  # once, answered UNIMPLEMENTED, then remembered
        second = await transfers_at_once(lao, authorisation_id, 4)
        for transfer_id in second:
            assert (await final_state(lao, transfer_id)).state == COMPLETED
        assert sample(
            lao, "itmolink_partner_calls_total", direction="sent", partner="KOR",
            method="DeliverBatch",
        ) == 1  # fmt: skip
        assert await kor.held() == 80
        assert sample(lao, "itmolink_deliveries_total", partner="KOR", outcome="unreachable") == 0
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


async def test_ready_envelopes_are_cut_into_batches_by_count_and_bytes(tmp_path: Path) -> None:
    """The client's cut (no node started): at most MAX_BATCH envelopes and
    max_message_bytes in all per call; one left alone, or too large to share a call,
    goes by Deliver (its future says None); a cancelled delivery is left out."""
    for party in ("LAO", "KOR"):
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
    extra = "[limits]\nmax_message_bytes = 1000\n"
    node = Node(load_config(write_node(tmp_path, "LAO", ["KOR"], extra=extra)))
    batches: list[list[bytes]] = []

    async def send_batch(partner: str, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        batches.append([envelope for envelope, _ in batch])

    node._send_batch = send_batch  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()

    def ready(sizes: list[int]) -> list[tuple[bytes, asyncio.Future[Any]]]:
        items = [(bytes([i % 256]) * size, loop.create_future()) for i, size in enumerate(sizes)]
        node._ready["KOR"] = list(items)
        return items

    items = ready([300] * 11)
    items[4][1].cancel()
    node._flush("KOR")
    await asyncio.sleep(0)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert items[10][1].result() is None  # the tenth left alone: Deliver
    assert items[4][0] not in [e for b in batches for e in b]

    batches.clear()
    items = ready([5] * (2 * MAX_BATCH + 5))
    node._flush("KOR")
    await asyncio.sleep(0)
    assert [len(b) for b in batches] == [MAX_BATCH, MAX_BATCH, 5]
    assert not any(f.done() for _, f in items)

    batches.clear()
    items = ready([1200, 100, 100])
    node._flush("KOR")
    await asyncio.sleep(0)
    assert batches == [[items[1][0], items[2][0]]]
    assert items[0][1].result() is None  # larger than a call may carry: alone

    batches.clear()
    node._no_batch["KOR"] = time.monotonic() + 600  # KOR answered UNIMPLEMENTED
    items = ready([10] * 3)
    node._flush("KOR")
    assert batches == []
    assert all(f.result() is None for _, f in items)
