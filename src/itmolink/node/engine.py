"""The protocol engine: every protocol step as one database transaction.

The engine is synchronous and clock-free: callers pass ``now`` and it runs on
the node's single database thread. It verifies envelopes, applies the core
rules and state machine, and persists each step together with the messages it
sends (outbox) and the evidence it received (journal):

* a request from a partner (``handle_delivery``) is verified before it is
  parsed, applied at most once (inbox), and answered with a signed reply;
* a reply to one of our requests (``handle_reply``) is verified, journaled and
  applied in the transaction that marks the request answered;
* operator requests (``authorise``, ``issue``, ``start_transfer``) persist
  their outgoing messages before anything is sent.

The corresponding adjustment of a transfer is written only by ``_accepted``
(sender) and ``_on_completion`` (receiver), each in the transaction that
journals the partner's signed acknowledgement; the adjustment row references
that journal entry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from google.protobuf.message import DecodeError, Message

from itmolink import PROTOCOL_VERSION
from itmolink.core import rules
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
    check_use_ndc,
    check_use_oimp,
    check_voluntary_cancellation,
    first_transfer_triggers,
)
from itmolink.core.adjustments import AdjustmentEntry, adjustments_for
from itmolink.core.aef import ActionSubtype
from itmolink.core.authorisation import (
    Authorisation,
    Revocation,
    UnitStatus,
    check_amendment,
    check_authorisation,
    revoke,
)
from itmolink.core.blocks import Block, take, total, validate_block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.issuance import Destination, IssuancePolicy, allocate_block, split_issuance
from itmolink.core.reconcile import Bucket, Total
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Effect, Event, Role, TransferState, step
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore, open_envelope, pae, seal
from itmolink.crypto.keys import SigningKey, VerifyingKey
from itmolink.node.convert import (
    block_from_pb,
    block_to_pb,
    describe_us,
    from_us,
    terms_from_statement,
    timestamp,
    timestamp_us,
    to_us,
)
from itmolink.node.validation import validate
from itmolink.store.sqlite import HOLDING_ACCOUNT, Store
from itmolink.store.tx import Tx
from itmolink.v1 import (
    authorisation_pb2,
    codes_pb2,
    common_pb2,
    envelope_pb2,
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
    )
}

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


def digest(payload: bytes) -> bytes:
    """SHA-256 of a payload's bytes: how one message refers to another."""
    return hashlib.sha256(payload).digest()


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


@dataclass(frozen=True, slots=True)
class Partner:
    party: str
    registry: str
    endpoint: str


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


class Engine:
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
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        limits: Limits | None = None,
        accounting: AccountingConfig | None = None,
        threshold: HostThreshold | None = None,
    ) -> None:
        self.party = party
        self.registry = registry
        self.signing_key = signing_key
        # A new signing key announced to the partners, used once all acknowledged.
        self.pending_key: SigningKey | None = None
        self._card_keys = trust.all()
        self.trust = trust
        self.partners = {p.party: p for p in partners}
        self.store = store
        self.default_timeout = default_timeout
        self._new_id = new_id
        self.limits = limits or Limits()
        self.accounting = accounting
        self.threshold = threshold
        self._after_commit: list[Callable[[], None]] = []
        self.reload_trust()

    # -- transactions and trust ------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Tx]:
        """A store transaction whose in-memory follow-ups run only once it committed."""
        self._after_commit.clear()
        try:
            with self.store.transaction() as tx:
                yield tx
        except BaseException:
            self._after_commit.clear()
            raise
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def reload_trust(self) -> None:
        """Pinned keys: the partners' cards, plus keys they announced, less revoked ones."""
        with self.store.transaction() as tx:
            learned = tx.partner_keys()
            revoked = tx.revoked_keys()
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
        for key_id in revoked:
            trust.revoke(key_id)
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

    def _send(self, tx: Tx, partner: str, msg: Message, subject_id: str, now_us: int) -> bytes:
        """Persist an outgoing request (journal and outbox); returns its payload bytes."""
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
        )
        return payload

    def _reply(
        self, tx: Tx | None, partner: str, msg: Message, in_reply_to: str, now_us: int
    ) -> tuple[bytes, bytes]:
        """Seal a reply (journaled when ``tx`` is given); returns (payload, envelope)."""
        msg.header.CopyFrom(self._header(tx, partner, now_us, in_reply_to))  # type: ignore[attr-defined]
        name, payload, envelope = self._seal(msg)
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

    # -- requests from partners ------------------------------------------------------

    def handle_delivery(self, peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        """Apply one request delivered by ``peer_party`` (the mTLS-authenticated
        partner) and return the signed reply envelope."""
        now_us = to_us(now)
        message_id = ""
        subject_id = ""
        try:
            if len(raw) > self.limits.max_message_bytes:
                raise Rejected(
                    RejectionCode.MESSAGE_TOO_LARGE,
                    f"envelope of {len(raw)} bytes; at most {self.limits.max_message_bytes}",
                )
            verified = open_envelope(raw, self.trust, now)
            if verified.signer_party != peer_party:
                raise Rejected(
                    RejectionCode.SIGNER_NOT_PEER,
                    f"envelope signed by {verified.signer_party} but delivered by {peer_party}",
                )
            cls = REQUEST_TYPES.get(verified.payload_type)
            if cls is None:
                raise Rejected(
                    RejectionCode.UNKNOWN_PAYLOAD_TYPE,
                    f"{verified.payload_type!r} is not a request this node accepts",
                )
            msg = cls()
            try:
                msg.ParseFromString(verified.payload)
            except DecodeError as exc:
                raise Rejected(RejectionCode.MALFORMED_PAYLOAD, f"payload: {exc}") from None
            header: common_pb2.Header = msg.header  # type: ignore[attr-defined]
            validate(msg, max_blocks=self.limits.max_blocks)
            # Echoed in a rejection's in_reply_to only once known to be well formed.
            message_id = header.message_id
            subject_id = _subject_of(msg)
            self._check_header(header, sender=verified.signer_party, now_us=now_us)
        except Rejected as rejected:
            log.warning("refused a message from %s without recording it: %s", peer_party, rejected)
            _, envelope = self._reply(
                None, peer_party, self._rejection(subject_id, rejected, raw), message_id, now_us
            )
            return envelope

        sender = verified.signer_party
        payload_digest = digest(pae(verified.payload_type, verified.payload))
        with self._transaction() as tx:
            seen = tx.inbox_get(sender, message_id)
            if seen is not None:
                if seen.payload_digest == payload_digest:
                    return seen.reply
                log.error(
                    "ALARM: %s reused message id %s with different content", sender, message_id
                )
                _, envelope = self._reply(
                    None,
                    sender,
                    self._rejection(
                        subject_id,
                        Rejected(
                            RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                            f"message id {message_id} was already received with other content",
                        ),
                        raw,
                    ),
                    message_id,
                    now_us,
                )
                return envelope
            try:
                self._check_window(header, now_us)
            except Rejected as rejected:
                _, envelope = self._reply(
                    None, sender, self._rejection(subject_id, rejected, raw), message_id, now_us
                )
                return envelope
            owner = tx.inbox_sequence_owner(sender, header.sequence)
            if owner is not None:
                _, envelope = self._reply(
                    None,
                    sender,
                    self._rejection(
                        subject_id,
                        Rejected(
                            RejectionCode.SEQUENCE_REUSED,
                            f"sequence {header.sequence} already used by message {owner}",
                        ),
                        raw,
                    ),
                    message_id,
                    now_us,
                )
                return envelope
            if tx.journal_has("in", sender, message_id):  # an id of one of its replies
                _, envelope = self._reply(
                    None, sender,
                    self._rejection(subject_id, Rejected(
                        RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                        f"message id {message_id} was already used by another message",
                    ), raw),
                    message_id, now_us,
                )  # fmt: skip
                return envelope
            journal_id = tx.journal(
                direction="in",
                partner=sender,
                message_id=message_id,
                payload_type=verified.payload_type,
                envelope=raw,
                now=now_us,
            )
            handler = self._request_handlers[verified.payload_type]
            try:
                with tx.savepoint():
                    envelope = handler(self, tx, sender, msg, verified.payload, journal_id, now_us)
            except Rejected as rejected:
                log.info("rejected %s %s from %s: %s", cls.__name__, subject_id, sender, rejected)
                self._record_rejected_request(tx, sender, msg, verified.payload, rejected, now_us)
                _, envelope = self._reply(
                    tx, sender, self._rejection(subject_id, rejected, raw), message_id, now_us
                )
            tx.inbox_put(
                partner=sender,
                message_id=message_id,
                payload_digest=payload_digest,
                sequence=header.sequence,
                reply=envelope,
                journal_id=journal_id,
            )
            return envelope

    def _check_header(self, header: common_pb2.Header, *, sender: str, now_us: int) -> None:
        if header.protocol_version != PROTOCOL_VERSION:
            raise Rejected(
                RejectionCode.UNSUPPORTED_VERSION,
                f"protocol_version {header.protocol_version}; this node speaks {PROTOCOL_VERSION}",
            )
        if not header.message_id:
            raise Rejected(RejectionCode.MISSING_FIELD, "header has no message_id")
        if header.sender_party != sender:
            raise Rejected(
                RejectionCode.SENDER_MISMATCH,
                f"header names sender {header.sender_party!r} but the signature is {sender}'s",
            )
        if header.audience != self.party:
            raise Rejected(
                RejectionCode.WRONG_AUDIENCE,
                f"message is addressed to {header.audience!r}, this node is {self.party}",
            )
        if header.sequence < 1:
            raise Rejected(RejectionCode.MISSING_FIELD, "header sequence must be at least 1")
        if not header.HasField("sent_at"):
            raise Rejected(RejectionCode.MISSING_FIELD, "header has no sent_at")

    def _check_window(self, header: common_pb2.Header, now_us: int) -> None:
        """A new request's sent_at must be near this node's clock. Checked after the
        inbox lookup, so a recorded request retried later still gets its reply."""
        sent_at = timestamp_us(header.sent_at)
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        oldest = now_us - self.limits.max_message_age // dt.timedelta(microseconds=1)
        if sent_at > now_us + skew:
            raise Rejected(
                RejectionCode.SENT_AT_OUT_OF_WINDOW,
                f"sent_at {describe_us(sent_at)} is ahead of this node's clock "
                f"by more than {self.limits.max_clock_skew}",
            )
        if sent_at < oldest:
            raise Rejected(
                RejectionCode.SENT_AT_OUT_OF_WINDOW,
                f"sent_at {describe_us(sent_at)} is older than {self.limits.max_message_age}",
            )

    def _record_rejected_request(
        self, tx: Tx, sender: str, msg: Message, payload: bytes, rejected: Rejected, now_us: int
    ) -> None:
        """Keep a visible record of a rejected transfer proposal (and block reuse of its id)."""
        if not isinstance(msg, TransferProposal) or not _owned_by(msg.transfer_id, sender):
            return
        if tx.transfer_get(msg.transfer_id) is not None:
            return
        tx.transfer_put(
            transfer_id=msg.transfer_id,
            direction=Role.RECEIVER,
            partner=sender,
            state=TransferState.REJECTED,
            quantity=msg.quantity,
            authorisation_id=msg.authorisation_id,
            first_transfer=msg.first_transfer,
            proposal_message_id=msg.header.message_id,
            proposal_digest=digest(payload),
            expires_at=0,
            rejection_code=int(rejected.code),
            rejection_detail=rejected.detail,
            proposed_at=timestamp_us(msg.header.sent_at),
            now=now_us,
        )

    def _on_authorisation(
        self,
        tx: Tx,
        sender: str,
        msg: AuthorisationStatement,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        terms = self._check_statement(msg, sender)
        existing = tx.authorisation_get(sender, terms.authorisation_id)
        if existing is not None and existing.version >= terms.version:
            if existing != terms:
                raise Rejected(
                    RejectionCode.AUTHORISATION_CONFLICT,
                    f"authorisation {terms.authorisation_id} version {existing.version} is "
                    f"already recorded with other terms",
                )
        else:
            if existing is not None:
                self._check_new_version(tx, sender, msg, terms)
            tx.authorisation_put(
                terms,
                activity_name=msg.activity.name,
                activity_description=msg.activity.description,
                oimp_detail=msg.oimp_detail,
                first_transfer_definition=msg.first_transfer_definition,
                revoked=msg.revoked,
                statement_journal_id=journal_id,
                now=now_us,
            )
            tx.authorisation_party_put(terms, self.party, "acknowledged", journal_id)
        ack = AuthorisationAcknowledgement(
            authorisation_id=terms.authorisation_id,
            version=terms.version,
            acquiring_party_reference=f"{self.registry}/{terms.authorisation_id}/v{terms.version}",
        )
        return self._reply(tx, sender, ack, msg.header.message_id, now_us)[1]

    def _learn_authorisation(self, tx: Tx, host: str, msg: TransferProposal, now_us: int) -> None:
        """Record the host's authorisation from the evidence an onward transfer carries.

        The evidence is the host's own signed statement: verified against the
        host's pinned key, it must name this party as an acquiring party.
        """
        if tx.authorisation_get(host, msg.authorisation_id) is not None:
            return
        if not msg.authorisation_evidence:
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"authorisation {msg.authorisation_id} of {host} is unknown here and the "
                "proposal carries no evidence of it",
            )
        # Checked without the key's validity window: the statement may well have been
        # signed with a key the host has since rotated out. A revoked key still fails.
        verified = open_envelope(msg.authorisation_evidence, self.trust)
        if verified.signer_party != host or verified.payload_type != type_name(
            AuthorisationStatement
        ):
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"the evidence is not {host}'s signed authorisation statement",
            )
        statement = AuthorisationStatement()
        try:
            statement.ParseFromString(verified.payload)
        except DecodeError:
            raise Rejected(RejectionCode.MALFORMED_PAYLOAD, "authorisation evidence") from None
        validate(statement, max_blocks=self.limits.max_blocks)
        if statement.authorisation_id != msg.authorisation_id or statement.revoked:
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"the evidence is not a valid statement of {msg.authorisation_id}",
            )
        terms = self._check_statement(statement, host)
        journal_id = tx.journal(
            direction="in", partner=host, message_id=statement.header.message_id,
            payload_type=verified.payload_type, envelope=msg.authorisation_evidence, now=now_us,
        ) if not tx.journal_has("in", host, statement.header.message_id) else None  # fmt: skip
        tx.authorisation_put(
            terms, activity_name=statement.activity.name,
            activity_description=statement.activity.description,
            oimp_detail=statement.oimp_detail,
            first_transfer_definition=statement.first_transfer_definition,
            statement_journal_id=journal_id, now=now_us,
        )  # fmt: skip
        tx.authorisation_party_put(terms, self.party, "acknowledged", journal_id)

    def _check_statement(self, statement: AuthorisationStatement, host: str) -> AuthorisationTerms:
        """The acquiring party's checks on a host's statement, received directly or
        as an onward transfer's evidence."""
        terms = terms_from_statement(statement)
        _check_owned_id(terms.authorisation_id, host, "authorisation id")
        rules.check_received_authorisation(terms, me=self.party, sender=host)
        check_authorisation(
            Authorisation(
                terms, oimp_detail=statement.oimp_detail,
                first_transfer_definition=_enum_or(
                    FirstTransferDefinition, statement.first_transfer_definition
                ),
            )
        )  # fmt: skip
        return terms

    def _check_new_version(
        self, tx: Tx, sender: str, msg: AuthorisationStatement, terms: AuthorisationTerms
    ) -> None:
        """An amendment or a revocation of an authorisation already recorded here."""
        current = self._authorisation(tx, sender, terms.authorisation_id)
        proposed = Authorisation(
            terms, oimp_detail=msg.oimp_detail,
            first_transfer_definition=_enum_or(
                FirstTransferDefinition, msg.first_transfer_definition
            ),
        )  # fmt: skip
        if msg.revoked:
            if current.revoked:
                raise Rejected(
                    RejectionCode.AUTHORISATION_REVOKED,
                    f"authorisation {terms.authorisation_id} is already revoked",
                )
            same = replace(current.terms, version=terms.version) == terms
            if terms.version != current.terms.version + 1 or not same:
                raise Rejected(
                    RejectionCode.AMENDMENT_NOT_ALLOWED,
                    f"a revocation of {terms.authorisation_id} must be the next version "
                    "with the same terms",
                )
            return
        check_amendment(
            current, proposed,
            issued_by_vintage=tx.issued_by_vintage(sender, terms.authorisation_id),
            received_by={self.party} if tx.has_received(terms.authorisation_id) else set(),
        )  # fmt: skip

    def _on_issuance(
        self, tx: Tx, sender: str, msg: IssuanceNotice, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        blocks = [block_from_pb(b) for b in msg.blocks]
        if not msg.issuance_id:
            raise Rejected(RejectionCode.MISSING_FIELD, "issuance notice has no issuance_id")
        self._check_origin(sender, blocks)
        # An issuance notice carries blocks under an authorisation exactly as a
        # proposal does, so the same content checks apply.
        rules.check_transfer_proposal(
            tx.authorisation_get(sender, msg.authorisation_id),
            authorisation_id=msg.authorisation_id,
            me=self.party,
            quantity=msg.quantity,
            blocks=blocks,
        )
        if not tx.issuance_exists(sender, msg.issuance_id):
            tx.issuance_put(
                host_party=sender,
                issuance_id=msg.issuance_id,
                authorisation_id=msg.authorisation_id,
                vintage=blocks[0].vintage,
                blocks=blocks,
                now=now_us,
            )
        ack = IssuanceAcknowledgement(issuance_id=msg.issuance_id)
        return self._reply(tx, sender, ack, msg.header.message_id, now_us)[1]

    def _on_proposal(
        self,
        tx: Tx,
        sender: str,
        msg: TransferProposal,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        _check_transfer_id(msg.transfer_id, sender)
        if not msg.HasField("expires_at"):
            raise Rejected(RejectionCode.MISSING_FIELD, "proposal has no expires_at")
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        if timestamp_us(msg.expires_at) + skew < now_us:
            raise Rejected(
                RejectionCode.PROPOSAL_EXPIRED,
                f"proposal {msg.transfer_id} expired at "
                f"{describe_us(timestamp_us(msg.expires_at))}",
            )
        if tx.transfer_get(msg.transfer_id) is not None:
            raise Rejected(
                RejectionCode.TRANSFER_STATE_CONFLICT,
                f"transfer id {msg.transfer_id} is already used by another transfer",
            )
        blocks = [block_from_pb(b) for b in msg.blocks]
        host = blocks[0].first_transferring_party if blocks else sender
        if host != sender:
            # An onward transfer: the units were first transferred by their host.
            self._learn_authorisation(tx, host, msg, now_us)
        elif tx.authorisation_details(sender, msg.authorisation_id).get("revoked"):
            raise Rejected(
                RejectionCode.AUTHORISATION_REVOKED,
                f"authorisation {msg.authorisation_id} is revoked",
            )
        rules.check_transfer_proposal(
            tx.authorisation_get(host, msg.authorisation_id),
            authorisation_id=msg.authorisation_id,
            me=self.party,
            quantity=msg.quantity,
            blocks=blocks,
        )
        self._check_origin(host, blocks)
        for block in blocks:
            rules.check_not_held([block], tx.blocks_overlapping(block))
        self._check_booking(tx, Role.RECEIVER, blocks)
        acceptance = TransferAcceptance(
            transfer_id=msg.transfer_id, proposal_digest=digest(payload)
        )
        acceptance_payload, envelope = self._reply(
            tx, sender, acceptance, msg.header.message_id, now_us
        )
        tx.transfer_put(
            transfer_id=msg.transfer_id,
            direction=Role.RECEIVER,
            partner=sender,
            state=TransferState.ACCEPTED,
            quantity=msg.quantity,
            authorisation_id=msg.authorisation_id,
            first_transfer=msg.first_transfer,
            proposal_message_id=msg.header.message_id,
            proposal_digest=acceptance.proposal_digest,
            acceptance_digest=digest(acceptance_payload),
            expires_at=timestamp_us(msg.expires_at),
            blocks=blocks,
            proposed_at=timestamp_us(msg.header.sent_at),
            now=now_us,
        )
        return envelope

    def _incoming_transfer(self, tx: Tx, sender: str, transfer_id: str) -> TransferState | None:
        record = tx.transfer_get(transfer_id)
        if record is None:
            return None
        if record.direction is not Role.RECEIVER or record.partner != sender:
            raise Rejected(
                RejectionCode.UNKNOWN_TRANSFER,
                f"{sender} has no transfer {transfer_id} to this node",
            )
        return record.state

    def _on_completion(
        self,
        tx: Tx,
        sender: str,
        msg: TransferCompletion,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        state = self._incoming_transfer(tx, sender, msg.transfer_id)
        record = tx.transfer_get(msg.transfer_id)
        if state is None or record is None:
            raise Rejected(RejectionCode.UNKNOWN_TRANSFER, f"no transfer {msg.transfer_id!r}")
        if msg.acceptance_digest != record.acceptance_digest:
            raise Rejected(
                RejectionCode.DIGEST_MISMATCH,
                f"completion of {msg.transfer_id} does not refer to this node's acceptance",
            )
        if state is TransferState.COMPLETED:
            # A completion sent again (freshly sealed) after this node had applied the
            # first: already posted, nothing more to do.
            years = {year for year, _ in tx.adjustment_amounts(msg.transfer_id)}
            receipt = TransferCompletionReceipt(
                transfer_id=msg.transfer_id, adjustment_year=years.pop() if len(years) == 1 else 0
            )
            return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]
        transition = step(Role.RECEIVER, state, Event.COMPLETION_RECEIVED)
        blocks = tx.blocks_of_transfer(msg.transfer_id)
        year = self._apply(
            tx, transition.effects, record.transfer_id, sender, blocks, journal_id, now_us
        )
        tx.transfer_set_state(msg.transfer_id, transition.state, now=now_us)
        for block in blocks:
            tx.action_put(
                action_type=ActionType.ACQUISITION.value, block=block, at=now_us,
                transferring_party=sender, transfer_id=msg.transfer_id,
            )  # fmt: skip
        log.info(
            "transfer %s from %s completed: %d tCO2e credited",
            msg.transfer_id,
            sender,
            total(blocks),
        )
        receipt = TransferCompletionReceipt(transfer_id=msg.transfer_id, adjustment_year=year)
        return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]

    def _on_void(
        self, tx: Tx, sender: str, msg: TransferVoid, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        _check_transfer_id(msg.transfer_id, sender)
        state = self._incoming_transfer(tx, sender, msg.transfer_id)
        if state is None:
            # The proposal has not arrived (or never will): remember the void so a
            # late proposal with this id is refused.
            tx.transfer_put(
                transfer_id=msg.transfer_id,
                direction=Role.RECEIVER,
                partner=sender,
                state=TransferState.VOIDED,
                quantity=0,
                authorisation_id="",
                first_transfer=False,
                proposal_message_id="",
                proposal_digest=b"",
                expires_at=0,
                rejection_detail=msg.reason,
                now=now_us,
            )
        else:
            transition = step(Role.RECEIVER, state, Event.VOID_RECEIVED)
            if transition.state is not state:  # a rejected transfer keeps its rejection
                tx.transfer_set_state(
                    msg.transfer_id, transition.state, now=now_us, rejection_detail=msg.reason
                )
        receipt = TransferVoidReceipt(transfer_id=msg.transfer_id)
        return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]

    def _on_status_query(
        self,
        tx: Tx,
        sender: str,
        msg: TransferStatusQuery,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        record = tx.transfer_get(msg.transfer_id)
        state = (
            record.state
            if record is not None and record.partner == sender
            else transfer_pb2.TRANSFER_STATE_UNKNOWN
        )
        if state == TransferState.COMPLETED and record is not None:
            # The receiver still waits for our completion: make sure one is coming.
            self._resend_completion(tx, msg.transfer_id, now_us)
        report = TransferStatusReport(transfer_id=msg.transfer_id, state=int(state))  # type: ignore[arg-type]
        return self._reply(tx, sender, report, msg.header.message_id, now_us)[1]

    def _on_reconciliation_query(
        self,
        tx: Tx,
        sender: str,
        msg: ReconciliationQuery,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        check_reconciliation_query(msg)
        snapshot = timestamp_us(msg.snapshot_at)
        answer = ReconciliationAnswer(reconciliation_id=msg.reconciliation_id)
        if msg.view == reconcile_pb2.RECONCILIATION_VIEW_TOTALS:
            for total in tx.reconcile_totals(sender, snapshot):
                answer.totals.add(
                    sender_party=total.sender, unit_type=total.unit_type,
                    vintage=total.vintage, authorisation_id=total.authorisation_id,
                    quantity=total.quantity, transfers=total.transfers,
                )  # fmt: skip
        else:
            view = VIEWS[msg.view]
            for prefix in dict.fromkeys(msg.prefixes):
                for bucket in tx.reconcile_buckets(sender, snapshot, view, prefix):
                    answer.buckets.add(
                        prefix=bucket.prefix, count=bucket.count, h1=bucket.h1, h2=bucket.h2
                    )
            for prefix in dict.fromkeys(msg.leaf_prefixes):
                leaves = tx.reconcile_leaves(sender, snapshot, view, prefix)
                if len(answer.leaves) + len(leaves) > MAX_LEAVES:
                    raise Rejected(
                        RejectionCode.INVALID_FIELD,
                        f"more than {MAX_LEAVES} leaves asked for: ask for narrower prefixes",
                    )
                for transfer_id, leaf in sorted(leaves.items()):
                    answer.leaves.add(transfer_id=transfer_id, digest=leaf)
        return self._reply(tx, sender, answer, msg.header.message_id, now_us)[1]

    def _on_key_rotation(
        self, tx: Tx, sender: str, msg: KeyRotation, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        if not msg.rotation_id:
            raise Rejected(RejectionCode.MISSING_FIELD, "key rotation has no rotation_id")
        if msg.HasField("new_key"):
            record = msg.new_key
            try:
                key = VerifyingKey.from_raw(
                    sender, record.key_id, record.public_key,
                    not_before=from_us(timestamp_us(record.not_before))
                    if record.HasField("not_before") else None,
                    not_after=from_us(timestamp_us(record.not_after))
                    if record.HasField("not_after") else None,
                )  # fmt: skip
            except ValueError as exc:
                raise Rejected(RejectionCode.INVALID_FIELD, str(exc)) from None
            tx.partner_key_put(
                key_id=key.key_id, party=sender, public_key=key.public_bytes,
                not_before=timestamp_us(record.not_before) if key.not_before else None,
                not_after=timestamp_us(record.not_after) if key.not_after else None,
                now=now_us,
            )  # fmt: skip
        for key_id in msg.revoked_key_ids:
            known = self.trust.get(key_id)
            if known is None or known.party != sender:
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"{sender} can revoke only its own pinned keys, not {key_id!r}",
                )
            tx.revoked_key_put(key_id=key_id, party=sender, source=sender, now=now_us)
        self._after_commit.append(self.reload_trust)
        log.warning(
            "%s rotated signing keys: new %s, revoked %s",
            sender, msg.new_key.key_id or "none", ", ".join(msg.revoked_key_ids) or "none",
        )  # fmt: skip
        ack = KeyRotationAcknowledgement(rotation_id=msg.rotation_id)
        return self._reply(tx, sender, ack, msg.header.message_id, now_us)[1]

    def _on_first_transfer_notice(
        self,
        tx: Tx,
        sender: str,
        msg: FirstTransferNotice,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        """A holder used or cancelled our OIMP units whose first transfer is that use."""
        _check_owned_id(msg.notice_id, sender, "notice id")
        blocks = [block_from_pb(b) for b in msg.blocks]
        self._check_origin(self.party, blocks)
        authorisation_ids = {b.authorisation_id for b in blocks}
        if len(authorisation_ids) != 1:
            raise Rejected(
                RejectionCode.BLOCK_ATTRIBUTE_MISMATCH, "a notice covers one authorisation"
            )
        authorisation = self._authorisation(tx, self.party, authorisation_ids.pop())
        if authorisation.revoked:
            raise Rejected(
                RejectionCode.AUTHORISATION_REVOKED,
                f"authorisation {authorisation.authorisation_id} is revoked",
            )
        if self._ca_point(authorisation) != "use":
            raise Rejected(
                RejectionCode.PURPOSE_NOT_AUTHORISED,
                f"units of {authorisation.authorisation_id} are not first transferred at use",
            )
        for block in blocks:
            validate_block(block)
            sent = tx.transferred_block_containing(block)
            if sent is None:
                raise Rejected(
                    RejectionCode.UNKNOWN_TRANSFER,
                    f"serials {block.label()} never left this registry",
                )
            if sent.attributes() != block.attributes():
                raise Rejected(
                    RejectionCode.BLOCK_ATTRIBUTE_MISMATCH,
                    f"serials {block.label()} left this registry as {sent.attributes()}",
                )
            if tx.serials_first_transferred(block):
                raise Rejected(
                    RejectionCode.ALREADY_FIRST_TRANSFERRED,
                    f"serials {block.label()} were first transferred already",
                )
        entries = [
            replace(entry, partner=sender)
            for entry in self._adjustment_entries(Role.SENDER, sender, "", blocks)
        ]
        tx.adjustments_put(
            entries, evidence_journal_id=journal_id, now=now_us, reference=msg.notice_id
        )
        for block in blocks:
            tx.action_put(
                action_type=ActionType.FIRST_TRANSFER.value,
                subtype=ActionSubtype.USE_OR_CANCELLATION.value, block=block, at=now_us,
                using_party=sender, oimp_purpose=msg.oimp_purpose,
            )  # fmt: skip
        years = {entry.year for entry in entries}
        ack = FirstTransferNoticeAcknowledgement(
            notice_id=msg.notice_id, adjustment_year=years.pop() if len(years) == 1 else 0
        )
        return self._reply(tx, sender, ack, msg.header.message_id, now_us)[1]

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = {
        type_name(AuthorisationStatement): _on_authorisation,
        type_name(IssuanceNotice): _on_issuance,
        type_name(TransferProposal): _on_proposal,
        type_name(TransferCompletion): _on_completion,
        type_name(TransferVoid): _on_void,
        type_name(TransferStatusQuery): _on_status_query,
        type_name(ReconciliationQuery): _on_reconciliation_query,
        type_name(KeyRotation): _on_key_rotation,
        type_name(FirstTransferNotice): _on_first_transfer_notice,
    }

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
        self, tx: Tx, terms: AuthorisationTerms, vintage: int, quantity: int
    ) -> None:
        """The host threshold on first transfers (only units that carry an adjustment)."""
        if (
            self.threshold is None
            or self.accounting is None
            or not terms.unit_type.requires_adjustment
        ):
            return
        check_host_threshold(
            self.threshold,
            self.accounting.ndc_period,
            tx.first_transferred_by_year(),
            year=booking_year(self.accounting, vintage=vintage),
            quantity=quantity,
        )

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

    def _transfer_counts(self, tx: Tx, role: Role, blocks: Sequence[Block]) -> bool:
        """Whether this party books an adjustment for a transfer of ``blocks``.

        The host books its first transfer when it happens (at the international
        transfer only for NDC use); an acquiring party subtracts, and gives back
        when it transfers onward, only units authorised for use toward an NDC.
        """
        if not blocks:
            return False
        host = blocks[0].first_transferring_party
        authorisation = self._authorisation(tx, host, blocks[0].authorisation_id)
        if role is Role.SENDER and host == self.party:
            return self._ca_point(authorisation) == "transfer"
        return Purpose.NDC in authorisation.terms.purposes

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
        role = Role.SENDER if Effect.DEBIT_RESERVED_BLOCKS in effects else Role.RECEIVER
        for effect in effects:
            if effect is Effect.DEBIT_RESERVED_BLOCKS:
                debited = tx.blocks_debit_reserved(transfer_id)
                if debited != len(blocks):
                    raise RuntimeError(
                        f"transfer {transfer_id}: {debited} reserved blocks, expected {len(blocks)}"
                    )
            elif effect is Effect.CREDIT_BLOCKS:
                tx.blocks_insert(blocks, account=HOLDING_ACCOUNT)
            elif effect is Effect.RELEASE_RESERVED_BLOCKS:
                tx.blocks_release(transfer_id)
        entries = []
        if Effect.APPLY_ADJUSTMENT in effects:
            entries = (
                self._adjustment_entries(role, partner, transfer_id, blocks)
                if self._transfer_counts(tx, role, blocks)
                else []
            )
            tx.adjustments_put(entries, evidence_journal_id=evidence_journal_id, now=now_us)
        years = {entry.year for entry in entries}
        return years.pop() if len(years) == 1 else 0

    # -- replies to our requests -----------------------------------------------------

    def handle_reply(self, message_id: str, raw: bytes, now: dt.datetime) -> None:
        """Apply a partner's reply to our outbox message ``message_id``.

        Raises :class:`ReplyError` for a reply that cannot be trusted or does not
        answer the request; the request then stays pending and is retried.
        """
        now_us = to_us(now)
        with self._transaction() as tx:
            request = tx.outbox_get(message_id)
            if request is None or request.state != "pending":
                return  # already answered (a duplicate reply) or cancelled
            reply, payload, journal_id = self._open_reply(
                tx, request.partner, request.payload_type, request.envelope, message_id, raw,
                now_us,
            )  # fmt: skip
            tx.outbox_answered(message_id, journal_id)
            if isinstance(reply, Rejection):
                code, detail = _rejection_reasons(reply)
                log.info(
                    "%s rejected %s %s: %s %s",
                    request.partner,
                    request.payload_type,
                    request.subject_id,
                    _code_name(code),
                    detail,
                )
            self._apply_reply(
                tx,
                request.payload_type,
                request.subject_id,
                request.partner,
                reply,
                payload,
                journal_id,
                now_us,
                request.envelope,
            )

    def _open_reply(
        self,
        tx: Tx,
        partner: str,
        request_type: str,
        request: bytes,
        message_id: str,
        raw: bytes,
        now_us: int,
    ) -> tuple[Message, bytes, int]:
        """Verify and journal a reply to our request; (reply, payload, journal id)."""
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
        if not header.message_id or tx.journal_has("in", partner, header.message_id):
            raise ReplyError(
                RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                f"reply from {partner} reuses message id {header.message_id!r}",
            )
        journal_id = tx.journal(
            direction="in",
            partner=partner,
            message_id=header.message_id,
            payload_type=verified.payload_type,
            envelope=raw,
            now=now_us,
        )
        return reply, verified.payload, journal_id

    @staticmethod
    def _check_answers(
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

    def _check_header_fields(self, header: common_pb2.Header, *, sender: str) -> None:
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
        if header.audience != self.party:
            raise Rejected(
                RejectionCode.WRONG_AUDIENCE,
                f"reply is addressed to {header.audience!r}, this node is {self.party}",
            )

    def _apply_reply(
        self,
        tx: Tx,
        request_type: str,
        subject_id: str,
        partner: str,
        reply: Message,
        reply_payload: bytes,
        journal_id: int,
        now_us: int,
        request_envelope: bytes = b"",
    ) -> None:
        rejected = isinstance(reply, Rejection)
        if request_type == type_name(AuthorisationStatement):
            # The subject names the version this answer is about, not the latest one.
            authorisation_id, _, version = subject_id.rpartition("#")
            code = _rejection_reasons(reply)[0] if isinstance(reply, Rejection) else 0
            tx.authorisation_party_set(
                host_party=self.party,
                authorisation_id=authorisation_id,
                version=int(version),
                party=partner,
                state="rejected" if rejected else "acknowledged",
                rejection_code=code,
                evidence_journal_id=journal_id,
                reference="" if isinstance(reply, Rejection) else reply.acquiring_party_reference,  # type: ignore[attr-defined]
            )
        elif request_type == type_name(TransferProposal):
            if isinstance(reply, Rejection):
                self._proposal_rejected(tx, subject_id, reply, now_us)
            else:
                assert isinstance(reply, TransferAcceptance)
                self._accepted(tx, subject_id, partner, reply, reply_payload, journal_id, now_us)
        elif request_type == type_name(TransferStatusQuery) and isinstance(
            reply, TransferStatusReport
        ):
            self._status_reported(tx, subject_id, partner, reply, now_us)
        elif request_type == type_name(KeyRotation):
            self._rotation_answered(tx, subject_id, partner, rejected)
        elif request_type == type_name(TransferCompletion) and isinstance(reply, Rejection):
            code = _rejection_reasons(reply)[0]
            if reply.header.sequence == 0 and self._fresh_seal_helps(code, request_envelope):
                # Refused before it was recorded because it was too old or signed with a
                # key no longer valid there: the completion is a commitment already
                # carried out here, so it is sent again, freshly sealed with today's key.
                log.warning(
                    "%s could not record the completion of %s (%s): sending it again",
                    partner, subject_id, _code_name(_rejection_reasons(reply)[0]),
                )  # fmt: skip
                self._resend_completion(tx, subject_id, now_us)
            else:
                log.error(
                    "ALARM: %s refused the completion of transfer %s, which is complete here; "
                    "reconcile with the partner",
                    partner, subject_id,
                )  # fmt: skip

    def _fresh_seal_helps(self, code: int, refused: bytes) -> bool:
        """Whether sealing a refused completion again (new sent_at, current key) can
        change the partner's answer. Anything else needs an operator, not a loop."""
        if code == RejectionCode.SENT_AT_OUT_OF_WINDOW:
            return True
        key_codes = (
            RejectionCode.SIGNING_KEY_REVOKED, RejectionCode.SIGNING_KEY_EXPIRED,
            RejectionCode.SIGNING_KEY_NOT_YET_VALID, RejectionCode.UNKNOWN_SIGNING_KEY,
        )  # fmt: skip
        if code not in key_codes or not refused:
            return False
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(refused)
        return all(sig.key_id != self.signing_key.key_id for sig in envelope.signatures)

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
        ):
            return
        years = {year for year, _ in tx.adjustment_amounts(transfer_id)}
        completion = TransferCompletion(
            transfer_id=transfer_id,
            acceptance_digest=record.acceptance_digest,
            adjustment_year=years.pop() if len(years) == 1 else 0,
        )
        self._send(tx, record.partner, completion, transfer_id, now_us)

    def _rotation_answered(self, tx: Tx, key_id: str, partner: str, rejected: bool) -> None:
        """Sign with the announced key once every partner acknowledged it."""
        if tx.meta_get("pending_signing_key") != key_id:
            return  # a revocation, or an old rotation
        if rejected:
            tx.set_meta("pending_signing_key_refused_by", partner)
            log.error("ALARM: %s refused signing key %s; still signing with the old key",
                      partner, key_id)  # fmt: skip
            return
        if tx.outbox_pending_of(payload_type=type_name(KeyRotation), subject_id=key_id):
            return
        if tx.meta_get("pending_signing_key_refused_by"):
            return
        self._switch_signing_key(tx, key_id)

    def _switch_signing_key(self, tx: Tx, key_id: str) -> None:
        tx.set_meta("signing_key_id", key_id)
        tx.set_meta("pending_signing_key", "")

        def switch() -> None:
            assert self.pending_key is not None
            assert self.pending_key.key_id == key_id
            self.signing_key, self.pending_key = self.pending_key, None
            log.warning("now signing with key %s", key_id)

        self._after_commit.append(switch)

    def _status_reported(
        self, tx: Tx, transfer_id: str, partner: str, report: TransferStatusReport, now_us: int
    ) -> None:
        """Resolve a transfer accepted here from the sender's own view of it."""
        record = tx.transfer_get(transfer_id)
        if record is None or record.direction is not Role.RECEIVER or record.partner != partner:
            return
        abandoned = (
            transfer_pb2.TRANSFER_STATE_VOIDED,
            transfer_pb2.TRANSFER_STATE_REJECTED,
            transfer_pb2.TRANSFER_STATE_UNKNOWN,
        )
        if record.state is not TransferState.ACCEPTED or report.state not in abandoned:
            return  # still undecided, or a completion is on its way
        transition = step(Role.RECEIVER, record.state, Event.ABANDONMENT_REPORTED)
        state_name = transfer_pb2.TransferState.Name(report.state)
        tx.transfer_set_state(
            transfer_id,
            transition.state,
            now=now_us,
            rejection_detail=f"the sender reports {state_name}",
        )
        log.warning("transfer %s from %s voided here: %s", transfer_id, partner, state_name)

    def _proposal_rejected(self, tx: Tx, transfer_id: str, reply: Rejection, now_us: int) -> None:
        record = tx.transfer_get(transfer_id)
        if record is None:
            raise RuntimeError(f"rejected transfer {transfer_id} is not recorded")
        try:
            transition = step(Role.SENDER, record.state, Event.REJECTION_RECEIVED)
        except Rejected:
            log.info(
                "late rejection of transfer %s in state %s ignored", transfer_id, record.state.name
            )
            return
        self._apply(tx, transition.effects, transfer_id, record.partner, [], 0, now_us)
        code, detail = _rejection_reasons(reply)
        tx.transfer_set_state(
            transfer_id, transition.state, now=now_us, rejection_code=code, rejection_detail=detail
        )

    def _accepted(
        self,
        tx: Tx,
        transfer_id: str,
        partner: str,
        acceptance: TransferAcceptance,
        acceptance_payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> None:
        record = tx.transfer_get(transfer_id)
        if record is None:
            raise RuntimeError(f"accepted transfer {transfer_id} is not recorded")
        if (
            acceptance.transfer_id != transfer_id
            or acceptance.proposal_digest != record.proposal_digest
        ):
            raise ReplyError(
                RejectionCode.DIGEST_MISMATCH,
                f"acceptance from {partner} does not match proposal of transfer {transfer_id}",
            )
        try:
            transition = step(Role.SENDER, record.state, Event.ACCEPTANCE_RECEIVED)
        except Rejected:
            # Voided on our clock before the acceptance arrived: the void we sent
            # tells the receiver; nothing is applied here.
            log.info(
                "late acceptance of transfer %s in state %s ignored", transfer_id, record.state.name
            )
            return
        blocks = tx.blocks_of_transfer(transfer_id)
        year = self._apply(tx, transition.effects, transfer_id, partner, blocks, journal_id, now_us)
        tx.transfer_set_state(
            transfer_id, transition.state, now=now_us, acceptance_digest=digest(acceptance_payload)
        )
        kind, subtype = (
            (ActionType.FIRST_TRANSFER, ActionSubtype.FIRST_TRANSFER_TO_ANOTHER_PARTY.value)
            if record.first_transfer
            else (ActionType.TRANSFER, "")
        )
        for block in blocks:
            tx.action_put(
                action_type=kind.value, subtype=subtype, block=block, at=now_us,
                acquiring_party=partner, transfer_id=transfer_id,
            )  # fmt: skip
        if Effect.SEND_COMPLETION in transition.effects:
            completion = TransferCompletion(
                transfer_id=transfer_id,
                acceptance_digest=digest(acceptance_payload),
                adjustment_year=year,
            )
            self._send(tx, partner, completion, transfer_id, now_us)
        log.info(
            "transfer %s to %s completed: %d tCO2e debited", transfer_id, partner, total(blocks)
        )

    # -- reconciliation (requester side) ------------------------------------------------

    def reconciliation_query(
        self, partner: str, query: ReconciliationQuery, now: dt.datetime
    ) -> tuple[str, bytes]:
        """Seal and journal a query to send now; (message id, envelope)."""
        self._require_partner(partner)
        now_us = to_us(now)
        with self.store.transaction() as tx:
            query.header.CopyFrom(self._header(tx, partner, now_us))
            name, _, envelope = self._seal(query)
            tx.journal(
                direction="out", partner=partner, message_id=query.header.message_id,
                payload_type=name, envelope=envelope, now=now_us,
            )  # fmt: skip
        return query.header.message_id, envelope

    def reconciliation_answer(
        self, partner: str, message_id: str, request: bytes, raw: bytes, now: dt.datetime
    ) -> ReconciliationAnswer:
        """Verify and journal the partner's answer to a reconciliation query."""
        with self.store.transaction() as tx:
            reply, _, _ = self._open_reply(
                tx, partner, type_name(ReconciliationQuery), request, message_id, raw, to_us(now)
            )
        if isinstance(reply, Rejection):
            code, detail = _rejection_reasons(reply)
            raise ReplyError(RejectionCode(code), f"{partner} refused the query: {detail}")
        assert isinstance(reply, ReconciliationAnswer)
        return reply

    def local_buckets(self, partner: str, snapshot_us: int, view: str, prefix: str) -> list[Bucket]:
        with self.store.transaction() as tx:
            return tx.reconcile_buckets(partner, snapshot_us, view, prefix)

    def local_leaves(
        self, partner: str, snapshot_us: int, view: str, prefix: str
    ) -> dict[str, bytes]:
        with self.store.transaction() as tx:
            return tx.reconcile_leaves(partner, snapshot_us, view, prefix)

    def local_totals(self, partner: str, snapshot_us: int) -> list[Total]:
        with self.store.transaction() as tx:
            return tx.reconcile_totals(partner, snapshot_us)

    def record_discrepancy(
        self,
        *,
        reconciliation_id: str,
        partner: str,
        phase: str,
        subject: str,
        detail: str,
        freeze: bool,
        now: dt.datetime,
    ) -> int:
        """Record what reconciliation found; freeze the blocks of a named transfer.

        Returns how many blocks were frozen here.
        """
        with self.store.transaction() as tx:
            tx.discrepancy_put(
                reconciliation_id=reconciliation_id, partner=partner, phase=phase,
                subject=subject, detail=detail, now=to_us(now),
            )  # fmt: skip
            frozen = tx.freeze_blocks_of(subject, partner) if freeze else 0
        log.error("ALARM: reconciliation with %s: %s %s: %s", partner, phase, subject, detail)
        return frozen

    def rotate_signing_key(self, new_key: SigningKey, now: dt.datetime) -> None:
        """Announce ``new_key`` to every partner; sign with it once all acknowledged."""
        now_us = to_us(now)
        with self._transaction() as tx:
            if tx.meta_get("pending_signing_key"):
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"key {tx.meta_get('pending_signing_key')} is still being announced",
                )
            tx.set_meta("pending_signing_key", new_key.key_id)
            tx.set_meta("pending_signing_key_refused_by", "")
            public = new_key.verifying_key().public_bytes
            for partner in sorted(self.partners):
                rotation = KeyRotation(
                    rotation_id=new_key.key_id,
                    # Valid from a little before now, so a partner whose clock lags
                    # does not refuse the first messages signed with it.
                    new_key=keys_pb2.SigningKeyRecord(
                        key_id=new_key.key_id,
                        public_key=public,
                        not_before=timestamp(
                            now_us - self.limits.max_clock_skew // dt.timedelta(microseconds=1)
                        ),
                    ),
                )
                self._send(tx, partner, rotation, new_key.key_id, now_us)
            self._after_commit.append(lambda: setattr(self, "pending_key", new_key))
            if not self.partners:
                self._switch_signing_key(tx, new_key.key_id)

    def revoke_signing_key(self, key_id: str, now: dt.datetime, partner: str = "") -> None:
        """Revoke an earlier key of ours at every partner, or a partner's key here."""
        now_us = to_us(now)
        with self._transaction() as tx:
            if partner:
                self._require_partner(partner)
                known = self.trust.get(key_id)
                if known is None or known.party != partner:
                    raise Rejected(
                        RejectionCode.UNKNOWN_SIGNING_KEY, f"{partner} has no pinned key {key_id!r}"
                    )
                tx.revoked_key_put(key_id=key_id, party=partner, source="operator", now=now_us)
                self._after_commit.append(self.reload_trust)
                return
            if not key_id.startswith(f"{self.party}-ed25519-"):
                raise Rejected(
                    RejectionCode.UNKNOWN_SIGNING_KEY, f"{key_id!r} is not a key of {self.party}"
                )
            if key_id in (self.signing_key.key_id, tx.meta_get("pending_signing_key")):
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"{key_id} is the key this node signs with (or is about to): rotate first",
                )
            if tx.outbox_pending_signed_by(key_id):
                raise Rejected(
                    RejectionCode.TRANSFER_STATE_CONFLICT,
                    f"messages signed with {key_id} are still being delivered: revoke it once "
                    "they are answered",
                )
            tx.revoked_key_put(key_id=key_id, party=self.party, source="self", now=now_us)
            for other in sorted(self.partners):
                revocation = KeyRotation(rotation_id=f"revoke-{key_id}", revoked_key_ids=[key_id])
                self._send(tx, other, revocation, f"revoke-{key_id}", now_us)

    def signing_keys_view(self) -> list[tuple[str, str, str, VerifyingKey | None]]:
        """(party, key id, status, key) for our keys and the partners'."""
        with self.store.transaction() as tx:
            revoked = tx.revoked_keys()
        rows: list[tuple[str, str, str, VerifyingKey | None]] = [
            (self.party, self.signing_key.key_id, "signing", self.signing_key.verifying_key())
        ]
        if self.pending_key is not None:
            rows.append(
                (self.party, self.pending_key.key_id, "pending", self.pending_key.verifying_key())
            )
        for key_id, party in sorted(revoked.items()):
            if party == self.party:
                rows.append((party, key_id, "revoked", None))
        for key in sorted(self.trust.all(), key=lambda k: (k.party, k.key_id)):
            status = "revoked" if self.trust.is_revoked(key.key_id) else "pinned"
            rows.append((key.party, key.key_id, status, key))
        return rows

    def retire(
        self,
        *,
        action: str,
        host_party: str,
        authorisation_id: str,
        vintage: int,
        quantity: int,
        now: dt.datetime,
        use_year: int = 0,
        oimp_purpose: str = "",
    ) -> tuple[str, list[Block]]:
        """Use held units toward the NDC or for OIMP, or cancel them voluntarily.

        The units move to a retirement or cancellation account of this registry
        and the action is recorded for the AEF; nothing is sent to a partner.
        """
        if action not in RETIREMENTS:
            raise Rejected(
                RejectionCode.INVALID_FIELD,
                f"action {action!r} is not one of {', '.join(sorted(RETIREMENTS))}",
            )
        account, kind, action_type = RETIREMENTS[action]
        now_us = to_us(now)
        with self.store.transaction() as tx:
            authorisation = self._authorisation(tx, host_party, authorisation_id)
            held = tx.blocks_held(
                account=HOLDING_ACCOUNT, authorisation_id=authorisation_id, vintage=vintage
            )
            taken, remainders = take(held, quantity)
            received = host_party != self.party
            # Received units are first transferred, except OIMP units whose first
            # transfer is their use: this use.
            first_transferred = received and self._ca_point(authorisation) != "use"
            if action_type is ActionType.USE_NDC:
                if self.accounting is None:
                    raise Rejected(
                        RejectionCode.MISSING_FIELD,
                        "using units toward the NDC needs the NDC period: add [accounting] "
                        "to the node configuration",
                    )
                check_use_ndc(
                    authorisation, me=self.party, blocks=taken, holdings=held,
                    use_year=use_year, ndc_period=self.accounting.ndc_period,
                    already_first_transferred=first_transferred,
                )  # fmt: skip
            elif action_type is ActionType.USE_OIMP:
                if not oimp_purpose:
                    raise Rejected(RejectionCode.MISSING_FIELD, "use for OIMP needs its purpose")
                check_use_oimp(
                    authorisation, me=self.party, blocks=taken, holdings=held,
                    already_first_transferred=first_transferred,
                )  # fmt: skip
            else:
                check_voluntary_cancellation(blocks=taken, holdings=held)
            for tail in remainders:
                tx.block_split(tail)
            tx.account_ensure(account, kind, now_us)
            tx.blocks_move(taken, account=account)
            if (
                action_type is ActionType.USE_OIMP
                and not received
                and FirstTransferTrigger.USE_OR_CANCELLATION
                in first_transfer_triggers(authorisation)
                and self._ca_point(authorisation) != "issuance"
            ):
                # The host uses its own OIMP units: that use is their first transfer.
                self._book_first_transfer(
                    tx, taken, reference=f"use:{authorisation_id}:{now_us}",
                    subtype=ActionSubtype.USE_OR_CANCELLATION, now_us=now_us,
                )  # fmt: skip
            elif (
                action_type is ActionType.USE_OIMP
                and received
                and self._ca_point(authorisation) == "use"
            ):
                # Units of another host whose first transfer is this use: the host
                # books its adjustment when it records the notice.
                self._require_partner(host_party)
                notice = FirstTransferNotice(
                    notice_id=f"{self.party}-U-{tx.next_counter('use-notice'):06d}",
                    blocks=[block_to_pb(b) for b in taken], oimp_purpose=oimp_purpose,
                )  # fmt: skip
                self._send(tx, host_party, notice, notice.notice_id, now_us)
            for block in taken:
                tx.action_put(
                    action_type=action_type.value, block=block, at=now_us,
                    using_party=self.party, oimp_purpose=oimp_purpose,
                    use_year=use_year or None,
                )  # fmt: skip
        log.info("%s: %d tCO2e of %s moved to %s", action, quantity, authorisation_id, account)
        return account, taken

    def snapshot_holdings(self, year: int, now: dt.datetime) -> tuple[bool, int, int]:
        """Freeze the holdings of 31 December ``year``: (taken now, taken at, blocks)."""
        with self.store.transaction() as tx:
            taken_now = tx.snapshot_take(year, to_us(now))
            snapshot = tx.snapshot(year)
        assert snapshot is not None
        return taken_now, snapshot[0], len(snapshot[1])

    def record_admin_action(
        self, *, operator: str, method: str, request: str, outcome: str, now: dt.datetime
    ) -> None:
        with self.store.transaction() as tx:
            tx.admin_audit_put(
                operator=operator, method=method, request=request, outcome=outcome,
                now=to_us(now),
            )  # fmt: skip

    # -- time-outs and the outbox ------------------------------------------------------

    def expire_transfers(self, now: dt.datetime) -> list[str]:
        """Void our proposals left unanswered past their time-out (the sender decides)."""
        now_us = to_us(now)
        voided: list[str] = []
        with self.store.transaction() as tx:
            for record in tx.transfers_expired(now_us):
                transition = step(Role.SENDER, record.state, Event.TIMED_OUT)
                self._apply(
                    tx, transition.effects, record.transfer_id, record.partner, [], 0, now_us
                )
                tx.transfer_set_state(
                    record.transfer_id,
                    transition.state,
                    now=now_us,
                    rejection_detail="no acceptance before the time-out",
                )
                tx.outbox_cancel(
                    payload_type=type_name(TransferProposal), subject_id=record.transfer_id
                )
                if Effect.SEND_VOID in transition.effects:
                    void = TransferVoid(
                        transfer_id=record.transfer_id, reason="no acceptance before the time-out"
                    )
                    self._send(tx, record.partner, void, record.transfer_id, now_us)
                voided.append(record.transfer_id)
                log.warning(
                    "transfer %s to %s voided: time-out", record.transfer_id, record.partner
                )
        return voided

    def query_pending_transfers(self, now: dt.datetime) -> list[str]:
        """Ask the sender about transfers accepted here that outlived their time-out.

        The receiver never credits without a completion; when none has come, the
        sender's answer tells whether one ever will (docs/PROTOCOL.md).
        """
        now_us = to_us(now)
        asked: list[str] = []
        with self.store.transaction() as tx:
            for record in tx.transfers_awaiting_completion(now_us - STATUS_QUERY_GRACE_US):
                last = tx.outbox_last_created(
                    payload_type=type_name(TransferStatusQuery), subject_id=record.transfer_id
                )
                if last is not None and (
                    last[0] == "pending" or last[1] > now_us - STATUS_QUERY_INTERVAL_US
                ):
                    continue
                query = TransferStatusQuery(transfer_id=record.transfer_id)
                self._send(tx, record.partner, query, record.transfer_id, now_us)
                asked.append(record.transfer_id)
        return asked

    def due_messages(
        self, now: dt.datetime, limit: int = 256, *, lease: dt.timedelta | None = None
    ) -> list[tuple[str, str, bytes]]:
        """(message id, partner, envelope) of outbox messages due for delivery.

        With ``lease``, each message returned is claimed for that long: it is not
        due again while its delivery is in flight.
        """
        now_us = to_us(now)
        lease_until = None if lease is None else now_us + lease // dt.timedelta(microseconds=1)
        with self.store.transaction() as tx:
            due = tx.outbox_due(now_us, limit, lease_until=lease_until)
        return [(m.message_id, m.partner, m.envelope) for m in due]

    def next_due(self) -> int | None:
        with self.store.transaction() as tx:
            return tx.outbox_next_due()

    def delivery_failed(self, message_id: str, error: str, now: dt.datetime) -> None:
        with self.store.transaction() as tx:
            message = tx.outbox_get(message_id)
            if message is None or message.state != "pending":
                return
            delay = retry_delay_us(message.attempts)
            tx.outbox_retry_later(message_id, next_attempt_at=to_us(now) + delay, error=error)

    # -- operator requests -------------------------------------------------------------

    def _require_partner(self, party: str) -> None:
        if party not in self.partners:
            raise Rejected(
                RejectionCode.UNKNOWN_PARTNER,
                f"{party} is not a partner of this node: add its card under [[partners]]",
            )

    def authorise(
        self,
        *,
        activity_id: str,
        activity_name: str,
        activity_description: str,
        cooperative_approach_id: str,
        acquiring_parties: Sequence[str],
        purposes: Sequence[Purpose],
        oimp_detail: str,
        first_transfer_definition: FirstTransferDefinition,
        vintage_from: int,
        vintage_to: int,
        quantity_cap: int,
        unit_type: UnitType,
        now: dt.datetime,
        buyer_share_bp: int = 0,
        voluntary_omge_bp: int = 0,
    ) -> AuthorisationTerms:
        """Record an authorisation and send it to each acquiring party.

        ``buyer_share_bp`` and ``voluntary_omge_bp`` are the cooperative approach's
        policy for issuances under it (basis points): a share of every issuance
        first-transferred to the (single) acquiring party, and a voluntary
        cancellation for overall mitigation.
        """
        if not 0 <= buyer_share_bp <= 10_000 or not 0 <= voluntary_omge_bp <= 10_000:
            raise Rejected(RejectionCode.INVALID_FIELD, "shares are basis points, 0 to 10,000")
        if buyer_share_bp and len(set(acquiring_parties)) != 1:
            raise Rejected(
                RejectionCode.INVALID_FIELD,
                "a buyer's share of issuance needs exactly one acquiring party",
            )
        now_us = to_us(now)
        for party in acquiring_parties:
            self._require_partner(party)
        with self.store.transaction() as tx:
            authorisation_id = f"{self.party}-A-{tx.next_counter('authorisation'):04d}"
            terms = AuthorisationTerms(
                authorisation_id=authorisation_id,
                version=1,
                host_party=self.party,
                activity_id=activity_id,
                cooperative_approach_id=cooperative_approach_id,
                acquiring_parties=frozenset(acquiring_parties),
                purposes=frozenset(purposes),
                vintage_from=vintage_from,
                vintage_to=vintage_to,
                quantity_cap=quantity_cap,
                unit_type=unit_type,
            )
            check_authorisation(
                Authorisation(
                    terms, oimp_detail=oimp_detail,
                    first_transfer_definition=first_transfer_definition,
                )
            )  # fmt: skip
            tx.authorisation_put(
                terms,
                activity_name=activity_name,
                activity_description=activity_description,
                oimp_detail=oimp_detail,
                first_transfer_definition=int(first_transfer_definition),
                now=now_us,
                buyer_share_bp=buyer_share_bp,
                voluntary_omge_bp=voluntary_omge_bp,
            )
            self._send_statement(
                tx, terms, activity_name=activity_name, activity_description=activity_description,
                oimp_detail=oimp_detail, first_transfer_definition=first_transfer_definition,
                revoked=False, now_us=now_us,
            )  # fmt: skip
        log.info(
            "authorisation %s recorded and sent to %s",
            authorisation_id,
            ", ".join(sorted(acquiring_parties)),
        )
        return terms

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
    ) -> None:
        """Send a version of our authorisation to each acquiring party (pending its answer)."""
        for party in sorted(terms.acquiring_parties):
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
        terms = tx.authorisation_get(host_party, authorisation_id)
        if terms is None:
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"no authorisation {authorisation_id!r} of {host_party} is recorded here",
            )
        details = tx.authorisation_details(host_party, authorisation_id)
        return Authorisation(
            terms,
            oimp_detail=details["oimp_detail"],
            first_transfer_definition=FirstTransferDefinition(details["first_transfer_definition"]),
            revoked=bool(details["revoked"]),
        )

    @staticmethod
    def _require_delivered(tx: Tx, current: Authorisation) -> None:
        """Versions go out one at a time: a partner records them only in order."""
        terms = current.terms
        states = tx.authorisation_party_states(
            terms.host_party, terms.authorisation_id, terms.version
        )
        waiting = sorted(p for p, state in states.items() if state == "pending")
        if waiting:
            raise Rejected(
                RejectionCode.AUTHORISATION_NOT_ACKNOWLEDGED,
                f"version {terms.version} of {terms.authorisation_id} is not yet answered by "
                f"{', '.join(waiting)}: change it once they have",
            )

    def amend_authorisation(
        self, authorisation_id: str, changes: dict[str, Any], now: dt.datetime
    ) -> AuthorisationTerms:
        """Record the next version of one of our authorisations and send it."""
        now_us = to_us(now)
        for party in changes.get("acquiring_parties", ()):
            self._require_partner(party)
        with self.store.transaction() as tx:
            current = self._authorisation(tx, self.party, authorisation_id)
            self._require_delivered(tx, current)
            details = tx.authorisation_details(self.party, authorisation_id)
            if (
                details["buyer_share_bp"]
                and len(changes.get("acquiring_parties", current.terms.acquiring_parties)) != 1
            ):
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    "a buyer's share of issuance needs exactly one acquiring party",
                )
            term_changes = {
                k: v for k, v in changes.items()
                if k not in ("oimp_detail", "first_transfer_definition")
            }  # fmt: skip
            proposed = replace(
                current,
                terms=replace(current.terms, version=current.terms.version + 1, **term_changes),
                oimp_detail=changes.get("oimp_detail", current.oimp_detail),
                first_transfer_definition=changes.get(
                    "first_transfer_definition", current.first_transfer_definition
                ),
            )
            check_amendment(
                current, proposed,
                issued_by_vintage=tx.issued_by_vintage(self.party, authorisation_id),
                received_by=tx.parties_that_received(authorisation_id),
            )  # fmt: skip
            tx.authorisation_put(
                proposed.terms, activity_name=details["activity_name"],
                activity_description=details["activity_description"],
                oimp_detail=proposed.oimp_detail,
                first_transfer_definition=int(proposed.first_transfer_definition),
                buyer_share_bp=details["buyer_share_bp"],
                voluntary_omge_bp=details["voluntary_omge_bp"], now=now_us,
            )  # fmt: skip
            self._send_statement(
                tx, proposed.terms, activity_name=details["activity_name"],
                activity_description=details["activity_description"],
                oimp_detail=proposed.oimp_detail,
                first_transfer_definition=proposed.first_transfer_definition,
                revoked=False, now_us=now_us,
            )  # fmt: skip
        return proposed.terms

    def revoke_authorisation(self, authorisation_id: str, now: dt.datetime) -> Revocation:
        """Revoke what may still be revoked of one of our authorisations.

        Units already first-transferred (or transferred to the Adaptation Fund or
        cancelled at issuance) keep their authorisation; units still held here
        move to the 'revoked' account; the unissued rest of the cap lapses.
        """
        now_us = to_us(now)
        with self.store.transaction() as tx:
            current = self._authorisation(tx, self.party, authorisation_id)
            self._require_delivered(tx, current)
            here = tx.blocks_of_authorisation(authorisation_id)
            if any(h.status != "held" for h in here):
                raise Rejected(
                    RejectionCode.TRANSFER_STATE_CONFLICT,
                    f"units of {authorisation_id} are in a pending transfer or frozen: "
                    "revoke once it has ended",
                )
            at_use = self._ca_point(current) == "use"
            units = [
                UnitStatus(h.block, first_transferred=h.account != HOLDING_ACCOUNT) for h in here
            ] + [
                # Units that left for another registry are first transferred, unless
                # their first transfer is their (not yet reported) use.
                UnitStatus(
                    block,
                    first_transferred=not at_use or tx.serials_first_transferred(block),
                )
                for block in tx.transferred_blocks_of_authorisation(authorisation_id)
            ]
            revocation = revoke(current, units)
            tx.account_ensure("revoked", "revoked", now_us)
            tx.blocks_move(revocation.revoked, account="revoked")
            details = tx.authorisation_details(self.party, authorisation_id)
            tx.authorisation_put(
                revocation.authorisation.terms, activity_name=details["activity_name"],
                activity_description=details["activity_description"],
                oimp_detail=current.oimp_detail,
                first_transfer_definition=int(current.first_transfer_definition),
                buyer_share_bp=details["buyer_share_bp"],
                voluntary_omge_bp=details["voluntary_omge_bp"], revoked=True, now=now_us,
            )  # fmt: skip
            self._send_statement(
                tx, revocation.authorisation.terms, activity_name=details["activity_name"],
                activity_description=details["activity_description"],
                oimp_detail=current.oimp_detail,
                first_transfer_definition=current.first_transfer_definition,
                revoked=True, now_us=now_us,
            )  # fmt: skip
        log.warning(
            "authorisation %s revoked: %d tCO2e revoked, %d refused (already first-transferred)",
            authorisation_id, revocation.revoked_quantity,
            sum(b.quantity for b, _ in revocation.refused),
        )  # fmt: skip
        return revocation

    def issue(
        self, *, authorisation_id: str, vintage: int, quantity: int, now: dt.datetime
    ) -> tuple[str, list[Block]]:
        """Issue units into the holding account and notify the acquiring parties."""
        now_us = to_us(now)
        with self.store.transaction() as tx:
            terms = tx.authorisation_get(self.party, authorisation_id)
            if terms is None:
                raise Rejected(
                    RejectionCode.UNKNOWN_AUTHORISATION,
                    f"{authorisation_id!r} is not an authorisation of {self.party}",
                )
            if tx.authorisation_details(self.party, authorisation_id).get("revoked"):
                raise Rejected(
                    RejectionCode.AUTHORISATION_REVOKED,
                    f"authorisation {authorisation_id} is revoked: nothing more is issued under it",
                )
            rules.check_issuance(
                terms,
                vintage=vintage,
                quantity=quantity,
                issued=tx.issued_total(self.party, authorisation_id),
            )
            start = tx.next_counter(f"serial:{self.registry}", quantity)
            block = Block(
                originating_registry=self.registry,
                serial_start=start,
                serial_end=start + quantity - 1,
                unit_type=terms.unit_type,
                vintage=vintage,
                activity_id=terms.activity_id,
                authorisation_id=authorisation_id,
                cooperative_approach_id=terms.cooperative_approach_id,
                first_transferring_party=self.party,
            )
            rules.check_not_held([block], tx.blocks_overlapping(block))
            issuance_id = f"{self.party}-I-{tx.next_counter('issuance'):06d}"
            details = tx.authorisation_details(self.party, authorisation_id)
            policy = IssuancePolicy(details["buyer_share_bp"], details["voluntary_omge_bp"])
            split = split_issuance(terms.unit_type, quantity, policy)
            buyer_share: list[Block] = []
            for destination, part in allocate_block(block, split):
                account, kind, action = ISSUANCE_DESTINATIONS[destination]
                tx.account_ensure(account, kind, now_us)
                tx.blocks_insert([part], account=account)
                if action is not None:
                    action_type, subtype = action
                    tx.action_put(
                        action_type=action_type.value, subtype=subtype.value, block=part, at=now_us
                    )
                if destination is Destination.BUYER_SHARE:
                    buyer_share.append(part)
            authorisation = self._authorisation(tx, self.party, authorisation_id)
            if self._ca_point(authorisation) == "issuance":
                # OIMP units first transferred at issuance: the host adds them now
                # (the Adaptation Fund's share included; units cancelled for OMGE not).
                counted = [
                    part for destination, part in allocate_block(block, split)
                    if destination not in (
                        Destination.OMGE_CANCELLATION, Destination.VOLUNTARY_OMGE_CANCELLATION
                    )
                ]  # fmt: skip
                self._check_threshold(tx, terms, vintage, total(counted))
                self._book_first_transfer(
                    tx, counted, reference=issuance_id, subtype=ActionSubtype.ISSUANCE,
                    now_us=now_us,
                )  # fmt: skip
            tx.issuance_put(
                host_party=self.party,
                issuance_id=issuance_id,
                authorisation_id=authorisation_id,
                vintage=vintage,
                blocks=[block],
                now=now_us,
            )
            for party in sorted(terms.acquiring_parties):
                notice = IssuanceNotice(
                    issuance_id=issuance_id,
                    authorisation_id=authorisation_id,
                    blocks=[block_to_pb(block)],
                    quantity=quantity,
                )
                self._send(tx, party, notice, issuance_id, now_us)
            if buyer_share:
                # The buyer's share under the cooperative approach leaves at once, as a
                # first transfer in this same transaction (JCM-style sharing of issuance).
                (buyer,) = terms.acquiring_parties
                states = tx.authorisation_party_states(self.party, authorisation_id, terms.version)
                rules.check_transfer_request(
                    terms, to_party=buyer, vintage=vintage,
                    acknowledged=states.get(buyer) == "acknowledged",
                )  # fmt: skip
                self._check_booking(tx, Role.SENDER, buyer_share)
                if self._ca_point(authorisation) == "transfer":
                    self._check_threshold(tx, terms, vintage, total(buyer_share))
                self._propose(
                    tx, terms, to_party=buyer, blocks=buyer_share, now_us=now_us,
                    expires_us=now_us + self.default_timeout // dt.timedelta(microseconds=1),
                )  # fmt: skip
        log.info(
            "issued %d tCO2e of vintage %d as %s (%s)",
            quantity,
            vintage,
            issuance_id,
            block.label(),
        )
        return issuance_id, [block]

    def start_transfer(
        self,
        *,
        to_party: str,
        authorisation_id: str,
        vintage: int,
        quantity: int,
        now: dt.datetime,
        timeout: dt.timedelta | None = None,
        host_party: str = "",
    ) -> str:
        """Reserve units and persist a proposal to ``to_party``; returns the transfer id.

        With ``host_party`` another party's, this is an onward transfer of units
        acquired from that host: the proposal carries the host's signed statement.
        """
        now_us = to_us(now)
        self._require_partner(to_party)
        expires_us = now_us + (timeout or self.default_timeout) // dt.timedelta(microseconds=1)
        host = host_party or self.party
        evidence = b""
        with self.store.transaction() as tx:
            terms = tx.authorisation_get(host, authorisation_id)
            if terms is None:
                raise Rejected(
                    RejectionCode.UNKNOWN_AUTHORISATION,
                    f"no authorisation {authorisation_id!r} of {host} is recorded here",
                )
            if host == self.party:
                if tx.authorisation_details(self.party, authorisation_id).get("revoked"):
                    raise Rejected(
                        RejectionCode.AUTHORISATION_REVOKED,
                        f"authorisation {authorisation_id} is revoked",
                    )
                states = tx.authorisation_party_states(host, authorisation_id, terms.version)
                acknowledged = states.get(to_party) == "acknowledged"
            else:
                # Units acquired from their host, already first-transferred: the
                # receiver checks the host's statement itself.
                evidence = tx.authorisation_evidence(host, authorisation_id) or b""
                acknowledged = True
            rules.check_transfer_request(
                terms, to_party=to_party, vintage=vintage, acknowledged=acknowledged
            )
            held = tx.blocks_held(
                account=HOLDING_ACCOUNT, authorisation_id=authorisation_id, vintage=vintage
            )
            taken, remainders = take(held, quantity)
            self._check_booking(tx, Role.SENDER, taken)
            if all(b.first_transferring_party == self.party for b in taken) and (
                self._ca_point(self._authorisation(tx, host, authorisation_id)) == "transfer"
            ):
                self._check_threshold(tx, terms, vintage, quantity)
            for tail in remainders:
                tx.block_split(tail)
            transfer_id = self._propose(
                tx, terms, to_party=to_party, blocks=taken, now_us=now_us, expires_us=expires_us,
                evidence=evidence,
            )  # fmt: skip
        return transfer_id

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
        """Reserve ``blocks`` and persist a proposal of them to ``to_party``."""
        quantity = total(blocks)
        authorisation_id = terms.authorisation_id
        taken = list(blocks)
        first_transfer = all(b.first_transferring_party == self.party for b in taken) and (
            self._ca_point(self._authorisation(tx, self.party, authorisation_id)) == "transfer"
        )
        transfer_id = f"{self.party}-T-{tx.next_counter('transfer'):06d}"
        tx.blocks_reserve(taken, transfer_id=transfer_id)
        proposal = TransferProposal(
            transfer_id=transfer_id,
            authorisation_id=authorisation_id,
            quantity=quantity,
            blocks=[block_to_pb(b) for b in taken],
            first_transfer=first_transfer,
            expires_at=timestamp(expires_us),
            authorisation_evidence=evidence,
        )
        payload = self._send(tx, to_party, proposal, transfer_id, now_us)
        tx.transfer_put(
            transfer_id=transfer_id,
            direction=Role.SENDER,
            partner=to_party,
            state=TransferState.PROPOSED,
            quantity=quantity,
            authorisation_id=authorisation_id,
            first_transfer=proposal.first_transfer,
            proposal_message_id=proposal.header.message_id,
            proposal_digest=digest(payload),
            expires_at=expires_us,
            blocks=taken,
            now=now_us,
        )
        log.info("transfer %s proposed: %d tCO2e to %s", transfer_id, quantity, to_party)
        return transfer_id


def _enum_or(kind: type[FirstTransferDefinition], value: int) -> FirstTransferDefinition:
    try:
        return kind(value)
    except ValueError:
        raise Rejected(RejectionCode.INVALID_FIELD, f"{kind.__name__} {value} is unknown") from None


def _subject_of(msg: Message) -> str:
    for name in ("transfer_id", "issuance_id", "authorisation_id"):
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


def _code_name(code: int) -> str:
    try:
        return RejectionCode(code).wire_name
    except ValueError:
        return f"REJECTION_CODE_{code}"
