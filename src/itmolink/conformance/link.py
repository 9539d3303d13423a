"""The kit's side of the link to the target: a mutual-TLS client that sends
signed requests and checks the signed replies, and a mutual-TLS server that
receives the target's requests and answers them as a partner registry would.

Nothing here reads the target's database: everything the kit learns about the
target comes through ``PartnerService.Deliver`` and ``DeliverBatch`` (and, for
target actions, the driver commands). The kit's own server serves ``Deliver``
only: a target that sends it several envelopes in one ``DeliverBatch`` call gets
UNIMPLEMENTED and must fall back to ``Deliver`` (PROTOCOL.md §2.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from itmolink.conformance.config import KitConfig
from itmolink.core.codes import Rejected
from itmolink.crypto.envelope import TrustStore, open_envelope, pae, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import (
    EXPECTED_REPLY,
    REQUEST_TYPES,
    Rejection,
    ReplyError,
    check_answers,
    check_reply_header,
    digest,
)
from itmolink.node.convert import timestamp, to_us
from itmolink.node.validation import validate
from itmolink.v1 import (
    authorisation_pb2,
    common_pb2,
    envelope_pb2,
    issuance_pb2,
    keys_pb2,
    partner_service_pb2,
    partner_service_pb2_grpc,
    transfer_pb2,
)

RPC_TIMEOUT_SECONDS = 10.0
# The field rules' bound on blocks in one message (the reference node's default, §5.13).
MAX_BLOCKS = 10_000
REJECTION_TYPE = str(Rejection.DESCRIPTOR.full_name)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# SHA-256 of bytes, as the protocol's digests use it (§5.4, §5.8): the node's own function.
sha256 = digest


def type_of(msg: Message) -> str:
    return str(msg.DESCRIPTOR.full_name)


@dataclass
class Reply:
    """The target's answer to one Deliver call."""

    sent: bytes  # the envelope the kit sent
    status: grpc.StatusCode
    details: str = ""
    raw: bytes = b""
    payload_type: str = ""
    payload: bytes = b""
    message: Message | None = None
    problems: list[str] = field(default_factory=list)
    # The trailing metadata of a call that ended with a non-OK status.
    trailing: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == grpc.StatusCode.OK

    @property
    def rejection_codes(self) -> list[int]:
        if isinstance(self.message, Rejection):
            return [int(r.code) for r in self.message.reasons]
        return []

    def describe(self) -> str:
        if not self.ok:
            return f"gRPC {self.status.name} ({self.details})"
        if isinstance(self.message, Rejection):
            reasons = ", ".join(f"{r.code} {r.detail!r}" for r in self.message.reasons)
            return f"Rejection [{reasons}]"
        return self.payload_type.removeprefix("itmolink.v1.") or "unreadable reply"


@dataclass
class BatchReply:
    """The target's answer to one DeliverBatch call: the call's status and, when OK,
    one :class:`Reply` per outcome (checked as in §5.3 against the envelope in the
    same position of the request)."""

    status: grpc.StatusCode
    details: str = ""
    replies: list[Reply] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == grpc.StatusCode.OK


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class Link:
    """The kit's client to the target (one mTLS channel) and its message sealing."""

    def __init__(self, config: KitConfig, target: str) -> None:
        self.config = config
        self.target = target
        self.key = config.signing_key()
        self.trust = TrustStore(config.target_card.signing_keys)
        for revoked in config.target_card.revoked_keys:  # as a node pins a card (§3.8)
            self.trust.revoke(revoked.key_id, revoked.compromised_since)
        # The link's sequence counter (§4.3: never reused, towards the target). A run
        # starts it at the current time in milliseconds, so a later run against the
        # same target continues above every sequence an earlier run used (a run sends
        # far fewer than 1,000 messages a second); the numbers still fit the signed
        # 64-bit columns of any ledger.
        self._sequence = int(time.time() * 1000)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    # -- channel -----------------------------------------------------------------------

    def credentials(self, cert: bytes | None = None, key: bytes | None = None) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=self.config.target_card.ca_certificate_pem,
            private_key=key if key is not None else self.config.keys.node_key.read_bytes(),
            certificate_chain=(
                cert if cert is not None else self.config.keys.node_certificate.read_bytes()
            ),
        )

    def _open(self) -> Any:
        if self._stub is None:
            self._channel = grpc.aio.secure_channel(self.target, self.credentials())
            self._stub = partner_service_pb2_grpc.PartnerServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel, self._stub = None, None

    # -- sealing -----------------------------------------------------------------------

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def header(self, *, in_reply_to: str = "", **overrides: Any) -> common_pb2.Header:
        fields: dict[str, Any] = dict(
            protocol_version=1,
            message_id=str(uuid.uuid4()),
            sender_party=self.config.party,
            sender_registry=self.config.registry,
            audience=self.config.target_party,
            sent_at=timestamp(to_us(now_utc())),
            in_reply_to=in_reply_to,
        )
        fields.update(overrides)
        if "sequence" not in fields:
            fields["sequence"] = self.next_sequence()
        return common_pb2.Header(**fields)

    def seal(
        self, msg: Message, *, key: SigningKey | None = None, **header: Any
    ) -> tuple[bytes, bytes]:
        """Give ``msg`` a fresh header (unless it has one) and sign it: (payload, envelope)."""
        if not msg.HasField("header"):
            msg.header.CopyFrom(self.header(**header))  # type: ignore[attr-defined]
        payload = msg.SerializeToString()
        return payload, seal(type_of(msg), payload, key or self.key)

    # -- delivery ----------------------------------------------------------------------

    async def deliver_raw(self, envelope: bytes, credentials: Any = None) -> Reply:
        """One Deliver call with exactly these bytes; the reply is checked as in §5.3."""
        if credentials is None:
            stub = self._open()
            channel = None
        else:
            channel = grpc.aio.secure_channel(self.target, credentials)
            stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
        try:
            call = stub.Deliver(
                partner_service_pb2.DeliverRequest(envelope=envelope),
                timeout=RPC_TIMEOUT_SECONDS,
            )
            response = await call
            raw = bytes(response.envelope)
        except grpc.aio.AioRpcError as exc:
            pairs: Any = exc.trailing_metadata() or ()  # (key, value) pairs
            trailing = {str(k): str(v) for k, v in pairs}
            return Reply(envelope, exc.code(), exc.details() or "", trailing=trailing)
        finally:
            if channel is not None:
                await channel.close(None)
        reply = Reply(envelope, grpc.StatusCode.OK, raw=raw)
        self._check_reply(reply)
        return reply

    async def deliver_batch(self, envelopes: list[bytes]) -> BatchReply:
        """One DeliverBatch call with exactly these envelopes (§2.6). Outcome i is
        checked as the reply to envelope i; extra outcomes are checked against no
        request (and so fail §5.3)."""
        stub = self._open()
        try:
            response = await stub.DeliverBatch(
                partner_service_pb2.DeliverBatchRequest(envelopes=envelopes),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            return BatchReply(exc.code(), exc.details() or "")
        batch = BatchReply(grpc.StatusCode.OK)
        for index, outcome in enumerate(response.outcomes):
            sent = envelopes[index] if index < len(envelopes) else b""
            kind = outcome.WhichOneof("outcome")
            if kind == "envelope":
                reply = Reply(sent, grpc.StatusCode.OK, raw=bytes(outcome.envelope))
                self._check_reply(reply)
            elif kind == "failure" and outcome.failure.code != 0:
                status = STATUS_BY_NUMBER.get(outcome.failure.code, grpc.StatusCode.UNKNOWN)
                reply = Reply(sent, status, outcome.failure.message)
            else:
                reply = Reply(sent, grpc.StatusCode.UNKNOWN, "an outcome with no reply or status")
                reply.problems.append("an outcome carries neither a reply nor a non-OK status")
            batch.replies.append(reply)
        return batch

    async def send(self, msg: Message, **seal_args: Any) -> Reply:
        """Seal ``msg`` (a fresh header unless it has one) and deliver it."""
        _, envelope = self.seal(msg, **seal_args)
        return await self.deliver_raw(envelope)

    def _check_reply(self, reply: Reply) -> None:
        """§5.3 P2 to P7 for a reply to the kit's request (as far as the kit can)."""
        try:
            verified = open_envelope(reply.raw, self.trust, now_utc())
        except Exception as exc:  # Rejected, or anything odd in the bytes
            reply.problems.append(f"reply envelope does not verify with the target's card: {exc}")
            return
        if verified.signer_party != self.config.target_party:
            reply.problems.append(f"reply signed by {verified.signer_party}")
        reply.payload_type, reply.payload = verified.payload_type, verified.payload
        request = self._request_of(reply.sent)
        expected = EXPECTED_REPLY.get(request[0]) if request else None
        if verified.payload_type == REJECTION_TYPE:
            message: Message = Rejection()
        elif expected is not None and verified.payload_type == str(expected.DESCRIPTOR.full_name):
            message = expected()
        else:
            reply.problems.append(f"{verified.payload_type} does not answer the request")
            return
        try:
            message.ParseFromString(verified.payload)
        except DecodeError as exc:
            reply.problems.append(f"reply payload does not parse: {exc}")
            return
        reply.message = message
        header: common_pb2.Header = message.header  # type: ignore[attr-defined]
        try:  # §5.3 P5a to P7: the node's own checks of a reply
            validate(message, max_blocks=MAX_BLOCKS)
            check_reply_header(header, sender=self.config.target_party, audience=self.config.party)
            check_answers(header, message, reply.sent, request[1] if request else "")
        except (Rejected, ReplyError) as exc:
            reply.problems.append(str(exc))
        if not header.message_id:
            reply.problems.append("reply has no message_id")
        if not header.in_reply_to and not (
            isinstance(message, Rejection) and message.envelope_digest
        ):
            # check_answers cannot tell this from a match when the kit's request has no id
            reply.problems.append(
                "the reply names no request: an empty in_reply_to needs a Rejection whose "
                "envelope_digest binds it to the request (§4.4, §5.4)"
            )

    @staticmethod
    def _request_of(envelope: bytes) -> tuple[str, str] | None:
        """(payload type, message id) of an envelope the kit sent, if it can be read."""
        try:
            env = envelope_pb2.Envelope()
            env.ParseFromString(envelope)
            cls = REQUEST_TYPES.get(env.payload_type)
            if cls is None:
                return (env.payload_type, "")
            msg = cls()
            msg.ParseFromString(env.payload)
            return (env.payload_type, msg.header.message_id)  # type: ignore[attr-defined]
        except (DecodeError, ValueError):
            return None


def flip_signature(envelope: bytes, index: int = 0, mask: int = 0x01) -> bytes:
    """``envelope`` with one bit of its first signature flipped: it no longer verifies."""
    env = envelope_pb2.Envelope()
    env.ParseFromString(envelope)
    sig = bytearray(env.signatures[0].sig)
    sig[index] ^= mask
    env.signatures[0].sig = bytes(sig)
    return env.SerializeToString()


# -- the kit's server: requests from the target ----------------------------------------


@dataclass
class Incoming:
    """One delivery of a request by the target to the kit."""

    raw: bytes
    payload_type: str
    payload: bytes
    message: Message
    received_at: float
    problems: list[str] = field(default_factory=list)

    @property
    def message_id(self) -> str:
        return str(self.message.header.message_id)  # type: ignore[attr-defined]


# What the kit does with a request: a reply message to seal (recorded: retries get
# the same bytes), an envelope already sealed (returned once, not recorded), or
# None to refuse the call with gRPC UNAVAILABLE (as if the kit were down).
Policy = Callable[[Incoming], Message | bytes | None]


class KitServer(partner_service_pb2_grpc.PartnerServiceServicer):
    """The kit's PartnerService: mutual TLS with the target's CA only; every
    request is verified against the target's card, recorded for the tests, and
    answered by the current policy. A request answered once gets the same reply
    bytes on every retry (§7.2)."""

    def __init__(self, config: KitConfig, link: Link) -> None:
        self.config = config
        self.link = link
        self.received: list[Incoming] = []
        self.refused: list[str] = []  # deliveries that failed the kit's own checks
        self._replies: dict[str, tuple[bytes, bytes]] = {}  # message id -> (digest, reply)
        self.policies: dict[str, Policy] = {}
        self.default_policy: Policy = lambda incoming: None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(self, self._server)
        credentials = grpc.ssl_server_credentials(
            [
                (
                    self.config.keys.node_key.read_bytes(),
                    self.config.keys.node_certificate.read_bytes(),
                )
            ],
            root_certificates=self.config.target_card.ca_certificate_pem,
            require_client_auth=True,
        )
        try:  # grpc returns 0, or (newer versions) raises, when it cannot bind
            self.port = self._server.add_secure_port(self.config.listen, credentials)
        except RuntimeError as exc:
            raise OSError(f"the kit cannot listen on {self.config.listen!r}: {exc}") from None
        if self.port == 0:
            raise OSError(f"the kit cannot listen on {self.config.listen!r}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.2)

    async def Deliver(
        self,
        request: partner_service_pb2.DeliverRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> partner_service_pb2.DeliverResponse:
        raw = bytes(request.envelope)
        try:
            verified = open_envelope(raw, self.link.trust, now_utc())
            cls = REQUEST_TYPES.get(verified.payload_type)
            if cls is None:
                raise ValueError(f"{verified.payload_type!r} is not a request type")
            msg = cls()
            msg.ParseFromString(verified.payload)
        except Exception as exc:
            self.refused.append(f"{type(exc).__name__}: {exc}")
            self.changed.set()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kit refused: {exc}")
            raise  # unreachable: abort raises
        incoming = Incoming(raw, verified.payload_type, verified.payload, msg, time.monotonic())
        incoming.problems.extend(self._check_header(msg))
        try:  # the field rules (§5.13) the target's requests must keep
            validate(msg, max_blocks=MAX_BLOCKS)
        except Rejected as exc:
            incoming.problems.append(str(exc))
        self.received.append(incoming)
        self.changed.set()
        content = sha256(pae(verified.payload_type, verified.payload))
        stored = self._replies.get(incoming.message_id)
        if stored is not None and stored[0] == content:
            return partner_service_pb2.DeliverResponse(envelope=stored[1])
        policy = self.policies.get(verified.payload_type, self.default_policy)
        answer = policy(incoming)
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the kit does not answer yet")
        assert answer is not None
        if isinstance(answer, bytes):
            return partner_service_pb2.DeliverResponse(envelope=answer)
        if not answer.HasField("header"):
            answer.header.CopyFrom(  # type: ignore[attr-defined]
                self.link.header(in_reply_to=incoming.message_id)
            )
        _, envelope = self.link.seal(answer)
        self._replies[incoming.message_id] = (content, envelope)
        return partner_service_pb2.DeliverResponse(envelope=envelope)

    def stored_reply(self, message_id: str) -> bytes | None:
        """The reply the kit sealed and stored for a request of the target, if any."""
        stored = self._replies.get(message_id)
        return None if stored is None else stored[1]

    async def DeliverBatch(
        self,
        request: partner_service_pb2.DeliverBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> partner_service_pb2.DeliverBatchResponse:
        """Not served, on purpose: a target must then deliver each envelope by
        Deliver (§2.6), which every test that waits for its requests checks."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the kit serves Deliver only")
        raise AssertionError("unreachable: abort raises")

    def _check_header(self, msg: Message) -> list[str]:
        header: common_pb2.Header = msg.header  # type: ignore[attr-defined]
        problems = []
        if header.protocol_version != 1:
            problems.append(f"protocol_version {header.protocol_version}")
        if header.sender_party != self.config.target_party:
            problems.append(f"sender_party {header.sender_party!r}")
        if header.sender_registry != self.config.target_card.registry:
            problems.append(f"sender_registry {header.sender_registry!r}")
        if header.audience != self.config.party:
            problems.append(f"audience {header.audience!r}, not {self.config.party}")
        if not header.message_id:
            problems.append("no message_id")
        if header.sequence < 1:
            problems.append(f"sequence {header.sequence} on a request")
        if not header.HasField("sent_at"):
            problems.append("no sent_at")
        return problems

    def of_type(self, cls: type[Message]) -> list[Incoming]:
        name = str(cls.DESCRIPTOR.full_name)
        return [i for i in self.received if i.payload_type == name]

    async def wait_for(self, predicate: Callable[[], Any], within: float) -> Any:
        """Wait until ``predicate()`` is truthy (returned) or ``within`` seconds pass (None)."""
        deadline = time.monotonic() + within
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.2))


# Default answers of a conforming acquiring party (the kit playing the buyer).
def default_answer(incoming: Incoming) -> Message | None:
    msg = incoming.message
    if isinstance(msg, authorisation_pb2.AuthorisationStatement):
        return authorisation_pb2.AuthorisationAcknowledgement(
            authorisation_id=msg.authorisation_id,
            version=msg.version,
            acquiring_party_reference=f"conformance/{msg.authorisation_id}/v{msg.version}",
        )
    if isinstance(msg, issuance_pb2.IssuanceNotice):
        return issuance_pb2.IssuanceAcknowledgement(issuance_id=msg.issuance_id)
    if isinstance(msg, transfer_pb2.TransferProposal):
        return transfer_pb2.TransferAcceptance(
            transfer_id=msg.transfer_id, proposal_digest=sha256(incoming.payload)
        )
    if isinstance(msg, transfer_pb2.TransferCompletion):
        return transfer_pb2.TransferCompletionReceipt(
            transfer_id=msg.transfer_id, adjustment_year=msg.adjustment_year
        )
    if isinstance(msg, transfer_pb2.TransferVoid):
        return transfer_pb2.TransferVoidReceipt(transfer_id=msg.transfer_id)
    if isinstance(msg, transfer_pb2.TransferBatchProposal):
        return transfer_pb2.TransferBatchAcceptance(
            batch_id=msg.batch_id,
            proposal_digest=sha256(incoming.payload),
            items=[transfer_pb2.TransferBatchOutcome(transfer_id=i.transfer_id) for i in msg.items],
        )
    if isinstance(msg, transfer_pb2.TransferBatchCompletion):
        return transfer_pb2.TransferBatchCompletionReceipt(
            batch_id=msg.batch_id,
            items=[
                transfer_pb2.TransferBatchOutcome(
                    transfer_id=i.transfer_id, adjustment_year=i.adjustment_year
                )
                for i in msg.items
            ],
        )
    if isinstance(msg, keys_pb2.KeyRotation):
        return keys_pb2.KeyRotationAcknowledgement(rotation_id=msg.rotation_id)
    return None
