"""The protocol engine's shared parts: messages, limits, sealing, transactions,
and the steps both sides take.

Every protocol step is one database transaction. The engine is synchronous and
clock-free: callers pass ``now`` and it runs on the node's single database
thread. It verifies envelopes, applies the core rules and state machine, and
persists each step together with the messages it sends (outbox) and the
evidence it received (journal):

* a request from a partner (``Requests.handle_delivery``) is verified before it
  is parsed, applied at most once (inbox), and answered with a signed reply;
* a reply to one of our requests (``Replies.handle_reply``) is verified,
  journaled and applied in the transaction that marks the request answered;
* operator requests (``Operations``: ``authorise``, ``issue``,
  ``start_transfer``, ...) persist their outgoing messages before anything is sent.

The corresponding adjustment of a transfer is written only by
``Replies._accepted`` (sender) and ``Requests._on_completion`` (receiver), each
in the transaction that journals the partner's signed acknowledgement; the
adjustment row references that journal entry. In a one-round transfer the
receiver writes its adjustment in ``Requests._on_proposal``, referencing the
journal entry of the sender's signed proposal that asked for it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from itmolink import PROTOCOL_VERSION
from itmolink.core.accounting import (
    AccountingConfig,
    HostThreshold,
    adjustment_entries,
    booking_year,
    check_host_threshold,
)
from itmolink.core.actions import (
    ActionType,
    FirstTransferTrigger,
    first_transfer_triggers,
)
from itmolink.core.adjustments import (
    AdjustmentEntry,
    adjustments_for,
    books_adjustment,
    oimp_at_issuance,
)
from itmolink.core.aef import ActionSubtype
from itmolink.core.authorisation import (
    Authorisation,
)
from itmolink.core.blocks import Block, total
from itmolink.core.codes import Rejected, RejectionCode, wire_name_of
from itmolink.core.issuance import Destination
from itmolink.core.reconcile import BLOCKS_LEAF_DEFINITION
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Effect, Role, TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey, VerifyingKey
from itmolink.node.convert import (
    block_to_pb,
    from_us,
    timestamp,
    to_us,
)
from itmolink.node.ratelimit import TokenBucket
from itmolink.node.validation import validate
from itmolink.store.sqlite import HOLDING_ACCOUNT, Store
from itmolink.store.tx import NewTransfer, Tx
from itmolink.v1 import (
    authorisation_pb2,
    codes_pb2,
    common_pb2,
    issuance_pb2,
    keys_pb2,
    reconcile_pb2,
    reply_pb2,
    transfer_pb2,
    use_pb2,
)

log = logging.getLogger("itmolink.engine")


AuthorisationStatement = authorisation_pb2.AuthorisationStatement
AuthorisationAcknowledgement = authorisation_pb2.AuthorisationAcknowledgement
IssuanceNotice = issuance_pb2.IssuanceNotice
IssuanceAcknowledgement = issuance_pb2.IssuanceAcknowledgement
TransferProposal = transfer_pb2.TransferProposal
TransferAcceptance = transfer_pb2.TransferAcceptance
TransferCompletion = transfer_pb2.TransferCompletion
TransferCompletionReceipt = transfer_pb2.TransferCompletionReceipt
TransferVoid = transfer_pb2.TransferVoid
TransferVoidReceipt = transfer_pb2.TransferVoidReceipt
TransferStatusQuery = transfer_pb2.TransferStatusQuery
TransferStatusReport = transfer_pb2.TransferStatusReport
TransferBatchProposal = transfer_pb2.TransferBatchProposal
TransferBatchItem = transfer_pb2.TransferBatchItem
TransferBatchAcceptance = transfer_pb2.TransferBatchAcceptance
TransferBatchOutcome = transfer_pb2.TransferBatchOutcome
TransferBatchCompletion = transfer_pb2.TransferBatchCompletion
TransferBatchCompletionItem = transfer_pb2.TransferBatchCompletionItem
TransferBatchCompletionReceipt = transfer_pb2.TransferBatchCompletionReceipt
Rejection = reply_pb2.Rejection
FirstTransferNotice = use_pb2.FirstTransferNotice
FirstTransferNoticeAcknowledgement = use_pb2.FirstTransferNoticeAcknowledgement
KeyRotation = keys_pb2.KeyRotation
KeyRotationAcknowledgement = keys_pb2.KeyRotationAcknowledgement
ReconciliationQuery = reconcile_pb2.ReconciliationQuery
ReconciliationAnswer = reconcile_pb2.ReconciliationAnswer


def type_name(cls: type[Message]) -> str:
    return str(cls.DESCRIPTOR.full_name)


# Each request type and the reply type that answers it (a Rejection may answer any).
EXPECTED_REPLY: dict[str, type[Message]] = {
    type_name(AuthorisationStatement): AuthorisationAcknowledgement,
    type_name(IssuanceNotice): IssuanceAcknowledgement,
    type_name(TransferProposal): TransferAcceptance,
    type_name(TransferCompletion): TransferCompletionReceipt,
    type_name(TransferVoid): TransferVoidReceipt,
    type_name(TransferStatusQuery): TransferStatusReport,
    type_name(ReconciliationQuery): ReconciliationAnswer,
    type_name(KeyRotation): KeyRotationAcknowledgement,
    type_name(FirstTransferNotice): FirstTransferNoticeAcknowledgement,
    type_name(TransferBatchProposal): TransferBatchAcceptance,
    type_name(TransferBatchCompletion): TransferBatchCompletionReceipt,
}
REQUEST_TYPES: dict[str, type[Message]] = {
    type_name(cls): cls
    for cls in (
        AuthorisationStatement,
        IssuanceNotice,
        TransferProposal,
        TransferCompletion,
        TransferVoid,
        TransferStatusQuery,
        ReconciliationQuery,
        KeyRotation,
        FirstTransferNotice,
        TransferBatchProposal,
        TransferBatchCompletion,
    )
}

# Most transfers in one TransferBatchProposal (docs/PROTOCOL.md §5.15): the
# `max_items` rule of its `items` field, so a partner reads the same limit.
MAX_BATCH_ITEMS = 1_000

# Where each part of an issuance goes: (account, account kind, AEF action if any).
ISSUANCE_DESTINATIONS: dict[
    Destination, tuple[str, str, tuple[ActionType, ActionSubtype] | None]
] = {
    Destination.HOST_HOLDING: (HOLDING_ACCOUNT, "holding", None),
    Destination.BUYER_SHARE: (HOLDING_ACCOUNT, "holding", None),
    Destination.ADAPTATION_FUND: (
        "adaptation-fund", "adaptation-fund",
        (ActionType.TRANSFER, ActionSubtype.MANDATORY_ADAPTATION_FUND),
    ),
    Destination.OMGE_CANCELLATION: (
        "omge-cancellation", "cancellation",
        (ActionType.CANCELLATION, ActionSubtype.MANDATORY_OMGE),
    ),
    Destination.VOLUNTARY_OMGE_CANCELLATION: (
        "voluntary-omge-cancellation", "cancellation",
        (ActionType.VOLUNTARY_CANCELLATION, ActionSubtype.VOLUNTARY_OMGE),
    ),
}  # fmt: skip

# What an operator may do with held units: (account, account kind, AEF action).
RETIREMENTS: dict[str, tuple[str, str, ActionType]] = {
    "use-ndc": ("retired-ndc", "retirement", ActionType.USE_NDC),
    "use-oimp": ("retired-oimp", "retirement", ActionType.USE_OIMP),
    "voluntary-cancellation": (
        "voluntary-cancellation", "cancellation", ActionType.VOLUNTARY_CANCELLATION,
    ),
}  # fmt: skip

RETRY_BASE_US = 200_000
RETRY_MAX_US = 30_000_000
# A receiver asks the sender about a transfer it accepted once the proposal's
# time-out has passed by this much (allowing for clock skew and a completion
# still in flight), and again at this interval while the answer is "not yet".
STATUS_QUERY_GRACE_US = 30_000_000
STATUS_QUERY_INTERVAL_US = 60_000_000
# A one-round proposal withdrawn past its deadline (PROTOCOL §6.11 S7): a new void
# after one answered without settling, at most this often.
WITHDRAWAL_INTERVAL_US = 3_600_000_000
WITHDRAWAL_REASON = "one-round proposal unanswered past expires_at + 2 x max_clock_skew"
# An amendment of our authorisation and the completions of our transfers under it
# to the same partner leave in the order the sender stated their leaves in (docs/
# DESIGN.md decision 55): one that must wait is looked at again this often.
ORDER_RECHECK_US = 1_000_000
# How the last error of a request held so begins (the outbox's last_error).
HELD = "held until"
# The counters that name what partners see (transfer, batch, issuance, authorisation
# and notice ids; serials are counted per registry, "serial:<registry>"). After an
# older backup is restored, `itmolink node restored` moves each past anything the lost
# tail of the ledger can have handed out (docs/OPERATIONS.md §7).
ID_COUNTERS = ("transfer", "batch", "issuance", "authorisation", "use-notice")
# A link's sequence this far above that of a message refused for reusing its
# sequence means `itmolink node restored` ran after the message was sealed (the step
# raises sequences to microseconds since 1970, about 1.8e15; a link in use counts by one).
RESTORED_GAP = 10**12


def serial_counter(registry: str) -> str:
    """The name of the counter of ``registry``'s serial numbers."""
    return f"serial:{registry}"


def random_uuid() -> str:
    """A random (version 4) UUID in canonical lower-case text, as ``str(uuid.uuid4())``
    but without building a UUID object (a message id for every message sent)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def digest(payload: bytes) -> bytes:
    """SHA-256 of a payload's bytes: how one message refers to another."""
    return hashlib.sha256(payload).digest()


_STATEMENT = type_name(AuthorisationStatement)
_COMPLETION = type_name(TransferCompletion)
_BATCH_COMPLETION = type_name(TransferBatchCompletion)
# The requests whose delivery order decision 55 keeps.
ORDERED_TYPES = frozenset({_STATEMENT, _COMPLETION, _BATCH_COMPLETION})


def retry_delay_us(attempts: int) -> int:
    """Exponential backoff for redelivering an unanswered message."""
    return int(min(RETRY_MAX_US, RETRY_BASE_US * 2 ** min(attempts, 20)))


@dataclass(frozen=True, slots=True)
class Limits:
    """What a node accepts from a partner (docs/SECURITY.md)."""

    # Largest serialised envelope accepted.
    max_message_bytes: int = 2 * 1024 * 1024
    # Most blocks in one proposal or issuance notice.
    max_blocks: int = 10_000
    # How far a message's sent_at may be ahead of this node's clock, and how far
    # a proposal's expires_at may be behind it.
    max_clock_skew: dt.timedelta = dt.timedelta(minutes=5)
    # Messages older than this are refused, so the inbox need not keep message
    # ids forever; the sender has voided or completed long before.
    max_message_age: dt.timedelta = dt.timedelta(days=30)
    # Transfers proposed per partner per second, a batched proposal counting each
    # of its items, with bursts of up to ``transfer_items_burst``; None: no limit
    # (the node's configuration always sets one, PROTOCOL.md §2.5).
    transfer_items_per_second: int | None = None
    transfer_items_burst: int = 0

    def __post_init__(self) -> None:
        if self.transfer_items_per_second is not None and not (
            self.transfer_items_per_second > 0 and self.transfer_items_burst >= MAX_BATCH_ITEMS
        ):
            raise ValueError(
                "a transfer budget needs a positive rate and a burst of at least "
                f"{MAX_BATCH_ITEMS} (a batched proposal's most items)"
            )


@dataclass(frozen=True, slots=True)
class Partner:
    party: str
    registry: str
    endpoint: str
    # Ask this partner to complete each transfer proposed alone on acceptance (the
    # one-round transfer, docs/DESIGN.md): node.toml [[partners]] complete_on_acceptance.
    complete_on_acceptance: bool = False


class ReplyError(Exception):
    """A partner's reply that cannot be applied; the request stays pending."""

    def __init__(self, code: RejectionCode, detail: str) -> None:
        super().__init__(f"{code.wire_name}: {detail}")
        self.code = code


def _rejection_reasons(rejection: Rejection) -> tuple[int, str]:
    if not rejection.reasons:
        return int(RejectionCode.UNSPECIFIED), "rejected without a reason"
    first = rejection.reasons[0]
    return int(first.code), first.detail


class EngineBase:
    """One registry's protocol logic over its store."""

    def __init__(
        self,
        *,
        party: str,
        registry: str,
        signing_key: SigningKey,
        trust: TrustStore,
        partners: Sequence[Partner],
        store: Store,
        default_timeout: dt.timedelta = dt.timedelta(minutes=2),
        new_id: Callable[[], str] = random_uuid,
        limits: Limits | None = None,
        accounting: AccountingConfig | None = None,
        threshold: HostThreshold | None = None,
        key_loader: Callable[[str], SigningKey] | None = None,
    ) -> None:
        self.party = party
        self.registry = registry
        self.signing_key = signing_key
        # A new signing key announced to the partners, used once all acknowledged.
        self.pending_key: SigningKey | None = None
        self._card_keys = trust.all()
        self._card_key_ids = frozenset(key.key_id for key in self._card_keys)
        # Keys the partners' cards list as revoked, with their compromise instants.
        self._card_revoked = trust.revocations()
        self.trust = trust
        # The key ids that signed the request being handled (requests.py).
        self._request_signers: tuple[str, ...] = ()
        self.partners = {p.party: p for p in partners}
        self.store = store
        self.default_timeout = default_timeout
        self._new_id = new_id
        self.limits = limits or Limits()
        # Per partner: the transfers it may still propose now (Limits, §2.5).
        self._transfer_items: dict[str, TokenBucket] = {}
        self.accounting = accounting
        self.threshold = threshold
        self._after_commit: list[Callable[[], None]] = []
        # Told of every Rejection sent or received (direction, partner, code name),
        # once its transaction committed: the node counts them for its metrics.
        self.on_rejection: Callable[[str, str, str], None] | None = None
        # Several node processes may share one database (PostgreSQL): what they
        # cache here (pinned keys, signing keys) is reloaded when the ledger's
        # shared-state counter moves. ``key_loader`` reads a signing key by id.
        self._key_loader = key_loader
        self._shared_seen = -1
        # Set by a runtime that delivers new requests as soon as they are committed:
        # each is then claimed for this long in the outbox (not due to the outbox
        # worker meanwhile) and listed in ``sent`` for the runtime to take.
        self.claim_sent_us = 0
        self.sent: list[tuple[str, str, bytes]] = []
        # The last authorisation row read and what was built of it (_authorisation).
        self._authorisation_memo: tuple[object, Authorisation] | None = None
        # One-round transfers whose receiver could not read the proposal, ALARMed
        # once in this process (Replies._refusal_to_retry).
        self._unreadable_alarmed: set[str] = set()
        # A runtime's clock, read again for a delivery once its transaction holds
        # the ledger's write lock (Requests.handle_delivery); None: the time given.
        self.ledger_clock: Callable[[], dt.datetime] | None = None
        # Whether an amendment of one of our authorisations may be undelivered
        # (decision 55): until a look at the outbox finds none, a completion made or
        # due is checked against them. Set again when this process amends, and when
        # another process sharing the database may have (the shared state moved).
        self._amendments_pending = True
        self.reload_trust()

    # -- transactions and trust ------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Tx]:
        """A store transaction whose in-memory follow-ups run only once it committed.

        It first catches up with what other processes sharing the database changed
        (:meth:`_sync_shared`), so it verifies and signs with the ledger's keys.
        """
        self._after_commit.clear()
        try:
            with self.store.transaction() as tx:
                self._sync_shared(tx)
                yield tx
        except BaseException:
            self._after_commit.clear()
            raise
        callbacks, self._after_commit = self._after_commit, []
        # Inside a group commit (store.group) they wait for the group's commit.
        after_commit = getattr(self.store, "after_commit", None)
        for callback in callbacks:
            if after_commit is not None:
                after_commit(callback)
            else:
                callback()

    def _sync_shared(self, tx: Tx) -> None:
        """Catch up with changes another process sharing the database committed."""
        seen = tx.shared_state()
        if seen == self._shared_seen:
            return
        self._amendments_pending = True
        self._load_trust(tx)
        current = tx.meta_get("signing_key_id")
        pending = tx.meta_get("pending_signing_key")
        if self._key_loader is not None:
            if current and current != self.signing_key.key_id:
                self.signing_key = self._key_loader(current)
            if not pending:
                self.pending_key = None
            elif self.pending_key is None or self.pending_key.key_id != pending:
                self.pending_key = self._key_loader(pending)
        self._shared_seen = seen

    def reload_trust(self) -> None:
        """Pinned keys: the partners' cards, plus keys they announced, less revoked ones."""
        with self.store.transaction() as tx:
            self._load_trust(tx)
            self._shared_seen = tx.shared_state()

    def _load_trust(self, tx: Tx) -> None:
        learned = tx.partner_keys()
        trust = TrustStore(self._card_keys)
        for key_id, party, public_key, not_before, not_after in learned:
            known = trust.get(key_id)
            if known is not None and (known.party, known.public_bytes) != (party, public_key):
                continue  # cannot happen: a key id is derived from its party and bytes
            # A key announced in-band replaces the same key from a card: its
            # validity window is the partner's latest word on it.
            trust.replace(
                VerifyingKey.from_raw(
                    party, key_id, public_key,
                    not_before=from_us(not_before) if not_before is not None else None,
                    not_after=from_us(not_after) if not_after is not None else None,
                )
            )  # fmt: skip
        since: dict[str, int | None] = {
            key_id: None if moment is None else to_us(moment)
            for key_id, moment in self._card_revoked.items()
        }
        for key_id, _party, _source, _at, compromised in tx.revocations():
            _widen(since, key_id, compromised)
        # A key a partner's card lists is its owner's out-of-band word: it falls only
        # when revoked itself, never with a key that (a thief says) announced it.
        announcers = [a for a in tx.partner_key_announcers() if a[0] not in self._card_key_ids]
        spared = {k: v.split() for k, v in tx.revocation_signers().items()}
        for key_id, threshold in cascade_revocations(since, announcers, spared).items():
            trust.revoke(key_id, None if threshold is None else from_us(max(threshold, 0)))
        self.trust = trust

    # -- sealing ---------------------------------------------------------------------

    def _header(
        self, tx: Tx | None, partner: str, now_us: int, in_reply_to: str = ""
    ) -> common_pb2.Header:
        return common_pb2.Header(
            protocol_version=PROTOCOL_VERSION,
            message_id=self._new_id(),
            sender_party=self.party,
            sender_registry=self.registry,
            audience=partner,
            sent_at=timestamp(now_us),
            # Replies to messages that failed authentication are not recorded and
            # carry sequence 0 (docs/PROTOCOL.md).
            sequence=0 if tx is None else tx.next_sequence(partner),
            in_reply_to=in_reply_to,
        )

    def _seal(self, msg: Message) -> tuple[str, bytes, bytes]:
        payload = msg.SerializeToString()
        name = type_name(type(msg))
        return name, payload, seal(name, payload, self.signing_key)

    def _send(
        self,
        tx: Tx,
        partner: str,
        msg: Message,
        subject_id: str,
        now_us: int,
        *,
        due_at_us: int | None = None,
    ) -> bytes:
        """Persist an outgoing request (journal and outbox); returns its payload bytes.
        With ``due_at_us`` it waits in the outbox until then instead of leaving at once."""
        msg.header.CopyFrom(self._header(tx, partner, now_us))  # type: ignore[attr-defined]
        name, payload, envelope = self._seal(msg)
        message_id = msg.header.message_id  # type: ignore[attr-defined]
        tx.journal(
            direction="out",
            partner=partner,
            message_id=message_id,
            payload_type=name,
            envelope=envelope,
            now=now_us,
        )
        tx.outbox_put(
            message_id=message_id,
            partner=partner,
            payload_type=name,
            subject_id=subject_id,
            envelope=envelope,
            now=now_us,
            next_attempt_at=(
                due_at_us
                if due_at_us is not None
                else now_us + self.claim_sent_us
                if self.claim_sent_us
                else None
            ),
        )
        if self._amendments_pending and name in ORDERED_TYPES:
            note = self._order_hold(tx, name, partner, subject_id, message_id)
            if note is not None:
                self._hold(tx, message_id, partner, note, now_us)
                return payload
        if self.claim_sent_us and due_at_us is None:
            self.sent.append((message_id, partner, envelope))
        return payload

    # -- the order of an amendment and the completions to its partner (decision 55) ------

    def _hold(self, tx: Tx, message_id: str, partner: str, note: str, now_us: int) -> None:
        """Keep a request back for another to the same partner (decision 55)."""
        if tx.outbox_hold(message_id, until=now_us + ORDER_RECHECK_US, note=note):
            log.info(
                "%s to %s %s", message_id, partner, note,
                extra={"message_id": message_id, "partner": partner},
            )  # fmt: skip

    def _pending_amendments(
        self, tx: Tx, partner: str | None = None
    ) -> list[tuple[str, str, str, int, int]]:
        """(message id, partner, authorisation id, version, journal id) of each of our
        undelivered statements that amend an authorisation: not version 1, which no
        transfer precedes, and not a revocation, which changes no term a booking
        depends on (PROTOCOL §5.6 A14) and may stop transfers. Looking at every
        partner and finding none tells this process that none is pending."""
        found = []
        revoked: dict[str, set[int]] = {}
        for message_id, to, subject, journal_id in tx.outbox_pending_of_type(_STATEMENT, partner):
            authorisation_id, _, number = subject.rpartition("#")
            version = int(number) if number.isdigit() else 0
            if version <= 1:
                continue
            if authorisation_id not in revoked:
                revoked[authorisation_id] = {
                    terms.version
                    for terms, details in tx.authorisation_versions(self.party, authorisation_id)
                    if details.get("revoked")
                }
            if version in revoked[authorisation_id]:
                continue
            found.append((message_id, to, authorisation_id, version, journal_id))
        if partner is None and not found:
            self._amendments_pending = False
        return found

    def _order_hold(
        self, tx: Tx, payload_type: str, partner: str, subject_id: str, message_id: str
    ) -> str | None:
        """Why an undelivered statement or completion to ``partner`` must wait for
        another request to it, or None (DESIGN.md decision 55).

        Each side states the receiver's adjustment for a transfer by the latest version
        of the authorisation it recorded when it completed: the sender when it sealed
        its first completion, the receiver when it applies one. An amendment therefore
        leaves after every completion the sender completed before it, and a completion
        after every amendment it was completed after; both orders are the order of
        their journal entries (a completion sealed again keeps its first one's place).
        """
        amendments = self._pending_amendments(tx)
        if not amendments:
            return None
        if payload_type == _STATEMENT:
            mine = [a for a in amendments if a[0] == message_id]
            if not mine:
                return None  # version 1 or a revocation: never held
            _, _, authorisation_id, version, position = mine[0]
            earlier = [
                transfer_id
                for transfer_id, first in tx.outbox_pending_completions_under(
                    partner, authorisation_id, single=_COMPLETION, batch=_BATCH_COMPLETION
                )
                if first < position
            ]
            if earlier:
                return (
                    f"{HELD} {partner} has the completion of {earlier[0]}, completed "
                    f"before version {version} of {authorisation_id}"
                )
            return None
        for transfer_id, authorisation_id, first in tx.completion_transfers(
            payload_type, subject_id, single=_COMPLETION, batch=_BATCH_COMPLETION
        ):
            for _, to, amended, version, position in amendments:
                if to == partner and amended == authorisation_id and position < first:
                    return (
                        f"{HELD} {partner} has version {version} of {authorisation_id}, "
                        f"under which {transfer_id} was completed"
                    )
        return None

    def _reply(
        self, tx: Tx | None, partner: str, msg: Message, in_reply_to: str, now_us: int
    ) -> tuple[bytes, bytes]:
        """Seal a reply (journaled when ``tx`` is given); returns (payload, envelope)."""
        msg.header.CopyFrom(self._header(tx, partner, now_us, in_reply_to))  # type: ignore[attr-defined]
        name, payload, envelope = self._seal(msg)
        if isinstance(msg, Rejection):
            self._notify_rejection(tx, "sent", partner, msg)
        if tx is not None:
            tx.journal(
                direction="out",
                partner=partner,
                message_id=msg.header.message_id,  # type: ignore[attr-defined]
                payload_type=name,
                envelope=envelope,
                now=now_us,
            )
        return payload, envelope

    def _notify_rejection(
        self, tx: Tx | None, direction: str, partner: str, rejection: Rejection
    ) -> None:
        callback = self.on_rejection
        if callback is None:
            return
        code = wire_name_of(_rejection_reasons(rejection)[0])

        def notify() -> None:
            callback(direction, partner, code)

        if tx is None:
            notify()
        else:
            self._after_commit.append(notify)

    def _rejection(self, subject_id: str, rejected: Rejected, request: bytes) -> Rejection:
        return Rejection(
            subject_id=subject_id,
            envelope_digest=digest(request),
            reasons=[
                codes_pb2.RejectionReason(
                    code=int(rejected.code),  # type: ignore[arg-type]
                    detail=rejected.detail,
                )
            ],
        )

    def _check_origin(self, host: str, blocks: Sequence[Block]) -> None:
        """Units come from their host's registry: no partner can hand this node
        serials of another registry (its own included)."""
        partner = self.partners.get(host)
        expected = self.registry if host == self.party else partner.registry if partner else None
        for block in blocks:
            if block.originating_registry != expected:
                raise Rejected(
                    RejectionCode.BLOCK_ATTRIBUTE_MISMATCH,
                    f"block {block.label()} does not come from {host}'s registry "
                    f"{expected or '(unknown: no partner card for ' + host + ')'}",
                )

    def _book_first_transfer(
        self,
        tx: Tx,
        blocks: Sequence[Block],
        *,
        reference: str,
        subtype: ActionSubtype,
        now_us: int,
    ) -> None:
        """The host's adjustment for a first transfer that is not an international
        transfer (OIMP at issuance or at use): booked now, in this transaction."""
        entries = self._adjustment_entries(Role.SENDER, "", "", blocks)
        tx.adjustments_put(entries, evidence_journal_id=None, now=now_us, reference=reference)
        for block in blocks:
            tx.action_put(
                action_type=ActionType.FIRST_TRANSFER.value, subtype=subtype.value,
                block=block, at=now_us,
            )  # fmt: skip

    def _check_threshold(
        self,
        tx: Tx,
        terms: AuthorisationTerms,
        vintage: int,
        quantity: int,
        pending: dict[int, int] | None = None,
    ) -> None:
        """The host threshold on first transfers (only units that carry an adjustment).

        ``pending``: tCO2e per booking year of first transfers checked earlier in the
        same operator request (a batch) and not recorded yet; this one is added.
        """
        if (
            self.threshold is None
            or self.accounting is None
            or not terms.unit_type.requires_adjustment
        ):
            return
        year = booking_year(self.accounting, vintage=vintage)
        done = tx.first_transferred_by_year()
        for pending_year, amount in (pending or {}).items():
            done[pending_year] = done.get(pending_year, 0) + amount
        check_host_threshold(
            self.threshold, self.accounting.ndc_period, done, year=year, quantity=quantity
        )
        if pending is not None:
            pending[year] = pending.get(year, 0) + quantity

    def _check_booking(self, tx: Tx, role: Role, blocks: Sequence[Block]) -> None:
        """Refuse, before anything is promised, units whose adjustment could not be
        booked (only where this party books one for the transfer)."""
        if self.accounting is None or not self._transfer_counts(tx, role, blocks):
            return
        for block in blocks:
            if block.unit_type.requires_adjustment:
                booking_year(self.accounting, vintage=block.vintage)

    @staticmethod
    def _ca_point(authorisation: Authorisation) -> str:
        """When the host's first transfer (and so its adjustment) happens.

        Units authorised for use toward an NDC, alone or with OIMP, are first
        transferred at the first international transfer ("transfer"), as the NDC
        rule requires, so both parties book the same transfer. Units authorised
        for OIMP only follow the host's definition: "issuance" (at authorisation
        or issuance) or "use" (at use or cancellation).
        """
        triggers = first_transfer_triggers(authorisation)
        if FirstTransferTrigger.INTERNATIONAL_TRANSFER in triggers:
            return "transfer"
        if {FirstTransferTrigger.ISSUANCE, FirstTransferTrigger.AUTHORISATION} & triggers:
            return "issuance"
        return "use"

    def _transfer_counts(
        self,
        tx: Tx,
        role: Role,
        blocks: Sequence[Block],
        first_transfer: bool | None = None,
    ) -> bool:
        """Whether this party books an adjustment for a transfer of ``blocks``
        (core.adjustments.books_adjustment, the rule the reconciliation leaves state).

        The host books its first transfer when it happens: for its own transfer of
        units authorised for NDC use, unless they were first transferred at issuance
        already, which the proposal's flag says where the authorisation allows it
        (``first_transfer``, the flag it recorded; before proposing, what the flag
        would be); an acquiring party subtracts, and gives back when it transfers
        onward, only units authorised for use toward an NDC.
        """
        if not blocks:
            return False
        host = blocks[0].first_transferring_party
        authorisation = self._authorisation(tx, host, blocks[0].authorisation_id)
        host_sends = role is Role.SENDER and host == self.party
        if host_sends and first_transfer is None:
            first_transfer = self._first_transfer(tx, blocks[0].authorisation_id, blocks)
        return books_adjustment(
            role,
            host_sends=host_sends,
            first_transfer=bool(first_transfer),
            ndc=Purpose.NDC in authorisation.terms.purposes,
            oimp_at_issuance=oimp_at_issuance(
                authorisation.terms.purposes, authorisation.first_transfer_definition
            ),
        )

    def _adjustment_entries(
        self, role: Role, partner: str, transfer_id: str, blocks: Sequence[Block]
    ) -> list[AdjustmentEntry]:
        """This party's entries for a completed transfer, by its accounting method."""
        if self.accounting is None:
            return adjustments_for(role, self.party, partner, transfer_id, blocks)
        try:
            return adjustment_entries(self.accounting, role, partner, transfer_id, blocks)
        except Rejected as rejected:
            # Checked when the transfer was agreed; the configuration changed since.
            # The partner's acknowledgement is already binding: book to the vintage.
            log.error("ALARM: transfer %s booked to its vintage: %s", transfer_id, rejected)
            return adjustments_for(role, self.party, partner, transfer_id, blocks)

    def _apply(
        self,
        tx: Tx,
        effects: Sequence[Effect],
        transfer_id: str,
        partner: str,
        blocks: Sequence[Block],
        evidence_journal_id: int,
        now_us: int,
    ) -> int:
        """Carry out a transition's block and adjustment effects; returns the CA year."""
        years = self._apply_many(
            tx, effects, [(transfer_id, partner, blocks)], evidence_journal_id, now_us
        )
        return years[transfer_id]

    def _apply_many(
        self,
        tx: Tx,
        effects: Sequence[Effect],
        transfers: Sequence[tuple[str, str, Sequence[Block]]],
        evidence_journal_id: int,
        now_us: int,
        first_transfer: Mapping[str, bool] | None = None,
    ) -> dict[str, int]:
        """Carry out the same transition's effects for several transfers (transfer id,
        partner, blocks) at once, with one statement per table; returns each CA year
        (0 when none, or entries for several years). ``first_transfer``: at the
        sender, each transfer's recorded proposal flag (the host books by it)."""
        role = Role.SENDER if Effect.DEBIT_RESERVED_BLOCKS in effects else Role.RECEIVER
        ids = [transfer_id for transfer_id, _, _ in transfers]
        for effect in effects:
            if effect is Effect.DEBIT_RESERVED_BLOCKS:
                debited = tx.blocks_debit_reserved_of(ids)
                expected = sum(len(blocks) for _, _, blocks in transfers)
                if debited != expected:
                    raise RuntimeError(
                        f"transfers {', '.join(ids)}: {debited} reserved blocks, "
                        f"expected {expected}"
                    )
            elif effect is Effect.CREDIT_BLOCKS:
                tx.blocks_insert(
                    [b for _, _, blocks in transfers for b in blocks], account=HOLDING_ACCOUNT
                )
            elif effect is Effect.RELEASE_RESERVED_BLOCKS:
                for transfer_id in ids:
                    tx.blocks_release(transfer_id)
        years = dict.fromkeys(ids, 0)
        if Effect.APPLY_ADJUSTMENT in effects:
            booked: list[AdjustmentEntry] = []
            for transfer_id, partner, blocks in transfers:
                flag = None if first_transfer is None else first_transfer.get(transfer_id)
                if not self._transfer_counts(tx, role, blocks, flag):
                    continue
                entries = self._adjustment_entries(role, partner, transfer_id, blocks)
                booked.extend(entries)
                entry_years = {entry.year for entry in entries}
                years[transfer_id] = entry_years.pop() if len(entry_years) == 1 else 0
            tx.adjustments_put(booked, evidence_journal_id=evidence_journal_id, now=now_us)
        return years

    def _journaled_query(self, partner: str, query: Message, now: dt.datetime) -> tuple[str, bytes]:
        """Seal and journal a query sent at once, not through the outbox (a
        reconciliation's, a recovery's); (message id, envelope)."""
        self._require_partner(partner)
        now_us = to_us(now)
        header: common_pb2.Header = query.header  # type: ignore[attr-defined]
        with self._transaction() as tx:
            header.CopyFrom(self._header(tx, partner, now_us))
            name, _, envelope = self._seal(query)
            tx.journal(
                direction="out", partner=partner, message_id=header.message_id,
                payload_type=name, envelope=envelope, now=now_us,
            )  # fmt: skip
        return header.message_id, envelope

    def _open_reply(
        self,
        tx: Tx,
        partner: str,
        request_type: str,
        request: bytes,
        message_id: str,
        raw: bytes,
        now_us: int,
        *,
        journal: bool = True,
    ) -> tuple[Message, bytes, int]:
        """Verify and journal a reply to our request; (reply, payload, journal id).
        With ``journal`` false it is verified only (journal id 0): the caller
        journals it with :meth:`_journal_reply` once it decides to apply it."""
        try:
            verified = open_envelope(raw, self.trust, from_us(now_us))
        except Rejected as rejected:
            raise ReplyError(rejected.code, f"reply from {partner}: {rejected.detail}") from None
        if verified.signer_party != partner:
            raise ReplyError(
                RejectionCode.SIGNER_NOT_PEER,
                f"reply to a message for {partner} is signed by {verified.signer_party}",
            )
        expected = EXPECTED_REPLY[request_type]
        if verified.payload_type == type_name(expected):
            reply: Message = expected()
        elif verified.payload_type == type_name(Rejection):
            reply = Rejection()
        else:
            raise ReplyError(
                RejectionCode.UNEXPECTED_REPLY,
                f"{verified.payload_type} does not answer {request_type}",
            )
        try:
            reply.ParseFromString(verified.payload)
        except DecodeError as exc:
            raise ReplyError(RejectionCode.MALFORMED_PAYLOAD, f"reply payload: {exc}") from None
        header: common_pb2.Header = reply.header  # type: ignore[attr-defined]
        try:
            validate(reply, max_blocks=self.limits.max_blocks)
            self._check_header_fields(header, sender=partner)
        except Rejected as rejected:
            raise ReplyError(rejected.code, rejected.detail) from None
        self._check_answers(header, reply, request, message_id)
        if not journal:
            return reply, verified.payload, 0
        return reply, verified.payload, self._journal_reply(tx, partner, reply, raw, now_us)

    def _journal_reply(self, tx: Tx, partner: str, reply: Message, raw: bytes, now_us: int) -> int:
        """Journal a reply verified by :meth:`_open_reply`; its journal id."""
        header: common_pb2.Header = reply.header  # type: ignore[attr-defined]
        journal_id = (
            tx.journal_new(
                direction="in",
                partner=partner,
                message_id=header.message_id,
                payload_type=type_name(type(reply)),
                envelope=raw,
                now=now_us,
            )
            if header.message_id
            else None
        )
        if journal_id is None:  # no id, or one the journal has: nothing was recorded
            raise ReplyError(
                RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                f"reply from {partner} reuses message id {header.message_id!r}",
            )
        if isinstance(reply, Rejection):
            self._notify_rejection(tx, "received", partner, reply)
        return journal_id

    @staticmethod
    def _check_answers(
        header: common_pb2.Header, reply: Message, request: bytes, message_id: str
    ) -> None:
        check_answers(header, reply, request, message_id)

    def _check_header_fields(self, header: common_pb2.Header, *, sender: str) -> None:
        """Header checks for replies (sequence 0 is allowed there)."""
        check_reply_header(header, sender=sender, audience=self.party)

    def _resend_completion(self, tx: Tx, transfer_id: str, now_us: int) -> None:
        """Queue a freshly sealed completion of a transfer completed here, unless one
        is already on its way."""
        record = tx.transfer_get(transfer_id)
        if (
            record is None
            or record.direction is not Role.SENDER
            or record.state is not TransferState.COMPLETED
            or tx.outbox_pending_of(
                payload_type=type_name(TransferCompletion), subject_id=transfer_id
            )
            or (
                record.batch_id
                and tx.outbox_pending_of(
                    payload_type=type_name(TransferBatchCompletion), subject_id=record.batch_id
                )
            )
        ):
            return
        if (
            record.complete_on_acceptance
            and not record.batch_id
            and not tx.outbox_count_of(
                payload_type=type_name(TransferCompletion), subject_id=transfer_id
            )
        ):
            # Completed on the receiver's completed acceptance (one-round, S2): the
            # receiver completed first, and no completion was ever owed.
            return
        years = {year for year, _ in tx.adjustment_amounts(transfer_id)}
        completion = TransferCompletion(
            transfer_id=transfer_id,
            acceptance_digest=record.acceptance_digest,
            adjustment_year=years.pop() if len(years) == 1 else 0,
        )
        # Each completion sealed again waits longer (0.2 s, 0.4 s, ... up to 30 s), as a
        # retry would: a receiver that keeps refusing them (its clock off by more than
        # the skew, 5003) is not sent a new one in a tight loop.
        earlier = tx.outbox_count_of(
            payload_type=type_name(TransferCompletion), subject_id=transfer_id
        )
        due_at_us = now_us + retry_delay_us(earlier - 1) if earlier else None
        self._send(tx, record.partner, completion, transfer_id, now_us, due_at_us=due_at_us)

    def _switch_signing_key(self, tx: Tx, key_id: str) -> None:
        tx.set_meta("signing_key_id", key_id)
        tx.set_meta("pending_signing_key", "")

        def switch() -> None:
            assert self.pending_key is not None
            assert self.pending_key.key_id == key_id
            self.signing_key, self.pending_key = self.pending_key, None
            log.warning("now signing with key %s", key_id)

        self._after_commit.append(switch)

    # -- operator requests -------------------------------------------------------------

    def _require_partner(self, party: str) -> None:
        if party not in self.partners:
            raise Rejected(
                RejectionCode.UNKNOWN_PARTNER,
                f"{party} is not a partner of this node: add its card under [[partners]]",
            )

    def _send_statement(
        self,
        tx: Tx,
        terms: AuthorisationTerms,
        *,
        activity_name: str,
        activity_description: str,
        oimp_detail: str,
        first_transfer_definition: FirstTransferDefinition,
        revoked: bool,
        now_us: int,
        removed: frozenset[str] = frozenset(),
    ) -> None:
        """Send a version of our authorisation to each acquiring party, and to each party
        it removes, and record each as pending its answer."""
        if terms.version > 1 and not revoked:
            # An amendment: what completes under the authorisation from now on waits
            # for it, and it for what completed before (decision 55); other processes
            # sharing the database learn it through the shared state.
            self._amendments_pending = True
            tx.shared_state_changed()
        for party in sorted(terms.acquiring_parties | removed):
            tx.authorisation_party_put(terms, party, "pending", None)
            statement = AuthorisationStatement(
                authorisation_id=terms.authorisation_id,
                version=terms.version,
                host_party=self.party,
                activity=authorisation_pb2.Activity(
                    activity_id=terms.activity_id, name=activity_name,
                    description=activity_description,
                ),
                cooperative_approach_id=terms.cooperative_approach_id,
                acquiring_parties=sorted(terms.acquiring_parties),
                purposes=[int(p) for p in sorted(terms.purposes)],  # type: ignore[misc]
                oimp_detail=oimp_detail,
                first_transfer_definition=int(first_transfer_definition),  # type: ignore[arg-type]
                vintage_from=terms.vintage_from,
                vintage_to=terms.vintage_to,
                quantity_cap=terms.quantity_cap,
                unit_type=int(terms.unit_type),  # type: ignore[arg-type]
                revoked=revoked,
            )  # fmt: skip
            self._send(tx, party, statement, f"{terms.authorisation_id}#{terms.version}", now_us)

    def _authorisation(self, tx: Tx, host_party: str, authorisation_id: str) -> Authorisation:
        latest = tx.authorisation_latest(host_party, authorisation_id)
        if latest is None:
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"no authorisation {authorisation_id!r} of {host_party} is recorded here",
            )
        # A transaction that remembers what it read gives the same terms object again:
        # their Authorisation is built once (a batch asks per item).
        terms, details = latest
        memo = self._authorisation_memo
        if memo is not None and memo[0] is terms:
            return memo[1]
        authorisation = Authorisation(
            terms,
            oimp_detail=details["oimp_detail"],
            first_transfer_definition=FirstTransferDefinition(details["first_transfer_definition"]),
            revoked=bool(details["revoked"]),
        )
        self._authorisation_memo = (terms, authorisation)
        return authorisation

    def _first_transfer(self, tx: Tx, authorisation_id: str, blocks: Sequence[Block]) -> bool:
        """Whether a transfer of ``blocks`` is their first transfer (§5.8, "Sender").

        Not for units first transferred already at issuance (their adjustment is
        booked): that happens only under an authorisation for OIMP first transferred at
        authorisation or issuance, amended to add NDC after the units were issued
        (units the host first transferred by using them are no longer held).
        """
        if not all(b.first_transferring_party == self.party for b in blocks):
            return False
        authorisation = self._authorisation(tx, self.party, authorisation_id)
        if self._ca_point(authorisation) != "transfer":
            return False
        if oimp_at_issuance(authorisation.terms.purposes, authorisation.first_transfer_definition):
            return not any(tx.serials_first_transferred(b) for b in blocks)
        return True

    def _check_one_kind(self, tx: Tx, authorisation_id: str, blocks: Sequence[Block]) -> None:
        """Refuse a host's transfer of ``blocks`` that mixes units first transferred at
        issuance with units that were not (docs/PROTOCOL.md §5.8, "Sender").

        Both kinds are held only under an authorisation for OIMP first transferred at
        authorisation or issuance amended to add NDC after some units were issued. The
        proposal's one ``first_transfer`` flag cannot say both, and the host's booking
        and threshold follow it: a mixed transfer would leave the adjustment of the
        units not booked at issuance unbooked. ALREADY_FIRST_TRANSFERRED (4013), the
        detail saying how many units of the first kind come first in serial order.
        """
        if not blocks or not all(b.first_transferring_party == self.party for b in blocks):
            return
        authorisation = self._authorisation(tx, self.party, authorisation_id)
        if self._ca_point(authorisation) != "transfer" or not oimp_at_issuance(
            authorisation.terms.purposes, authorisation.first_transfer_definition
        ):
            return
        kinds = [tx.serials_first_transferred(b) for b in blocks]
        if all(kinds) or not any(kinds):
            return
        leading = 0
        for block, kind in zip(blocks, kinds, strict=True):
            if kind != kinds[0]:
                break
            leading += block.quantity
        first, then = (
            ("first transferred at issuance", "not")
            if kinds[0]
            else ("not first transferred at issuance", "first transferred at issuance")
        )
        raise Rejected(
            RejectionCode.ALREADY_FIRST_TRANSFERRED,
            f"the {total(blocks)} units this transfer would take mix units first "
            f"transferred at issuance (their adjustment booked then) with units that were "
            f"not (booked at this transfer); one transfer cannot take both: the first "
            f"{leading} held in serial order are {first}, the ones after them {then}: "
            f"transfer at most {leading} now, the rest in another transfer",
        )

    def _reserve_outgoing(
        self, tx: Tx, authorisation_id: str, blocks: Sequence[Block], evidence: bytes = b""
    ) -> Outgoing:
        """Give a transfer of held ``blocks`` its id and reserve them for it."""
        taken = list(blocks)
        self._check_one_kind(tx, authorisation_id, taken)
        transfer_id = f"{self.party}-T-{tx.next_counter('transfer'):06d}"
        tx.blocks_reserve(taken, transfer_id=transfer_id)
        return Outgoing(
            transfer_id, authorisation_id, total(taken), taken,
            self._first_transfer(tx, authorisation_id, taken), evidence,
        )  # fmt: skip

    def _record_outgoing(
        self,
        tx: Tx,
        to_party: str,
        items: Sequence[Outgoing],
        *,
        message_id: str,
        payload: bytes,
        expires_us: int,
        now_us: int,
        batch_id: str = "",
        complete_on_acceptance: bool = False,
    ) -> None:
        """Record proposed transfers, each PROPOSED with the digest of the proposal
        (or batch proposal) that carries it, and whether it asked the receiver to
        complete on acceptance."""
        proposal_digest = digest(payload)
        tx.transfers_put(
            [
                NewTransfer(
                    transfer_id=item.transfer_id, direction=Role.SENDER, partner=to_party,
                    state=TransferState.PROPOSED, quantity=item.quantity,
                    authorisation_id=item.authorisation_id, first_transfer=item.first_transfer,
                    proposal_message_id=message_id, proposal_digest=proposal_digest,
                    expires_at=expires_us, blocks=item.blocks, batch_id=batch_id,
                    complete_on_acceptance=complete_on_acceptance,
                )
                for item in items
            ],
            now=now_us,
        )  # fmt: skip

    def _propose(
        self,
        tx: Tx,
        terms: AuthorisationTerms,
        *,
        to_party: str,
        blocks: Sequence[Block],
        now_us: int,
        expires_us: int,
        evidence: bytes = b"",
    ) -> str:
        """Reserve held ``blocks`` and persist a proposal of them to ``to_party``."""
        item = self._reserve_outgoing(tx, terms.authorisation_id, blocks, evidence)
        return self._send_proposal(tx, to_party, item, now_us=now_us, expires_us=expires_us)

    def _send_proposal(
        self, tx: Tx, to_party: str, item: Outgoing, *, now_us: int, expires_us: int
    ) -> str:
        """Persist the proposal of one transfer whose blocks are reserved, and record
        the transfer as PROPOSED. It asks the receiver to complete on acceptance if
        this node is configured so for the partner (one-round transfer, recorded with
        the transfer: the proposal's flag is what counts when the answer comes)."""
        partner = self.partners.get(to_party)
        one_round = partner is not None and partner.complete_on_acceptance
        proposal = TransferProposal(
            transfer_id=item.transfer_id,
            authorisation_id=item.authorisation_id,
            quantity=item.quantity,
            blocks=[block_to_pb(b) for b in item.blocks],
            first_transfer=item.first_transfer,
            expires_at=timestamp(expires_us),
            authorisation_evidence=item.evidence,
            complete_on_acceptance=one_round,
        )
        payload = self._send(tx, to_party, proposal, item.transfer_id, now_us)
        self._record_outgoing(
            tx, to_party, [item], message_id=proposal.header.message_id, payload=payload,
            expires_us=expires_us, now_us=now_us, complete_on_acceptance=one_round,
        )  # fmt: skip
        log.info(
            "transfer %s proposed%s: %d tCO2e to %s", item.transfer_id,
            " (one round)" if one_round else "", item.quantity, to_party,
            extra={"transfer_id": item.transfer_id, "partner": to_party},
        )  # fmt: skip
        return item.transfer_id


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A transfer this node is about to propose: its id, the blocks reserved for it
    and what its proposal (or its item of a batch proposal) says."""

    transfer_id: str
    authorisation_id: str
    quantity: int
    blocks: list[Block]
    first_transfer: bool
    evidence: bytes


def check_answers(
    header: common_pb2.Header, reply: Message, request: bytes, message_id: str
) -> None:
    """A reply names the request it answers; a Rejection of a request that could
    not be read that far is bound to it by the digest of the request's bytes."""
    if isinstance(reply, Rejection) and reply.envelope_digest:
        if reply.envelope_digest != digest(request):
            raise ReplyError(
                RejectionCode.UNEXPECTED_REPLY,
                "rejection is about another envelope than the one sent",
            )
        if header.in_reply_to in ("", message_id):
            return
    if header.in_reply_to != message_id:
        raise ReplyError(
            RejectionCode.UNEXPECTED_REPLY,
            f"reply answers {header.in_reply_to!r}, not {message_id}",
        )


def check_reply_header(header: common_pb2.Header, *, sender: str, audience: str) -> None:
    """Header checks for replies (sequence 0 is allowed there)."""
    if header.protocol_version != PROTOCOL_VERSION:
        raise Rejected(
            RejectionCode.UNSUPPORTED_VERSION,
            f"protocol_version {header.protocol_version}; this node speaks {PROTOCOL_VERSION}",
        )
    if header.sender_party != sender:
        raise Rejected(
            RejectionCode.SENDER_MISMATCH,
            f"reply names sender {header.sender_party!r} but is signed by {sender}",
        )
    if header.audience != audience:
        raise Rejected(
            RejectionCode.WRONG_AUDIENCE,
            f"reply is addressed to {header.audience!r}, this node is {audience}",
        )


def _enum_or(kind: type[FirstTransferDefinition], value: int) -> FirstTransferDefinition:
    try:
        return kind(value)
    except ValueError:
        raise Rejected(RejectionCode.INVALID_FIELD, f"{kind.__name__} {value} is unknown") from None


def _subject_of(msg: Message) -> str:
    for name in ("batch_id", "transfer_id", "issuance_id", "authorisation_id"):
        if msg.DESCRIPTOR.fields_by_name.get(name) is not None:
            return str(getattr(msg, name))
    return ""


VIEWS = {
    reconcile_pb2.RECONCILIATION_VIEW_BLOCKS: "blocks",
    reconcile_pb2.RECONCILIATION_VIEW_JOURNAL: "journal",
}
MAX_PREFIXES = 256
MAX_LEAVES = 4_096


def check_reconciliation_query(msg: ReconciliationQuery) -> None:
    if not msg.reconciliation_id or not msg.HasField("snapshot_at"):
        raise Rejected(RejectionCode.MISSING_FIELD, "query needs reconciliation_id and snapshot_at")
    if msg.view not in (reconcile_pb2.RECONCILIATION_VIEW_TOTALS, *VIEWS):
        raise Rejected(RejectionCode.INVALID_FIELD, f"unknown reconciliation view {msg.view}")
    if len(msg.prefixes) > MAX_PREFIXES or len(msg.leaf_prefixes) > MAX_PREFIXES:
        raise Rejected(RejectionCode.INVALID_FIELD, f"at most {MAX_PREFIXES} prefixes per query")
    for prefix in [*msg.prefixes, *msg.leaf_prefixes]:
        if len(prefix) > 64 or prefix.strip("0123456789abcdef"):
            raise Rejected(RejectionCode.INVALID_FIELD, f"prefix {prefix!r} is not lower-case hex")
    check_leaf_definition(msg.view, msg.leaf_definition, "query")


def check_leaf_definition(view: int, definition: int, said_by: str) -> None:
    """A BLOCKS query or answer states the blocks leaf definition this node computes
    (docs/PROTOCOL.md §11.3 R6, §11.7), else 2010: leaves of two definitions differ on
    every transfer that carries an adjustment, so they are not compared at all."""
    if view != reconcile_pb2.RECONCILIATION_VIEW_BLOCKS or definition == BLOCKS_LEAF_DEFINITION:
        return
    stated = f"definition {definition}" if definition else "no definition (before schema 7)"
    raise Rejected(
        RejectionCode.INVALID_FIELD,
        f"the {said_by} states {stated} of the blocks leaf; this node computes definition "
        f"{BLOCKS_LEAF_DEFINITION} (PROTOCOL §11.4): both partners must run the same one "
        "before they compare blocks",
    )


def _owned_by(transfer_id: str, party: str) -> bool:
    return transfer_id.startswith(f"{party}-") and len(transfer_id) > len(party) + 1


def _check_owned_id(identifier: str, owner: str, what: str) -> None:
    if not _owned_by(identifier, owner):
        raise Rejected(
            RejectionCode.INVALID_IDENTIFIER,
            f"{what} {identifier!r} of {owner} must start with '{owner}-'",
        )


def _check_transfer_id(transfer_id: str, sender: str) -> None:
    """Transfer ids start with the sender's party code, so no partner can take
    an id that belongs to another (docs/PROTOCOL.md)."""
    if not transfer_id:
        raise Rejected(RejectionCode.MISSING_FIELD, "message has no transfer_id")
    if not _owned_by(transfer_id, sender):
        raise Rejected(
            RejectionCode.INVALID_IDENTIFIER,
            f"transfer id {transfer_id!r} from {sender} must start with '{sender}-'",
        )


# A cascaded key was the thief's from the start: everything it announced falls with it.
_EVERYTHING = -(2**63)


def _widen(since: dict[str, int | None], key_id: str, compromised: int | None) -> None:
    """Record a revocation of ``key_id``; the earliest compromise instant given wins."""
    known = since.get(key_id)
    if key_id not in since or (compromised is not None and (known is None or compromised < known)):
        since[key_id] = compromised


def cascade_revocations(
    since: dict[str, int | None],
    announcers: Sequence[tuple[str, str, int]],
    spared: Mapping[str, Collection[str]] | None = None,
) -> dict[str, int | None]:
    """Every revoked key id, with the instant from which what it announced falls.

    ``since`` maps the keys revoked outright to their compromise instants (None: a
    retirement, nothing falls with it); ``announcers`` lists (key id, the key ids that
    signed its announcement, when it was recorded). A key recorded as announced, at
    or after that instant, in a KeyRotation signed by a compromised key is revoked
    too, and so is everything it announced (transitively). ``spared`` maps a key
    revoked outright to the keys that do not fall with it (the signers of the
    revocation that gave its instant), nor carry its cascade on. PROTOCOL §3.8.
    """
    announced: dict[str, list[tuple[str, int]]] = {}
    for key_id, signers, added_at in announcers:
        for signer in set(signers.split()):
            announced.setdefault(signer, []).append((key_id, added_at))
    spared = spared or {}
    result = dict(since)
    fallen: set[str] = set()
    for root, root_threshold in since.items():
        if root_threshold is None:
            continue
        keep = set(spared.get(root, ())) - {root}
        queue = [root]
        reached = {root}
        while queue:
            signer = queue.pop()
            threshold = root_threshold if signer == root else _EVERYTHING
            for key_id, added_at in announced.get(signer, ()):
                if added_at >= threshold and key_id not in keep and key_id not in reached:
                    reached.add(key_id)
                    fallen.add(key_id)
                    queue.append(key_id)
    for key_id in fallen:
        result[key_id] = _EVERYTHING
    return result
