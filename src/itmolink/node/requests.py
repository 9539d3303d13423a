"""Requests from partners: verified before parsed, applied at most once, answered.

Every request is handled in one database transaction that journals it, applies
it (or records why not) and stores the signed reply in the inbox.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar

from google.protobuf.message import DecodeError, Message

from itmolink import PROTOCOL_VERSION
from itmolink.core import rules
from itmolink.core.actions import (
    ActionType,
)
from itmolink.core.aef import ActionSubtype
from itmolink.core.authorisation import (
    Authorisation,
    check_amendment,
    check_authorisation,
)
from itmolink.core.blocks import Block, total, validate_block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.reconcile import BLOCKS_LEAF_DEFINITION
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Event, Role, TransferState, step
from itmolink.core.units import FirstTransferDefinition
from itmolink.crypto.envelope import VerifiedEnvelope, open_envelope, pae, sealed_payload
from itmolink.crypto.keys import VerifyingKey, is_key_id_of
from itmolink.node.base import (
    MAX_LEAVES,
    REQUEST_TYPES,
    VIEWS,
    AuthorisationAcknowledgement,
    AuthorisationStatement,
    EngineBase,
    FirstTransferNotice,
    FirstTransferNoticeAcknowledgement,
    IssuanceAcknowledgement,
    IssuanceNotice,
    KeyRotation,
    KeyRotationAcknowledgement,
    ReconciliationAnswer,
    ReconciliationQuery,
    TransferAcceptance,
    TransferBatchAcceptance,
    TransferBatchCompletion,
    TransferBatchCompletionReceipt,
    TransferBatchItem,
    TransferBatchOutcome,
    TransferBatchProposal,
    TransferCompletion,
    TransferCompletionReceipt,
    TransferProposal,
    TransferStatusQuery,
    TransferStatusReport,
    TransferVoid,
    TransferVoidReceipt,
    _check_owned_id,
    _check_transfer_id,
    _enum_or,
    _owned_by,
    _subject_of,
    check_reconciliation_query,
    digest,
    log,
    type_name,
)
from itmolink.node.convert import (
    block_from_pb,
    describe_us,
    from_us,
    terms_from_statement,
    timestamp_us,
    to_us,
)
from itmolink.node.ratelimit import RateLimited, TokenBucket
from itmolink.node.validation import validate
from itmolink.store.tx import NewAction, NewTransfer, TransferRecord, Tx
from itmolink.v1 import (
    codes_pb2,
    common_pb2,
    envelope_pb2,
    reconcile_pb2,
    transfer_pb2,
)

# Refusals that a stale copy of the pinned keys can cause (a key learned, revoked or
# renewed through another process sharing the database).
_KEY_CODES = frozenset({
    RejectionCode.UNKNOWN_SIGNING_KEY,
    RejectionCode.SIGNING_KEY_REVOKED,
    RejectionCode.SIGNING_KEY_EXPIRED,
    RejectionCode.SIGNING_KEY_NOT_YET_VALID,
})  # fmt: skip


# Revocations a partner may keep here of its keys that were never announced here
# (PROTOCOL.md §5.12 KR3): enough for rotations given up, not a table to fill.
MAX_UNPINNED_REVOCATIONS = 16
# Room left in a status report for its header, signature and framing around the
# records it carries (PROTOCOL §5.11): a report is refused over max_message_bytes.
RECORDS_MARGIN = 2048


class Requests(EngineBase):
    """The receiver's side of the protocol."""

    # -- requests from partners ------------------------------------------------------

    def _open_delivery(self, raw: bytes, now: dt.datetime) -> VerifiedEnvelope:
        """Verify a delivered envelope with the pinned keys, catching up first with
        the ledger when they do not accept its key: another process sharing the
        database may have recorded the partner's new key (docs/DESIGN.md)."""
        try:
            return open_envelope(raw, self.trust, now)
        except Rejected as rejected:
            if rejected.code not in _KEY_CODES:
                raise
        with self.store.transaction() as tx:
            self._sync_shared(tx)
        return open_envelope(raw, self.trust, now)

    def _take_transfer_items(self, sender: str, msg: Message, now_us: int) -> None:
        """Count the transfers a proposal asks for against the sender's budget
        (PROTOCOL.md §2.5): one for a ``TransferProposal``, one per item of a
        ``TransferBatchProposal``. Raises :class:`RateLimited` over it."""
        rate = self.limits.transfer_items_per_second
        if rate is None:
            return
        if isinstance(msg, TransferBatchProposal):
            count = len(msg.items)
        elif isinstance(msg, TransferProposal):
            count = 1
        else:
            return
        bucket = self._transfer_items.get(sender)
        if bucket is None:
            bucket = self._transfer_items[sender] = TokenBucket(
                rate, self.limits.transfer_items_burst, now_us / 1e6
            )
        if not bucket.take(now_us / 1e6, count):
            raise RateLimited(f"{sender} proposed more than {rate} transfers a second")

    def handle_delivery(self, peer_party: str, raw: bytes, now: dt.datetime) -> bytes:
        """Apply one request delivered by ``peer_party`` (the mTLS-authenticated
        partner) and return the signed reply envelope.

        ``now`` is when the delivery arrived: the checks made before the ledger is
        opened (key validity, the header) use it. With a ``ledger_clock`` (a
        runtime's), the time is read again once the transaction holds the ledger's
        write lock, and the checks made there (the ``sent_at`` window, a proposal's
        expiry, T1b) use that reading: deliveries are then judged in the order in
        which they are recorded, whichever process or group commit they go through
        (PROTOCOL §6.11 S5)."""
        now_us = to_us(now)
        message_id = ""
        subject_id = ""
        try:
            if len(raw) > self.limits.max_message_bytes:
                raise Rejected(
                    RejectionCode.MESSAGE_TOO_LARGE,
                    f"envelope of {len(raw)} bytes; at most {self.limits.max_message_bytes}",
                )
            verified = self._open_delivery(raw, now)
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
            log.warning(
                "refused a message from %s without recording it: %s", peer_party, rejected,
                extra={"partner": peer_party, "code": rejected.code.wire_name},
            )  # fmt: skip
            _, envelope = self._reply(
                None, peer_party, self._rejection(subject_id, rejected, raw), message_id, now_us
            )
            return envelope

        sender = verified.signer_party
        payload_digest = digest(pae(verified.payload_type, verified.payload))
        verified_with = self.trust
        with self._transaction() as tx:
            if self.ledger_clock is not None:
                now_us = max(now_us, to_us(self.ledger_clock()))
            if self.trust is not verified_with:
                # Another process sharing the database changed the pinned keys since
                # the check above (a revocation, a new validity window): check again
                # with the ledger's keys before anything is recorded.
                try:
                    open_envelope(raw, self.trust, now)
                except Rejected as rejected:
                    log.warning(
                        "refused a message from %s without recording it: %s", sender, rejected,
                        extra={"partner": sender, "code": rejected.code.wire_name},
                    )  # fmt: skip
                    _, envelope = self._reply(
                        None, sender, self._rejection(subject_id, rejected, raw), message_id,
                        now_us,
                    )  # fmt: skip
                    return envelope
            seen, owner = tx.inbox_lookup(sender, message_id, header.sequence)
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
            journal_id = tx.journal_new(
                direction="in",
                partner=sender,
                message_id=message_id,
                payload_type=verified.payload_type,
                envelope=raw,
                now=now_us,
            )
            if journal_id is None:  # an id of one of its replies: nothing was recorded
                _, envelope = self._reply(
                    None, sender,
                    self._rejection(subject_id, Rejected(
                        RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                        f"message id {message_id} was already used by another message",
                    ), raw),
                    message_id, now_us,
                )  # fmt: skip
                return envelope
            # D8b. Raised inside the transaction: the journal entry above is rolled back
            # with it, so a refused request is retried, unrecorded.
            self._take_transfer_items(sender, msg, now_us)
            handler = self._request_handlers[verified.payload_type]
            # The keys that signed it: a key announced in it is recorded as announced
            # by them, to fall with them (PROTOCOL §3.8, §5.12 KR2).
            self._request_signers = verified.key_ids
            try:
                sent = len(self.sent)
                with tx.savepoint():
                    envelope = handler(self, tx, sender, msg, verified.payload, journal_id, now_us)
            except Rejected as rejected:
                # What the handler put in the outbox was rolled back with it: not sent.
                del self.sent[sent:]
                log.info(
                    "rejected %s %s from %s: %s", cls.__name__, subject_id, sender, rejected,
                    extra={
                        "partner": sender, "message_id": message_id, "subject_id": subject_id,
                        "code": rejected.code.wire_name,
                    },
                )  # fmt: skip
                self._record_rejected_request(tx, sender, msg, verified.payload, rejected, now_us)
                _, envelope = self._reply(
                    tx, sender, self._rejection(subject_id, rejected, raw), message_id, now_us
                )
            finally:
                self._request_signers = ()
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
        """Keep a visible record of a rejected transfer proposal (and block reuse of its
        id); of each transfer of a batch refused as a whole."""
        if isinstance(msg, TransferProposal):
            items: list[TransferProposal | TransferBatchItem] = [msg]
            expires_at, batch_id = 0, ""
        elif isinstance(msg, TransferBatchProposal):
            items, expires_at, batch_id = list(msg.items), 0, msg.batch_id
        else:
            return
        seen: set[str] = set()
        records = []
        for item in items:
            if (
                not _owned_by(item.transfer_id, sender)
                or item.transfer_id in seen
                or tx.transfer_get(item.transfer_id) is not None
            ):
                continue
            seen.add(item.transfer_id)
            records.append(
                self._incoming_row(
                    sender, msg, item, TransferState.REJECTED, [], proposal_digest=digest(payload),
                    expires_at=expires_at, batch_id=batch_id, rejected=rejected,
                )
            )  # fmt: skip
        tx.transfers_put(records, now=now_us)

    @staticmethod
    def _incoming_row(
        sender: str,
        msg: TransferProposal | TransferBatchProposal,
        item: TransferProposal | TransferBatchItem,
        state: TransferState,
        blocks: list[Block],
        *,
        proposal_digest: bytes,
        expires_at: int,
        acceptance_digest: bytes = b"",
        batch_id: str = "",
        rejected: Rejected | None = None,
    ) -> NewTransfer:
        """An incoming transfer as recorded here, proposed alone or in a batch."""
        asked = isinstance(item, TransferProposal) and item.complete_on_acceptance
        return NewTransfer(
            transfer_id=item.transfer_id, direction=Role.RECEIVER, partner=sender, state=state,
            quantity=item.quantity, authorisation_id=item.authorisation_id,
            first_transfer=item.first_transfer, proposal_message_id=msg.header.message_id,
            proposal_digest=proposal_digest, acceptance_digest=acceptance_digest,
            expires_at=expires_at, blocks=blocks, proposed_at=timestamp_us(msg.header.sent_at),
            rejection_code=0 if rejected is None else int(rejected.code),
            rejection_detail="" if rejected is None else rejected.detail, batch_id=batch_id,
            complete_on_acceptance=asked,
        )  # fmt: skip

    def _on_authorisation(
        self,
        tx: Tx,
        sender: str,
        msg: AuthorisationStatement,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        # A party that an amendment removes is sent that amendment too: it may
        # record a version that no longer names it, if an earlier one did.
        named_before = any(
            self.party in version.acquiring_parties
            for version, _ in tx.authorisation_versions(sender, msg.authorisation_id)
        )
        terms = self._check_statement(msg, sender, named_before=named_before)
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

    def _learn_authorisation(
        self, tx: Tx, host: str, msg: TransferProposal | TransferBatchItem, now_us: int
    ) -> None:
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

    def _check_statement(
        self, statement: AuthorisationStatement, host: str, *, named_before: bool = False
    ) -> AuthorisationTerms:
        """The acquiring party's checks on a host's statement, received directly or
        as an onward transfer's evidence."""
        terms = terms_from_statement(statement)
        _check_owned_id(terms.authorisation_id, host, "authorisation id")
        rules.check_received_authorisation(
            terms, me=self.party, sender=host, named_before=named_before
        )
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
        self._check_expiry(msg, f"proposal {msg.transfer_id}", now_us)
        self._check_unknown_id(tx, msg.transfer_id)
        blocks = self._check_incoming(tx, sender, msg, now_us)
        if msg.complete_on_acceptance:
            return self._accept_completed(tx, sender, msg, payload, blocks, journal_id, now_us)
        acceptance = TransferAcceptance(
            transfer_id=msg.transfer_id, proposal_digest=digest(payload)
        )
        acceptance_payload, envelope = self._reply(
            tx, sender, acceptance, msg.header.message_id, now_us
        )
        tx.transfers_put(
            [
                self._incoming_row(
                    sender, msg, msg, TransferState.ACCEPTED, blocks,
                    proposal_digest=acceptance.proposal_digest,
                    acceptance_digest=digest(acceptance_payload),
                    expires_at=timestamp_us(msg.expires_at),
                )
            ],
            now=now_us,
        )  # fmt: skip
        return envelope

    def _accept_completed(
        self,
        tx: Tx,
        sender: str,
        msg: TransferProposal,
        payload: bytes,
        blocks: list[Block],
        journal_id: int,
        now_us: int,
    ) -> bytes:
        """R1, the one-round transfer: a proposal that asks to complete on acceptance
        and passed T1 to T5 is accepted and completed in this transaction, the one
        that journals it. The transfer is recorded ACCEPTED, then takes the
        receiver's completion step (:meth:`_complete_incoming_many`: credit, −CA
        referencing the proposal's journal entry, AEF actions, COMPLETED), and the
        acceptance says so with the year booked; its digest is sealed with the
        transfer. The stored reply answers any later delivery of the same bytes."""
        proposal_digest = digest(payload)
        tx.transfers_put(
            [
                self._incoming_row(
                    sender, msg, msg, TransferState.ACCEPTED, blocks,
                    proposal_digest=proposal_digest, expires_at=timestamp_us(msg.expires_at),
                )
            ],
            now=now_us,
        )  # fmt: skip
        record = tx.transfer_get(msg.transfer_id)
        assert record is not None
        sealed: list[bytes] = []

        def accept(years: dict[str, int]) -> bytes:
            acceptance = TransferAcceptance(
                transfer_id=msg.transfer_id, proposal_digest=proposal_digest, completed=True,
                adjustment_year=years[msg.transfer_id],
            )  # fmt: skip
            acceptance_payload, envelope = self._reply(
                tx, sender, acceptance, msg.header.message_id, now_us
            )
            sealed.append(envelope)
            return digest(acceptance_payload)

        self._complete_incoming_many(
            tx, sender, [record], journal_id, now_us,
            event=Event.ACCEPTED_TO_COMPLETE, acceptance=accept,
        )  # fmt: skip
        (envelope,) = sealed
        return envelope

    def _check_expiry(
        self, msg: TransferProposal | TransferBatchProposal, what: str, now_us: int
    ) -> None:
        """T1a, T1b (B2 for a batch): expires_at is set and not past, allowing for skew."""
        if not msg.HasField("expires_at"):
            raise Rejected(RejectionCode.MISSING_FIELD, f"{what} has no expires_at")
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        if timestamp_us(msg.expires_at) + skew < now_us:
            raise Rejected(
                RejectionCode.PROPOSAL_EXPIRED,
                f"{what} expired at {describe_us(timestamp_us(msg.expires_at))}",
            )

    @staticmethod
    def _check_unknown_id(tx: Tx, transfer_id: str, known: set[str] | None = None) -> None:
        """T2: a transfer id is used once, whatever the direction, partner or outcome
        (``known``: the ids of a batch already recorded here, read beforehand)."""
        if (transfer_id in known) if known is not None else tx.transfer_get(transfer_id):
            raise Rejected(
                RejectionCode.TRANSFER_STATE_CONFLICT,
                f"transfer id {transfer_id} is already used by another transfer",
            )

    def _check_incoming(
        self,
        tx: Tx,
        sender: str,
        item: TransferProposal | TransferBatchItem,
        now_us: int,
        batch: _BatchSerials | None = None,
    ) -> list[Block]:
        """The receiver's checks T2a to T5 on one proposed transfer (alone or an item
        of a batch); returns its blocks. Writes nothing but what T2a learns."""
        blocks = [block_from_pb(b) for b in item.blocks]
        host = blocks[0].first_transferring_party if blocks else sender
        if host != sender:
            # An onward transfer: the units were first transferred by their host.
            self._learn_authorisation(tx, host, item, now_us)
        elif tx.authorisation_details(sender, item.authorisation_id).get("revoked"):
            raise Rejected(
                RejectionCode.AUTHORISATION_REVOKED,
                f"authorisation {item.authorisation_id} is revoked",
            )
        rules.check_transfer_proposal(
            tx.authorisation_get(host, item.authorisation_id),
            authorisation_id=item.authorisation_id,
            me=self.party,
            quantity=item.quantity,
            blocks=blocks,
        )
        self._check_origin(host, blocks)
        for block in blocks:
            # In a batch, what is held and expected here was read once for all its items.
            rules.check_not_held(
                [block], tx.blocks_overlapping(block) if batch is None else batch.overlapping(block)
            )
        self._check_booking(tx, Role.RECEIVER, blocks)
        if batch is not None:
            batch.add(blocks)  # accepted: later items of the batch are checked against it
        return blocks

    def _on_batch_proposal(
        self,
        tx: Tx,
        sender: str,
        msg: TransferBatchProposal,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        """Each item is checked as a proposal of its own (T1 to T5) and accepted or
        rejected on its own; one acceptance answers the batch (§5.15)."""
        _check_owned_id(msg.batch_id, sender, "batch id")  # B1
        self._check_expiry(msg, f"batch {msg.batch_id}", now_us)  # B2
        blocks_in_batch = sum(len(item.blocks) for item in msg.items)
        if blocks_in_batch > self.limits.max_blocks:  # B3
            raise Rejected(
                RejectionCode.TOO_MANY_BLOCKS,
                f"batch {msg.batch_id} carries {blocks_in_batch} blocks; at most "
                f"{self.limits.max_blocks}",
            )
        if tx.batch_known(msg.batch_id, sender):  # B4
            raise Rejected(
                RejectionCode.TRANSFER_STATE_CONFLICT,
                f"batch id {msg.batch_id} is already used by another batch",
            )
        proposal_digest = digest(payload)
        expires_at = timestamp_us(msg.expires_at)
        outcomes: list[TransferBatchOutcome] = []
        accepted: list[tuple[TransferBatchItem, list[Block]]] = []
        refused: list[NewTransfer] = []
        seen: set[str] = set()
        known = set(tx.transfers_get([item.transfer_id for item in msg.items]))
        every_block = [block_from_pb(b) for item in msg.items for b in item.blocks]
        held = tx.blocks_overlapping_each(every_block)
        serials = _BatchSerials(
            tx.blocks_expected(within=_serial_ranges(every_block)),
            dict(zip(every_block, held, strict=True)),
        )
        for item in msg.items:
            recordable = False
            try:
                _check_transfer_id(item.transfer_id, sender)  # T1
                if item.transfer_id in seen:
                    raise Rejected(
                        RejectionCode.TRANSFER_STATE_CONFLICT,
                        f"transfer id {item.transfer_id} appears twice in batch {msg.batch_id}",
                    )
                self._check_unknown_id(tx, item.transfer_id, known)  # T2
                recordable = True
                onward = bool(item.blocks) and item.blocks[0].first_transferring_party != sender
                # Only T2a writes (what it learns): undone if a later check fails.
                with tx.savepoint() if onward else contextlib.nullcontext():
                    blocks = self._check_incoming(tx, sender, item, now_us, serials)
            except Rejected as rejected:
                log.info(
                    "rejected transfer %s of batch %s from %s: %s", item.transfer_id,
                    msg.batch_id, sender, rejected,
                    extra={"partner": sender, "subject_id": item.transfer_id,
                           "code": rejected.code.wire_name},
                )  # fmt: skip
                outcomes.append(
                    TransferBatchOutcome(
                        transfer_id=item.transfer_id,
                        rejection=codes_pb2.RejectionReason(
                            code=int(rejected.code),  # type: ignore[arg-type]
                            detail=rejected.detail,
                        ),
                    )
                )
                if recordable:
                    refused.append(
                        self._incoming_row(
                            sender, msg, item, TransferState.REJECTED, [],
                            proposal_digest=proposal_digest, expires_at=0,
                            batch_id=msg.batch_id, rejected=rejected,
                        )
                    )  # fmt: skip
            else:
                outcomes.append(TransferBatchOutcome(transfer_id=item.transfer_id))
                accepted.append((item, blocks))
            seen.add(item.transfer_id)
        acceptance = TransferBatchAcceptance(
            batch_id=msg.batch_id, proposal_digest=proposal_digest, items=outcomes
        )
        acceptance_payload, envelope = self._reply(
            tx, sender, acceptance, msg.header.message_id, now_us
        )
        acceptance_digest = digest(acceptance_payload)
        tx.transfers_put(
            [
                self._incoming_row(
                    sender, msg, item, TransferState.ACCEPTED, blocks,
                    proposal_digest=proposal_digest, acceptance_digest=acceptance_digest,
                    expires_at=expires_at, batch_id=msg.batch_id,
                )
                for item, blocks in accepted
            ]
            + refused,
            now=now_us,
        )  # fmt: skip
        return envelope

    def _completion_target(
        self,
        tx: Tx,
        sender: str,
        transfer_id: str,
        acceptance_digest: bytes,
        batch_id: str = "",
        *,
        known: TransferRecord | None = None,
    ) -> TransferRecord:
        """C1 and C2: the incoming transfer a completion is about (alone, or an item of
        the batch ``batch_id``, read beforehand as ``known``), whose acceptance it names."""
        record = known if batch_id else tx.transfer_get(transfer_id)
        if (
            record is None
            or record.direction is not Role.RECEIVER
            or record.partner != sender
            or (batch_id and record.batch_id != batch_id)
        ):
            where = f" in batch {batch_id}" if batch_id else ""
            raise Rejected(
                RejectionCode.UNKNOWN_TRANSFER,
                f"{sender} has no transfer {transfer_id!r}{where} to this node",
            )
        if acceptance_digest != record.acceptance_digest:
            raise Rejected(
                RejectionCode.DIGEST_MISMATCH,
                f"completion of {transfer_id} does not refer to this node's acceptance",
            )
        return record

    def _complete_incoming(
        self, tx: Tx, sender: str, record: TransferRecord, journal_id: int, now_us: int
    ) -> int:
        """C3, C4 and the receiver's completion step for one transfer
        (:meth:`_complete_incoming_many`); raises the Rejected of C4."""
        years, refused = self._complete_incoming_many(tx, sender, [record], journal_id, now_us)
        if record.transfer_id in refused:
            raise refused[record.transfer_id]
        return years[record.transfer_id]

    def _complete_incoming_many(
        self,
        tx: Tx,
        sender: str,
        records: Sequence[TransferRecord],
        journal_id: int,
        now_us: int,
        *,
        event: Event = Event.COMPLETION_RECEIVED,
        acceptance: Callable[[dict[str, int]], bytes] | None = None,
        completion_journaled: bool = True,
    ) -> tuple[dict[str, int], dict[str, Rejected]]:
        """C3, C4 and the receiver's completion step for transfers that passed C1 and
        C2 (one completed alone, or the items of a batch completion), in the
        transaction that journals the completion: credit the blocks, book −CA, record
        the AEF actions, COMPLETED. Returns the year of each one's adjustment (for a
        transfer already COMPLETED, C3, the year booked the first time, and nothing
        is applied), and the refusal of each that is in another state (C4, 3008).

        The one-round transfer (R1) takes the same step on ``event``
        ACCEPTED_TO_COMPLETE, in the transaction that journals the proposal:
        ``acceptance`` is given the years booked, seals the acceptance and returns
        its digest, recorded with the transfers when they become COMPLETED.
        ``completion_journaled`` false: ``journal_id`` is not the entry of a completion
        (a recovery without one, :mod:`itmolink.node.evidence`)."""
        years: dict[str, int] = {}
        refused: dict[str, Rejected] = {}
        posted = [r.transfer_id for r in records if r.state is TransferState.COMPLETED]
        if posted:
            # A completion sent again (freshly sealed) after this node had applied the
            # first: already posted, nothing more to do.
            for transfer_id, amounts in tx.adjustment_amounts_of(posted).items():
                booked = {year for year, _ in amounts}
                years[transfer_id] = booked.pop() if len(booked) == 1 else 0
        live: list[TransferRecord] = []
        transition = None
        for record in records:
            if record.state is TransferState.COMPLETED:
                continue
            try:
                transition = step(Role.RECEIVER, record.state, event)
            except Rejected as rejected:
                refused[record.transfer_id] = rejected
                continue
            live.append(record)
        if transition is None or not live:
            return years, refused
        ids = [record.transfer_id for record in live]
        blocks = tx.blocks_of_transfers(ids)
        years.update(
            self._apply_many(
                tx, transition.effects, [(t, sender, blocks[t]) for t in ids], journal_id, now_us
            )
        )
        tx.transfers_set_state(
            ids, transition.state, now=now_us, blocks=blocks,
            records={r.transfer_id: r for r in live},
            acceptance_digest=None if acceptance is None else acceptance(years),
        )  # fmt: skip
        tx.actions_put([
            NewAction(
                action_type=ActionType.ACQUISITION.value, block=block, at=now_us,
                transferring_party=sender, transfer_id=transfer_id,
            )
            for transfer_id in ids
            for block in blocks[transfer_id]
        ])  # fmt: skip
        if event is Event.COMPLETION_RECEIVED and completion_journaled:
            # The sender's proof that it completed, which records give back (§5.11).
            tx.completions_put([(transfer_id, journal_id) for transfer_id in ids])
        if len(ids) == 1:  # a batch logs one line for all (_on_batch_completion)
            log.info(
                "transfer %s from %s completed: %d tCO2e credited", ids[0], sender,
                total(blocks[ids[0]]), extra={"transfer_id": ids[0], "partner": sender},
            )  # fmt: skip
        return years, refused

    def _on_completion(
        self,
        tx: Tx,
        sender: str,
        msg: TransferCompletion,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        record = self._completion_target(tx, sender, msg.transfer_id, msg.acceptance_digest)
        year = self._complete_incoming(tx, sender, record, journal_id, now_us)
        receipt = TransferCompletionReceipt(transfer_id=msg.transfer_id, adjustment_year=year)
        return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]

    def _on_batch_completion(
        self,
        tx: Tx,
        sender: str,
        msg: TransferBatchCompletion,
        payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> bytes:
        """Each item is completed as a TransferCompletion of its own would be (C1 to
        C4); an item that fails is answered with its reason, the others apply."""
        _check_owned_id(msg.batch_id, sender, "batch id")
        ids = [item.transfer_id for item in msg.items]
        known = tx.transfers_get(ids)
        refused: dict[str, Rejected] = {}
        targets: dict[str, TransferRecord] = {}
        for transfer_id in ids:
            try:
                record = self._completion_target(
                    tx, sender, transfer_id, msg.acceptance_digest, msg.batch_id,
                    known=known.get(transfer_id),
                )  # fmt: skip
            except Rejected as rejected:
                refused[transfer_id] = rejected
            else:
                targets[transfer_id] = record
        years, not_applied = self._complete_incoming_many(
            tx, sender, list(targets.values()), journal_id, now_us
        )
        refused.update(not_applied)
        outcomes: list[TransferBatchOutcome] = []
        for transfer_id in ids:
            refusal = refused.get(transfer_id)
            if refusal is None:
                outcomes.append(
                    TransferBatchOutcome(
                        transfer_id=transfer_id, adjustment_year=years[transfer_id]
                    )
                )
                continue
            log.error(
                "refused the completion of transfer %s of batch %s from %s: %s",
                transfer_id, msg.batch_id, sender, refusal,
            )  # fmt: skip
            outcomes.append(
                TransferBatchOutcome(
                    transfer_id=transfer_id,
                    rejection=codes_pb2.RejectionReason(
                        code=int(refusal.code),  # type: ignore[arg-type]
                        detail=refusal.detail,
                    ),
                )
            )
        log.info(
            "batch %s from %s completed: %d of %d transfers", msg.batch_id, sender,
            len(ids) - len(refused), len(ids),
            extra={"subject_id": msg.batch_id, "partner": sender},
        )  # fmt: skip
        receipt = TransferBatchCompletionReceipt(batch_id=msg.batch_id, items=outcomes)
        return self._reply(tx, sender, receipt, msg.header.message_id, now_us)[1]

    def _incoming_transfer(self, tx: Tx, sender: str, transfer_id: str) -> TransferState | None:
        record = self._incoming_record(tx, sender, transfer_id)
        return None if record is None else record.state

    def _incoming_record(self, tx: Tx, sender: str, transfer_id: str) -> TransferRecord | None:
        record = tx.transfer_get(transfer_id)
        if record is None:
            return None
        if record.direction is not Role.RECEIVER or record.partner != sender:
            raise Rejected(
                RejectionCode.UNKNOWN_TRANSFER,
                f"{sender} has no transfer {transfer_id} to this node",
            )
        return record

    def _on_void(
        self, tx: Tx, sender: str, msg: TransferVoid, payload: bytes, journal_id: int, now_us: int
    ) -> bytes:
        _check_transfer_id(msg.transfer_id, sender)
        proposed_at = now_us
        if msg.HasField("proposal_sent_at"):
            proposed_at = timestamp_us(msg.proposal_sent_at)
            if proposed_at > timestamp_us(msg.header.sent_at):
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    "proposal_sent_at is later than the void's own sent_at: a proposal "
                    "comes before its void",
                )
        state = self._incoming_transfer(tx, sender, msg.transfer_id)
        if state is None:
            # The proposal has not arrived (or never will): remember the void so a
            # late proposal with this id is refused, placed where the proposal would
            # have placed the transfer in a reconciliation snapshot (an older sender
            # gives no proposal_sent_at: then when the void arrived, §11.9).
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
                proposed_at=proposed_at,
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
        if state == TransferState.COMPLETED and record is not None and not msg.include_records:
            # The receiver still waits for our completion: make sure one is coming. (A
            # query for records comes from a partner that lost the transfer and takes
            # it back from them, §7.9: a completion would only be refused there.)
            self._resend_completion(tx, msg.transfer_id, now_us)
        report = TransferStatusReport(transfer_id=msg.transfer_id, state=int(state))  # type: ignore[arg-type]
        if msg.include_records and record is not None and record.partner == sender:
            report.records.extend(self._records_of(tx, record))
        return self._reply(tx, sender, report, msg.header.message_id, now_us)[1]

    def _records_of(self, tx: Tx, record: TransferRecord) -> list[bytes]:
        """The records a status query asks for (PROTOCOL §5.11, §7.9): the journaled
        envelopes of a final transfer, byte for byte: its proposal (the batch proposal
        of an item of a batch); if it completed, the receiver's acceptance (the batch
        acceptance); and, if it completed in two phases, the sender's completion of it
        (a ``TransferCompletion`` or the ``TransferBatchCompletion``). None when this
        node does not hold them as they were exchanged (each is checked against the
        digests recorded with the transfer), or when they would not fit in one
        message."""
        if not record.state.is_final or not record.proposal_message_id:
            return []
        ours = record.direction is Role.SENDER
        proposal = tx.journal_envelope(
            "out" if ours else "in", record.partner, record.proposal_message_id
        )
        if proposal is None or digest(sealed_payload(proposal)) != record.proposal_digest:
            return []
        records = [proposal]
        if record.state is TransferState.COMPLETED:
            acceptance: bytes | None = None
            if ours:
                entry = tx.outbox_answer_of(record.proposal_message_id)
                acceptance = None if entry is None else tx.journal_envelope_of(entry)
            else:
                seen = tx.inbox_get(record.partner, record.proposal_message_id)
                acceptance = None if seen is None else seen.reply
            if acceptance is None or digest(sealed_payload(acceptance)) != record.acceptance_digest:
                return []
            records.append(acceptance)
            if not _completed_on_acceptance(acceptance):
                completion = self._completion_record(tx, record, ours)
                if completion is None:
                    return []
                records.append(completion)
        if sum(len(r) for r in records) + RECORDS_MARGIN > self.limits.max_message_bytes:
            return []
        return records

    @staticmethod
    def _completion_record(tx: Tx, record: TransferRecord, ours: bool) -> bytes | None:
        """The sender's completion of a transfer completed in two phases, as exchanged:
        the last one sent (a completion sealed again names the same acceptance), or the
        one it was completed on here; None if this node does not hold one that names
        the transfer and its acceptance."""
        found: list[bytes | None] = []
        if ours:
            found.append(
                tx.outbox_last_envelope(
                    payload_type=type_name(TransferCompletion), subject_id=record.transfer_id
                )
            )
            if record.batch_id:
                found.append(
                    tx.outbox_last_envelope(
                        payload_type=type_name(TransferBatchCompletion), subject_id=record.batch_id
                    )
                )
        else:
            found.append(tx.completion_of(record.transfer_id))
        for envelope in found:
            if envelope is not None and _completes(envelope, record):
                return envelope
        return None

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
            if msg.view == reconcile_pb2.RECONCILIATION_VIEW_BLOCKS:
                answer.leaf_definition = BLOCKS_LEAF_DEFINITION
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
                # A key the sender's card lists is pinned from the card: no in-band
                # announcer is recorded for it, so it cannot fall with one (a thief
                # with an old key "announcing" the owner's current key).
                now=now_us, announced_by=None if key.key_id in self._card_key_ids
                else " ".join(dict.fromkeys(self._request_signers)),
            )  # fmt: skip
        compromised_since = (
            timestamp_us(msg.compromised_since) if msg.HasField("compromised_since") else None
        )
        # A key the partner's card lists as revoked is known here, though not pinned.
        unpinned = [
            k for k in msg.revoked_key_ids
            if self.trust.get(k) is None and k not in self._card_revoked
        ]  # fmt: skip
        if len(set(unpinned)) > 1:
            raise Rejected(
                RejectionCode.INVALID_FIELD,
                "one KeyRotation may revoke at most one key that is not pinned yet",
            )
        revoked = tx.revoked_keys() if unpinned else {}
        if unpinned and unpinned[0] not in revoked:
            held = sum(
                1 for key_id, party in revoked.items()
                if party == sender and self.trust.get(key_id) is None
                and key_id not in self._card_revoked
            )  # fmt: skip
            if held >= MAX_UNPINNED_REVOCATIONS:
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"{sender} already revoked {held} keys never announced here",
                )
        for key_id in msg.revoked_key_ids:
            known = self.trust.get(key_id)
            # A key not pinned yet may be revoked by its own party: a revocation that
            # overtakes the key's announcement (a rotation given up, §5.12 KR3) keeps
            # the key revoked once the announcement pins it.
            own = known.party == sender if known is not None else is_key_id_of(sender, key_id)
            if not own:
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"{sender} can revoke only its own keys, not {key_id!r}",
                )
            # The keys that signed a revocation giving a compromise instant are the
            # owner's (a thief cannot sign with them): they do not fall with it.
            tx.revoked_key_put(
                key_id=key_id, party=sender, source=sender, now=now_us,
                compromised_since=compromised_since,
                signed_by=" ".join(dict.fromkeys(self._request_signers)),
            )  # fmt: skip
        self._after_commit.append(self.reload_trust)
        log.warning(
            "%s rotated signing keys: new %s, revoked %s%s",
            sender, msg.new_key.key_id or "none", ", ".join(msg.revoked_key_ids) or "none",
            f" (compromised since {from_us(compromised_since).isoformat()}: the keys "
            "announced with them since then fall too)" if compromised_since is not None else "",
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
        type_name(TransferBatchProposal): _on_batch_proposal,
        type_name(TransferBatchCompletion): _on_batch_completion,
    }


class _BatchSerials:
    """What T4 checks a batch's items against, read once for the whole batch: the
    blocks held here that overlap each of its blocks, the serials expected here
    (transfers accepted earlier, within the batch's serial ranges), and those of the
    batch's items accepted so far (recorded only once the acceptance is sealed)."""

    def __init__(self, expected: list[Block], held: dict[Block, list[Block]]) -> None:
        self._held = held
        # Expected serials never overlap one another, nor do the accepted items' (T4
        # holds for each): sorted by start, only the neighbours of a range can overlap
        # it. Sorted once; the batch's accepted items are kept apart, so that adding
        # one never moves the (possibly many) expected ones.
        self._expected = _by_registry(expected)
        self._accepted: dict[str, list[tuple[int, int, Block]]] = {}

    def overlapping(self, block: Block) -> list[Block]:
        found = list(self._held.get(block, ()))
        for ranges in (self._expected, self._accepted):
            found += _neighbours_overlapping(ranges.get(block.originating_registry, []), block)
        return found

    def add(self, blocks: list[Block]) -> None:
        for block in blocks:
            bisect.insort(
                self._accepted.setdefault(block.originating_registry, []),
                (block.serial_start, block.serial_end, block),
            )


def _by_registry(blocks: list[Block]) -> dict[str, list[tuple[int, int, Block]]]:
    found: dict[str, list[tuple[int, int, Block]]] = {}
    for block in blocks:
        found.setdefault(block.originating_registry, []).append(
            (block.serial_start, block.serial_end, block)
        )
    for ranges in found.values():
        ranges.sort(key=lambda r: (r[0], r[1]))
    return found


def _neighbours_overlapping(ranges: list[tuple[int, int, Block]], block: Block) -> list[Block]:
    at = bisect.bisect_left(ranges, (block.serial_start, block.serial_end))
    return [
        other
        for start, end, other in ranges[max(at - 1, 0) : at + 1]
        if start <= block.serial_end and block.serial_start <= end
    ]


def _serial_ranges(blocks: list[Block]) -> dict[str, tuple[int, int]]:
    """Per registry, the smallest serial range that holds all of ``blocks``."""
    ranges: dict[str, tuple[int, int]] = {}
    for block in blocks:
        low, high = ranges.get(block.originating_registry, (block.serial_start, block.serial_end))
        ranges[block.originating_registry] = (
            min(low, block.serial_start),
            max(high, block.serial_end),
        )
    return ranges


def _completed_on_acceptance(acceptance: bytes) -> bool:
    """Whether a stored acceptance envelope completed its transfer (§6.11 R1)."""
    envelope = envelope_pb2.Envelope.FromString(acceptance)
    if envelope.payload_type != type_name(TransferAcceptance):
        return False  # a batch acceptance: batches complete in two phases
    return TransferAcceptance.FromString(envelope.payload).completed


def _completes(completion: bytes, record: TransferRecord) -> bool:
    """Whether a stored completion envelope completes ``record`` on its acceptance."""
    envelope = envelope_pb2.Envelope.FromString(completion)
    if envelope.payload_type == type_name(TransferCompletion):
        single = TransferCompletion.FromString(envelope.payload)
        return (single.transfer_id, single.acceptance_digest) == (
            record.transfer_id, record.acceptance_digest,
        )  # fmt: skip
    if envelope.payload_type == type_name(TransferBatchCompletion):
        batch = TransferBatchCompletion.FromString(envelope.payload)
        return (
            batch.batch_id == record.batch_id
            and batch.acceptance_digest == record.acceptance_digest
            and any(item.transfer_id == record.transfer_id for item in batch.items)
        )
    return False
