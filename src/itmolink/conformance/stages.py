"""The conformance tests, in four stages (docs/PROTOCOL.md §13).

Each test names the section of docs/PROTOCOL.md it checks and the roles of the
target it applies to: ``host`` (the target transfers out; the kit plays the
acquiring party) or ``buyer`` (the target acquires; the kit plays the host).
Tests of a stage run in order and share the run's context; a later test may
rely on what an earlier test of the same or an earlier stage set up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from google.protobuf.message import Message

from itmolink.conformance.config import EXPIRED_KEY_FILE, FUTURE_KEY_FILE, ROLES, KitConfig
from itmolink.conformance.context import (
    CheckFailed,
    Context,
    KitTransfer,
    NotRunnable,
    check,
    other_party,
)
from itmolink.conformance.link import (
    Incoming,
    Reply,
    default_answer,
    flip_signature,
    now_utc,
    sha256,
)
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected
from itmolink.core.reconcile import (
    BLOCKS_LEAF_DEFINITION,
    blocks_leaf,
    id_hash,
    slices,
)
from itmolink.crypto.envelope import open_envelope
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.pki import init_party
from itmolink.node.base import Rejection
from itmolink.node.convert import block_from_pb, block_to_pb, timestamp, timestamp_us, to_us
from itmolink.v1 import (
    authorisation_pb2,
    codes_pb2,
    common_pb2,
    envelope_pb2,
    issuance_pb2,
    keys_pb2,
    reconcile_pb2,
    transfer_pb2,
    use_pb2,
)

STAGES = {
    1: "connectivity and envelope",
    2: "authorisation and issuance",
    3: "transfers",
    4: "reconciliation",
}


@dataclass(frozen=True)
class KitTest:
    id: str
    stage: int
    section: str
    title: str
    roles: tuple[str, ...]
    run: Callable[[Context], Awaitable[None]]


TESTS: list[KitTest] = []


def kit_test(
    test_id: str, stage: int, section: str, title: str, roles: tuple[str, ...] = ROLES
) -> Callable[[Callable[[Context], Awaitable[None]]], Callable[[Context], Awaitable[None]]]:
    def register(fn: Callable[[Context], Awaitable[None]]) -> Callable[[Context], Awaitable[None]]:
        TESTS.append(KitTest(test_id, stage, section, title, roles, fn))
        return fn

    return register


def tests_for(role: str) -> list[KitTest]:
    return [t for t in TESTS if role in t.roles]


C = codes_pb2  # rejection code constants


def _status_query(ctx: Context, transfer_id: str = "") -> transfer_pb2.TransferStatusQuery:
    return transfer_pb2.TransferStatusQuery(
        transfer_id=transfer_id or f"{ctx.kit}-T-{ctx.nonce}-PROBE"
    )


async def _status(ctx: Context, transfer_id: str) -> int:
    reply = await ctx.link.send(_status_query(ctx, transfer_id))
    report = ctx.expect(reply, transfer_pb2.TransferStatusReport, f"status of {transfer_id}")
    check(
        report.transfer_id == transfer_id,
        f"status report names {report.transfer_id!r}, not {transfer_id!r}",
    )
    return int(report.state)


def _state(value: int) -> str:
    return str(transfer_pb2.TransferState.Name(value))  # type: ignore[arg-type]


async def _expect_state(ctx: Context, transfer_id: str, state: int, section: str) -> None:
    got = await _status(ctx, transfer_id)
    check(
        got == state,
        f"{section}: {transfer_id} is {_state(got)} at the target, not {_state(state)}",
    )


# ======================================================================================
# Stage 1: connectivity and envelope (both roles)
# ======================================================================================


@kit_test(
    "1.01-mtls-status-query", 1, "§2.2, §5.11", "mutual TLS; a status query gets a signed report"
)
async def t_mtls(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx))
    report = ctx.expect(reply, transfer_pb2.TransferStatusReport, "status query")
    check(
        report.state == transfer_pb2.TRANSFER_STATE_UNKNOWN,
        f"an unknown transfer is TRANSFER_STATE_UNKNOWN, got {_state(report.state)}",
    )


@kit_test(
    "1.02-unpinned-client-refused", 1, "§2.3", "a client certificate of an unpinned CA is refused"
)
async def t_unpinned(ctx: Context) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stranger = init_party(Path(tmp) / "pki", ctx.kit, ctx.config.registry, now=now_utc())
        credentials = ctx.link.credentials(
            cert=stranger.node_certificate.read_bytes(), key=stranger.node_key.read_bytes()
        )
    _, envelope = ctx.link.seal(_status_query(ctx))
    reply = await ctx.link.deliver_raw(envelope, credentials=credentials)
    check(
        reply.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED),
        f"a client whose certificate no pinned CA issued got {reply.describe()}; "
        "it must fail the handshake (UNAVAILABLE) or get UNAUTHENTICATED",
    )
    # ... and not because the target is down: the kit's own certificate still gets in.
    reply = await ctx.link.send(_status_query(ctx))
    ctx.expect(reply, transfer_pb2.TransferStatusReport, "a status query right after (§2.2)")


@kit_test("1.03-garbage-bytes", 1, "§3.6, §5.2 D2", "bytes that are no envelope: 1002, unrecorded")
async def t_garbage(ctx: Context) -> None:
    reply = await ctx.link.deliver_raw(b"\x0a\xff\xff\xff\xff\x0f garbage")
    rejection = ctx.expect_rejection(
        reply, C.REJECTION_CODE_MALFORMED_ENVELOPE, "garbage bytes", recorded=False
    )
    check(
        rejection.header.in_reply_to == "" and rejection.subject_id == "",
        "a refusal at D2 echoes no id (in_reply_to and subject_id empty, §5.2)",
    )


@kit_test("1.04-oversized", 1, "§2.5, §5.2 D1b", "an envelope over max_message_bytes: 2007")
async def t_oversized(ctx: Context) -> None:
    size = ctx.config.max_message_bytes + 200
    envelope = envelope_pb2.Envelope(
        payload_type="itmolink.v1.TransferStatusQuery", payload=b"\x00" * size
    ).SerializeToString()
    reply = await ctx.link.deliver_raw(envelope)
    ctx.expect_rejection(reply, C.REJECTION_CODE_MESSAGE_TOO_LARGE, "oversized", recorded=False)


@kit_test("1.05-unknown-key", 1, "§3.6, §5.2 D2", "a signature by an unpinned key: 1003")
async def t_unknown_key(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx), key=SigningKey.generate(ctx.kit))
    ctx.expect_rejection(reply, C.REJECTION_CODE_UNKNOWN_SIGNING_KEY, "unknown key", recorded=False)


@kit_test("1.06-bad-signature", 1, "§3.6, §5.2 D2", "a signature that does not verify: 1004")
async def t_bad_signature(ctx: Context) -> None:
    _, envelope = ctx.link.seal(_status_query(ctx))
    reply = await ctx.link.deliver_raw(flip_signature(envelope))
    ctx.expect_rejection(reply, C.REJECTION_CODE_BAD_SIGNATURE, "bad signature", recorded=False)


def _extra_key(ctx: Context, name: str) -> SigningKey:
    key = ctx.config.extra_key(name)
    if key is None:
        raise CheckFailed(
            f"the kit has no {name} (make the kit's identity with 'itmolink conformance init' "
            "and give the target its card)"
        )
    return key


@kit_test("1.07-expired-key", 1, "§3.6, §3.8", "a signature by an expired pinned key: 1009")
async def t_expired_key(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx), key=_extra_key(ctx, EXPIRED_KEY_FILE))
    ctx.expect_rejection(reply, C.REJECTION_CODE_SIGNING_KEY_EXPIRED, "expired key", recorded=False)


@kit_test("1.08-not-yet-valid-key", 1, "§3.6, §3.8", "a signature by a key not valid yet: 1008")
async def t_future_key(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx), key=_extra_key(ctx, FUTURE_KEY_FILE))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_SIGNING_KEY_NOT_YET_VALID, "not-yet-valid key", recorded=False
    )


@kit_test("1.09-wrong-audience", 1, "§4.5, §4.7", "a message addressed to another party: 1007")
async def t_audience(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx), audience=other_party(ctx.kit, ctx.target))
    ctx.expect_rejection(reply, C.REJECTION_CODE_WRONG_AUDIENCE, "wrong audience", recorded=False)


@kit_test("1.10-sender-mismatch", 1, "§4.7", "a header naming another sender than the signer: 1006")
async def t_sender(ctx: Context) -> None:
    other = other_party(ctx.kit, ctx.target)
    reply = await ctx.link.send(_status_query(ctx), sender_party=other)
    ctx.expect_rejection(reply, C.REJECTION_CODE_SENDER_MISMATCH, "sender mismatch", recorded=False)


@kit_test("1.11-unsupported-version", 1, "§4.7, §10", "protocol_version 2: 1001")
async def t_version(ctx: Context) -> None:
    reply = await ctx.link.send(_status_query(ctx), protocol_version=2)
    ctx.expect_rejection(reply, C.REJECTION_CODE_UNSUPPORTED_VERSION, "version 2", recorded=False)


@kit_test("1.12-unknown-payload-type", 1, "§5.1, §5.2 D4", "a reply type sent as a request: 2001")
async def t_payload_type(ctx: Context) -> None:
    msg = transfer_pb2.TransferStatusReport(
        transfer_id=f"{ctx.kit}-T-X", state=transfer_pb2.TRANSFER_STATE_PROPOSED
    )
    reply = await ctx.link.send(msg)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_UNKNOWN_PAYLOAD_TYPE, "reply type as request", recorded=False
    )


@kit_test(
    "1.13-stale-sent-at",
    1,
    "§4.6, §5.2 D7a",
    "a replayed old message, sent_at out of the window: 5003",
)
async def t_stale(ctx: Context) -> None:
    old = now_utc() - dt.timedelta(days=ctx.config.max_message_age_days + 1)
    reply = await ctx.link.send(_status_query(ctx), sent_at=timestamp(to_us(old)))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_SENT_AT_OUT_OF_WINDOW, "old sent_at", recorded=False
    )
    ahead = now_utc() + dt.timedelta(days=1)
    reply = await ctx.link.send(_status_query(ctx), sent_at=timestamp(to_us(ahead)))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_SENT_AT_OUT_OF_WINDOW, "sent_at a day ahead", recorded=False
    )


@kit_test(
    "1.14-identical-retry",
    1,
    "§7.2, §5.2 D7",
    "the same request twice: the same reply, byte for byte",
)
async def t_retry(ctx: Context) -> None:
    _, envelope = ctx.link.seal(_status_query(ctx))
    first = await ctx.link.deliver_raw(envelope)
    ctx.expect(first, transfer_pb2.TransferStatusReport, "status query")
    second = await ctx.link.deliver_raw(envelope)
    check(second.ok, f"the retry got {second.describe()}")
    check(
        second.raw == first.raw,
        f"the retry of a recorded request must get the stored reply byte for byte; "
        f"got {second.describe()} (a different envelope)",
    )


@kit_test("1.15-reused-message-id", 1, "§5.2 D7", "a message id reused with other content: 5001")
async def t_reused_id(ctx: Context) -> None:
    first = _status_query(ctx, f"{ctx.kit}-T-{ctx.nonce}-R1")
    _, envelope = ctx.link.seal(first)
    ctx.expect(await ctx.link.deliver_raw(envelope), transfer_pb2.TransferStatusReport, "query")
    other = _status_query(ctx, f"{ctx.kit}-T-{ctx.nonce}-R2")
    reply = await ctx.link.send(other, message_id=first.header.message_id)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_DUPLICATE_MESSAGE_CONFLICT, "reused message id", recorded=False
    )


@kit_test(
    "1.16-reused-sequence", 1, "§4.3, §5.2 D8", "a new message with a sequence already used: 5002"
)
async def t_reused_sequence(ctx: Context) -> None:
    first = _status_query(ctx)
    _, envelope = ctx.link.seal(first)
    ctx.expect(await ctx.link.deliver_raw(envelope), transfer_pb2.TransferStatusReport, "query")
    reply = await ctx.link.send(_status_query(ctx), sequence=first.header.sequence)
    ctx.expect_rejection(reply, C.REJECTION_CODE_SEQUENCE_REUSED, "reused sequence", recorded=False)


@kit_test(
    "1.17-key-rotation",
    1,
    "§5.12, §3.8",
    "a key announced in-band signs; once revoked in-band: 1010",
)
async def t_rotation(ctx: Context) -> None:
    new = SigningKey.generate(ctx.kit)
    record = keys_pb2.SigningKeyRecord(
        key_id=new.key_id, public_key=new.verifying_key().public_bytes
    )
    rotation = keys_pb2.KeyRotation(rotation_id=new.key_id, new_key=record)
    ack = ctx.expect(
        await ctx.link.send(rotation), keys_pb2.KeyRotationAcknowledgement, "key rotation"
    )
    check(ack.rotation_id == rotation.rotation_id, f"acknowledgement names {ack.rotation_id!r}")
    reply = await ctx.link.send(_status_query(ctx), key=new)
    ctx.expect(reply, transfer_pb2.TransferStatusReport, "a query signed with the announced key")
    revocation = keys_pb2.KeyRotation(
        rotation_id=f"revoke-{new.key_id}", revoked_key_ids=[new.key_id]
    )
    ctx.expect(
        await ctx.link.send(revocation), keys_pb2.KeyRotationAcknowledgement, "key revocation"
    )
    reply = await ctx.link.send(_status_query(ctx), key=new)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_SIGNING_KEY_REVOKED, "a revoked key", recorded=False
    )


@kit_test(
    "1.18-deliver-batch",
    1,
    "§2.6",
    "DeliverBatch answers each envelope as Deliver would, in order, or is UNIMPLEMENTED",
)
async def t_deliver_batch(ctx: Context) -> None:
    query = _status_query(ctx, f"{ctx.kit}-T-{ctx.nonce}-B1")
    _, first = ctx.link.seal(query)
    _, reused = ctx.link.seal(
        _status_query(ctx, f"{ctx.kit}-T-{ctx.nonce}-B2"), message_id=query.header.message_id
    )
    _, unsigned = ctx.link.seal(_status_query(ctx))
    garbage = b"\x0a\xff\xff\xff\xff\x0f garbage"
    # Valid, undecodable, badly signed, the first again, a reused id: each answered
    # as alone, the repeat with the first one's reply (§7.2).
    envelopes = [first, garbage, flip_signature(unsigned), first, reused]
    batch = await ctx.link.deliver_batch(envelopes)
    if batch.status == grpc.StatusCode.UNIMPLEMENTED:
        ctx.notes["deliver_batch"] = False  # MAY: the target serves Deliver alone
        return
    check(
        batch.ok,
        f"a DeliverBatch call of {len(envelopes)} envelopes got gRPC {batch.status.name} "
        f"({batch.details}): a node that serves DeliverBatch answers OK with one outcome "
        "per envelope, one that does not answers UNIMPLEMENTED (§2.6)",
    )
    check(
        len(batch.replies) == len(envelopes),
        f"DeliverBatch answered {len(batch.replies)} outcomes for {len(envelopes)} envelopes",
    )
    r = batch.replies

    def slot(i: int) -> str:
        return f"DeliverBatch outcome {i} (outcomes come in the order of the request, §2.6)"

    ctx.expect(r[0], transfer_pb2.TransferStatusReport, slot(0))
    ctx.expect_rejection(r[1], C.REJECTION_CODE_MALFORMED_ENVELOPE, slot(1), recorded=False)
    ctx.expect_rejection(r[2], C.REJECTION_CODE_BAD_SIGNATURE, slot(2), recorded=False)
    check(
        r[3].ok and r[3].raw == r[0].raw,
        f"{slot(3)}: the same envelope twice in one call gets the same reply byte for byte "
        f"(§7.2), got {r[3].describe()}",
    )
    ctx.expect_rejection(r[4], C.REJECTION_CODE_DUPLICATE_MESSAGE_CONFLICT, slot(4), recorded=False)
    again = await ctx.link.deliver_raw(first)
    check(
        again.ok and again.raw == r[0].raw,
        "the envelope answered in a DeliverBatch call, delivered again by Deliver, must get "
        f"the same reply byte for byte (§2.6, §7.2), got {again.describe()}",
    )
    for count in (0, 129):
        refused = await ctx.link.deliver_batch([garbage] * count)
        check(
            refused.status == grpc.StatusCode.INVALID_ARGUMENT,
            f"a DeliverBatch call of {count} envelopes must be refused with INVALID_ARGUMENT "
            f"(1 to 128, §2.6), got {refused.status.name}",
        )
    ctx.notes["deliver_batch"] = True


@kit_test(
    "1.19-revocation-before-announcement",
    1,
    "§5.12 KR3, §3.8",
    "a key revoked before its announcement arrives stays revoked once announced: 1010",
)
async def t_revocation_first(ctx: Context) -> None:
    given_up = SigningKey.generate(ctx.kit)
    revocation = keys_pb2.KeyRotation(
        rotation_id=f"revoke-{given_up.key_id}", revoked_key_ids=[given_up.key_id]
    )
    ctx.expect(
        await ctx.link.send(revocation),
        keys_pb2.KeyRotationAcknowledgement,
        "the revocation of a key of the kit's party not pinned yet",
    )
    record = keys_pb2.SigningKeyRecord(
        key_id=given_up.key_id, public_key=given_up.verifying_key().public_bytes
    )
    announcement = keys_pb2.KeyRotation(rotation_id=given_up.key_id, new_key=record)
    ctx.expect(
        await ctx.link.send(announcement),
        keys_pb2.KeyRotationAcknowledgement,
        "the announcement that arrives after its revocation",
    )
    reply = await ctx.link.send(_status_query(ctx), key=given_up)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_SIGNING_KEY_REVOKED, "a key revoked before it was announced",
        recorded=False,
    )  # fmt: skip


def _check_rate_limited(reply: Reply, what: str) -> None:
    """A call refused over a rate or budget (§2.5): 2009 in the trailing metadata, and
    no reply envelope (§2.1)."""
    code = reply.trailing.get("itmolink-rejection-code")
    check(
        code == "REJECTION_CODE_RATE_LIMITED",
        f"{what} must carry 'itmolink-rejection-code: REJECTION_CODE_RATE_LIMITED' in its "
        f"trailing metadata, got {code!r}",
    )
    check(not reply.raw, f"{what} must carry no reply envelope (§2.1)")


@kit_test(
    "1.20-rate-limit",
    1,
    "§2.5, §2.1",
    "over its agreed rate the target refuses a call with RESOURCE_EXHAUSTED and 2009 in the "
    "trailing metadata, no reply, nothing recorded",
)
async def t_rate_limit(ctx: Context) -> None:
    rate, burst = ctx.config.rate_per_second, ctx.config.rate_burst
    if not (rate and burst):
        raise NotRunnable("no [target] rate_per_second and rate_burst in the configuration")
    # More calls at once than a full burst plus what refills while they are sent.
    count = burst + rate + 50
    sealed = [ctx.link.seal(_status_query(ctx))[1] for _ in range(count)]
    replies = await asyncio.gather(*(ctx.link.deliver_raw(e) for e in sealed))
    limited = [r for r in replies if r.status == grpc.StatusCode.RESOURCE_EXHAUSTED]
    check(limited, f"{count} calls at once, over a burst of {burst}: none was rate limited")
    for reply in limited:
        _check_rate_limited(reply, "a rate-limited call")
    others = [r for r in replies if r.status != grpc.StatusCode.RESOURCE_EXHAUSTED]
    for reply in others:
        ctx.expect(reply, transfer_pb2.TransferStatusReport, "a status query within the rate")
    await asyncio.sleep(3 / rate + 0.1)
    # Nothing of a refused call was recorded: the same bytes are answered as new (§7.2),
    # with a reply sealed after a query sent in between, not a reply stored earlier.
    probe = ctx.expect(
        await ctx.link.send(_status_query(ctx)), transfer_pb2.TransferStatusReport, "a new query"
    )
    again = await ctx.link.deliver_raw(limited[0].sent)
    report = ctx.expect(again, transfer_pb2.TransferStatusReport, "a rate-limited query sent again")
    check(
        report.header.sequence > probe.header.sequence,
        f"the rate-limited query sent again got reply sequence {report.header.sequence}, older "
        f"than {probe.header.sequence} of a query sent after the flood: a stored reply, so the "
        "refused call was recorded (§2.1: nothing of it may be)",
    )
    # Leave the later tests (and a run that follows this one) a full bucket.
    await asyncio.sleep(burst / rate)


# ======================================================================================
# Stage 2, target = buyer: the kit is the host and sends authorisations and issuances
# ======================================================================================


async def _authorise_at_target(ctx: Context, suffix: str) -> str:
    statement = ctx.statement(suffix)
    reply = await ctx.link.send(statement)
    ack = ctx.expect(reply, authorisation_pb2.AuthorisationAcknowledgement, "statement")
    check(
        (ack.authorisation_id, ack.version) == (statement.authorisation_id, statement.version),
        f"acknowledgement names {ack.authorisation_id} v{ack.version}",
    )
    ctx.authorisations[statement.authorisation_id] = statement
    return str(statement.authorisation_id)


async def _announce_with(ctx: Context, key: SigningKey | None, what: str) -> SigningKey:
    """Announce a new key of the kit's party in a KeyRotation signed by ``key`` (the
    kit's own key if None); returns it."""
    new = SigningKey.generate(ctx.kit)
    record = keys_pb2.SigningKeyRecord(
        key_id=new.key_id, public_key=new.verifying_key().public_bytes
    )
    rotation = keys_pb2.KeyRotation(rotation_id=new.key_id, new_key=record)
    reply = await (ctx.link.send(rotation) if key is None else ctx.link.send(rotation, key=key))
    ctx.expect(reply, keys_pb2.KeyRotationAcknowledgement, what)
    return new


@kit_test(
    "1.21-revocation-cascade",
    1,
    "§5.12 KR3, §3.8",
    "a revocation with compromised_since revokes the keys announced with the key, "
    "transitively (1010); one without it revokes the key alone",
)
async def t_revocation_cascade(ctx: Context) -> None:
    retired = await _announce_with(ctx, None, "the announcement of a key to retire")
    kept = await _announce_with(ctx, retired, "a key announced with the key to retire")
    stolen = await _announce_with(ctx, None, "the announcement of a key to be stolen")
    thief = await _announce_with(ctx, stolen, "a key announced with the stolen key")
    thiefs_next = await _announce_with(ctx, thief, "a key announced with that key")
    retirement = keys_pb2.KeyRotation(
        rotation_id=f"revoke-{retired.key_id}", revoked_key_ids=[retired.key_id]
    )
    ctx.expect(
        await ctx.link.send(retirement), keys_pb2.KeyRotationAcknowledgement,
        "a revocation without compromised_since",
    )  # fmt: skip
    ctx.expect(
        await ctx.link.send(_status_query(ctx), key=kept),
        transfer_pb2.TransferStatusReport,
        "a query signed with a key announced with a key revoked without compromised_since "
        "(only the listed key is revoked)",
    )
    # Compromised since long before the announcements, by the target's clock too.
    compromise = keys_pb2.KeyRotation(
        rotation_id=f"revoke-{stolen.key_id}", revoked_key_ids=[stolen.key_id],
        compromised_since=timestamp(to_us(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))),
    )  # fmt: skip
    ctx.expect(
        await ctx.link.send(compromise), keys_pb2.KeyRotationAcknowledgement,
        "a revocation with compromised_since",
    )  # fmt: skip
    for key, what in (
        (thief, "a key announced with the compromised key"),
        (thiefs_next, "a key announced with a key that fell with the compromised key"),
    ):
        reply = await ctx.link.send(_status_query(ctx), key=key)
        ctx.expect_rejection(reply, C.REJECTION_CODE_SIGNING_KEY_REVOKED, what, recorded=False)
    ctx.expect(
        await ctx.link.send(_status_query(ctx)),
        transfer_pb2.TransferStatusReport,
        "a query signed with the kit's own key, which announced the compromised key",
    )


@kit_test(
    "2.01-authorisation-acknowledged",
    2,
    "§5.6",
    "an authorisation statement is acknowledged",
    ("buyer",),
)
async def t_b_authorise(ctx: Context) -> None:
    ctx.notes["auth"] = await _authorise_at_target(ctx, "1")


@kit_test(
    "2.02-authorisation-vintage-before-2021",
    2,
    "§5.6, §5.5.2",
    "an authorisation from vintage 2020: 4002",
    ("buyer",),
)
async def t_b_auth_2020(ctx: Context) -> None:
    reply = await ctx.link.send(ctx.statement("OLD", vintage_from=2020))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_VINTAGE_BEFORE_2021, "vintage_from 2020", recorded=True
    )


@kit_test(
    "2.03-authorisation-not-acquiring",
    2,
    "§5.6",
    "an authorisation not naming the target: 4001",
    ("buyer",),
)
async def t_b_auth_other(ctx: Context) -> None:
    other = other_party(ctx.kit, ctx.target)
    reply = await ctx.link.send(ctx.statement("OTHER", acquiring_parties=[other]))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_NOT_ACQUIRING_PARTY, "other acquiring party", recorded=True
    )


@kit_test(
    "2.04-authorisation-conflict",
    2,
    "§5.6",
    "a recorded version sent again with other terms: 3009",
    ("buyer",),
)
async def t_b_auth_conflict(ctx: Context) -> None:
    reply = await ctx.link.send(ctx.statement("1", vintage_to=2029))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_AUTHORISATION_CONFLICT, "conflicting version", recorded=True
    )


@kit_test("2.05-issuance-acknowledged", 2, "§5.7", "an issuance notice is acknowledged", ("buyer",))
async def t_b_issuance(ctx: Context) -> None:
    blocks = ctx.new_blocks(5_000, ctx.needs("auth", "2.01"))
    notice = ctx.issuance(f"{ctx.kit}-I-{ctx.nonce}-1", blocks)
    reply = await ctx.link.send(notice)
    ack = ctx.expect(reply, issuance_pb2.IssuanceAcknowledgement, "issuance notice")
    check(ack.issuance_id == notice.issuance_id, f"acknowledgement names {ack.issuance_id!r}")


@kit_test(
    "2.06-issuance-unknown-authorisation",
    2,
    "§5.7",
    "an issuance under an unknown authorisation: 3006",
    ("buyer",),
)
async def t_b_issuance_unknown(ctx: Context) -> None:
    ghost = ctx.statement("GHOST")
    ctx.authorisations[ghost.authorisation_id] = ghost  # known to the kit only
    blocks = ctx.new_blocks(10, ghost.authorisation_id)
    reply = await ctx.link.send(ctx.issuance(f"{ctx.kit}-I-{ctx.nonce}-2", blocks))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_UNKNOWN_AUTHORISATION, "unknown authorisation", recorded=True
    )


@kit_test(
    "2.07-authorisation-revoked",
    2,
    "§5.6",
    "the next version with the same terms and revoked set is acknowledged",
    ("buyer",),
)
async def t_b_revocation(ctx: Context) -> None:
    revoked = await _authorise_at_target(ctx, "REV")
    statement = ctx.statement("REV", version=2, revoked=True)
    reply = await ctx.link.send(statement)
    ack = ctx.expect(reply, authorisation_pb2.AuthorisationAcknowledgement, "revocation")
    check(ack.version == 2, f"the acknowledgement names version {ack.version}, not 2")
    ctx.notes["revoked_auth"] = revoked


@kit_test(
    "2.08-authorisation-amended",
    2,
    "§5.6",
    "an amendment (next version) is acknowledged; a version gap (4015) or an amendment of a "
    "revoked authorisation (4014) is not",
    ("buyer",),
)
async def t_b_amendment(ctx: Context) -> None:
    amended = await _authorise_at_target(ctx, "AMD")
    reply = await ctx.link.send(ctx.statement("AMD", version=2, vintage_to=2026))
    ack = ctx.expect(reply, authorisation_pb2.AuthorisationAcknowledgement, "amendment")
    check(ack.version == 2, f"the acknowledgement names version {ack.version}, not 2")
    ctx.authorisations[amended] = ctx.statement("AMD", version=2, vintage_to=2026)
    ctx.notes["amended_auth"] = amended
    reply = await ctx.link.send(ctx.statement("AMD", version=4, vintage_to=2025))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_AMENDMENT_NOT_ALLOWED, "version 4 after 2", recorded=True
    )
    reply = await ctx.link.send(ctx.statement("REV", version=3, vintage_to=2029))
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_AUTHORISATION_REVOKED, "amending a revoked one", recorded=True
    )


# ======================================================================================
# Stage 2, target = host: the target authorises and issues (driver), the kit acknowledges
# ======================================================================================

CAP = 50_000
ISSUED = 20_000
VINTAGE = 2025


def _incoming_after(ctx: Context, cls: type[Message], seen: int) -> list[Incoming]:
    return ctx.server.of_type(cls)[seen:]


async def _driver(ctx: Context, action: str, **values: object) -> bool:
    result = await ctx.driver.run(action, **values)
    return result.ok


def _require_ok(ok: bool, action: str, ctx: Context) -> None:
    if not ok:
        last = ctx.driver.log[-1]
        raise CheckFailed(
            f"driver action {action} failed (exit {last.returncode}): {last.output.strip()[-500:]}"
        )


def _unstored(ctx: Context, incoming: Incoming, answer: Message, *, corrupt: bool = False) -> bytes:
    """A sealed reply the kit's server returns once without recording it."""
    answer.header.CopyFrom(ctx.link.header(in_reply_to=incoming.message_id))  # type: ignore[attr-defined]
    _, envelope = ctx.link.seal(answer)
    return flip_signature(envelope, -1, 0x80) if corrupt else envelope


@kit_test(
    "2.01-statement-received",
    2,
    "§5.6, §4.7",
    "the target's authorisation reaches the kit, well formed",
    ("host",),
)
async def t_h_statement(ctx: Context) -> None:
    name = str(authorisation_pb2.AuthorisationStatement.DESCRIPTOR.full_name)
    deliveries: list[Incoming] = []

    def policy(incoming: Incoming) -> Message | bytes | None:
        deliveries.append(incoming)
        n = len(deliveries)
        if n == 1:
            return None  # gRPC UNAVAILABLE: the target must deliver again (§7.1)
        if n == 2:  # answers another message: the target must not apply it (§5.3 P7)
            wrong = default_answer(incoming)
            assert wrong is not None
            wrong.header.CopyFrom(ctx.link.header(in_reply_to=str(uuid.uuid4())))  # type: ignore[attr-defined]
            return ctx.link.seal(wrong)[1]
        if n == 3:  # a signature that does not verify (§5.3 P2)
            ack = default_answer(incoming)
            assert ack is not None
            return _unstored(ctx, incoming, ack, corrupt=True)
        return default_answer(incoming)

    ctx.server.policies[name] = policy
    _require_ok(
        await _driver(
            ctx, "authorise", activity_id=f"{ctx.target}-CONF-{ctx.nonce}",
            cooperative_approach_id=f"{ctx.target}-{ctx.kit}-CONF", vintage_from=2021,
            vintage_to=2030, cap=CAP,
        ),
        "authorise", ctx,
    )  # fmt: skip
    got = await ctx.server.wait_for(lambda: len(deliveries) >= 1, ctx.config.act_within_seconds)
    check(got, "no AuthorisationStatement reached the kit after the driver's authorise")
    statement = deliveries[0].message
    assert isinstance(statement, authorisation_pb2.AuthorisationStatement)
    check(not deliveries[0].problems, f"statement header: {'; '.join(deliveries[0].problems)}")
    check(statement.host_party == ctx.target, f"host_party {statement.host_party!r}")
    check(
        statement.authorisation_id.startswith(f"{ctx.target}-"),
        f"authorisation id {statement.authorisation_id!r} must start with '{ctx.target}-' (§1.5)",
    )
    check(statement.version == 1, f"a new authorisation is version 1, got {statement.version}")
    check(ctx.kit in statement.acquiring_parties, "the statement does not name the kit")
    check(
        (statement.vintage_from, statement.vintage_to, statement.quantity_cap) == (2021, 2030, CAP),
        "vintages or cap differ from what the driver asked for: "
        f"{statement.vintage_from}-{statement.vintage_to}, cap {statement.quantity_cap}",
    )
    ctx.notes["statement_deliveries"] = deliveries
    ctx.authorisations[statement.authorisation_id] = statement
    ctx.notes["auth"] = statement.authorisation_id


@kit_test(
    "2.02-statement-redelivered",
    2,
    "§7.1, §5.3",
    "unanswered or badly answered, the statement is delivered again, byte for byte",
    ("host",),
)
async def t_h_redelivery(ctx: Context) -> None:
    deliveries: list[Incoming] = ctx.needs("statement_deliveries", "2.01")
    got = await ctx.server.wait_for(lambda: len(deliveries) >= 4, ctx.config.act_within_seconds)
    check(
        got,
        f"the statement was delivered {len(deliveries)} time(s): after gRPC UNAVAILABLE, a reply "
        "answering another message and a reply with a bad signature, it must be delivered "
        "again each time",
    )
    check(
        all(d.raw == deliveries[0].raw for d in deliveries),
        "a retry must carry the same envelope bytes as the first delivery (§7.1)",
    )


@kit_test(
    "2.03-issuance-notice",
    2,
    "§5.7, §6.7",
    "an issuance reaches the kit with the authorisation's attributes",
    ("host",),
)
async def t_h_issuance(ctx: Context) -> None:
    seen = len(ctx.server.of_type(issuance_pb2.IssuanceNotice))
    _require_ok(
        await _driver(
            ctx,
            "issue",
            authorisation_id=ctx.needs("auth", "2.01"),
            vintage=VINTAGE,
            quantity=ISSUED,
        ),
        "issue",
        ctx,
    )
    got = await ctx.server.wait_for(
        lambda: _incoming_after(ctx, issuance_pb2.IssuanceNotice, seen),
        ctx.config.act_within_seconds,
    )
    check(got, "no IssuanceNotice reached the kit after the driver's issue")
    incoming = got[0]
    notice = incoming.message
    assert isinstance(notice, issuance_pb2.IssuanceNotice)
    check(not incoming.problems, f"notice header: {'; '.join(incoming.problems)}")
    statement = ctx.authorisations[ctx.notes["auth"]]
    blocks = [block_from_pb(b) for b in notice.blocks]
    check(blocks, "the notice carries no blocks")
    check(
        sum(b.quantity for b in blocks) == notice.quantity == ISSUED,
        f"notice quantity {notice.quantity}, blocks {sum(b.quantity for b in blocks)}, "
        f"issued {ISSUED}",
    )
    _check_blocks(ctx, blocks, statement, VINTAGE)


def _check_blocks(
    ctx: Context,
    blocks: list[Block],
    statement: authorisation_pb2.AuthorisationStatement,
    vintage: int,
) -> None:
    for b in blocks:
        check(
            b.originating_registry == ctx.config.target_card.registry,
            f"block {b.label()} does not come from the target's registry",
        )
        expected = (
            statement.authorisation_id, statement.activity.activity_id,
            statement.cooperative_approach_id, ctx.target, int(statement.unit_type), vintage,
        )  # fmt: skip
        actual = (
            b.authorisation_id, b.activity_id, b.cooperative_approach_id,
            b.first_transferring_party, int(b.unit_type), b.vintage,
        )  # fmt: skip
        check(actual == expected, f"block {b.label()} attributes {actual}, expected {expected}")


@kit_test(
    "2.04-issue-over-cap-refused",
    2,
    "§5.6, §6.7",
    "the target refuses to issue beyond the authorisation's cap",
    ("host",),
)
async def t_h_cap(ctx: Context) -> None:
    seen = len(ctx.server.of_type(issuance_pb2.IssuanceNotice))
    ok = await _driver(
        ctx, "issue", authorisation_id=ctx.needs("auth", "2.01"), vintage=VINTAGE,
        quantity=CAP - ISSUED + 1,
    )  # fmt: skip
    arrived = await ctx.server.wait_for(
        lambda: _incoming_after(ctx, issuance_pb2.IssuanceNotice, seen), 1.5
    )
    check(not arrived, f"an IssuanceNotice beyond the cap of {CAP} tCO2e reached the kit")
    check(not ok, f"the driver's issue of {CAP - ISSUED + 1} tCO2e over a cap of {CAP} succeeded")


@kit_test(
    "2.05-authorise-before-2021-refused",
    2,
    "§5.6, §5.5.2",
    "the target refuses to authorise vintages before 2021",
    ("host",),
)
async def t_h_2020(ctx: Context) -> None:
    seen = len(ctx.server.of_type(authorisation_pb2.AuthorisationStatement))
    ok = await _driver(
        ctx, "authorise", activity_id=f"{ctx.target}-CONF-{ctx.nonce}-OLD",
        cooperative_approach_id=f"{ctx.target}-{ctx.kit}-CONF", vintage_from=2020,
        vintage_to=2030, cap=0,
    )  # fmt: skip
    arrived = await ctx.server.wait_for(
        lambda: _incoming_after(ctx, authorisation_pb2.AuthorisationStatement, seen), 1.5
    )
    check(not arrived, "an AuthorisationStatement for vintage 2020 reached the kit")
    check(not ok, "the driver's authorise from vintage 2020 succeeded")


# ======================================================================================
# Stage 3, target = buyer: the kit proposes, completes and voids
# ======================================================================================


async def _propose(
    ctx: Context, quantity: int, **kwargs: object
) -> tuple[KitTransfer, bytes, Reply]:
    blocks = ctx.new_blocks(quantity, ctx.needs("auth", "2.01"))
    proposal = ctx.proposal(blocks, **kwargs)  # type: ignore[arg-type]
    payload, envelope = ctx.link.seal(proposal)
    record = ctx.record_outgoing(proposal, payload, blocks)
    reply = await ctx.link.deliver_raw(envelope)
    return record, envelope, reply


def _accepted(ctx: Context, record: KitTransfer, reply: object, what: str) -> None:
    acceptance = ctx.expect(reply, transfer_pb2.TransferAcceptance, what)  # type: ignore[arg-type]
    check(
        acceptance.transfer_id == record.transfer_id, f"acceptance names {acceptance.transfer_id!r}"
    )
    check(
        acceptance.proposal_digest == record.proposal_digest,
        "proposal_digest must be SHA-256 of the proposal payload as received (§5.8)",
    )
    if not record.one_round:
        check(
            not acceptance.completed and acceptance.adjustment_year == 0,
            f"{what}: an acceptance of a proposal that did not ask to complete on acceptance "
            f"says completed = {str(acceptance.completed).lower()}, adjustment_year = "
            f"{acceptance.adjustment_year}; only a proposal with complete_on_acceptance is "
            "completed in the step that accepts it, and a two-phase acceptance names no year "
            "(PROTOCOL §6.11)",
        )
    record.acceptance_digest = sha256(reply.payload)  # type: ignore[attr-defined]


async def _complete(ctx: Context, record: KitTransfer, what: str) -> tuple[bytes, Reply]:
    """Complete ``record``: (the completion's envelope, the target's receipt)."""
    completion = transfer_pb2.TransferCompletion(
        transfer_id=record.transfer_id,
        acceptance_digest=record.acceptance_digest,
        adjustment_year=record.blocks[0].vintage,
    )
    _, envelope = ctx.link.seal(completion)
    reply = await ctx.link.deliver_raw(envelope)
    receipt = ctx.expect(reply, transfer_pb2.TransferCompletionReceipt, what)
    check(receipt.transfer_id == record.transfer_id, f"receipt names {receipt.transfer_id!r}")
    check(
        receipt.adjustment_year == record.blocks[0].vintage,
        f"the receipt's adjustment_year is {receipt.adjustment_year}; the receiver books its "
        f"adjustment for vintage {record.blocks[0].vintage} (§5.9, §6.6)",
    )
    record.moved = record.final_at_target = True
    return envelope, reply


@kit_test(
    "3.01-transfer-completed",
    3,
    "§5.8, §5.9, §6.2",
    "proposal, acceptance, completion, receipt",
    ("buyer",),
)
async def t_b_transfer(ctx: Context) -> None:
    record, _, reply = await _propose(ctx, 1_000)
    _accepted(ctx, record, reply, "proposal")
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_ACCEPTED, "§6.4")
    await _complete(ctx, record, "completion")
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.4")
    ctx.notes["completed"] = record


@kit_test(
    "3.02-retries-same-reply",
    3,
    "§7.2",
    "a proposal and a completion delivered twice get their stored replies",
    ("buyer",),
)
async def t_b_retries(ctx: Context) -> None:
    record, envelope, reply = await _propose(ctx, 700)
    _accepted(ctx, record, reply, "proposal")
    again = await ctx.link.deliver_raw(envelope)
    check(
        again.ok and again.raw == reply.raw,
        f"the retried proposal got {again.describe()}, not the stored acceptance",
    )
    completion, receipt = await _complete(ctx, record, "completion")
    for attempt in ("retried", "retried again"):
        retry = await ctx.link.deliver_raw(completion)
        check(
            retry.ok and retry.raw == receipt.raw,
            f"the {attempt} completion got {retry.describe()}, not the stored receipt byte for "
            "byte",
        )


@kit_test(
    "3.03-completion-resealed",
    3,
    "§5.9, §7.2",
    "a completion sealed again (new message id) gets a receipt; the transfer stays COMPLETED",
    ("buyer",),
)
async def t_b_resealed(ctx: Context) -> None:
    record: KitTransfer = ctx.needs("completed", "3.01")
    await _complete(ctx, record, "completion sent again")
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.4")


@kit_test(
    "3.04-proposal-reused-message-id",
    3,
    "§5.2 D7",
    "a proposal reusing a message id with another payload: 5001, applied never",
    ("buyer",),
)
async def t_b_reused(ctx: Context) -> None:
    record, envelope, reply = await _propose(ctx, 300)
    _accepted(ctx, record, reply, "proposal")
    await _complete(ctx, record, "completion")
    first = envelope_pb2.Envelope()
    first.ParseFromString(envelope)
    original = transfer_pb2.TransferProposal()
    original.ParseFromString(first.payload)
    blocks = ctx.new_blocks(300, ctx.needs("auth", "2.01"))
    other = ctx.proposal(blocks)
    reply = await ctx.link.send(other, message_id=original.header.message_id)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_DUPLICATE_MESSAGE_CONFLICT, "reused id", recorded=False
    )
    await _expect_state(ctx, other.transfer_id, transfer_pb2.TRANSFER_STATE_UNKNOWN, "§5.2 D7")


async def _refused_proposal(
    ctx: Context, code: int, what: str, *, size: int = 100,
    blocks: list[Block] | None = None, **fields: object,
) -> KitTransfer:  # fmt: skip
    """A proposal the target refuses with ``code`` after recording it (§5.8: the
    transfer is final as REJECTED at the target, in its snapshots)."""
    blocks = blocks if blocks is not None else ctx.new_blocks(size, ctx.needs("auth", "2.01"))
    proposal = ctx.proposal(blocks, **fields)  # type: ignore[arg-type]
    payload, envelope = ctx.link.seal(proposal)
    record = ctx.record_outgoing(proposal, payload, blocks)
    reply = await ctx.link.deliver_raw(envelope)
    ctx.expect_rejection(reply, code, what, recorded=True)
    record.final_at_target, record.moved = True, False
    return record


@kit_test(
    "3.05-vintage-before-2021",
    3,
    "§5.5.2, §5.8 T3",
    "a proposal of vintage 2020 units: 4002",
    ("buyer",),
)
async def t_b_2020(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"), vintage=2020)
    record = await _refused_proposal(
        ctx, C.REJECTION_CODE_VINTAGE_BEFORE_2021, "vintage 2020", blocks=blocks
    )
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§5.2 D10")


@kit_test(
    "3.06-vintage-not-authorised",
    3,
    "§5.5.2, §5.8 T3",
    "a proposal of a vintage outside the authorisation: 4003",
    ("buyer",),
)
async def t_b_2031(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"), vintage=2031)
    await _refused_proposal(
        ctx, C.REJECTION_CODE_VINTAGE_NOT_AUTHORISED, "vintage 2031", blocks=blocks
    )


@kit_test(
    "3.07-unknown-authorisation",
    3,
    "§5.5.2, §5.8 T3",
    "a proposal under an authorisation never sent: 3006",
    ("buyer",),
)
async def t_b_unknown_auth(ctx: Context) -> None:
    ghost = ctx.statement("GHOST2")
    ctx.authorisations[ghost.authorisation_id] = ghost
    blocks = ctx.new_blocks(100, ghost.authorisation_id)
    await _refused_proposal(
        ctx, C.REJECTION_CODE_UNKNOWN_AUTHORISATION, "unknown authorisation", blocks=blocks
    )


@kit_test(
    "3.08-quantity-mismatch",
    3,
    "§5.5.2, §5.8 T3",
    "a quantity that is not the sum of the blocks: 3002",
    ("buyer",),
)
async def t_b_quantity(ctx: Context) -> None:
    await _refused_proposal(
        ctx, C.REJECTION_CODE_QUANTITY_MISMATCH, "quantity mismatch", size=100, quantity=101
    )


@kit_test(
    "3.09-foreign-origin",
    3,
    "§5.5.2 O1, §5.8 T3a",
    "blocks of another registry than the sender's: 3004",
    ("buyer",),
)
async def t_b_origin(ctx: Context) -> None:
    registry = ctx.config.target_card.registry
    blocks = [
        replace(b, originating_registry=registry)
        for b in ctx.new_blocks(100, ctx.needs("auth", "2.01"))
    ]
    await _refused_proposal(
        ctx, C.REJECTION_CODE_BLOCK_ATTRIBUTE_MISMATCH, "foreign origin", blocks=blocks
    )


@kit_test(
    "3.10-expired-proposal",
    3,
    "§5.8 T1b",
    "a proposal whose expires_at has long passed: 3011",
    ("buyer",),
)
async def t_b_expired(ctx: Context) -> None:
    await _refused_proposal(
        ctx,
        C.REJECTION_CODE_PROPOSAL_EXPIRED,
        "expired proposal",
        expires_in=-dt.timedelta(hours=1),
    )


@kit_test(
    "3.11-transfer-id-reused",
    3,
    "§5.8 T2",
    "a new proposal with a transfer id already used: 3008",
    ("buyer",),
)
async def t_b_reused_transfer(ctx: Context) -> None:
    done: KitTransfer = ctx.needs("completed", "3.01")
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"))
    proposal = ctx.proposal(blocks, transfer_id=done.transfer_id)
    reply = await ctx.link.send(proposal)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_TRANSFER_STATE_CONFLICT, "reused transfer id", recorded=True
    )
    await _expect_state(ctx, done.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§5.8 T2")


@kit_test(
    "3.12-foreign-transfer-id",
    3,
    "§1.5, §5.8 T1",
    "a transfer id without the sender's prefix: 2006, nothing recorded",
    ("buyer",),
)
async def t_b_foreign_id(ctx: Context) -> None:
    transfer_id = f"{ctx.target}-T-{ctx.nonce}-STOLEN"
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"))
    reply = await ctx.link.send(ctx.proposal(blocks, transfer_id=transfer_id))
    ctx.expect_rejection(reply, C.REJECTION_CODE_INVALID_IDENTIFIER, "foreign id", recorded=True)
    # The id is the target's own: recording it (even as REJECTED) would let a partner
    # take up the target's transfer ids.
    await _expect_state(ctx, transfer_id, transfer_pb2.TRANSFER_STATE_UNKNOWN, "§1.5, §5.8 T1")


@kit_test(
    "3.13-serials-already-held", 3, "§5.8 T4", "serials the target already holds: 3005", ("buyer",)
)
async def t_b_held(ctx: Context) -> None:
    done: KitTransfer = ctx.needs("completed", "3.01")
    await _refused_proposal(
        ctx, C.REJECTION_CODE_SERIALS_ALREADY_HELD, "held serials", blocks=list(done.blocks)
    )


@kit_test(
    "3.14-void-after-acceptance",
    3,
    "§5.10, §6.4",
    "a void after acceptance: nothing credited, the serials can come again",
    ("buyer",),
)
async def t_b_void(ctx: Context) -> None:
    record, _, reply = await _propose(ctx, 400)
    _accepted(ctx, record, reply, "proposal")
    void = transfer_pb2.TransferVoid(
        transfer_id=record.transfer_id, reason="conformance: time-out",
        proposal_sent_at=timestamp(record.proposed_at_us),
    )  # fmt: skip
    receipt = ctx.expect(await ctx.link.send(void), transfer_pb2.TransferVoidReceipt, "void")
    check(receipt.transfer_id == record.transfer_id, f"void receipt names {receipt.transfer_id!r}")
    record.final_at_target, record.moved, record.voided = True, False, True
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_VOIDED, "§6.4")
    # The units were never credited: the same serials are accepted in a new transfer.
    proposal = ctx.proposal(list(record.blocks))
    payload, envelope = ctx.link.seal(proposal)
    again = ctx.record_outgoing(proposal, payload, list(record.blocks))
    _accepted(ctx, again, await ctx.link.deliver_raw(envelope), "the voided serials proposed again")
    await _complete(ctx, again, "completion of the second proposal")


@kit_test(
    "3.15-completion-checks",
    3,
    "§5.9",
    "a completion of an unknown transfer (3007) or with a wrong digest (3010)",
    ("buyer",),
)
async def t_b_completion_checks(ctx: Context) -> None:
    unknown = transfer_pb2.TransferCompletion(
        transfer_id=f"{ctx.kit}-T-{ctx.nonce}-NONE",
        acceptance_digest=b"\x00" * 32,
        adjustment_year=2025,
    )
    ctx.expect_rejection(
        await ctx.link.send(unknown),
        C.REJECTION_CODE_UNKNOWN_TRANSFER,
        "unknown transfer",
        recorded=True,
    )
    record, _, reply = await _propose(ctx, 250)
    _accepted(ctx, record, reply, "proposal")
    wrong = transfer_pb2.TransferCompletion(
        transfer_id=record.transfer_id,
        acceptance_digest=sha256(b"not the acceptance"),
        adjustment_year=2025,
    )
    ctx.expect_rejection(
        await ctx.link.send(wrong), C.REJECTION_CODE_DIGEST_MISMATCH, "wrong digest", recorded=True
    )
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_ACCEPTED, "§5.9")
    await _complete(ctx, record, "the right completion after a wrong one")


@kit_test(
    "3.16-revoked-authorisation",
    3,
    "§5.6, §5.8 T2a",
    "a proposal under a revoked authorisation: 4014",
    ("buyer",),
)
async def t_b_revoked(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("revoked_auth", "2.07"))
    record = await _refused_proposal(
        ctx, C.REJECTION_CODE_AUTHORISATION_REVOKED, "revoked authorisation", blocks=blocks
    )
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§5.2 D10")


@kit_test(
    "3.17-void-rules",
    3,
    "§5.10 V1a, V3, V4",
    "a void before its proposal leaves a tombstone at the proposal's sent_at (the late "
    "proposal: 3008); a proposal_sent_at after the void's sent_at: 2010; a void of a "
    "completed transfer: 3008",
    ("buyer",),
)
async def t_b_void_rules(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"))
    proposal = ctx.proposal(blocks)
    # The proposal "was sent" a minute ago and is lost; its void says so (§5.10 V3).
    proposed_us = to_us(now_utc()) - 60_000_000
    void = transfer_pb2.TransferVoid(
        transfer_id=proposal.transfer_id, reason="conformance",
        proposal_sent_at=timestamp(proposed_us),
    )  # fmt: skip
    receipt = ctx.expect(await ctx.link.send(void), transfer_pb2.TransferVoidReceipt, "early void")
    check(receipt.transfer_id == proposal.transfer_id, f"receipt names {receipt.transfer_id!r}")
    tombstone = KitTransfer(
        proposal.transfer_id, ctx.kit, ctx.target, proposal.authorisation_id,
        final_at_target=True, voided=True, proposed_at_us=proposed_us,
    )  # fmt: skip
    ctx.transfers[tombstone.transfer_id] = tombstone
    await _expect_state(ctx, proposal.transfer_id, transfer_pb2.TRANSFER_STATE_VOIDED, "§5.10 V3")
    await _expect_tombstone_at(ctx, tombstone)
    # V1a: a void cannot place its proposal after itself.
    later = ctx.proposal(ctx.new_blocks(100, ctx.needs("auth", "2.01")))
    ahead = transfer_pb2.TransferVoid(
        transfer_id=later.transfer_id, reason="conformance",
        proposal_sent_at=timestamp(to_us(now_utc()) + 60_000_000),
    )  # fmt: skip
    ctx.expect_rejection(
        await ctx.link.send(ahead), C.REJECTION_CODE_INVALID_FIELD,
        "a void whose proposal_sent_at is after its own sent_at (§5.10 V1a)", recorded=True,
    )  # fmt: skip
    await _expect_state(ctx, later.transfer_id, transfer_pb2.TRANSFER_STATE_UNKNOWN, "§5.10 V1a")
    reply = await ctx.link.send(proposal)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_TRANSFER_STATE_CONFLICT, "a proposal after its void", recorded=True
    )
    done: KitTransfer = ctx.needs("completed", "3.01")
    late = transfer_pb2.TransferVoid(transfer_id=done.transfer_id, reason="conformance")
    ctx.expect_rejection(
        await ctx.link.send(late),
        C.REJECTION_CODE_TRANSFER_STATE_CONFLICT,
        "a void of a completed transfer",
        recorded=True,
    )
    await _expect_state(ctx, done.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§5.10 V4")


async def _expect_tombstone_at(ctx: Context, tombstone: KitTransfer) -> None:
    """The target's tombstone stands at the void's proposal_sent_at in its snapshots
    (§5.10 V3, §11.1): in the one cut 1 µs after it, not in the one cut at it."""
    for cut, present in ((tombstone.proposed_at_us + 1, True), (tombstone.proposed_at_us, False)):
        query = reconcile_pb2.ReconciliationQuery(
            reconciliation_id=str(uuid.uuid4()),
            snapshot_at=timestamp(cut),
            view=reconcile_pb2.RECONCILIATION_VIEW_BLOCKS,
            leaf_prefixes=[id_hash(tombstone.transfer_id)],
            leaf_definition=BLOCKS_LEAF_DEFINITION,
        )
        answer = ctx.expect(
            await ctx.link.send(query), reconcile_pb2.ReconciliationAnswer, "reconciliation query"
        )
        leaves = {leaf.transfer_id: leaf.digest for leaf in answer.leaves}
        where = "1 µs after" if present else "at"
        if present:
            check(
                leaves.get(tombstone.transfer_id) == tombstone.blocks_leaf(),
                f"the tombstone of {tombstone.transfer_id} is not in the snapshot cut {where} the "
                "void's proposal_sent_at with the leaf of a transfer that moved nothing "
                f"(§5.10 V3, §11.1): got {leaves.get(tombstone.transfer_id, b'').hex() or 'none'}",
            )
        else:
            check(
                tombstone.transfer_id not in leaves,
                f"the tombstone of {tombstone.transfer_id} is in the snapshot cut {where} the "
                "void's proposal_sent_at: its proposed_at must be that instant (§5.10 V3)",
            )


@kit_test(
    "3.18-amended-terms-apply",
    3,
    "§5.6, §5.5.2",
    "a proposal of a vintage the amendment removed: 4003",
    ("buyer",),
)
async def t_b_amended(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("amended_auth", "2.08"), vintage=2028)
    await _refused_proposal(
        ctx, C.REJECTION_CODE_VINTAGE_NOT_AUTHORISED, "vintage removed by amendment", blocks=blocks
    )


# ======================================================================================
# Stage 3, target = host: the target proposes (driver), the kit answers
# ======================================================================================


def _proposals_after(ctx: Context, seen: int) -> list[Incoming]:
    return _incoming_after(ctx, transfer_pb2.TransferProposal, seen)


async def _driver_propose(
    ctx: Context, quantity: int, policy: Callable[[Incoming], Message | bytes | None],
    timeout_seconds: int = 0, *, authorisation_id: str = "", first_transfer: bool = True,
) -> Incoming:  # fmt: skip
    """The target proposes (driver), under the run's NDC authorisation unless another is
    named; ``first_transfer``: whether the proposal is its units' first transfer."""
    name = str(transfer_pb2.TransferProposal.DESCRIPTOR.full_name)
    seen = len(ctx.server.of_type(transfer_pb2.TransferProposal))
    ctx.server.policies[name] = policy
    authorisation_id = authorisation_id or ctx.needs("auth", "2.01")
    _require_ok(
        await _driver(
            ctx, "propose_transfer", authorisation_id=authorisation_id, vintage=VINTAGE,
            quantity=quantity, timeout_seconds=timeout_seconds,
        ),
        "propose_transfer", ctx,
    )  # fmt: skip
    # Not a redelivery of a proposal the kit already knows (one left unanswered).
    got = await ctx.server.wait_for(
        lambda: [
            i for i in _proposals_after(ctx, seen)
            if i.message.transfer_id not in ctx.transfers  # type: ignore[attr-defined]
        ],
        ctx.config.act_within_seconds,
    )  # fmt: skip
    check(got, "no TransferProposal reached the kit after the driver's propose_transfer")
    incoming: Incoming = got[0]
    proposal = incoming.message
    assert isinstance(proposal, transfer_pb2.TransferProposal)
    check(not incoming.problems, f"proposal header: {'; '.join(incoming.problems)}")
    check(
        proposal.transfer_id.startswith(f"{ctx.target}-"),
        f"transfer id {proposal.transfer_id!r} must start with '{ctx.target}-' (§1.5)",
    )
    blocks = [block_from_pb(b) for b in proposal.blocks]
    check(blocks, "the proposal carries no blocks")
    check(
        proposal.quantity == quantity == sum(b.quantity for b in blocks),
        f"proposal quantity {proposal.quantity}, blocks {sum(b.quantity for b in blocks)}, "
        f"asked {quantity}",
    )
    _check_blocks(ctx, blocks, ctx.authorisations[authorisation_id], VINTAGE)
    check(proposal.HasField("expires_at"), "the proposal has no expires_at (§5.8 T1a)")
    check(
        timestamp_us(proposal.expires_at) > to_us(now_utc()) - 300_000_000,
        "the proposal expired before it was sent",
    )
    asks = ctx.config.asks_complete_on_acceptance
    check(
        proposal.complete_on_acceptance == asks,
        f"the target's proposal {'does not ask' if asks else 'asks'} the kit to complete on "
        f"acceptance, but the kit's [target] asks_complete_on_acceptance is {str(asks).lower()}: "
        "a sender asks a partner always or never (PROTOCOL §6.11 S1); state what the target "
        "does for the kit",
    )
    check(
        proposal.first_transfer == first_transfer,
        "a host's transfer of its NDC units is their first transfer (§5.8)"
        if first_transfer
        else "a transfer of units whose first transfer is their use is not their first "
        "transfer (§5.5.3, §5.8)",
    )
    record = KitTransfer(
        transfer_id=proposal.transfer_id, sender=ctx.target, receiver=ctx.kit,
        authorisation_id=proposal.authorisation_id, blocks=tuple(blocks),
        proposal_digest=sha256(incoming.payload),
        proposed_at_us=timestamp_us(proposal.header.sent_at), adjusted=first_transfer,
        one_round=proposal.complete_on_acceptance,
    )  # fmt: skip
    ctx.transfers[record.transfer_id] = record
    return incoming


def _completions_of(ctx: Context, transfer_id: str) -> list[Incoming]:
    return [
        i for i in ctx.server.of_type(transfer_pb2.TransferCompletion)
        if i.message.transfer_id == transfer_id  # type: ignore[attr-defined]
    ]  # fmt: skip


async def _wait_completion(ctx: Context, record: KitTransfer) -> None:
    got = await ctx.server.wait_for(
        lambda: _completions_of(ctx, record.transfer_id), ctx.config.act_within_seconds
    )
    check(
        got, f"no TransferCompletion of {record.transfer_id} reached the kit after its acceptance"
    )
    completion = got[0].message
    assert isinstance(completion, transfer_pb2.TransferCompletion)
    check(not got[0].problems, f"completion header: {'; '.join(got[0].problems)}")
    check(
        completion.acceptance_digest == record.acceptance_digest,
        "the completion's acceptance_digest is not SHA-256 of the kit's acceptance payload (§5.9)",
    )
    year = VINTAGE if record.adjusted else 0
    check(
        completion.adjustment_year == year,
        f"the completion's adjustment_year is {completion.adjustment_year}, the host books "
        + (f"its adjustment for vintage {VINTAGE}" if year else "no adjustment for it")
        + " (§5.9, §6.6)",
    )
    record.moved = record.final_at_target = True


def _accepting(ctx: Context, *, bad_first: int = 0) -> Callable[[Incoming], Message | bytes | None]:
    """Accept the proposal (after ``bad_first`` acceptances with a wrong digest)."""
    bad: list[Incoming] = []

    def policy(incoming: Incoming) -> Message | bytes | None:
        msg = incoming.message
        assert isinstance(msg, transfer_pb2.TransferProposal)
        if len(bad) < bad_first:
            bad.append(incoming)
            wrong = transfer_pb2.TransferAcceptance(
                transfer_id=msg.transfer_id, proposal_digest=sha256(b"another proposal")
            )
            return _unstored(ctx, incoming, wrong)
        answer = default_answer(incoming)
        assert isinstance(answer, transfer_pb2.TransferAcceptance)
        answer.header.CopyFrom(ctx.link.header(in_reply_to=incoming.message_id))
        payload, _ = ctx.link.seal(answer)
        record = ctx.transfers.get(msg.transfer_id)
        if record is not None:
            record.acceptance_digest = sha256(payload)
        ctx.notes.setdefault("acceptances", {})[msg.transfer_id] = sha256(payload)
        return answer

    return policy


@kit_test(
    "3.01-proposal-completed",
    3,
    "§5.8, §5.9, §6.2",
    "the target's proposal, the kit's acceptance, the target's completion",
    ("host",),
)
async def t_h_transfer(ctx: Context) -> None:
    incoming = await _driver_propose(ctx, 3_000, _accepting(ctx))
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    record.acceptance_digest = ctx.notes.get("acceptances", {}).get(record.transfer_id, b"")
    await _wait_completion(ctx, record)
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.3")
    ctx.notes["proposal-completed"] = incoming


@kit_test(
    "3.02-acceptance-digest-checked",
    3,
    "§5.8, §5.3",
    "an acceptance with a wrong proposal_digest is not applied",
    ("host",),
)
async def t_h_wrong_digest(ctx: Context) -> None:
    incoming = await _driver_propose(ctx, 1_500, _accepting(ctx, bad_first=1))
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    got = await ctx.server.wait_for(
        lambda: _completions_of(ctx, record.transfer_id), ctx.config.act_within_seconds
    )
    check(got, f"no TransferCompletion of {record.transfer_id} reached the kit")
    good = ctx.notes.get("acceptances", {}).get(record.transfer_id)
    check(
        good is not None,
        "the target completed the transfer on an acceptance whose proposal_digest is wrong "
        "instead of delivering the proposal again (§5.8: 3010, nothing applied)",
    )
    deliveries = [
        i for i in ctx.server.of_type(transfer_pb2.TransferProposal)
        if i.message.transfer_id == record.transfer_id  # type: ignore[attr-defined]
    ]  # fmt: skip
    check(
        all(d.raw == deliveries[0].raw for d in deliveries),
        "retries must carry the same bytes (§7.1)",
    )
    record.acceptance_digest = good
    await _wait_completion(ctx, record)


@kit_test(
    "3.03-rejection-final",
    3,
    "§5.8, §6.3",
    "a rejected proposal is not completed; its status is REJECTED",
    ("host",),
)
async def t_h_rejected(ctx: Context) -> None:
    def reject(incoming: Incoming) -> Message:
        msg = incoming.message
        return Rejection(
            subject_id=msg.transfer_id,  # type: ignore[attr-defined]
            envelope_digest=sha256(incoming.raw),
            reasons=[codes_pb2.RejectionReason(
                code=C.REJECTION_CODE_VINTAGE_OUTSIDE_NDC_PERIOD, detail="conformance: refused"
            )],
        )  # fmt: skip

    incoming = await _driver_propose(ctx, 1_000, reject)
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    record.final_at_target = True
    await ctx.server.wait_for(lambda: False, 1.0)
    check(not _completions_of(ctx, record.transfer_id), "the target completed a rejected transfer")
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§6.3")


@kit_test(
    "3.04-timeout-void",
    3,
    "§7.4, §5.10, §6.11 S4",
    "an unanswered proposal is voided after its time-out, with its sent_at; one that asks "
    "to complete on acceptance is not, but delivered again until answered",
    ("host",),
)
async def t_h_timeout(ctx: Context) -> None:
    if ctx.config.asks_complete_on_acceptance:
        await _one_round_never_voided(ctx)
        return
    timeout = 2
    incoming = await _driver_propose(ctx, 500, lambda incoming: None, timeout_seconds=timeout)
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    voids = await ctx.server.wait_for(
        lambda: [
            i for i in ctx.server.of_type(transfer_pb2.TransferVoid)
            if i.message.transfer_id == record.transfer_id  # type: ignore[attr-defined]
        ],
        ctx.config.act_within_seconds + 2,
    )  # fmt: skip
    check(voids, f"no TransferVoid of {record.transfer_id} reached the kit after its time-out")
    proposal = incoming.message
    assert isinstance(proposal, transfer_pb2.TransferProposal)
    void = voids[0].message
    assert isinstance(void, transfer_pb2.TransferVoid)
    _check_void_of(voids[0], proposal)
    # Measured twice: on the target's clock (the two sent_at) and on the kit's, with
    # slack for the delivery of the proposal.
    waited_us = timestamp_us(void.header.sent_at) - timestamp_us(proposal.header.sent_at)
    seen = voids[0].received_at - incoming.received_at
    check(
        waited_us >= (timeout - 0.1) * 1_000_000 and seen >= timeout / 2,
        f"the target voided {waited_us / 1e6:.2f} s after proposing by its clock "
        f"({seen:.2f} s apart at the kit), before the time-out of {timeout} s (§7.4)",
    )
    record.final_at_target = record.voided = True
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_VOIDED, "§6.3")
    check(not _completions_of(ctx, record.transfer_id), "the target completed a voided transfer")


async def _report(
    ctx: Context, transfer_id: str, *, records: bool = True
) -> transfer_pb2.TransferStatusReport:
    """The target's report on ``transfer_id``, asking for its records (or not)."""
    query = transfer_pb2.TransferStatusQuery(transfer_id=transfer_id, include_records=records)
    reply = await ctx.link.send(query)
    report = ctx.expect(reply, transfer_pb2.TransferStatusReport, f"status of {transfer_id}")
    check(
        report.transfer_id == transfer_id,
        f"status report names {report.transfer_id!r}, not {transfer_id!r}",
    )
    return report  # type: ignore[no-any-return]


def _check_records(
    report: transfer_pb2.TransferStatusReport,
    expected: list[bytes],
    completions: Sequence[bytes] = (),
    *,
    target_completes: Context | None = None,
) -> None:
    """The report carries ``expected`` (the proposal, the acceptance), then, when
    ``completions`` are given, one of them (the sender's, sealed more than once). With
    ``target_completes`` (the target is the sender), a third record the kit never
    received passes if it is a completion the target signed of this transfer, on the
    acceptance: one sealed again and not delivered yet (§5.11: any one)."""
    names = ["the proposal", "the acceptance", "the completion"]
    if completions:
        sent = list(report.records)
        chosen = completions[-1]
        if len(sent) == 3 and (
            sent[2] in completions
            or (
                target_completes is not None
                and _completes(target_completes, sent[2], report.transfer_id, expected[1])
            )
        ):
            chosen = sent[2]
        expected = [*expected, chosen]
    check(
        len(report.records) == len(expected),
        f"the report on {report.transfer_id} ({_state(report.state)}) carries "
        f"{len(report.records)} record(s); a final transfer's records are "
        f"{' and '.join(names[: len(expected)])} (§5.11)",
    )
    for number, (got, want) in enumerate(zip(report.records, expected, strict=True)):
        check(
            got == want,
            f"record {number + 1} of {report.transfer_id} is not {names[number]} envelope "
            "byte for byte as exchanged (§5.11: the journaled envelope, not a new one)",
        )


def _completes(ctx: Context, raw: bytes, transfer_id: str, acceptance: bytes) -> bool:
    """Whether ``raw`` is a completion the target signed of ``transfer_id`` on the
    acceptance envelope ``acceptance``."""
    try:
        verified = open_envelope(raw, ctx.link.trust, now_utc())
    except Rejected:
        return False
    if verified.payload_type != str(transfer_pb2.TransferCompletion.DESCRIPTOR.full_name):
        return False
    completion = transfer_pb2.TransferCompletion.FromString(verified.payload)
    accepted = envelope_pb2.Envelope.FromString(acceptance).payload
    return (
        verified.signer_party == ctx.target
        and completion.transfer_id == transfer_id
        and completion.acceptance_digest == sha256(accepted)
    )


@kit_test(
    "3.10-status-records",
    3,
    "§5.11, §7.9",
    "a status query with include_records about the transfer of 3.01: the target's proposal, "
    "the kit's acceptance and the target's completion, byte for byte",
    ("host",),
)
async def t_h_records(ctx: Context) -> None:
    incoming: Incoming = ctx.needs("proposal-completed", "3.01")
    acceptance = ctx.server.stored_reply(incoming.message_id)
    assert acceptance is not None
    transfer_id = incoming.message.transfer_id  # type: ignore[attr-defined]
    completions = [i.raw for i in _completions_of(ctx, transfer_id)]
    check(completions, f"no TransferCompletion of {transfer_id} reached the kit (3.01)")
    _check_records(
        await _report(ctx, transfer_id), [incoming.raw, acceptance], completions,
        target_completes=ctx,
    )  # fmt: skip


def _check_void_of(incoming: Incoming, proposal: transfer_pb2.TransferProposal) -> None:
    """The target's void of ``proposal`` is a well-formed request naming it, with the
    proposal's sent_at as its proposal_sent_at (§5.10 field 4)."""
    void = incoming.message
    assert isinstance(void, transfer_pb2.TransferVoid)
    check(not incoming.problems, f"void header: {'; '.join(incoming.problems)}")
    check(
        void.header.in_reply_to == "",
        f"the void names {void.header.in_reply_to!r} in in_reply_to: a request names none (§4.4)",
    )
    check(
        void.transfer_id == proposal.transfer_id,
        f"the void names {void.transfer_id!r}, not {proposal.transfer_id!r}",
    )
    check(
        void.HasField("proposal_sent_at")
        and timestamp_us(void.proposal_sent_at) == timestamp_us(proposal.header.sent_at),
        f"the void's proposal_sent_at is "
        f"{timestamp_us(void.proposal_sent_at) if void.HasField('proposal_sent_at') else 'unset'}"
        f", not the proposal's sent_at {timestamp_us(proposal.header.sent_at)} (§5.10)",
    )


@kit_test(
    "3.19-status-unknown",
    3,
    "§5.11",
    "a status query about a transfer never made: UNKNOWN",
    ("buyer",),
)
@kit_test(
    "3.05-status-unknown",
    3,
    "§5.11",
    "a status query about a transfer never made: UNKNOWN",
    ("host",),
)
async def t_status_unknown(ctx: Context) -> None:
    await _expect_state(
        ctx, f"{ctx.target}-T-{ctx.nonce}-NEVER", transfer_pb2.TRANSFER_STATE_UNKNOWN, "§5.11"
    )


@kit_test(
    "3.06-batch-completed",
    3,
    "§5.15, §6.10",
    "the target's batch of three: the item the kit rejects is REJECTED there, the others "
    "completed by one batch completion",
    ("host",),
)
async def t_h_batch(ctx: Context) -> None:
    if "propose_batch" not in ctx.config.driver:
        raise NotRunnable("no [driver] propose_batch command (optional, §13.3)")
    authorisation = ctx.needs("auth", "2.01")
    quantities = [300, 200, 100]
    proposals = ctx.server.of_type(transfer_pb2.TransferBatchProposal)
    completions = ctx.server.of_type(transfer_pb2.TransferBatchCompletion)
    seen, seen_completions = len(proposals), len(completions)
    answers: dict[str, bytes] = {}

    def policy(incoming: Incoming) -> Message:
        batch = incoming.message
        assert isinstance(batch, transfer_pb2.TransferBatchProposal)
        acceptance = transfer_pb2.TransferBatchAcceptance(
            header=ctx.link.header(in_reply_to=incoming.message_id),
            batch_id=batch.batch_id,
            proposal_digest=sha256(incoming.payload),
            items=[
                transfer_pb2.TransferBatchOutcome(transfer_id=item.transfer_id)
                if n != 1
                else transfer_pb2.TransferBatchOutcome(
                    transfer_id=item.transfer_id,
                    rejection=codes_pb2.RejectionReason(
                        code=C.REJECTION_CODE_SERIALS_ALREADY_HELD,
                        detail="conformance: the kit refuses the second transfer",
                    ),
                )
                for n, item in enumerate(batch.items)
            ],
        )
        payload, _ = ctx.link.seal(acceptance)
        answers[batch.batch_id] = sha256(payload)
        return acceptance

    ctx.server.policies[str(transfer_pb2.TransferBatchProposal.DESCRIPTOR.full_name)] = policy
    _require_ok(
        await _driver(
            ctx, "propose_batch", authorisation_id=authorisation, vintage=VINTAGE,
            quantities=",".join(str(q) for q in quantities), timeout_seconds=0,
        ),
        "propose_batch", ctx,
    )  # fmt: skip
    got = await ctx.server.wait_for(
        lambda: ctx.server.of_type(transfer_pb2.TransferBatchProposal)[seen:],
        ctx.config.act_within_seconds,
    )
    check(got, "no TransferBatchProposal reached the kit after the driver's propose_batch")
    incoming = got[0]
    batch = incoming.message
    assert isinstance(batch, transfer_pb2.TransferBatchProposal)
    check(not incoming.problems, f"batch proposal header: {'; '.join(incoming.problems)}")
    check(
        batch.batch_id.startswith(f"{ctx.target}-"),
        f"batch id {batch.batch_id!r} must start with '{ctx.target}-' (§5.15 B1)",
    )
    check(
        [item.quantity for item in batch.items] == quantities,
        f"the batch's quantities are {[i.quantity for i in batch.items]}, asked {quantities}",
    )
    records: list[KitTransfer] = []
    for item in batch.items:
        blocks = [block_from_pb(b) for b in item.blocks]
        check(
            sum(b.quantity for b in blocks) == item.quantity,
            f"item {item.transfer_id}: blocks add up to {sum(b.quantity for b in blocks)}",
        )
        _check_blocks(ctx, blocks, ctx.authorisations[ctx.notes["auth"]], VINTAGE)
        record = KitTransfer(
            transfer_id=item.transfer_id, sender=ctx.target, receiver=ctx.kit,
            authorisation_id=item.authorisation_id, blocks=tuple(blocks),
            proposal_digest=sha256(incoming.payload),
            proposed_at_us=timestamp_us(batch.header.sent_at),
        )  # fmt: skip
        ctx.transfers[record.transfer_id] = record
        records.append(record)
    first, refused, last = records
    refused.final_at_target, refused.moved = True, False
    got = await ctx.server.wait_for(
        lambda: ctx.server.of_type(transfer_pb2.TransferBatchCompletion)[seen_completions:],
        ctx.config.act_within_seconds,
    )
    check(got, "no TransferBatchCompletion reached the kit after its batch acceptance")
    completion = got[0].message
    assert isinstance(completion, transfer_pb2.TransferBatchCompletion)
    check(not got[0].problems, f"batch completion header: {'; '.join(got[0].problems)}")
    check(
        completion.batch_id == batch.batch_id
        and completion.acceptance_digest == answers.get(batch.batch_id),
        "the batch completion must name the batch and carry SHA-256 of the kit's batch "
        "acceptance payload (§5.15)",
    )
    listed = [(i.transfer_id, i.adjustment_year) for i in completion.items]
    check(
        listed == [(first.transfer_id, VINTAGE), (last.transfer_id, VINTAGE)],
        f"the batch completion lists {listed}; expected the two accepted transfers, each "
        f"with the year of the host's adjustment, {VINTAGE}, and not the rejected one (§5.15)",
    )
    for record in (first, last):
        record.acceptance_digest = answers[batch.batch_id]
        record.moved = record.final_at_target = True
        await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.3")
    await _expect_state(ctx, refused.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§6.3")


def _batch(
    ctx: Context, items: list[tuple[list[Block], dict[str, object]]], *, suffix: str,
    expires_in: dt.timedelta = dt.timedelta(minutes=10),
) -> transfer_pb2.TransferBatchProposal:  # fmt: skip
    """A batch proposal of the kit (§5.15): one item per (blocks, field overrides)."""
    expires = dt.datetime.now(dt.UTC) + expires_in
    return transfer_pb2.TransferBatchProposal(
        batch_id=f"{ctx.kit}-B-{ctx.nonce}-{suffix}",
        expires_at=timestamp(to_us(expires)),
        items=[
            transfer_pb2.TransferBatchItem(
                **{  # type: ignore[arg-type]
                    "transfer_id": ctx.new_transfer_id(),
                    "authorisation_id": blocks[0].authorisation_id,
                    "quantity": sum(b.quantity for b in blocks),
                    "blocks": [block_to_pb(b) for b in blocks],
                    "first_transfer": True,
                    **overrides,
                }
            )
            for blocks, overrides in items
        ],
    )  # fmt: skip


def _record_batch(
    ctx: Context, batch: transfer_pb2.TransferBatchProposal, payload: bytes,
    blocks: list[list[Block]],
) -> list[KitTransfer]:  # fmt: skip
    """The kit's record of each transfer of a batch: the batch's digests are its own."""
    records = []
    for item, item_blocks in zip(batch.items, blocks, strict=True):
        record = KitTransfer(
            transfer_id=item.transfer_id, sender=ctx.kit, receiver=ctx.target,
            authorisation_id=item.authorisation_id, blocks=tuple(item_blocks),
            proposal_digest=sha256(payload),
            proposed_at_us=timestamp_us(batch.header.sent_at),
        )  # fmt: skip
        ctx.transfers[record.transfer_id] = record
        records.append(record)
    return records


@kit_test(
    "3.07-first-transfer-notice",
    3,
    "§5.14, §6.6",
    "OIMP units first transferred at use: the kit's notice is acknowledged with the "
    "adjustment's year; the same serials again: 4013; other attributes: 3004; serials "
    "that never left: 3007",
    ("host",),
)
async def t_h_first_transfer_notice(ctx: Context) -> None:
    if "authorise_oimp_at_use" not in ctx.config.driver:
        raise NotRunnable("no [driver] authorise_oimp_at_use command (optional, §13.3)")
    statements = str(authorisation_pb2.AuthorisationStatement.DESCRIPTOR.full_name)
    ctx.server.policies[statements] = default_answer
    seen = len(ctx.server.of_type(authorisation_pb2.AuthorisationStatement))
    _require_ok(
        await _driver(
            ctx, "authorise_oimp_at_use", activity_id=f"{ctx.target}-CONF-USE-{ctx.nonce}",
            cooperative_approach_id=f"{ctx.target}-{ctx.kit}-CONF", vintage_from=2021,
            vintage_to=2030, cap=CAP, oimp_detail="CORSIA",
        ),
        "authorise_oimp_at_use", ctx,
    )  # fmt: skip
    got = await ctx.server.wait_for(
        lambda: _incoming_after(ctx, authorisation_pb2.AuthorisationStatement, seen),
        ctx.config.act_within_seconds,
    )
    check(got, "no AuthorisationStatement reached the kit after authorise_oimp_at_use")
    statement = got[0].message
    assert isinstance(statement, authorisation_pb2.AuthorisationStatement)
    check(
        statement.first_transfer_definition
        == common_pb2.FIRST_TRANSFER_DEFINITION_AT_USE_OR_CANCELLATION,
        f"the statement's first_transfer_definition is {statement.first_transfer_definition}, "
        "not at use or cancellation",
    )
    authorisation_id = str(statement.authorisation_id)
    ctx.authorisations[authorisation_id] = statement
    seen = len(ctx.server.of_type(issuance_pb2.IssuanceNotice))
    _require_ok(
        await _driver(
            ctx, "issue", authorisation_id=authorisation_id, vintage=VINTAGE, quantity=1_000
        ),
        "issue", ctx,
    )  # fmt: skip
    check(
        await ctx.server.wait_for(
            lambda: _incoming_after(ctx, issuance_pb2.IssuanceNotice, seen),
            ctx.config.act_within_seconds,
        ),
        "no IssuanceNotice reached the kit for the OIMP authorisation",
    )
    incoming = await _driver_propose(
        ctx, 600, _accepting(ctx), authorisation_id=authorisation_id, first_transfer=False
    )
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    record.acceptance_digest = ctx.notes.get("acceptances", {}).get(record.transfer_id, b"")
    await _wait_completion(ctx, record)
    # 100 units used for CORSIA, and 10 more of the same block named with another vintage.
    first = next((b for b in record.blocks if b.quantity >= 110), None)
    if first is None:
        raise NotRunnable("the target's transfer of 600 units carries no block of 110 or more")
    used = replace(first, serial_end=first.serial_start + 99)

    def notice(suffix: str, *blocks: Block) -> use_pb2.FirstTransferNotice:
        return use_pb2.FirstTransferNotice(
            notice_id=f"{ctx.kit}-U-{ctx.nonce}-{suffix}",
            blocks=[block_to_pb(b) for b in blocks],
            oimp_purpose="CORSIA",
        )

    ack = ctx.expect(
        await ctx.link.send(notice("1", used)),
        use_pb2.FirstTransferNoticeAcknowledgement,
        "a first-transfer notice of units the target transferred to the kit",
    )
    check(ack.notice_id == f"{ctx.kit}-U-{ctx.nonce}-1", f"acknowledgement names {ack.notice_id!r}")
    check(
        ack.adjustment_year == VINTAGE,
        f"the acknowledgement's adjustment_year is {ack.adjustment_year}: the host books its "
        f"adjustment for vintage {VINTAGE} (§5.14, §6.6)",
    )
    ctx.expect_rejection(
        await ctx.link.send(notice("2", used)), C.REJECTION_CODE_ALREADY_FIRST_TRANSFERRED,
        "the same serials in another notice", recorded=True,
    )  # fmt: skip
    rest = replace(first, serial_start=used.serial_end + 1, serial_end=used.serial_end + 10)
    ctx.expect_rejection(
        await ctx.link.send(notice("3", replace(rest, vintage=VINTAGE + 1))),
        C.REJECTION_CODE_BLOCK_ATTRIBUTE_MISMATCH,
        "serials the target transferred, of another vintage than it transferred",
        recorded=True,
    )
    last = max(record.blocks, key=lambda b: b.serial_end)
    never = replace(last, serial_start=last.serial_end + 1, serial_end=last.serial_end + 10)
    ctx.expect_rejection(
        await ctx.link.send(notice("4", never)), C.REJECTION_CODE_UNKNOWN_TRANSFER,
        "serials that never left the target's registry", recorded=True,
    )  # fmt: skip


@kit_test(
    "3.20-batch-transfer",
    3,
    "§5.15, §6.10",
    "a batch: each item accepted or rejected on its own, one completion, per-item receipt",
    ("buyer",),
)
async def t_b_batch(ctx: Context) -> None:
    authorisation = ctx.needs("auth", "2.01")
    blocks = [
        ctx.new_blocks(300, authorisation),
        ctx.new_blocks(100, authorisation, vintage=2020),  # refused alone: 4002
        ctx.new_blocks(200, authorisation),
    ]
    batch = _batch(ctx, [(b, {}) for b in blocks], suffix="1")
    payload, envelope = ctx.link.seal(batch)
    first, refused, last = _record_batch(ctx, batch, payload, blocks)
    reply = await ctx.link.deliver_raw(envelope)
    acceptance = ctx.expect(reply, transfer_pb2.TransferBatchAcceptance, "batch proposal")
    check(acceptance.batch_id == batch.batch_id, f"acceptance names {acceptance.batch_id!r}")
    check(
        acceptance.proposal_digest == sha256(payload),
        "proposal_digest must be SHA-256 of the batch proposal's payload as received (§5.15)",
    )
    outcomes = [(o.transfer_id, o.rejection.code) for o in acceptance.items]
    wanted = [
        (first.transfer_id, 0),
        (refused.transfer_id, C.REJECTION_CODE_VINTAGE_BEFORE_2021),
        (last.transfer_id, 0),
    ]
    check(
        outcomes == wanted,
        f"the batch's outcomes are {outcomes}; expected one per item, in order, the item of "
        f"vintage 2020 alone rejected with 4002 (§5.15): {wanted}",
    )
    acceptance_digest = sha256(reply.payload)
    for record in (first, last):
        record.acceptance_digest = acceptance_digest
    refused.final_at_target, refused.moved = True, False
    await _expect_state(ctx, first.transfer_id, transfer_pb2.TRANSFER_STATE_ACCEPTED, "§5.15")
    await _expect_state(ctx, refused.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§5.15")
    completion = transfer_pb2.TransferBatchCompletion(
        batch_id=batch.batch_id,
        acceptance_digest=acceptance_digest,
        items=[
            transfer_pb2.TransferBatchCompletionItem(
                transfer_id=r.transfer_id, adjustment_year=2025
            )
            for r in (first, last)
        ],
    )
    completed = await ctx.link.send(completion)
    receipt = ctx.expect(completed, transfer_pb2.TransferBatchCompletionReceipt, "batch completion")
    answered = [(o.transfer_id, o.adjustment_year, o.HasField("rejection")) for o in receipt.items]
    check(
        answered == [(first.transfer_id, 2025, False), (last.transfer_id, 2025, False)],
        f"the receipt's items are {answered}; expected each completed item with the year of "
        "the receiver's adjustment, 2025 (§5.15, §6.6)",
    )
    for record in (first, last):
        record.moved = record.final_at_target = True
        await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§5.15")
    # A completion of one batched transfer, alone, names the batch's acceptance (§5.15).
    await _complete(ctx, first, "a TransferCompletion of one transfer of the batch")
    await _expect_state(ctx, first.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§5.15")
    ctx.notes["batch-completed"] = (
        last.transfer_id,
        refused.transfer_id,
        envelope,
        reply.raw,
        completed.sent,
    )


@kit_test(
    "3.21-batch-refused-whole",
    3,
    "§5.15 B2, §5.13",
    "an expired batch: 3011, every item REJECTED; over 1,000 items: 2011, unrecorded",
    ("buyer",),
)
async def t_b_batch_refused(ctx: Context) -> None:
    authorisation = ctx.needs("auth", "2.01")
    blocks = [ctx.new_blocks(50, authorisation), ctx.new_blocks(60, authorisation)]
    batch = _batch(ctx, [(b, {}) for b in blocks], suffix="2", expires_in=-dt.timedelta(hours=1))
    payload, envelope = ctx.link.seal(batch)
    records = _record_batch(ctx, batch, payload, blocks)
    ctx.expect_rejection(
        await ctx.link.deliver_raw(envelope), C.REJECTION_CODE_PROPOSAL_EXPIRED, "expired batch",
        recorded=True,
    )  # fmt: skip
    for record in records:
        record.final_at_target, record.moved = True, False
        await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§5.15")
    one = ctx.new_blocks(1, authorisation)
    huge = _batch(ctx, [(one, {})] * 1_001, suffix="3")
    ctx.expect_rejection(
        await ctx.link.send(huge), C.REJECTION_CODE_TOO_MANY_ITEMS, "a batch of 1,001 transfers",
        recorded=False,
    )  # fmt: skip
    await _expect_state(
        ctx, huge.items[0].transfer_id, transfer_pb2.TRANSFER_STATE_UNKNOWN, "§5.15"
    )


@kit_test(
    "3.22-transfer-budget",
    3,
    "§2.5, §5.2 D8b, §5.15",
    "over its agreed transfer budget the target refuses a batch whole with RESOURCE_EXHAUSTED "
    "and 2009, no reply, nothing recorded; the same batch is taken once the budget refilled",
    ("buyer",),
)
async def t_b_transfer_budget(ctx: Context) -> None:
    rate, burst = ctx.config.transfer_items_per_second, ctx.config.transfer_items_burst
    if not (rate and burst):
        raise NotRunnable(
            "no [target] transfer_items_per_second and transfer_items_burst in the configuration"
        )
    authorisation = ctx.needs("auth", "2.01")
    # Expired batches of 1,000 items: each takes 1,000 transfers of the budget at D8b,
    # before B2 refuses it whole (3011, every item recorded REJECTED), so the target
    # records rejections only. More items at once than a full budget plus a second of
    # refill; a target that takes longer than that to answer them may refill in between.
    count = -(-(burst + rate) // 1_000) + 1
    batches = []
    for n in range(count):
        blocks = [ctx.new_blocks(1, authorisation) for _ in range(1_000)]
        batch = _batch(
            ctx, [(b, {}) for b in blocks], suffix=f"budget-{n}",
            expires_in=-dt.timedelta(hours=1),
        )  # fmt: skip
        payload, envelope = ctx.link.seal(batch)
        batches.append((batch, payload, envelope, blocks))
    replies = await asyncio.gather(*(ctx.link.deliver_raw(b[2]) for b in batches))
    over = [
        (batch, reply)
        for batch, reply in zip(batches, replies, strict=True)
        if reply.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    check(
        over,
        f"{count} batches of 1,000 transfers at once, over a budget of {burst} (refilled at "
        f"{rate} a second): none was refused (§2.5, §5.2 D8b)",
    )
    for (batch, payload, _, blocks), reply in zip(batches, replies, strict=True):
        if reply.status == grpc.StatusCode.RESOURCE_EXHAUSTED:
            _check_rate_limited(reply, "a batch over the transfer budget")
            continue
        ctx.expect_rejection(
            reply, C.REJECTION_CODE_PROPOSAL_EXPIRED, "an expired batch within the budget",
            recorded=True,
        )  # fmt: skip
        for record in _record_batch(ctx, batch, payload, blocks):
            record.final_at_target, record.moved = True, False
    (batch, payload, envelope, blocks), refused = over[0]
    # Nothing of the refused batch was recorded: its first transfer is unknown, and the
    # same bytes, once the budget has refilled, get a reply sealed after a query sent in
    # between, not a reply stored earlier (§5.2 D8b, §7.2).
    await asyncio.sleep(1_000 / rate + 0.2)
    await _expect_state(
        ctx, batch.items[0].transfer_id, transfer_pb2.TRANSFER_STATE_UNKNOWN, "§5.2 D8b"
    )
    probe = ctx.expect(
        await ctx.link.send(_status_query(ctx)), transfer_pb2.TransferStatusReport, "a new query"
    )
    again = ctx.expect_rejection(
        await ctx.link.deliver_raw(refused.sent), C.REJECTION_CODE_PROPOSAL_EXPIRED,
        "the refused batch sent again once the budget refilled", recorded=True,
    )  # fmt: skip
    check(
        again.header.sequence > probe.header.sequence,
        f"the refused batch sent again got reply sequence {again.header.sequence}, older than "
        f"{probe.header.sequence} of a query sent after it: a stored reply, so the batch "
        "refused over the budget was recorded (§5.2 D8b: nothing of it may be)",
    )
    for record in _record_batch(ctx, batch, payload, blocks):
        record.final_at_target, record.moved = True, False
    # The other refused batches were not recorded either; the kit forgets them. Leave the
    # later tests (and a run that follows) a full budget.
    await asyncio.sleep(burst / rate)


# ======================================================================================
# Stage 3: the one-round transfer (PROTOCOL §6.11), both roles
# ======================================================================================


@kit_test(
    "3.23-one-round-proposal",
    3,
    "§6.11 R1, S3",
    "a proposal asking to complete on acceptance gets a signed acceptance: completed with the "
    "vintage as year if the target honours it, else a two-phase acceptance, which the kit "
    "completes",
    ("buyer",),
)
async def t_b_one_round(ctx: Context) -> None:
    record, envelope, reply = await _propose(ctx, 600, complete_on_acceptance=True)
    _accepted(ctx, record, reply, "a one-round proposal")
    acceptance = reply.message
    assert isinstance(acceptance, transfer_pb2.TransferAcceptance)
    year = record.blocks[0].vintage
    said = (
        f"completed = {str(acceptance.completed).lower()}, "
        f"adjustment_year = {acceptance.adjustment_year}"
    )
    if ctx.config.completes_on_acceptance:
        check(
            acceptance.completed and acceptance.adjustment_year == year,
            f"the acceptance of a one-round proposal says {said}; the target honours "
            "complete_on_acceptance ([target] completes_on_acceptance), so it completes in the "
            f"step that accepts: completed = true, adjustment_year = {year}, the year of the "
            "adjustment it booked (PROTOCOL §6.11 R1, §6.6)",
        )
        record.moved = record.final_at_target = True
        await _expect_state(
            ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.11 R1"
        )
    else:
        check(
            not acceptance.completed and acceptance.adjustment_year == 0,
            f"the acceptance of a one-round proposal says {said}; with [target] "
            "completes_on_acceptance false the kit expects a two-phase acceptance "
            "(completed = false, no year; PROTOCOL §6.11 S3): set it if the target honours "
            "complete_on_acceptance",
        )
        await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_ACCEPTED, "§6.4")
        await _complete(ctx, record, "the completion of a two-phase answer to a one-round proposal")
    ctx.notes["one_round"] = (record, envelope, reply)


@kit_test(
    "3.24-one-round-settled",
    3,
    "§6.11 R3, §5.9, §7.2",
    "after 3.23: the proposal's bytes again get the stored acceptance, a completion gets a "
    "receipt with the year, a void 3008; the transfer stays COMPLETED",
    ("buyer",),
)
async def t_b_one_round_settled(ctx: Context) -> None:
    record, envelope, reply = ctx.needs("one_round", "3.23")
    assert isinstance(record, KitTransfer)
    again = await ctx.link.deliver_raw(envelope)
    check(
        again.ok and again.raw == reply.raw,
        f"the one-round proposal delivered again got {again.describe()}, not the stored "
        "acceptance byte for byte (§7.2)",
    )
    await _complete(ctx, record, "a TransferCompletion of a transfer completed on acceptance")
    void = transfer_pb2.TransferVoid(
        transfer_id=record.transfer_id, reason="conformance",
        proposal_sent_at=timestamp(record.proposed_at_us),
    )  # fmt: skip
    ctx.expect_rejection(
        await ctx.link.send(void), C.REJECTION_CODE_TRANSFER_STATE_CONFLICT,
        "a void of a transfer completed on acceptance", recorded=True,
    )  # fmt: skip
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.11 R3")


@kit_test(
    "3.25-one-round-expired",
    3,
    "§6.11 R2, §5.8 T1b",
    "a one-round proposal past its expiry by more than the target's max_clock_skew_seconds: "
    "3011, recorded; the same bytes again get the same rejection; nothing completed",
    ("buyer",),
)
async def t_b_one_round_expired(ctx: Context) -> None:
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"))
    late = dt.timedelta(seconds=ctx.config.max_clock_skew_seconds + 60)
    proposal = ctx.proposal(blocks, expires_in=-late, complete_on_acceptance=True)
    payload, envelope = ctx.link.seal(proposal)
    record = ctx.record_outgoing(proposal, payload, blocks)
    reply = await ctx.link.deliver_raw(envelope)
    ctx.expect_rejection(
        reply, C.REJECTION_CODE_PROPOSAL_EXPIRED, "a one-round proposal past its expiry",
        recorded=True,
    )  # fmt: skip
    record.final_at_target, record.moved = True, False
    again = await ctx.link.deliver_raw(envelope)
    check(
        again.ok and again.raw == reply.raw,
        f"the expired one-round proposal delivered again got {again.describe()}, not the "
        "stored rejection byte for byte (§7.2: a recorded refusal is the proposal's answer; "
        "PROTOCOL §6.11 S4 relies on it)",
    )
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_REJECTED, "§5.2 D10")


def _of_transfer(ctx: Context, cls: type[Message], transfer_id: str) -> list[Incoming]:
    return [
        i for i in ctx.server.of_type(cls)
        if i.message.transfer_id == transfer_id  # type: ignore[attr-defined]
    ]  # fmt: skip


def _completing(
    ctx: Context, hold: Callable[[Incoming], bool] | None = None
) -> Callable[[Incoming], Message | bytes | None]:
    """Answer the target's proposal as a one-round receiver: completed, with the vintage
    as year (the kit credits and books in the step that accepts, PROTOCOL §6.11 R1).
    While ``hold(incoming)`` is true, refuse the delivery (UNAVAILABLE) instead."""

    def policy(incoming: Incoming) -> Message | bytes | None:
        if hold is not None and hold(incoming):
            return None
        msg = incoming.message
        assert isinstance(msg, transfer_pb2.TransferProposal)
        record = ctx.transfers.get(msg.transfer_id)
        answer = transfer_pb2.TransferAcceptance(
            header=ctx.link.header(in_reply_to=incoming.message_id),
            transfer_id=msg.transfer_id,
            proposal_digest=sha256(incoming.payload),
            completed=True,
            adjustment_year=VINTAGE if record is None or record.adjusted else 0,
        )
        payload, _ = ctx.link.seal(answer)
        ctx.notes.setdefault("acceptances", {})[msg.transfer_id] = sha256(payload)
        ctx.notes.setdefault("completed_on_acceptance", set()).add(msg.transfer_id)
        return answer

    return policy


def _completed_by_kit(ctx: Context, record: KitTransfer) -> bool:
    """Whether the kit answered ``record``'s proposal with completed = true (then it has
    moved, and the target must hold it as final)."""
    digest = ctx.notes.get("acceptances", {}).get(record.transfer_id)
    if digest is None:
        return False
    record.acceptance_digest = digest
    record.moved = record.final_at_target = True
    return True


async def _state_past(ctx: Context, transfer_id: str, waiting: int, every: float) -> int:
    """The target's state of ``transfer_id`` once what the kit sent is applied there (it
    may apply it after the call that carried it ended): polled every ``every`` seconds
    while it is ``waiting``, for at most ``[target] act_within_seconds``."""
    deadline = time.monotonic() + ctx.config.act_within_seconds
    while True:
        state = await _status(ctx, transfer_id)
        if state != waiting or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(every)


async def _settled_by_kit(ctx: Context, record: KitTransfer, started: float, what: str) -> None:
    """After the kit answered ``record``'s proposal with completed = true (at ``started``):
    for 2 s the target sends neither a completion (S2) nor a void (S4), then reports the
    transfer COMPLETED. Only then does the kit query its status: a completion the target
    sends in answer to that query (as for a receiver still waiting for one) is not counted,
    the receiver answers it with a receipt (PROTOCOL §6.11 R3)."""
    await asyncio.sleep(max(0.0, started + 2.0 - time.monotonic()))
    check(
        not _completions_of(ctx, record.transfer_id),
        f"the target sent a TransferCompletion of {record.transfer_id} after the kit's "
        f"acceptance with completed = true{what}: a sender that asked sends none "
        "(PROTOCOL §6.11 S2)",
    )
    voided = f"the target voided {record.transfer_id} after the kit's acceptance with "
    check(
        not _of_transfer(ctx, transfer_pb2.TransferVoid, record.transfer_id),
        f"{voided}completed = true{what} (PROTOCOL §6.11 S4)",
    )
    state = await _state_past(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_PROPOSED, 0.2)
    check(
        state == transfer_pb2.TRANSFER_STATE_COMPLETED,
        f"{record.transfer_id} is {_state(state)} at the target after the kit's acceptance "
        f"with completed = true{what}, not TRANSFER_STATE_COMPLETED (PROTOCOL §6.11 S2)",
    )
    check(
        not _of_transfer(ctx, transfer_pb2.TransferVoid, record.transfer_id),
        f"{voided}completed = true{what} (PROTOCOL §6.11 S4)",
    )


@kit_test(
    "3.08-one-round-answer",
    3,
    "§6.11 S1, S2, S6",
    "an acceptance saying completed: if the target asked, it records COMPLETED and sends no "
    "completion and no void; if not, it applies none of it and takes the two-phase "
    "acceptance the kit sends next",
    ("host",),
)
async def t_h_one_round(ctx: Context) -> None:
    if not ctx.config.asks_complete_on_acceptance:
        await _completed_unasked(ctx)
        return
    incoming = await _driver_propose(ctx, 800, _completing(ctx))
    started = time.monotonic()
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    check(_completed_by_kit(ctx, record), "the kit did not answer the target's proposal")
    await _settled_by_kit(ctx, record, started, "")


async def _completed_unasked(ctx: Context) -> None:
    """3.08 when the target does not ask: the kit first answers completed = true (signed,
    the right digest, not recorded); the target must apply none of it (2004, PROTOCOL
    §6.11 S6) and deliver the proposal again, which the kit accepts as usual."""
    ordinary = _accepting(ctx)
    claimed: list[Incoming] = []

    def policy(incoming: Incoming) -> Message | bytes | None:
        if claimed:
            return ordinary(incoming)
        claimed.append(incoming)
        msg = incoming.message
        assert isinstance(msg, transfer_pb2.TransferProposal)
        answer = transfer_pb2.TransferAcceptance(
            transfer_id=msg.transfer_id, proposal_digest=sha256(incoming.payload),
            completed=True, adjustment_year=VINTAGE,
        )  # fmt: skip
        return _unstored(ctx, incoming, answer)

    incoming = await _driver_propose(ctx, 900, policy)
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    await ctx.server.wait_for(
        lambda: _completions_of(ctx, record.transfer_id), ctx.config.act_within_seconds
    )
    good = ctx.notes.get("acceptances", {}).get(record.transfer_id)
    if good is None:
        state = _state(await _status(ctx, record.transfer_id))
        raise CheckFailed(
            "the target took the kit's acceptance saying completed = true, to a proposal that "
            "did not ask for it, instead of refusing it and delivering the proposal again "
            f"(PROTOCOL §6.11 S6: 2004, nothing applied); the transfer is {state} there"
        )
    record.acceptance_digest = good
    await _wait_completion(ctx, record)
    await _expect_state(ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_COMPLETED, "§6.3")


async def _one_round_never_voided(ctx: Context) -> None:
    """3.04 when the target asks to complete on acceptance: its proposal, unanswered past
    the time-out, is not voided but delivered again, byte for byte, and the kit's
    completed acceptance then settles it (PROTOCOL §6.11 S4, §7.1)."""
    timeout = 2
    first: list[float] = []

    def hold(incoming: Incoming) -> bool:
        # Unanswered until half a second past the time-out (on the kit's clock, from the
        # first delivery): a sender that voids on its time-out has voided by then.
        first.append(incoming.received_at)
        return incoming.received_at < first[0] + timeout + 0.5

    incoming = await _driver_propose(ctx, 600, _completing(ctx, hold), timeout_seconds=timeout)
    record = ctx.transfers[incoming.message.transfer_id]  # type: ignore[attr-defined]
    await ctx.server.wait_for(
        lambda: _completed_by_kit(ctx, record)
        or _of_transfer(ctx, transfer_pb2.TransferVoid, record.transfer_id),
        timeout + 0.5 + ctx.config.act_within_seconds,
    )  # fmt: skip
    check(
        not _of_transfer(ctx, transfer_pb2.TransferVoid, record.transfer_id),
        f"the target voided its one-round proposal {record.transfer_id} on its time-out of "
        f"{timeout} s: a sender that asked never voids (PROTOCOL §6.11 S4)",
    )
    check(
        _completed_by_kit(ctx, record),
        f"the target did not deliver its one-round proposal {record.transfer_id} again after "
        f"its time-out of {timeout} s (within {ctx.config.act_within_seconds:g} s): it keeps "
        "delivering it until an answer settles it (PROTOCOL §6.11 S4, §7.1)",
    )
    started = time.monotonic()
    deliveries = _of_transfer(ctx, transfer_pb2.TransferProposal, record.transfer_id)
    check(
        all(d.raw == deliveries[0].raw for d in deliveries),
        "the one-round proposal was delivered again with other bytes (§7.1)",
    )
    await _settled_by_kit(ctx, record, started, ", past its time-out")


# The driver time-out of the one-round proposals that test 3.09 leaves unanswered (their
# expires_at), and the slack the kit allows, on its own clock, for the first delivery of
# a proposal (which a loaded target may start late) when it checks that the void did not
# come too early (the exact check is on the target's clock: the void's sent_at against
# the proposal's expires_at).
WITHDRAWAL_TIMEOUT_SECONDS = 2
WITHDRAWAL_SLACK_SECONDS = 2.0
VOID = str(transfer_pb2.TransferVoid.DESCRIPTOR.full_name)


def _unreserved(ctx: Context, authorisation: str) -> int:
    """The units of the run's issuance under ``authorisation`` that the target should
    hold free now: those issued less those it moved or may still hold reserved (any
    transfer the kit does not know final there)."""
    taken = sum(
        b.quantity
        for r in ctx.transfers.values()
        if r.sender == ctx.target and r.authorisation_id == authorisation
        and (r.moved or not r.final_at_target)
        for b in r.blocks
    )  # fmt: skip
    return ISSUED - taken


async def _withdrawal_of(ctx: Context, incoming: Incoming) -> Incoming:
    """The target's void withdrawing the one-round proposal first delivered as
    ``incoming``, left unanswered: not before expires_at + 2 × max_clock_skew (on the
    target's clock, and on the kit's with some slack), within the target's grace and
    act_within_seconds after, well formed (PROTOCOL §6.11 S7, §5.10)."""
    proposal = incoming.message
    assert isinstance(proposal, transfer_pb2.TransferProposal)
    transfer_id = proposal.transfer_id
    lead = (timestamp_us(proposal.expires_at) - timestamp_us(proposal.header.sent_at)) / 1e6
    check(
        0 < lead <= WITHDRAWAL_TIMEOUT_SECONDS + CLOCK_MARGIN_SECONDS,
        f"the proposal of {transfer_id} expires {lead:.1f} s after its sent_at, but the "
        f"driver asked for a time-out of {WITHDRAWAL_TIMEOUT_SECONDS} s (§13.3)",
    )
    skew = ctx.config.max_clock_skew_seconds
    earliest = lead + 2 * skew  # seconds after the proposal was sent
    grace = ctx.config.withdrawal_grace_seconds
    within = (
        max(0.0, incoming.received_at + earliest - time.monotonic())
        + grace + ctx.config.act_within_seconds
    )  # fmt: skip
    voids = await ctx.server.wait_for(
        lambda: _of_transfer(ctx, transfer_pb2.TransferVoid, transfer_id), within
    )
    check(
        voids,
        f"no TransferVoid of the one-round transfer {transfer_id}, left unanswered, reached "
        f"the kit within {grace:g} s ([target] withdrawal_grace_seconds) and "
        f"{ctx.config.act_within_seconds:g} s more past its expires_at + 2 × "
        f"max_clock_skew_seconds ({skew} s): the target does not withdraw it (PROTOCOL "
        "§6.11 S7, a MAY: state [target] withdraws_one_round = false if it never does)",
    )
    void_in: Incoming = voids[0]
    void = void_in.message
    assert isinstance(void, transfer_pb2.TransferVoid)
    # Measured twice: on the target's clock (its void's sent_at against its proposal's
    # expires_at) and on the kit's (from the proposal's first delivery).
    after_us = timestamp_us(void.header.sent_at) - timestamp_us(proposal.expires_at)
    seen = void_in.received_at - incoming.received_at
    check(
        after_us >= 2 * skew * 1_000_000 and seen >= earliest - WITHDRAWAL_SLACK_SECONDS,
        f"the target withdrew its one-round proposal {transfer_id} {after_us / 1e6:.2f} s "
        f"after its expires_at by its clock ({seen:.2f} s after the proposal's first delivery "
        f"at the kit, which expired {lead:.2f} s after it was sent), before expires_at + 2 × "
        f"max_clock_skew_seconds ({2 * skew} s): the receiver may still complete it "
        "(PROTOCOL §6.11 S7)",
    )
    _check_void_of(void_in, proposal)
    return void_in


async def _still_proposed(ctx: Context, transfer_id: str, when: str) -> None:
    """The target holds ``transfer_id`` PROPOSED ``when`` (the kit's answer that
    settles it has not come yet): §6.11 S4, S7."""
    state = await _status(ctx, transfer_id)
    check(
        state == transfer_pb2.TRANSFER_STATE_PROPOSED,
        f"{transfer_id} is {_state(state)} at the target {when}, not "
        "TRANSFER_STATE_PROPOSED: a sender that asked settles a withdrawn one-round transfer "
        "only on the receiver's answer, the receipt of its void or, after a refusal with "
        "3008, a report of a final state it asked for; never on its own clock (PROTOCOL "
        "§6.11 S4, S7)",
    )


@kit_test(
    "3.09-one-round-withdrawn",
    3,
    "§6.11 S4, S7, §5.10, §5.11",
    "one-round proposals left unanswered are withdrawn past expires_at + 2 × "
    "max_clock_skew, not before, and stay PROPOSED until the kit answers: its receipt "
    "settles one VOIDED; after a 3008 the target asks, and a report of VOIDED settles the "
    "other; their units can be proposed again",
    ("host",),
)
async def t_h_withdrawn(ctx: Context) -> None:
    if not ctx.config.asks_complete_on_acceptance:
        raise NotRunnable(
            "the target's proposals to the kit do not ask to complete on acceptance "
            "([target] asks_complete_on_acceptance): only one-round proposals are withdrawn "
            "(§6.11 S7); 3.04 checks the two-phase time-out void"
        )
    if not ctx.config.withdraws_one_round:
        raise NotRunnable(
            "the target never withdraws a one-round proposal left unanswered "
            "([target] withdraws_one_round = false; §6.11 S7: a MAY)"
        )
    authorisation = ctx.needs("auth", "2.01")
    free = _unreserved(ctx, authorisation)
    check(free >= 2, f"the target should hold {free} units of {authorisation} free")
    # Two transfers left unanswered: the kit acknowledges the void of the first, refuses
    # that of the second with a recorded 3008 (as a receiver that voided it on an earlier
    # void whose receipt was lost) and reports it VOIDED when asked. A third transfer of
    # all their units then shows both released; the kit completes it on acceptance.
    withdrawn: list[str] = []
    completing = {"now": False}

    def hold(incoming: Incoming) -> bool:
        transfer_id = incoming.message.transfer_id  # type: ignore[attr-defined]
        return not completing["now"] or transfer_id in withdrawn

    proposals = _completing(ctx, hold)
    void_answers: dict[str, Message] = {}
    answered: dict[str, float] = {}
    reports: dict[str, transfer_pb2.TransferState.ValueType] = {}
    previous_void = ctx.server.policies.get(VOID, ctx.server.default_policy)
    previous_query = ctx.server.policies.get(STATUS_QUERY, ctx.server.default_policy)

    def void_policy(incoming: Incoming) -> Message | bytes | None:
        transfer_id = str(incoming.message.transfer_id)  # type: ignore[attr-defined]
        if transfer_id not in withdrawn:
            return previous_void(incoming)
        answer = void_answers.get(transfer_id)
        if answer is not None:
            answered.setdefault(transfer_id, time.monotonic())
        return answer  # None: unanswered (UNAVAILABLE) until the kit has looked

    def query_policy(incoming: Incoming) -> Message | bytes | None:
        transfer_id = str(incoming.message.transfer_id)  # type: ignore[attr-defined]
        if transfer_id not in withdrawn:
            return previous_query(incoming)
        state = reports.get(transfer_id)
        if state is None:
            return None
        return transfer_pb2.TransferStatusReport(transfer_id=transfer_id, state=state)

    ctx.server.policies[VOID] = void_policy
    ctx.server.policies[STATUS_QUERY] = query_policy
    try:
        first = await _driver_propose(
            ctx, free // 2, proposals, timeout_seconds=WITHDRAWAL_TIMEOUT_SECONDS
        )
        withdrawn.append(first.message.transfer_id)  # type: ignore[attr-defined]
        second = await _driver_propose(
            ctx, free - free // 2, proposals, timeout_seconds=WITHDRAWAL_TIMEOUT_SECONDS
        )
        withdrawn.append(second.message.transfer_id)  # type: ignore[attr-defined]
        received, refused = withdrawn
        for incoming in (first, second):
            await _withdrawal_of(ctx, incoming)
        for transfer_id in withdrawn:
            await _still_proposed(ctx, transfer_id, "while its void is unanswered")
        deliveries = _of_transfer(ctx, transfer_pb2.TransferProposal, received)
        check(
            all(d.raw == deliveries[0].raw for d in deliveries),
            "the one-round proposal was delivered again with other bytes (§7.1)",
        )
        void_answers[received] = transfer_pb2.TransferVoidReceipt(transfer_id=received)
        void_answers[refused] = Rejection(
            subject_id=refused,
            reasons=[codes_pb2.RejectionReason(
                code=C.REJECTION_CODE_TRANSFER_STATE_CONFLICT,
                detail="conformance: voided by an earlier void",
            )],
        )  # fmt: skip
        # The receipt settles the first (§5.10, §6.11 S7).
        await ctx.server.wait_for(lambda: received in answered, ctx.config.act_within_seconds)
        check(received in answered, f"the target did not deliver its void of {received} again")
        state = await _state_past(ctx, received, transfer_pb2.TRANSFER_STATE_PROPOSED, 0.2)
        check(
            state == transfer_pb2.TRANSFER_STATE_VOIDED,
            f"{received} is {_state(state)} at the target after the kit's receipt of its "
            "void, not TRANSFER_STATE_VOIDED (PROTOCOL §5.10, §6.11 S7)",
        )
        record = ctx.transfers[received]
        record.final_at_target = record.voided = True
        # The refusal settles nothing: the target asks, and settles on the report.
        await ctx.server.wait_for(lambda: refused in answered, ctx.config.act_within_seconds)
        check(refused in answered, f"the target did not deliver its void of {refused} again")
        await asyncio.sleep(REPORT_SETTLE_SECONDS)
        await _still_proposed(
            ctx, refused, "after the kit refused its void with 3008, before any report of the kit"
        )
        queries = await ctx.server.wait_for(
            lambda: [
                i for i in _status_queries(ctx, refused) if i.received_at >= answered[refused]
            ],
            ctx.config.act_within_seconds,
        )  # fmt: skip
        check(
            queries,
            f"no TransferStatusQuery about {refused} reached the kit within "
            f"{ctx.config.act_within_seconds:g} s of its refusal of the void with 3008: the "
            "sender asks which final state the receiver holds (PROTOCOL §6.11 S7, §5.11)",
        )
        _check_query(ctx, queries[0], refused)
        await _still_proposed(
            ctx, refused, "while its status query, after the refusal of its void, is unanswered"
        )
        record = ctx.transfers[refused]
        record.final_at_target = record.voided = True
        reports[refused] = transfer_pb2.TRANSFER_STATE_VOIDED
        state = await _state_past(ctx, refused, transfer_pb2.TRANSFER_STATE_PROPOSED, 0.2)
        check(
            state == transfer_pb2.TRANSFER_STATE_VOIDED,
            f"{refused} is {_state(state)} at the target after the kit refused its void with "
            "3008 and reported it TRANSFER_STATE_VOIDED, not TRANSFER_STATE_VOIDED (PROTOCOL "
            "§6.11 S7, §5.11)",
        )
        # Both released: all their units in one transfer, which the kit completes.
        completing["now"] = True
        try:
            again = await _driver_propose(ctx, free, proposals)
        except CheckFailed as exc:
            raise CheckFailed(
                f"the target could not propose again the {free} units of {received} and "
                f"{refused}, which it holds VOIDED: it did not release them (PROTOCOL §5.10, "
                f"§6.11 S7): {exc}"
            ) from None
        record = ctx.transfers[again.message.transfer_id]  # type: ignore[attr-defined]
        check(_completed_by_kit(ctx, record), "the kit did not answer the target's proposal")
        state = await _state_past(
            ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_PROPOSED, 0.2
        )
        check(
            state == transfer_pb2.TRANSFER_STATE_COMPLETED,
            f"{record.transfer_id} is {_state(state)} at the target after the kit's "
            "acceptance with completed = true, not TRANSFER_STATE_COMPLETED (§6.11 S2)",
        )
    finally:
        ctx.server.policies[VOID] = previous_void
        ctx.server.policies[STATUS_QUERY] = previous_query


# ======================================================================================
# Stage 3, target = buyer: its status queries about transfers left accepted (§7.7)
# ======================================================================================

# The least room the kit leaves, each way, between the expires_at of its proposals in
# 3.26 and the limits of the target's clock (G behind it, max_clock_skew_seconds ahead):
# the two clocks may differ.
CLOCK_MARGIN_SECONDS = 10.0
# A bounded wait, longer than the reference's outbox pass (at most a second, §7.4): the
# kit holds the target's first query about one transfer unanswered this long (no second
# query may come meanwhile), and watches this long after answering "not yet" about
# another (no new query may come within I). It is not the target's I, which is the
# reference's 60 s: the kit waits for the next query only when I is at most
# SECOND_QUERY_MAX_INTERVAL_SECONDS (a target set up for a quick run).
STATUS_HOLD_SECONDS = 1.0
STATUS_WATCH_SECONDS = 1.5
SECOND_QUERY_MAX_INTERVAL_SECONDS = 10.0
# How long after answering a query the kit gives the target to apply the report before
# it asks the transfer's state (the report is applied when its call ends, §5.3 P8).
REPORT_SETTLE_SECONDS = 0.3
STATUS_QUERY = str(transfer_pb2.TransferStatusQuery.DESCRIPTOR.full_name)


def left_waiting_expiry(config: KitConfig) -> tuple[dt.timedelta, float]:
    """(``expires_at`` of the kit's proposals in 3.26 from now, seconds after the target
    accepts them before it must ask about them). A transfer is left waiting once its
    ``expires_at`` is at or before now − G on the target's clock (§7.7), and T1b takes a
    proposal whose ``expires_at`` lies up to ``max_clock_skew_seconds`` back (§5.8). When
    there is room between the two, the proposals expire halfway between them in the past,
    so that the target must ask at once; else they expire 2 s ahead and G is waited out."""
    grace = config.status_query_grace_seconds
    skew = float(config.max_clock_skew_seconds)
    if skew - grace >= 2 * CLOCK_MARGIN_SECONDS:
        return -dt.timedelta(seconds=grace + (skew - grace) / 2), 0.0
    return dt.timedelta(seconds=2), 2 + grace


def _status_queries(ctx: Context, transfer_id: str) -> list[Incoming]:
    return _of_transfer(ctx, transfer_pb2.TransferStatusQuery, transfer_id)


def _check_query(ctx: Context, incoming: Incoming, transfer_id: str) -> None:
    """A status query of the target is a well-formed request (§4, §5.11, §5.13)."""
    what = f"the target's TransferStatusQuery about {transfer_id}"
    check(not incoming.problems, f"{what}: {'; '.join(incoming.problems)}")
    header = incoming.message.header  # type: ignore[attr-defined]
    check(
        header.in_reply_to == "",
        f"{what} names {header.in_reply_to!r} in in_reply_to: a request names none (§4.4)",
    )
    sent_us = timestamp_us(header.sent_at)
    now_us = to_us(now_utc())
    check(
        now_us - ctx.config.max_message_age_days * 86_400_000_000
        <= sent_us
        <= now_us + ctx.config.max_clock_skew_seconds * 1_000_000,
        f"{what} has sent_at {(sent_us - now_us) / 1e6:+.1f} s from the kit's clock, outside "
        "the window a responder takes (§4.6)",
    )


def _new_queries(ctx: Context, first: Incoming) -> list[Incoming]:
    """The target's queries about ``first``'s transfer other than ``first`` (its
    redeliveries carry the same bytes, §7.1)."""
    transfer_id = first.message.transfer_id  # type: ignore[attr-defined]
    return [i for i in _status_queries(ctx, transfer_id) if i.message_id != first.message_id]


def _check_interval(ctx: Context, first: Incoming, answered_at: float | None) -> None:
    """No new query about ``first``'s transfer while ``first`` was unanswered (the kit
    answered at ``answered_at``, on its clock), nor created less than I after it (by the
    two queries' sent_at, on the target's clock): §7.7."""
    transfer_id = first.message.transfer_id  # type: ignore[attr-defined]
    interval = ctx.config.status_query_interval_seconds
    for later in _new_queries(ctx, first):
        check(
            answered_at is not None and later.received_at > answered_at,
            f"the target sent a second TransferStatusQuery about {transfer_id} (message id "
            f"{later.message_id}) while its first one was unanswered: at most one query per "
            "transfer is outstanding, and an unanswered one is delivered again, byte for "
            "byte (§7.7, §7.1)",
        )
        apart = (
            timestamp_us(later.message.header.sent_at)  # type: ignore[attr-defined]
            - timestamp_us(first.message.header.sent_at)  # type: ignore[attr-defined]
        ) / 1e6
        check(
            apart >= interval - 0.001,
            f"the target asked again about {transfer_id} {apart:.2f} s after its first "
            f"TransferStatusQuery (by their sent_at), within its interval I of {interval:g} s "
            "([target] status_query_interval_seconds): at most one new query per transfer per "
            "interval (§7.7)",
        )


@kit_test(
    "3.26-status-queries",
    3,
    "§7.7, §5.11",
    "transfers the target accepted and the kit never completes, past expires_at + G: a "
    "well-formed TransferStatusQuery about each; reported VOIDED or UNKNOWN, the target "
    "voids (nothing credited); reported PROPOSED, or COMPLETED after the first query went "
    "unanswered, it keeps it ACCEPTED, asks nothing new within I, and takes the completion",
    ("buyer",),
)
async def t_b_status_queries(ctx: Context) -> None:
    expires_in, due = left_waiting_expiry(ctx.config)
    expiry = f"{expires_in.total_seconds():+g} s"
    # What the kit reports about each transfer: it voided one after its time-out (the
    # void lost), has no record of one, has not decided one (its time-out pass will come),
    # and completed one (the completion is on its way) but answers its query only once
    # the target has held it unanswered for STATUS_HOLD_SECONDS.
    plan = {
        "voided": transfer_pb2.TRANSFER_STATE_VOIDED,
        "unknown": transfer_pb2.TRANSFER_STATE_UNKNOWN,
        "proposed": transfer_pb2.TRANSFER_STATE_PROPOSED,
        "held": transfer_pb2.TRANSFER_STATE_COMPLETED,
    }
    auth = ctx.needs("auth", "2.01")
    proposals = {
        kind: ctx.proposal(ctx.new_blocks(100 + 10 * n, auth), expires_in=expires_in)
        for n, kind in enumerate(plan)
    }
    ids = {kind: proposal.transfer_id for kind, proposal in proposals.items()}
    answers = {ids[kind]: state for kind, state in plan.items()}
    answered: dict[str, float] = {}  # message id -> when the kit first answered it
    released: list[bool] = []
    previous = ctx.server.policies.get(STATUS_QUERY, ctx.server.default_policy)

    def policy(incoming: Incoming) -> Message | bytes | None:
        transfer_id = str(incoming.message.transfer_id)  # type: ignore[attr-defined]
        if transfer_id not in answers:
            return previous(incoming)
        if transfer_id == ids["held"] and not released:
            return None  # gRPC UNAVAILABLE: the target must deliver the same query again
        answered.setdefault(incoming.message_id, time.monotonic())
        return transfer_pb2.TransferStatusReport(
            transfer_id=transfer_id, state=answers[transfer_id]
        )

    ctx.server.policies[STATUS_QUERY] = policy
    try:
        records: dict[str, KitTransfer] = {}
        for kind, proposal in proposals.items():
            payload, envelope = ctx.link.seal(proposal)
            blocks = [block_from_pb(b) for b in proposal.blocks]
            records[kind] = ctx.record_outgoing(proposal, payload, blocks)
            reply = await ctx.link.deliver_raw(envelope)
            _accepted(ctx, records[kind], reply, f"a proposal expiring {expiry} from now")
        accepted_at = time.monotonic()
        within = due + ctx.config.act_within_seconds
        await ctx.server.wait_for(
            lambda: all(_status_queries(ctx, t) for t in answers), within
        )  # fmt: skip
        for transfer_id in ids.values():
            got = _status_queries(ctx, transfer_id)
            check(
                got,
                f"no TransferStatusQuery about {transfer_id} reached the kit within {within:g} "
                f"s after the target accepted it: the transfer is left waiting (ACCEPTED, "
                f"expires_at {expiry} from when the kit proposed it, so at or before now "
                f"- G with G = {ctx.config.status_query_grace_seconds:g} s, [target] "
                "status_query_grace_seconds) and the receiver must ask its sender (§7.7)",
            )
            _check_query(ctx, got[0], transfer_id)
        first = {kind: _status_queries(ctx, t)[0] for kind, t in ids.items()}

        # Reported VOIDED or UNKNOWN: the sender will never complete; the target voids.
        for kind in ("voided", "unknown"):
            record = records[kind]
            state = await _state_past(
                ctx, record.transfer_id, transfer_pb2.TRANSFER_STATE_ACCEPTED, 0.1
            )
            check(
                state == transfer_pb2.TRANSFER_STATE_VOIDED,
                f"{record.transfer_id} is {_state(state)} at the target "
                f"{ctx.config.act_within_seconds:g} s after the kit's signed report of "
                f"{_state(plan[kind])}, not TRANSFER_STATE_VOIDED: the sender will never "
                "complete it, so the receiver voids it (§5.11, §7.7)",
            )
            record.final_at_target, record.moved, record.voided = True, False, True
        # Nothing was credited: the same serials are accepted in a new transfer (T4).
        again_blocks = [b for kind in ("voided", "unknown") for b in records[kind].blocks]
        again = ctx.proposal(again_blocks)
        payload, envelope = ctx.link.seal(again)
        second = ctx.record_outgoing(again, payload, again_blocks)
        _accepted(
            ctx, second, await ctx.link.deliver_raw(envelope),
            "the serials of the transfers voided on the kit's reports, proposed again",
        )  # fmt: skip
        await _complete(ctx, second, "completion of the serials proposed again")

        # The held query: unanswered for STATUS_HOLD_SECONDS; only redeliveries may come.
        held = first["held"]
        await asyncio.sleep(max(0.0, held.received_at + STATUS_HOLD_SECONDS - time.monotonic()))
        _check_interval(ctx, held, None)
        released.append(True)
        got = await ctx.server.wait_for(
            lambda: held.message_id in answered, ctx.config.act_within_seconds
        )
        check(
            got,
            f"the target's TransferStatusQuery about {ids['held']}, unanswered (gRPC "
            f"UNAVAILABLE) for {STATUS_HOLD_SECONDS:g} s, was not delivered again within "
            f"{ctx.config.act_within_seconds:g} s: a request is retried until answered (§7.1, "
            "§7.7)",
        )
        check(
            all(i.raw == held.raw for i in _status_queries(ctx, ids["held"])
                if i.message_id == held.message_id),
            f"the TransferStatusQuery about {ids['held']} was delivered again with other "
            "bytes (§7.1)",
        )  # fmt: skip
        # Reported PROPOSED, or COMPLETED: the target keeps waiting, and asks nothing new
        # within I (watched for a bounded time, or until the next query when I is short).
        proposed = first["proposed"]
        end = max(
            answered.get(proposed.message_id, accepted_at) + STATUS_WATCH_SECONDS,
            answered[held.message_id] + REPORT_SETTLE_SECONDS,
        )
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for kind in ("voided", "unknown"):
            check(
                not _new_queries(ctx, first[kind]),
                f"the target asked again about {ids[kind]}, which it voided on the kit's "
                "report: nothing is sent after that (§5.11)",
            )
        for kind in ("proposed", "held"):
            _check_interval(ctx, first[kind], answered.get(first[kind].message_id))
            state = await _status(ctx, ids[kind])
            check(
                state == transfer_pb2.TRANSFER_STATE_ACCEPTED,
                f"{ids[kind]} is {_state(state)} at the target after the kit's signed report "
                f"of {_state(plan[kind])}, not TRANSFER_STATE_ACCEPTED: the sender may still "
                "complete it, so the receiver keeps waiting and asks again later (§5.11, §7.7)",
            )
        if ctx.config.status_query_interval_seconds <= SECOND_QUERY_MAX_INTERVAL_SECONDS:
            await _asked_again(ctx, proposed, answered)
        for kind in ("proposed", "held"):
            await _complete(ctx, records[kind], f"the completion of {ids[kind]} after the report")
            await _expect_state(ctx, ids[kind], transfer_pb2.TRANSFER_STATE_COMPLETED, "§5.9")
    finally:
        ctx.server.policies[STATUS_QUERY] = previous


async def _asked_again(ctx: Context, first: Incoming, answered: dict[str, float]) -> None:
    """With a short I: the target asks again about a transfer reported PROPOSED, once I
    has passed since its first query, and not before (§7.7)."""
    transfer_id = first.message.transfer_id  # type: ignore[attr-defined]
    interval = ctx.config.status_query_interval_seconds
    within = interval + ctx.config.act_within_seconds
    got = await ctx.server.wait_for(lambda: _new_queries(ctx, first), within)
    check(
        got,
        f"the target did not ask again about {transfer_id} within {within:g} s of its first "
        f"TransferStatusQuery, answered TRANSFER_STATE_PROPOSED: it asks again after its "
        f"interval I of {interval:g} s ([target] status_query_interval_seconds) while the "
        "transfer is left waiting (§7.7)",
    )
    _check_query(ctx, got[0], transfer_id)
    _check_interval(ctx, first, answered.get(first.message_id))


@kit_test(
    "3.27-status-records",
    3,
    "§5.11, §7.9",
    "a status query with include_records: none while the transfer is ACCEPTED or unasked; "
    "for the completed transfer, the kit's proposal, the target's acceptance and the kit's "
    "completion, byte for byte; "
    "for a rejected one, the proposal alone; for the items of the batch of 3.20, the batch's",
    ("buyer",),
)
async def t_b_records(ctx: Context) -> None:
    record, envelope, reply = await _propose(ctx, 400)
    _accepted(ctx, record, reply, "proposal")
    report = await _report(ctx, record.transfer_id)
    check(
        report.state == transfer_pb2.TRANSFER_STATE_ACCEPTED and not report.records,
        f"while {record.transfer_id} is {_state(report.state)} the report carries "
        f"{len(report.records)} record(s): records are only for a final transfer (§5.11)",
    )
    completion, _ = await _complete(ctx, record, "completion")
    report = await _report(ctx, record.transfer_id, records=False)
    check(
        report.state == transfer_pb2.TRANSFER_STATE_COMPLETED and not report.records,
        f"a query that did not ask got {len(report.records)} record(s) (§5.11)",
    )
    report = await _report(ctx, record.transfer_id)
    _check_records(report, [envelope, reply.raw], [completion])
    blocks = ctx.new_blocks(100, ctx.needs("auth", "2.01"), vintage=2020)
    proposal = ctx.proposal(blocks)
    payload, refused = ctx.link.seal(proposal)
    rejected = ctx.record_outgoing(proposal, payload, blocks)
    ctx.expect_rejection(
        await ctx.link.deliver_raw(refused), C.REJECTION_CODE_VINTAGE_BEFORE_2021,
        "vintage 2020", recorded=True,
    )  # fmt: skip
    rejected.final_at_target, rejected.moved = True, False
    report = await _report(ctx, rejected.transfer_id)
    check(
        report.state == transfer_pb2.TRANSFER_STATE_REJECTED,
        f"{rejected.transfer_id} is {_state(report.state)} at the target, not REJECTED",
    )
    _check_records(report, [refused])
    one_round = ctx.notes.get("one_round")
    if one_round is not None and ctx.config.completes_on_acceptance:
        # 3.23 passed: completed on acceptance, its records are the proposal and the
        # acceptance that completed it; no completion (the kit's of 3.24 decided nothing).
        completed_at_once, proposal_sent, acceptance_sent = one_round
        _check_records(
            await _report(ctx, completed_at_once.transfer_id), [proposal_sent, acceptance_sent.raw]
        )
    batch = ctx.notes.get("batch-completed")
    if batch is not None:  # 3.20 passed: an item's records are the batch's envelopes
        completed, rejected_item, batch_proposal, batch_acceptance, batch_completion = batch
        _check_records(
            await _report(ctx, completed), [batch_proposal, batch_acceptance], [batch_completion]
        )
        _check_records(await _report(ctx, rejected_item), [batch_proposal])


# ======================================================================================
# Stage 4: reconciliation (both roles)
# ======================================================================================


def _snapshot_at(ctx: Context) -> int:
    """The run's snapshot time T (µs), the same for every query of stage 4: after
    every proposal of this run (§11.1: proposed_at < T), whichever clock set its
    proposed_at (the target's own, in role host), and not before the kit's now."""
    if "snapshot_at" not in ctx.notes:
        latest = max((t.proposed_at_us for t in ctx.transfers.values()), default=0)
        ctx.notes["snapshot_at"] = max(to_us(now_utc()), latest + 1)
    return int(ctx.notes["snapshot_at"])


async def _query(ctx: Context, view: int, **fields: object) -> reconcile_pb2.ReconciliationAnswer:
    query = reconcile_pb2.ReconciliationQuery(
        reconciliation_id=ctx.notes.setdefault("reconciliation_id", str(uuid.uuid4())),
        snapshot_at=timestamp(_snapshot_at(ctx)),
        view=view,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )
    blocks = view == reconcile_pb2.RECONCILIATION_VIEW_BLOCKS
    if blocks:
        query.leaf_definition = BLOCKS_LEAF_DEFINITION
    reply = await ctx.link.send(query)
    answer = ctx.expect(reply, reconcile_pb2.ReconciliationAnswer, "reconciliation query")
    check(
        answer.reconciliation_id == query.reconciliation_id,
        f"answer names reconciliation {answer.reconciliation_id!r}",
    )
    check(
        not blocks or answer.leaf_definition == BLOCKS_LEAF_DEFINITION,
        f"blocks answer states leaf definition {answer.leaf_definition}, "
        f"not {BLOCKS_LEAF_DEFINITION} (§11.2)",
    )
    return answer  # type: ignore[no-any-return]


def _final(ctx: Context) -> list[KitTransfer]:
    return [t for t in ctx.transfers.values() if t.final_at_target]


async def _leaves(ctx: Context, view: int) -> dict[str, bytes]:
    ids = [t.transfer_id for t in _final(ctx)]
    leaves: dict[str, bytes] = {}
    for start in range(0, len(ids), 256):
        answer = await _query(
            ctx, view, leaf_prefixes=[id_hash(t) for t in ids[start : start + 256]]
        )
        leaves.update({leaf.transfer_id: bytes(leaf.digest) for leaf in answer.leaves})
    return leaves


@kit_test(
    "4.01-totals", 4, "§11.3", "the target's totals for this run's authorisations equal the kit's"
)
async def t_totals(ctx: Context) -> None:
    answer = await _query(ctx, reconcile_pb2.RECONCILIATION_VIEW_TOTALS)
    theirs: dict[tuple[str, int, int, str], tuple[int, int]] = {
        (t.sender_party, int(t.unit_type), t.vintage, t.authorisation_id): (t.quantity, t.transfers)
        for t in answer.totals
        if t.authorisation_id in ctx.authorisations
    }
    mine: dict[tuple[str, int, int, str], tuple[int, int]] = {}
    for record in _final(ctx):
        if not record.moved:
            continue
        keys = {
            (record.sender, int(b.unit_type), b.vintage, b.authorisation_id) for b in record.blocks
        }
        for key in keys:
            quantity = sum(
                b.quantity for b in record.blocks
                if (record.sender, int(b.unit_type), b.vintage, b.authorisation_id) == key
            )  # fmt: skip
            q, n = mine.get(key, (0, 0))
            mine[key] = (q + quantity, n + 1)
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    check(
        not differing,
        "totals differ: "
        + "; ".join(
            f"{k}: kit {mine.get(k, (0, 0))}, target {theirs.get(k, (0, 0))}" for k in differing
        ),
    )


def _adjustment_diagnosis(record: KitTransfer, got: bytes) -> str:
    """What the target booked for a completed transfer whose blocks leaf differs,
    when it is a wrong corresponding adjustment (§6.6). The target states its own
    role's entries from its ledger (§11.4), so each wrong booking is tried for
    either role, the other role's entries as expected."""
    expected = record.expected_adjustments()
    receiver = tuple(sorted((y, -a) for y, a in expected))
    for role, mine in (("sender", expected), ("receiver", receiver)):
        variants = {
            "no adjustment": (),
            "the adjustment twice": tuple(sorted(mine * 2)),
            "the adjustment with the wrong sign": tuple(sorted((y, -a) for y, a in mine)),
        }
        for name, booked in variants.items():
            facts = (
                record.facts(booked, receiver) if role == "sender"
                else record.facts(expected, booked)
            )  # fmt: skip
            if blocks_leaf(facts) == got:
                return (
                    f": the target books {name} (as the {role}; expected one entry per "
                    f"vintage, {mine})"
                )
    return ": other blocks or adjustments"


@kit_test(
    "4.02-blocks-leaves",
    4,
    "§11.4, §6.6",
    "every final transfer's blocks leaf equals the kit's (for a completed transfer, it holds "
    "the sender's and the receiver's corresponding adjustments, one per vintage each)",
)
async def t_blocks_leaves(ctx: Context) -> None:
    leaves = await _leaves(ctx, reconcile_pb2.RECONCILIATION_VIEW_BLOCKS)
    _compare_leaves(ctx, leaves, lambda r: r.blocks_leaf(), "blocks", _adjustment_diagnosis)


@kit_test("4.03-journal-leaves", 4, "§11.4", "every final transfer's journal leaf equals the kit's")
async def t_journal_leaves(ctx: Context) -> None:
    leaves = await _leaves(ctx, reconcile_pb2.RECONCILIATION_VIEW_JOURNAL)
    _compare_leaves(ctx, leaves, lambda r: r.journal_leaf(), "journal")


def _compare_leaves(
    ctx: Context,
    leaves: dict[str, bytes],
    mine: Callable[[KitTransfer], bytes],
    view: str,
    diagnose: Callable[[KitTransfer, bytes], str] | None = None,
) -> None:
    asked = {t.transfer_id for t in _final(ctx)}
    problems = []
    for record in _final(ctx):
        got = leaves.get(record.transfer_id)
        if got is None:
            problems.append(
                f"{record.transfer_id} is missing (not final, or unknown, at the target)"
            )
        elif got != mine(record):
            state = "moved" if record.moved else "not moved"
            why = diagnose(record, got) if diagnose is not None and record.moved else ""
            problems.append(f"{record.transfer_id} ({state}) differs{why}")
    extra = sorted(set(leaves) - asked)
    if extra:
        problems.append(f"leaves the kit did not ask for: {', '.join(extra[:5])}")
    check(not problems, f"{view} leaves: " + "; ".join(problems))


@kit_test(
    "4.04-bucket-summaries", 4, "§11.5", "bucket summaries (count, h1, h2) agree with the leaves"
)
async def t_buckets(ctx: Context) -> None:
    problems = []
    records = _final(ctx)
    answer = await _query(
        ctx, reconcile_pb2.RECONCILIATION_VIEW_BLOCKS,
        prefixes=[id_hash(r.transfer_id)[:63] for r in records][:256],
    )  # fmt: skip
    buckets = {b.prefix: b for b in answer.buckets}
    for record in records[:256]:
        bucket = buckets.get(id_hash(record.transfer_id))
        h1, h2 = slices(record.blocks_leaf())
        if bucket is None or (bucket.count, bucket.h1, bucket.h2) != (1, h1, h2):
            problems.append(
                f"{record.transfer_id}: bucket "
                f"{bucket and (bucket.count, bucket.h1, bucket.h2)}, expected {(1, h1, h2)}"
            )
    check(not problems, "; ".join(problems))


@kit_test(
    "4.05-query-checks",
    4,
    "§11.3 R1, R2, R6",
    "a query without a view (2010) or a snapshot (2003), or a blocks query of another leaf "
    "definition (2010), is rejected",
)
async def t_query_checks(ctx: Context) -> None:
    bad_view = reconcile_pb2.ReconciliationQuery(
        reconciliation_id=str(uuid.uuid4()),
        snapshot_at=timestamp(to_us(now_utc())),
        view=reconcile_pb2.RECONCILIATION_VIEW_UNSPECIFIED,
    )
    ctx.expect_rejection(
        await ctx.link.send(bad_view), C.REJECTION_CODE_INVALID_FIELD, "view 0", recorded=True
    )
    no_snapshot = reconcile_pb2.ReconciliationQuery(
        reconciliation_id=str(uuid.uuid4()), view=reconcile_pb2.RECONCILIATION_VIEW_TOTALS
    )
    ctx.expect_rejection(
        await ctx.link.send(no_snapshot),
        C.REJECTION_CODE_MISSING_FIELD,
        "no snapshot",
        recorded=True,
    )
    old_leaf = reconcile_pb2.ReconciliationQuery(  # as a node before schema 7 asks
        reconciliation_id=str(uuid.uuid4()),
        snapshot_at=timestamp(to_us(now_utc())),
        view=reconcile_pb2.RECONCILIATION_VIEW_BLOCKS,
        prefixes=[""],
    )
    ctx.expect_rejection(
        await ctx.link.send(old_leaf),
        C.REJECTION_CODE_INVALID_FIELD,
        "blocks query of no leaf definition",
        recorded=True,
    )
