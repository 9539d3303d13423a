"""Deliberately faulty variants of our node, each breaking ONE protocol rule.

Tests only: nothing in src/ can reach these. A variant is applied to a started
node (its engine's class is swapped for a subclass, its trust store or store
wrapped) and, for a rule checked in the core, by a monkeypatch that the test
undoes. tests/conformance/test_kit.py runs the kit against each variant and
asserts that the kit fails it, in the test named here, for the reason named here
(a fragment of the failure message).

Not a variant, because the kit cannot see it from outside: a receiver that books
its corresponding adjustment when it accepts instead of when the completion
arrives. For a transfer that completes, the final records are the same; for one
that is voided, the stray entry appears in no reconciliation leaf (§11.4 hashes
adjustments only of transfers that moved), so no partner can observe it. A
variant that books the adjustment wrongly in a way that survives to the final
records is caught (receiver-books-no-adjustment, sender-adjustment-wrong-sign).

Nor a receiver that applies a completion sent again a second time (credits the
units or books the adjustment twice): once a transfer is final its leaves are
fixed (§11.4: they hash the transfer's blocks and the entries booked for it,
which a second application may or may not touch), and the totals count
transfers, not postings. What the kit can see of a repeated completion is the
answer: a receipt, and the state still COMPLETED (answers-repeated-completion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from google.protobuf.message import DecodeError, Message

from itmolink.core import rules
from itmolink.core.adjustments import AdjustmentEntry
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Effect, Role, TransferState
from itmolink.crypto.envelope import TrustStore, pae, seal
from itmolink.crypto.keys import VerifyingKey
from itmolink.node import operations
from itmolink.node.convert import block_from_pb, terms_from_statement, to_us
from itmolink.node.engine import Engine
from itmolink.node.ratelimit import RateLimited, TokenBucket
from itmolink.node.runtime import Node
from itmolink.store.sqlite import HOLDING_ACCOUNT
from itmolink.store.tx import Tx
from itmolink.v1 import authorisation_pb2, common_pb2, envelope_pb2, reply_pb2, transfer_pb2
from tests.conformance.harness import ONE_ROUND_SKEW_SECONDS


@dataclass(frozen=True)
class Variant:
    name: str
    role: str  # the role in which the kit must catch it
    rule: str
    catches: str  # the kit test that must fail
    expect: str  # a fragment of its failure message: why it fails
    patch: Callable[[Node], None]
    # (object, attribute, replacement factory taking the original) for core rules.
    core_patches: tuple[tuple[Any, str, Callable[[Any], Any]], ...] = field(default=())
    # Whether the node asks the kit to complete on acceptance (PROTOCOL §6.11), and the
    # kit expects it to: for a sender's fault in the one-round transfer.
    one_round: bool = False
    # The kit's [target] act_within_seconds: shorter for a variant whose fault the kit
    # sees only when that wait runs out (in role buyer, only test 3.26 waits on it).
    act_within: float = 8.0


def _swap(node: Node, cls: type[Engine]) -> None:
    node.engine.__class__ = cls


# -- envelope and header ----------------------------------------------------------------


class _AnySignature(VerifyingKey):
    __slots__ = ()

    def verify(self, signature: bytes, message: bytes) -> bool:
        return True


class _NoWindow(VerifyingKey):
    __slots__ = ()

    def valid_at(self, now: dt.datetime) -> str | None:
        return None


def _retrust(node: Node, cls: type[VerifyingKey]) -> None:
    engine = node.engine
    engine.trust = TrustStore(
        cls(k.party, k.key_id, k.public_bytes, k.not_before, k.not_after)
        for k in engine.trust.all()
    )


class IgnoresRevocations(Engine):
    def reload_trust(self) -> None:
        super().reload_trust()
        self.trust = TrustStore(self.trust.all())  # the same keys, none revoked


class RevocationsDoNotCascade(Engine):
    """Revokes the listed keys only, whatever compromised_since says."""

    def _load_trust(self, tx: Tx) -> None:
        super()._load_trust(tx)
        trust = TrustStore(self.trust.all())
        for key_id in tx.revoked_keys():
            trust.revoke(key_id)
        self.trust = trust


class RefusesEarlyRevocations(Engine):
    """Refuses, as the reference did before, to revoke a key it does not pin yet."""

    def _refuse_unpinned(
        self, tx: Tx, sender: str, msg: Any, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        for key_id in msg.revoked_key_ids:
            if self.trust.get(key_id) is None:
                raise Rejected(RejectionCode.INVALID_FIELD, f"{key_id!r} is not pinned")
        return Engine._on_key_rotation(self, tx, sender, msg, payload, journal_id, now_us)

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.KeyRotation": _refuse_unpinned,
    }


class IgnoresAudience(Engine):
    def _check_header(self, header: common_pb2.Header, *, sender: str, now_us: int) -> None:
        readdressed = common_pb2.Header()
        readdressed.CopyFrom(header)
        readdressed.audience = self.party
        super()._check_header(readdressed, sender=sender, now_us=now_us)


class NoSentAtWindow(Engine):
    def _check_window(self, header: common_pb2.Header, now_us: int) -> None:
        return None


# -- replies: right verdict, wrong reply --------------------------------------------------


class _RewritesReplies(Engine):
    """Decides as the reference does, then changes its reply and signs it again."""

    def handle_delivery(self, peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        reply = super().handle_delivery(peer_party, raw, now)
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(reply)
        rejection = envelope.payload_type == "itmolink.v1.Rejection"
        cls = reply_pb2.Rejection if rejection else _reply_class(envelope.payload_type)
        message = cls()
        message.ParseFromString(envelope.payload)
        if not self.rewrite(message):
            return reply
        return seal(envelope.payload_type, message.SerializeToString(), self.signing_key)

    def rewrite(self, message: Any) -> bool:
        raise NotImplementedError


def _reply_class(payload_type: str) -> type[Message]:
    from itmolink.node.base import EXPECTED_REPLY

    return next(c for c in EXPECTED_REPLY.values() if c.DESCRIPTOR.full_name == payload_type)


class ExpiredKeyAsBadSignature(_RewritesReplies):
    def rewrite(self, message: Any) -> bool:
        from itmolink.v1.codes_pb2 import RejectionCode as WireCode

        if isinstance(message, reply_pb2.Rejection) and message.reasons[0].code == int(
            RejectionCode.SIGNING_KEY_EXPIRED
        ):
            message.reasons[0].code = WireCode.ValueType(RejectionCode.BAD_SIGNATURE)
            return True
        return False


class RecordsEarlyRefusals(_RewritesReplies):
    """Gives a refusal before recording a sequence, as if it had recorded it."""

    def rewrite(self, message: Any) -> bool:
        if isinstance(message, reply_pb2.Rejection) and message.header.sequence == 0:
            message.header.sequence = 7
            return True
        return False


class UnrecordedLookingRefusals(_RewritesReplies):
    """Gives a recorded refusal sequence 0, as if it had not recorded it."""

    def rewrite(self, message: Any) -> bool:
        if isinstance(message, reply_pb2.Rejection) and message.header.sequence > 0:
            message.header.sequence = 0
            return True
        return False


class WrongInReplyTo(_RewritesReplies):
    def rewrite(self, message: Any) -> bool:
        if isinstance(message, reply_pb2.Rejection):
            return False
        message.header.in_reply_to = "00000000-0000-4000-8000-000000000000"
        return True


class WrongEnvelopeDigest(_RewritesReplies):
    def rewrite(self, message: Any) -> bool:
        if isinstance(message, reply_pb2.Rejection):
            message.envelope_digest = hashlib.sha256(b"another envelope").digest()
            return True
        return False


# -- the inbox ------------------------------------------------------------------------


class _TxProxy:
    """A transaction whose inbox misbehaves as its engine's variant says."""

    def __init__(self, tx: Tx, engine: Any) -> None:
        self._tx = tx
        self._engine = engine
        self._forgotten: set[tuple[str, str]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def inbox_get(self, partner: str, message_id: str) -> Any:
        return self._misremembered(partner, message_id, self._tx.inbox_get(partner, message_id))

    def inbox_lookup(self, partner: str, message_id: str, sequence: int) -> Any:
        seen, owner = self._tx.inbox_lookup(partner, message_id, sequence)
        return self._misremembered(partner, message_id, seen), owner

    def _misremembered(self, partner: str, message_id: str, seen: Any) -> Any:
        if seen is None:
            return None
        if self._engine.forget_all_replies:
            return None
        if seen.payload_digest != self._engine.incoming_digest:
            self._forgotten.add((partner, message_id))
            return None
        return seen

    def journal_has(self, direction: str, partner: str, message_id: str) -> bool:
        if (partner, message_id) in self._forgotten:
            return False
        return bool(self._tx.journal_has(direction, partner, message_id))

    def journal_new(self, **entry: Any) -> int | None:
        if (entry["partner"], entry["message_id"]) in self._forgotten:
            return self.journal(**entry)  # as if the journal did not have it
        return self._tx.journal_new(**entry)

    def journal(self, **entry: Any) -> int:
        key = (entry["partner"], entry["message_id"])
        if entry["direction"] == "in" and key in self._forgotten:
            self._tx._exec("DELETE FROM inbox WHERE partner = ? AND message_id = ?", key)
            self._tx._exec(
                "DELETE FROM journal WHERE direction = 'in' AND partner = ? AND message_id = ?",
                key,
            )
        return int(self._tx.journal(**entry))


class _StoreProxy:
    def __init__(self, store: Any, engine: Any) -> None:
        self._store = store
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Any]:
        with self._store.transaction(exclusive=exclusive) as tx:
            yield _TxProxy(tx, self._engine)


class InboxVariant(Engine):
    forget_all_replies = False
    incoming_digest = b""

    def handle_delivery(self, peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        envelope = envelope_pb2.Envelope()
        with contextlib.suppress(DecodeError):
            envelope.ParseFromString(raw)
        self.incoming_digest = hashlib.sha256(pae(envelope.payload_type, envelope.payload)).digest()
        return super().handle_delivery(peer_party, raw, now)


class ForgetsReplies(InboxVariant):
    forget_all_replies = True


class ReusedIdAsNew(InboxVariant):
    forget_all_replies = False


def _inbox(cls: type[InboxVariant]) -> Callable[[Node], None]:
    def patch(node: Node) -> None:
        _swap(node, cls)
        node.engine.store = _StoreProxy(node.engine.store, node.engine)

    return patch


# -- time-outs ------------------------------------------------------------------------


class _EarlyVoidTx:
    """A transaction in which a proposal with a short time-out (at most 5 s) counts as
    expired 0.3 s after it was made."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def transfers_expired(self, now: int) -> list[Any]:
        return [
            r for r in self._tx.transfers_expired(now + 60_000_000)
            if r.expires_at <= now
            or (r.expires_at - r.created_at <= 5_000_000 and now >= r.created_at + 300_000)
        ]  # fmt: skip


class _WrappedStore:
    """A store whose transactions are wrapped (``wrap(tx)``) to misbehave."""

    def __init__(self, store: Any, wrap: Callable[[Tx], Any]) -> None:
        self._store = store
        self._wrap = wrap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Any]:
        with self._store.transaction(exclusive=exclusive) as tx:
            yield self._wrap(tx)


def _voids_early(node: Node) -> None:
    node.engine.store = _WrappedStore(node.engine.store, _EarlyVoidTx)


class _TakesNoticesAtTheirWordTx:
    """A transaction in which the block an outgoing transfer carried has whatever
    attributes the block asked about claims."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def transferred_block_containing(self, block: Block) -> Block | None:
        sent = self._tx.transferred_block_containing(block)
        if sent is None:
            return None
        return dataclasses.replace(
            block, serial_start=sent.serial_start, serial_end=sent.serial_end
        )


def _notices_at_their_word(node: Node) -> None:
    node.engine.store = _WrappedStore(node.engine.store, _TakesNoticesAtTheirWordTx)


def _records_then_rate_limits(node: Node) -> None:
    """Admits every call and applies it, then refuses those over the rate: the step is
    recorded (its savepoint released in the group) but the call ends RESOURCE_EXHAUSTED."""
    bucket = TokenBucket(100, 200, time.monotonic())
    handle = node.engine.handle_delivery

    def handle_delivery(peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        reply = handle(peer_party, raw, now)
        if not bucket.take(time.monotonic()):
            raise RateLimited("over the rate, after recording it")
        return reply

    node.admit = lambda party: True  # type: ignore[method-assign]
    node.engine.handle_delivery = handle_delivery  # type: ignore[method-assign]


def _no_transfer_budget(node: Node) -> None:
    """Takes every proposal, whatever the number of transfers its partners propose."""
    node.engine._take_transfer_items = lambda sender, msg, now_us: None  # type: ignore[method-assign]


def _records_then_over_budget(node: Node) -> None:
    """Applies a proposal, then refuses it over the transfer budget: the step is recorded
    (its savepoint released in the group) but the call ends RESOURCE_EXHAUSTED."""
    take = node.engine._take_transfer_items
    handle = node.engine.handle_delivery
    taken: list[tuple[str, Any, int]] = []

    def handle_delivery(peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        taken.clear()
        reply = handle(peer_party, raw, now)
        for args in taken:
            take(*args)  # raises RateLimited over the budget, after recording
        return reply

    node.engine._take_transfer_items = (  # type: ignore[method-assign]
        lambda sender, msg, now_us: taken.append((sender, msg, now_us))
    )
    node.engine.handle_delivery = handle_delivery  # type: ignore[method-assign]


# -- Article 6 rules and the transfer steps ---------------------------------------------


class AcceptsPre2021(Engine):
    def _check_statement(
        self, statement: authorisation_pb2.AuthorisationStatement, host: str, **kwargs: Any
    ) -> AuthorisationTerms:
        checked = authorisation_pb2.AuthorisationStatement()
        checked.CopyFrom(statement)
        checked.vintage_from = max(2021, statement.vintage_from)
        super()._check_statement(checked, host, **kwargs)
        return terms_from_statement(statement)


class _NeverRevoked:
    """A transaction in which no authorisation is ever revoked."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def authorisation_details(self, host: str, authorisation_id: str) -> dict[str, Any]:
        details = dict(self._tx.authorisation_details(host, authorisation_id))
        details["revoked"] = False
        return details

    def authorisation_latest(
        self, host: str, authorisation_id: str
    ) -> tuple[AuthorisationTerms, dict[str, Any]] | None:
        latest = self._tx.authorisation_latest(host, authorisation_id)
        if latest is None:
            return None
        return latest[0], {**latest[1], "revoked": False}


class IgnoresAuthorisationRevocation(Engine):
    """Accepts transfers under an authorisation its host revoked."""

    def _on_proposal(self, tx: Tx, *args: Any) -> bytes:
        handler = Engine._request_handlers["itmolink.v1.TransferProposal"]
        return handler(self, _NeverRevoked(tx), *args)

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferProposal": _on_proposal,
    }


class CreditsOnAcceptance(Engine):
    """Credits the blocks when it accepts, not when the sender completes."""

    def _on_proposal(self, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        envelope = Engine._request_handlers["itmolink.v1.TransferProposal"](
            self, tx, sender, msg, *args
        )
        tx.blocks_insert([block_from_pb(b) for b in msg.blocks], account=HOLDING_ACCOUNT)
        return envelope

    def _apply(self, tx: Tx, effects: Sequence[Effect], *args: Any, **kwargs: Any) -> int:
        kept = [e for e in effects if e is not Effect.CREDIT_BLOCKS]
        return super()._apply(tx, kept, *args, **kwargs)

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferProposal": _on_proposal,
    }


class AnswersRepeatedCompletion(Engine):
    """Refuses a completion of a transfer it has already completed (3008), instead of
    receipting it again (§5.9: the sender seals a new one when it lost the receipt)."""

    def _on_completion(self, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        record = tx.transfer_get(msg.transfer_id)
        if record is not None and record.state is TransferState.COMPLETED:
            raise Rejected(RejectionCode.TRANSFER_STATE_CONFLICT, "already completed")
        return bytes(
            Engine._request_handlers["itmolink.v1.TransferCompletion"](self, tx, sender, msg, *args)
        )

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferCompletion": _on_completion,
    }


class RecordsForeignTransferIds(Engine):
    """Keeps a proposal refused for a transfer id of another party (§5.8 T1) as a
    REJECTED transfer, as its status reports show."""

    def _on_proposal(self, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        try:
            handler = Engine._request_handlers["itmolink.v1.TransferProposal"]
            return bytes(handler(self, tx, sender, msg, *args))
        except Rejected as refused:
            if refused.code is RejectionCode.INVALID_IDENTIFIER:
                self.__dict__.setdefault("foreign", set()).add(msg.transfer_id)
            raise

    def _on_status_query(self, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        if msg.transfer_id in self.__dict__.get("foreign", set()):
            report = transfer_pb2.TransferStatusReport(
                transfer_id=msg.transfer_id, state=transfer_pb2.TRANSFER_STATE_REJECTED
            )
            return self._reply(tx, sender, report, msg.header.message_id, args[2])[1]
        handler = Engine._request_handlers["itmolink.v1.TransferStatusQuery"]
        return bytes(handler(self, tx, sender, msg, *args))

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferProposal": _on_proposal,
        "itmolink.v1.TransferStatusQuery": _on_status_query,
    }


class VoidsCompletedTransfer(Engine):
    """Takes a void of a transfer it completed as the end of that transfer."""

    def _on_void(self, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        record = tx.transfer_get(msg.transfer_id)
        if (
            record is not None
            and record.partner == sender
            and record.state is TransferState.COMPLETED
        ):
            now_us = args[2]
            tx.transfer_set_state(msg.transfer_id, TransferState.VOIDED, now=now_us)
            receipt = transfer_pb2.TransferVoidReceipt(transfer_id=msg.transfer_id)
            return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]
        handler = Engine._request_handlers["itmolink.v1.TransferVoid"]
        return handler(self, tx, sender, msg, *args)

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferVoid": _on_void,
    }


def _void_changed(name: str, doc: str, change: Callable[[Any], None]) -> type[Engine]:
    """An engine that changes every incoming TransferVoid with ``change``, then takes it
    as ours does."""

    def on_void(self: Engine, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        change(msg)
        handler = Engine._request_handlers["itmolink.v1.TransferVoid"]
        return handler(self, tx, sender, msg, *args)

    handlers = {**Engine._request_handlers, "itmolink.v1.TransferVoid": on_void}
    return type(name, (Engine,), {"__doc__": doc, "_request_handlers": handlers})


def _placed_no_later_than_itself(msg: Any) -> None:
    if msg.HasField("proposal_sent_at") and (
        msg.proposal_sent_at.ToNanoseconds() > msg.header.sent_at.ToNanoseconds()
    ):
        msg.proposal_sent_at.CopyFrom(msg.header.sent_at)


TombstoneAtArrival = _void_changed(
    "TombstoneAtArrival",
    "Places a void's tombstone at the void's arrival, not at its proposal_sent_at.",
    lambda msg: msg.ClearField("proposal_sent_at"),
)
VoidPlacedAfterItself = _void_changed(
    "VoidPlacedAfterItself",
    "Takes a void whose proposal_sent_at is later than its own sent_at (no V1a).",
    _placed_no_later_than_itself,
)


def _void_without_proposal_sent_at(original: Any) -> Any:
    def void(tx: Tx, transfer_id: str, reason: str) -> Any:
        return transfer_pb2.TransferVoid(transfer_id=transfer_id, reason=reason)

    return void


class ReceiverBooksNoAdjustment(Engine):
    def _adjustment_entries(
        self, role: Role, partner: str, transfer_id: str, blocks: Sequence[Block]
    ) -> list[AdjustmentEntry]:
        entries = super()._adjustment_entries(role, partner, transfer_id, blocks)
        return [] if role is Role.RECEIVER else entries


class SenderBooksWrongSign(Engine):
    def _adjustment_entries(
        self, role: Role, partner: str, transfer_id: str, blocks: Sequence[Block]
    ) -> list[AdjustmentEntry]:
        entries = super()._adjustment_entries(role, partner, transfer_id, blocks)
        if role is Role.SENDER:
            return [dataclasses.replace(e, amount=-e.amount) for e in entries]
        return entries


class WrongCompletionDigest(Engine):
    """The completion carries the proposal's digest instead of the acceptance's."""

    def _send(
        self, tx: Tx, partner: str, msg: Message, subject_id: str, now_us: int, **kwargs: Any
    ) -> bytes:
        if isinstance(msg, transfer_pb2.TransferCompletion):
            record = tx.transfer_get(msg.transfer_id)
            if record is not None:
                msg.acceptance_digest = record.proposal_digest
        return super()._send(tx, partner, msg, subject_id, now_us, **kwargs)


class AppliesUnmatchedAcceptance(Engine):
    """Applies an acceptance without checking that it accepts this proposal."""

    def _accepted(
        self, tx: Tx, transfer_id: str, partner: str, acceptance: Any, *args: Any
    ) -> None:
        record = tx.transfer_get(transfer_id)
        if record is not None:
            acceptance = transfer_pb2.TransferAcceptance(
                header=acceptance.header,
                transfer_id=transfer_id,
                proposal_digest=record.proposal_digest,
            )
        super()._accepted(tx, transfer_id, partner, acceptance, *args)


# -- the transport ------------------------------------------------------------------


def _reorders_batch_outcomes(node: Node) -> None:
    """DeliverBatch outcomes in reverse order: each envelope is handled right, but
    its reply goes back in another envelope's place (§2.6)."""
    handle = node.db_many

    async def db_many(calls: Sequence[Callable[[], Any]]) -> list[Any]:
        return list(reversed(await handle(calls)))

    node.db_many = db_many  # type: ignore[method-assign]


def _no_cap(original: Callable[..., None]) -> Callable[..., None]:
    def check_issuance(terms: AuthorisationTerms, **kwargs: Any) -> None:
        original(dataclasses.replace(terms, quantity_cap=0), **kwargs)

    return check_issuance


# -- batched transfers (§5.15) -------------------------------------------------------------


class BatchAllOrNothing(Engine):
    """Refuses a whole batch when one of its items fails a check, instead of
    rejecting that item alone (§5.15)."""

    def _batch_all_or_nothing(
        self, tx: Tx, sender: str, msg: Any, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        envelope = Engine._request_handlers["itmolink.v1.TransferBatchProposal"](
            self, tx, sender, msg, payload, journal_id, now_us
        )
        sealed = envelope_pb2.Envelope.FromString(envelope)
        acceptance = transfer_pb2.TransferBatchAcceptance.FromString(sealed.payload)
        for outcome in acceptance.items:
            if outcome.HasField("rejection"):
                raise Rejected(RejectionCode(outcome.rejection.code), outcome.rejection.detail)
        return envelope

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        **Engine._request_handlers,
        "itmolink.v1.TransferBatchProposal": _batch_all_or_nothing,
    }


class CompletesRejectedBatchItems(Engine):
    """Completes every item of its batch, those the receiver rejected too (§5.15)."""

    def _batch_accepted(
        self, tx: Tx, batch_id: str, partner: str, acceptance: Any, acceptance_payload: bytes,
        journal_id: int, now_us: int,
    ) -> None:  # fmt: skip
        everything = transfer_pb2.TransferBatchAcceptance()
        everything.CopyFrom(acceptance)
        for outcome in everything.items:
            outcome.ClearField("rejection")
        super()._batch_accepted(
            tx, batch_id, partner, everything, acceptance_payload, journal_id, now_us
        )


class ForgetsRefusedBatchItems(Engine):
    """Records nothing of the items of a batch it refuses as a whole (§5.15, §5.2 D10)."""

    def _record_rejected_request(
        self, tx: Tx, sender: str, msg: Message, payload: bytes, rejected: Rejected, now_us: int
    ) -> None:
        if not isinstance(msg, transfer_pb2.TransferBatchProposal):
            super()._record_rejected_request(tx, sender, msg, payload, rejected, now_us)


# -- the one-round transfer (PROTOCOL §6.11) ----------------------------------------------


def _proposal_handler(
    change: Callable[[Engine, transfer_pb2.TransferProposal], Any],
) -> dict[str, Callable[..., bytes]]:
    """The reference's handlers, the proposal's taken by ``change`` first."""
    original = Engine._request_handlers["itmolink.v1.TransferProposal"]

    def on_proposal(self: Engine, tx: Tx, sender: str, msg: Any, *args: Any) -> bytes:
        change(self, msg)
        return original(self, tx, sender, msg, *args)

    return {**Engine._request_handlers, "itmolink.v1.TransferProposal": on_proposal}


class CompletesUnasked(Engine):
    """Completes every proposal in the step that accepts it, asked or not (R1 for all)."""

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = _proposal_handler(
        lambda engine, msg: setattr(msg, "complete_on_acceptance", True)
    )


def _two_phase_said_completed(engine: Engine, msg: Any) -> None:
    engine._said_completed = msg.complete_on_acceptance  # type: ignore[attr-defined]
    msg.complete_on_acceptance = False


class SaysCompletedButAccepts(_RewritesReplies):
    """Takes a one-round proposal in two phases (records it ACCEPTED) but answers that
    it completed it, with the vintage as year."""

    _said_completed = False
    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = _proposal_handler(
        _two_phase_said_completed
    )

    def handle_delivery(self, peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        self._said_completed = False
        return super().handle_delivery(peer_party, raw, now)

    def rewrite(self, message: Any) -> bool:
        if not (isinstance(message, transfer_pb2.TransferAcceptance) and self._said_completed):
            return False
        message.completed, message.adjustment_year = True, 2025
        return True


class _VoidsOneRoundTx:
    """A transaction whose time-out pass takes the one-round proposals too (as before
    PROTOCOL §6.11 S4)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def transfers_expired(self, now: int) -> list[Any]:
        from itmolink.store.tx import _TRANSFER_READ, _transfer

        rows = self._tx._exec(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE direction = 'out' "
            "AND state = ? AND expires_at <= ?",
            (int(TransferState.PROPOSED), now),
        )
        return [_transfer(r) for r in rows]


def _voids_one_round(node: Node) -> None:
    node.engine.store = _WrappedStore(node.engine.store, _VoidsOneRoundTx)


# -- the withdrawal of a one-round proposal left unanswered (PROTOCOL §6.11 S7) ----------------


class _NeverWithdrawsTx:
    """A transaction in which no one-round proposal is ever unanswered long enough to be
    withdrawn: the sender never sends the void of S7."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def transfers_one_round_unanswered(self, expired_before: int) -> list[Any]:
        return []


class _WithdrawsEarlyTx(_NeverWithdrawsTx):
    """Withdraws a one-round proposal past its expires_at + the grace only, without the
    2 × max_clock_skew while a delivery of it may still be completed (the harness's
    skew: the kit's tests run the one-round target with it)."""

    def transfers_one_round_unanswered(self, expired_before: int) -> list[Any]:
        skew_us = ONE_ROUND_SKEW_SECONDS * 1_000_000
        return list(self._tx.transfers_one_round_unanswered(expired_before + 2 * skew_us))


class SettlesWithdrawalItself(Engine):
    """Settles a one-round transfer VOIDED, its units released, as it sends the void that
    withdraws it: on its own clock, without the receiver's answer."""

    def query_pending_transfers(self, now: dt.datetime) -> list[str]:
        asked = super().query_pending_transfers(now)
        with self._transaction() as tx:
            for transfer_id in asked:
                record = tx.transfer_get(transfer_id)
                if (
                    record is not None and record.direction is Role.SENDER
                    and record.complete_on_acceptance and record.state is TransferState.PROPOSED
                ):  # fmt: skip
                    self._settle_withdrawn(tx, record, "withdrawn on our clock", to_us(now))
        return asked


class SettlesOnVoidRefusal(Engine):
    """Settles a withdrawn one-round transfer VOIDED on the receiver's refusal of the
    void (3008) instead of asking which final state it holds: it may have completed."""

    def _withdrawal_answered(
        self, tx: Tx, transfer_id: str, partner: str, reply: Message, now_us: int
    ) -> None:
        record = tx.transfer_get(transfer_id)
        if (
            isinstance(reply, reply_pb2.Rejection) and record is not None
            and record.complete_on_acceptance and record.state is TransferState.PROPOSED
        ):  # fmt: skip
            self._settle_withdrawn(tx, record, "the receiver refused the void", now_us)
            return
        super()._withdrawal_answered(tx, transfer_id, partner, reply, now_us)


# -- status queries about transfers left accepted (PROTOCOL §7.7) ---------------------------


class _NeverAsksTx:
    """A transaction in which no incoming transfer is ever left waiting: the receiver
    never asks its sender about one (§7.7)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def transfers_awaiting_completion(self, expired_before: int) -> list[Any]:
        return []


class _ForgetsItsQueriesTx:
    """A transaction in which the receiver does not see its earlier status queries:
    none (``pending_too``) or only those still unanswered, so it asks at every pass."""

    pending_too = True

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def outbox_last_created(self, *, payload_type: str, subject_id: str) -> tuple[str, int] | None:
        last = self._tx.outbox_last_created(payload_type=payload_type, subject_id=subject_id)
        if payload_type != "itmolink.v1.TransferStatusQuery" or last is None:
            return last
        return None if self.pending_too or last[0] != "pending" else last


class _AsksAgainAtOnceTx(_ForgetsItsQueriesTx):
    """Keeps one query outstanding per transfer, but asks again as soon as it is
    answered (no interval I)."""

    pending_too = False


def _wrapped(wrap: Callable[[Tx], Any]) -> Callable[[Node], None]:
    def patch(node: Node) -> None:
        node.engine.store = _WrappedStore(node.engine.store, wrap)

    return patch


class SendsNoRecords(Engine):
    """Answers a status query that asks for a transfer's records without them."""

    def _records_of(self, tx: Tx, record: Any) -> list[bytes]:
        return []


class ResealsRecords(Engine):
    """Sends a transfer's acceptance among its records sealed anew (a later sent_at, so a
    new signature), not as it was exchanged."""

    def _records_of(self, tx: Tx, record: Any) -> list[bytes]:
        records = super()._records_of(tx, record)
        if len(records) >= 2:
            envelope = envelope_pb2.Envelope.FromString(records[1])
            acceptance = transfer_pb2.TransferAcceptance.FromString(envelope.payload)
            acceptance.header.sent_at.nanos = (acceptance.header.sent_at.nanos + 1000) % 10**9
            records[1] = seal(
                envelope.payload_type, acceptance.SerializeToString(), self.signing_key
            )
        return records


class IgnoresStatusReports(Engine):
    """Asks its senders about the transfers it accepted, and then ignores their reports."""

    def _status_reported(
        self, tx: Tx, transfer_id: str, partner: str, report: Any, now_us: int
    ) -> None:
        record = tx.transfer_get(transfer_id)
        if record is None or record.direction is not Role.RECEIVER:
            super()._status_reported(tx, transfer_id, partner, report, now_us)


class VoidsOnAnyReport(Engine):
    """Voids a transfer it accepted on any report of its sender, PROPOSED and COMPLETED
    too (as if every answer meant the completion will never come)."""

    def _status_reported(
        self, tx: Tx, transfer_id: str, partner: str, report: Any, now_us: int
    ) -> None:
        final = transfer_pb2.TransferStatusReport()
        final.CopyFrom(report)
        if final.state in (
            transfer_pb2.TRANSFER_STATE_PROPOSED, transfer_pb2.TRANSFER_STATE_COMPLETED
        ):  # fmt: skip
            final.state = transfer_pb2.TRANSFER_STATE_VOIDED
        super()._status_reported(tx, transfer_id, partner, final, now_us)


VARIANTS = [
    Variant("accepts-bad-signature", "buyer", "accepts a signature that does not verify",
            "1.06-bad-signature",
            "expected Rejection REJECTION_CODE_BAD_SIGNATURE (1004), got TransferStatusReport",
            lambda n: _retrust(n, _AnySignature)),
    Variant("reorders-batch-outcomes", "buyer", "answers a DeliverBatch call out of order",
            "1.18-deliver-batch",
            "DeliverBatch outcome 0 (outcomes come in the order of the request, §2.6)",
            _reorders_batch_outcomes),
    Variant("ignores-audience", "buyer", "processes messages addressed to another party",
            "1.09-wrong-audience",
            "expected Rejection REJECTION_CODE_WRONG_AUDIENCE (1007), got TransferStatusReport",
            lambda n: _swap(n, IgnoresAudience)),
    Variant("accepts-expired-key", "buyer", "accepts signatures of keys outside their window",
            "1.07-expired-key",
            "REJECTION_CODE_SIGNING_KEY_EXPIRED (1009), got TransferStatusReport",
            lambda n: _retrust(n, _NoWindow)),
    Variant("expired-key-as-bad-signature", "buyer", "refuses an expired key with 1004, not 1009",
            "1.07-expired-key",
            "expected REJECTION_CODE_SIGNING_KEY_EXPIRED (1009), got Rejection [1004",
            lambda n: _swap(n, ExpiredKeyAsBadSignature)),
    Variant("records-early-refusals", "buyer", "gives a refusal before recording a sequence",
            "1.03-garbage-bytes",
            "a refusal before recording carries sequence 0 (§5.2), got 7",
            lambda n: _swap(n, RecordsEarlyRefusals)),
    Variant("unrecorded-looking-refusals", "buyer", "gives a recorded refusal sequence 0",
            "2.02-authorisation-vintage-before-2021",
            "a recorded Rejection carries a sequence >= 1",
            lambda n: _swap(n, UnrecordedLookingRefusals)),
    Variant("wrong-in-reply-to", "buyer", "names another message in a reply's in_reply_to",
            "1.01-mtls-status-query",
            "the reply breaks §5.3: REJECTION_CODE_UNEXPECTED_REPLY: reply answers '00000000-",
            lambda n: _swap(n, WrongInReplyTo)),
    Variant("wrong-envelope-digest", "buyer", "binds a rejection to another envelope",
            "1.03-garbage-bytes",
            "REJECTION_CODE_UNEXPECTED_REPLY: rejection is about another envelope",
            lambda n: _swap(n, WrongEnvelopeDigest)),
    Variant("ignores-key-revocation", "buyer", "accepts signatures of a key revoked in-band",
            "1.17-key-rotation",
            "REJECTION_CODE_SIGNING_KEY_REVOKED (1010), got TransferStatusReport",
            lambda n: _swap(n, IgnoresRevocations)),
    Variant("revocation-does-not-cascade", "buyer",
            "keeps the keys announced with a key revoked as compromised",
            "1.21-revocation-cascade",
            "REJECTION_CODE_SIGNING_KEY_REVOKED (1010), got TransferStatusReport",
            lambda n: _swap(n, RevocationsDoNotCascade)),
    Variant("refuses-early-revocation", "buyer", "refuses to revoke a key it does not pin yet",
            "1.19-revocation-before-announcement",
            "expected KeyRotationAcknowledgement",
            lambda n: _swap(n, RefusesEarlyRevocations)),
    Variant("notice-attributes-unchecked", "host",
            "books a first-transfer notice's blocks with the attributes it claims",
            "3.07-first-transfer-notice",
            "expected Rejection REJECTION_CODE_BLOCK_ATTRIBUTE_MISMATCH (3004), "
            "got FirstTransferNoticeAcknowledgement",
            _notices_at_their_word),
    Variant("no-rate-limit", "buyer", "admits every call, whatever its partners' rate",
            "1.20-rate-limit", "none was rate limited",
            lambda n: setattr(n, "admit", lambda party: True)),
    Variant("records-rate-limited", "buyer", "records a request, then answers it rate limited",
            "1.20-rate-limit", "so the refused call was recorded",
            _records_then_rate_limits),
    Variant("no-transfer-budget", "buyer", "takes every proposal, whatever its partners' budget",
            "3.22-transfer-budget", "none was refused",
            _no_transfer_budget),
    Variant("records-over-budget", "buyer", "records a batch, then refuses it over the budget",
            "3.22-transfer-budget",
            "is TRANSFER_STATE_REJECTED at the target, not TRANSFER_STATE_UNKNOWN",
            _records_then_over_budget),
    Variant("accepts-replay", "buyer", "accepts a replayed old message (no sent_at window)",
            "1.13-stale-sent-at",
            "REJECTION_CODE_SENT_AT_OUT_OF_WINDOW (5003), got TransferStatusReport",
            lambda n: _swap(n, NoSentAtWindow)),
    Variant("forgets-replies", "buyer", "answers a retried message anew, not with its stored reply",
            "1.14-identical-retry",
            "must get the stored reply byte for byte",
            _inbox(ForgetsReplies)),
    Variant("reused-id-as-new", "buyer", "answers a reused id with a different payload as new",
            "1.15-reused-message-id",
            "REJECTION_CODE_DUPLICATE_MESSAGE_CONFLICT (5001), got TransferStatusReport",
            _inbox(ReusedIdAsNew)),
    Variant("accepts-vintage-2020", "buyer", "accepts an authorisation of vintages before 2021",
            "2.02-authorisation-vintage-before-2021",
            "REJECTION_CODE_VINTAGE_BEFORE_2021 (4002), got AuthorisationAcknowledgement",
            lambda n: _swap(n, AcceptsPre2021)),
    Variant("ignores-authorisation-revocation", "buyer", "accepts units of a revoked authorisation",
            "3.16-revoked-authorisation",
            "REJECTION_CODE_AUTHORISATION_REVOKED (4014), got TransferAcceptance",
            lambda n: _swap(n, IgnoresAuthorisationRevocation)),
    Variant("credits-on-acceptance", "buyer", "credits units on acceptance, not on completion",
            "3.14-void-after-acceptance",
            "the voided serials proposed again: expected TransferAcceptance, got Rejection [3005",
            lambda n: _swap(n, CreditsOnAcceptance)),
    Variant("answers-repeated-completion", "buyer", "refuses a completion sealed again (3008)",
            "3.03-completion-resealed",
            "expected TransferCompletionReceipt, got Rejection [3008",
            lambda n: _swap(n, AnswersRepeatedCompletion)),
    Variant("records-foreign-transfer-id", "buyer", "records a proposal with another's transfer id",
            "3.12-foreign-transfer-id",
            "is TRANSFER_STATE_REJECTED at the target, not TRANSFER_STATE_UNKNOWN",
            lambda n: _swap(n, RecordsForeignTransferIds)),
    Variant("voids-completed-transfer", "buyer", "lets a void end a transfer it completed",
            "3.17-void-rules",
            "REJECTION_CODE_TRANSFER_STATE_CONFLICT (3008), got TransferVoidReceipt",
            lambda n: _swap(n, VoidsCompletedTransfer)),
    Variant("tombstone-at-arrival", "buyer", "places a void's tombstone at the void's arrival",
            "3.17-void-rules",
            "is not in the snapshot cut 1 µs after the void's proposal_sent_at",
            lambda n: _swap(n, TombstoneAtArrival)),
    Variant("void-placed-after-itself", "buyer",
            "takes a void whose proposal_sent_at is after its own sent_at",
            "3.17-void-rules",
            "REJECTION_CODE_INVALID_FIELD (2010), got TransferVoidReceipt",
            lambda n: _swap(n, VoidPlacedAfterItself)),
    Variant("void-without-proposal-sent-at", "host", "sends its voids without proposal_sent_at",
            "3.04-timeout-void",
            "the void's proposal_sent_at is unset",
            lambda n: None,
            ((operations, "_void", _void_without_proposal_sent_at),)),
    Variant("receiver-books-no-adjustment", "buyer", "books no adjustment on completion",
            "3.01-transfer-completed",
            "the receipt's adjustment_year is 0",
            lambda n: _swap(n, ReceiverBooksNoAdjustment)),
    Variant("voids-before-time-out", "host", "voids its proposal before the time-out",
            "3.04-timeout-void", "before the time-out of 2 s", _voids_early),
    Variant("ignores-cap", "host", "issues beyond the authorisation's quantity cap",
            "2.04-issue-over-cap-refused",
            "an IssuanceNotice beyond the cap",
            lambda n: None,
            ((rules, "check_issuance", _no_cap),)),
    Variant("applies-unmatched-acceptance", "host", "applies an acceptance of another proposal",
            "3.02-acceptance-digest-checked",
            "the target completed the transfer on an acceptance whose proposal_digest is wrong",
            lambda n: _swap(n, AppliesUnmatchedAcceptance)),
    Variant("wrong-completion-digest", "host", "puts the proposal's digest in the completion",
            "3.01-proposal-completed",
            "the completion's acceptance_digest is not SHA-256 of the kit's acceptance payload",
            lambda n: _swap(n, WrongCompletionDigest)),
    Variant("sender-adjustment-wrong-sign", "host", "books its adjustment with the wrong sign",
            "4.02-blocks-leaves",
            "the target books the adjustment with the wrong sign",
            lambda n: _swap(n, SenderBooksWrongSign)),
    Variant("batch-all-or-nothing", "buyer", "refuses a whole batch for one bad item",
            "3.20-batch-transfer",
            "batch proposal: expected TransferBatchAcceptance, got Rejection",
            lambda n: _swap(n, BatchAllOrNothing)),
    Variant("forgets-refused-batch-items", "buyer",
            "records nothing of the items of a batch it refuses",
            "3.21-batch-refused-whole", "TRANSFER_STATE_UNKNOWN",
            lambda n: _swap(n, ForgetsRefusedBatchItems)),
    Variant("completes-rejected-batch-items", "host",
            "completes the items of its batch that the receiver rejected",
            "3.06-batch-completed", "expected the two accepted transfers",
            lambda n: _swap(n, CompletesRejectedBatchItems)),
    Variant("completes-unasked", "buyer",
            "completes a proposal that did not ask to complete on acceptance",
            "3.01-transfer-completed",
            "an acceptance of a proposal that did not ask to complete on acceptance says "
            "completed = true",
            lambda n: _swap(n, CompletesUnasked)),
    Variant("says-completed-but-accepts", "buyer",
            "answers a one-round proposal completed but records it ACCEPTED",
            "3.23-one-round-proposal",
            "is TRANSFER_STATE_ACCEPTED at the target, not TRANSFER_STATE_COMPLETED",
            lambda n: _swap(n, SaysCompletedButAccepts)),
    Variant("voids-one-round", "host", "voids a one-round proposal on its time-out",
            "3.04-timeout-void", "a sender that asked never voids",
            _voids_one_round, one_round=True),
    Variant("sends-no-records", "buyer",
            "answers a status query asking for a final transfer's records without them",
            "3.27-status-records", "carries 0 record(s)",
            lambda n: _swap(n, SendsNoRecords)),
    Variant("reseals-records", "buyer",
            "sends a transfer's acceptance as a record sealed anew, not as exchanged",
            "3.27-status-records", "is not the acceptance envelope byte for byte",
            lambda n: _swap(n, ResealsRecords)),
    Variant("never-withdraws", "host",
            "never withdraws a one-round proposal left unanswered past expires_at + 2 × skew",
            "3.09-one-round-withdrawn", "the target does not withdraw it",
            _wrapped(_NeverWithdrawsTx), one_round=True, act_within=4.0),
    Variant("withdraws-early", "host",
            "withdraws a one-round proposal past expires_at, without the 2 × max_clock_skew",
            "3.09-one-round-withdrawn", "before expires_at + 2 × max_clock_skew_seconds",
            _wrapped(_WithdrawsEarlyTx), one_round=True),
    Variant("settles-withdrawal-itself", "host",
            "settles a withdrawn one-round transfer VOIDED as it sends the void",
            "3.09-one-round-withdrawn", "while its void is unanswered",
            lambda n: _swap(n, SettlesWithdrawalItself), one_round=True),
    Variant("settles-on-void-refusal", "host",
            "settles a withdrawn one-round transfer VOIDED on a refusal of its void (3008)",
            "3.09-one-round-withdrawn", "before any report of the kit",
            lambda n: _swap(n, SettlesOnVoidRefusal), one_round=True),
    Variant("never-asks-status", "buyer",
            "never asks the sender about a transfer it accepted and that outlived expires_at",
            "3.26-status-queries", "no TransferStatusQuery about",
            _wrapped(_NeverAsksTx), act_within=4.0),
    Variant("ignores-status-report", "buyer",
            "keeps a transfer ACCEPTED when its sender reports it VOIDED",
            "3.26-status-queries",
            "after the kit's signed report of TRANSFER_STATE_VOIDED, not TRANSFER_STATE_VOIDED",
            lambda n: _swap(n, IgnoresStatusReports), act_within=4.0),
    Variant("voids-on-any-report", "buyer",
            "voids a transfer its sender reports PROPOSED or COMPLETED",
            "3.26-status-queries",
            "after the kit's signed report of TRANSFER_STATE_PROPOSED, not "
            "TRANSFER_STATE_ACCEPTED",
            lambda n: _swap(n, VoidsOnAnyReport)),
    Variant("asks-every-pass", "buyer",
            "sends a new status query at every pass, one still unanswered or not",
            "3.26-status-queries", "while its first one was unanswered",
            _wrapped(_ForgetsItsQueriesTx)),
    Variant("asks-again-at-once", "buyer",
            "asks again about a transfer as soon as its last query is answered (no interval)",
            "3.26-status-queries", "within its interval I of 60 s",
            _wrapped(_AsksAgainAtOnceTx)),
]  # fmt: skip
