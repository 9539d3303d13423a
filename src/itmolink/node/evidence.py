"""Recovering transfers a restored ledger lost, from the partner's records.

A ledger restored from a backup older than its last transaction has lost the
transfers made after the backup; its partners still hold them. Reconciliation
lists each as final at the partner and unknown here (PROTOCOL.md §11.8). For
such a transfer the node asks the partner for its records (a
``TransferStatusQuery`` with ``include_records``, §5.11) and gets back the
signed envelopes exchanged for it: the proposal and, if it completed, the
receiver's acceptance. One of the two is signed by this node itself, so the
partner cannot make them up. Once both verify and agree with each other and with
the ledger (the units of an outgoing transfer still held here, those of an
incoming one held nowhere here), the transfer is applied as it was then: the
same step a live transfer takes at completion (debit or credit, corresponding
adjustment, AEF actions, leaves), in one transaction with the journaled report
and records (PROTOCOL.md §7.9, DESIGN.md decision 61).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from itmolink.core.blocks import Block, cut_out
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Event, Role, TransferState
from itmolink.crypto.envelope import (
    TrustStore,
    VerifiedEnvelope,
    open_envelope,
    pae,
    signing_key_ids,
)
from itmolink.crypto.keys import VerifyingKey
from itmolink.node.base import (
    ReplyError,
    TransferAcceptance,
    TransferBatchAcceptance,
    TransferBatchCompletion,
    TransferBatchItem,
    TransferBatchProposal,
    TransferCompletion,
    TransferProposal,
    TransferStatusQuery,
    TransferStatusReport,
    _rejection_reasons,
    digest,
    log,
    type_name,
)
from itmolink.node.convert import block_from_pb, from_us, timestamp_us, to_us
from itmolink.node.replies import Replies
from itmolink.node.requests import Requests
from itmolink.node.validation import validate
from itmolink.store.sqlite import HOLDING_ACCOUNT
from itmolink.store.tx import NewTransfer, Tx
from itmolink.v1 import transfer_pb2

RECOVERED = "recovered"
NOT_RECOVERED = "not recovered"
KNOWN = "known here"


@dataclass(frozen=True, slots=True)
class Recovered:
    """What became of one transfer asked about."""

    transfer_id: str
    outcome: str  # RECOVERED, NOT_RECOVERED or KNOWN
    partner_state: str  # the state the partner reported, e.g. "COMPLETED"
    detail: str
    quantity: int = 0


@dataclass(frozen=True, slots=True)
class _Record:
    """A verified record: its message, its payload bytes and its envelope as sent."""

    msg: Message
    payload: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class _Proposed:
    """A verified proposal record and the transfer asked about in it: the proposal
    itself, or its item of a batch proposal (``batch_id`` then set)."""

    record: _Record
    msg: TransferProposal | TransferBatchProposal
    item: TransferProposal | TransferBatchItem
    batch_id: str


def _state_name(state: int) -> str:
    try:
        return str(transfer_pb2.TransferState.Name(state)).removeprefix("TRANSFER_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return f"TRANSFER_STATE_{state}"


class Evidence(Requests, Replies):
    """The requester's side of recovering a lost transfer (see the module)."""

    def recorded_state(self, transfer_id: str) -> TransferState | None:
        """The state of a transfer this node records, or None."""
        with self._transaction() as tx:
            record = tx.transfer_get(transfer_id)
        return None if record is None else record.state

    def records_query(self, partner: str, transfer_id: str, now: dt.datetime) -> tuple[str, bytes]:
        """Seal and journal a status query asking for a transfer's records, to send
        now; (message id, envelope)."""
        query = TransferStatusQuery(transfer_id=transfer_id, include_records=True)
        return self._journaled_query(partner, query, now)

    def records_answer(
        self,
        partner: str,
        transfer_id: str,
        message_id: str,
        request: bytes,
        raw: bytes,
        now: dt.datetime,
    ) -> Recovered:
        """Verify and journal the partner's report, and recover the transfer from
        the records it carries if they allow it; all in one transaction."""
        now_us = to_us(now)
        with self._transaction() as tx:
            reply, _, _ = self._open_reply(
                tx, partner, type_name(TransferStatusQuery), request, message_id, raw, now_us
            )
            if isinstance(reply, TransferStatusReport):
                return self._recover(tx, partner, transfer_id, reply, now_us)
        code, detail = _rejection_reasons(reply)  # type: ignore[arg-type]
        raise ReplyError(RejectionCode(code), f"{partner} refused the query: {detail}")

    def _recover(
        self,
        tx: Tx,
        partner: str,
        transfer_id: str,
        report: TransferStatusReport,
        now_us: int,
    ) -> Recovered:
        state_name = _state_name(report.state)
        known = tx.transfer_get(transfer_id)
        if known is not None:
            return Recovered(
                transfer_id, KNOWN, state_name, f"recorded here as {known.state.name}: not changed"
            )

        def refuse(detail: str) -> Recovered:
            log.warning(
                "transfer %s not recovered from %s: %s", transfer_id, partner, detail,
                extra={"transfer_id": transfer_id, "partner": partner},
            )  # fmt: skip
            return Recovered(transfer_id, NOT_RECOVERED, state_name, detail)

        if report.transfer_id != transfer_id:
            return refuse(f"the report is about {report.transfer_id!r}")
        final = {
            transfer_pb2.TRANSFER_STATE_COMPLETED: TransferState.COMPLETED,
            transfer_pb2.TRANSFER_STATE_VOIDED: TransferState.VOIDED,
            transfer_pb2.TRANSFER_STATE_REJECTED: TransferState.REJECTED,
        }.get(report.state)
        if final is None:
            return refuse(f"{partner} holds it {state_name}, not final: nothing to recover yet")
        if transfer_id.startswith(f"{self.party}-"):
            sender, receiver = self.party, partner
        elif transfer_id.startswith(f"{partner}-"):
            sender, receiver = partner, self.party
        else:
            return refuse("its id names neither this node nor the partner as its sender")
        wanted = 2 if final is TransferState.COMPLETED else 1
        if len(report.records) < wanted:
            return refuse(
                f"{partner} sent {len(report.records)} record(s), {wanted} needed: it does not "
                "hold them as exchanged, or does not implement the records (PROTOCOL.md "
                "§5.11); settle it with its operators"
            )
        try:
            # All or nothing: a refusal undoes what the steps before it wrote (the
            # report stays journaled).
            with tx.savepoint():
                proposed = self._proposed(tx, report.records[0], transfer_id, sender, receiver)
                if final is not TransferState.COMPLETED:
                    return self._recover_unmoved(tx, partner, proposed, final, state_name, now_us)
                acceptance = self._acceptance(tx, report.records[1], proposed, receiver, sender)
                completion = None
                if not _completed_by(acceptance):
                    # Two phases: the sender decided, by its completion (§6.2); without it the
                    # receiver's word (an acceptance it can sign at any time) proves nothing.
                    if len(report.records) < 3:
                        raise Rejected(
                            RejectionCode.MISSING_FIELD,
                            f"{partner} sent no completion record: a transfer completed in two "
                            "phases needs its sender's completion (§5.11)",
                        )
                    completion = self._completion(tx, report.records[2], proposed, acceptance)
                if sender == self.party:
                    self._recover_outgoing(tx, partner, proposed, acceptance, completion, now_us)
                else:
                    self._recover_incoming(tx, partner, proposed, acceptance, completion, now_us)
        except Rejected as rejected:
            return refuse(f"{rejected.code.name} ({int(rejected.code)}): {rejected.detail}")
        moved = "debited" if sender == self.party else "credited"
        quantity = proposed.item.quantity
        log.warning(
            "transfer %s recovered from %s's records: %d tCO2e %s, COMPLETED",
            transfer_id, partner, quantity, moved,
            extra={"transfer_id": transfer_id, "partner": partner},
        )  # fmt: skip
        sent_at = acceptance.msg.header.sent_at  # type: ignore[attr-defined]
        return Recovered(
            transfer_id, RECOVERED, state_name,
            f"COMPLETED: {quantity} tCO2e {moved}, accepted at "
            f"{from_us(timestamp_us(sent_at)):%Y-%m-%d %H:%M:%S} UTC",
            quantity,
        )  # fmt: skip

    def _proposed(
        self, tx: Tx, raw: bytes, transfer_id: str, sender: str, receiver: str
    ) -> _Proposed:
        """The proposal record of ``transfer_id``: a proposal of it alone, or a batch
        proposal with it among its items."""
        record = self._record(
            tx, raw, (TransferProposal, TransferBatchProposal), sender=sender, audience=receiver
        )
        msg = record.msg
        if isinstance(msg, TransferProposal):
            if msg.transfer_id != transfer_id:
                raise Rejected(
                    RejectionCode.INVALID_FIELD,
                    f"the proposal record is of transfer {msg.transfer_id!r}",
                )
            return _Proposed(record, msg, msg, "")
        assert isinstance(msg, TransferBatchProposal)
        items = [item for item in msg.items if item.transfer_id == transfer_id]
        if len(items) != 1:
            raise Rejected(
                RejectionCode.INVALID_FIELD,
                f"the batch proposal record {msg.batch_id!r} has {len(items)} items "
                f"{transfer_id!r}, not one",
            )
        return _Proposed(record, msg, items[0], msg.batch_id)

    def _acceptance(
        self, tx: Tx, raw: bytes, proposed: _Proposed, sender: str, audience: str
    ) -> _Record:
        """The acceptance record that answered ``proposed`` and accepted its transfer."""
        batch = bool(proposed.batch_id)
        record = self._record(
            tx, raw, (TransferBatchAcceptance if batch else TransferAcceptance,),
            sender=sender, audience=audience,
        )  # fmt: skip
        msg = record.msg
        header = msg.header  # type: ignore[attr-defined]
        if (
            header.in_reply_to != proposed.msg.header.message_id
            or msg.proposal_digest != digest(proposed.record.payload)  # type: ignore[attr-defined]
        ):
            raise Rejected(
                RejectionCode.DIGEST_MISMATCH,
                "the acceptance record does not answer the proposal record",
            )
        transfer_id = proposed.item.transfer_id
        if isinstance(msg, TransferBatchAcceptance):
            outcomes = [o for o in msg.items if o.transfer_id == transfer_id]
            if msg.batch_id != proposed.batch_id or len(outcomes) != 1:
                raise Rejected(
                    RejectionCode.DIGEST_MISMATCH,
                    f"the batch acceptance record does not answer {transfer_id} once",
                )
            if outcomes[0].HasField("rejection"):
                raise Rejected(
                    RejectionCode.UNEXPECTED_REPLY,
                    f"the batch acceptance record rejects {transfer_id}, reported COMPLETED",
                )
            return record
        assert isinstance(msg, TransferAcceptance)
        assert isinstance(proposed.item, TransferProposal)
        if msg.transfer_id != transfer_id:
            raise Rejected(
                RejectionCode.DIGEST_MISMATCH,
                f"the acceptance record is of transfer {msg.transfer_id!r}",
            )
        if msg.completed and not proposed.item.complete_on_acceptance:
            raise Rejected(
                RejectionCode.UNEXPECTED_REPLY,
                "the acceptance says it completed a proposal that did not ask (§6.11 S6)",
            )
        return record

    def _completion(self, tx: Tx, raw: bytes, proposed: _Proposed, acceptance: _Record) -> _Record:
        """The sender's completion record: its ``TransferCompletion`` of the transfer,
        or its ``TransferBatchCompletion`` with the transfer among its items, naming
        the acceptance record."""
        msg = proposed.msg
        record = self._record(
            tx, raw, (TransferCompletion, TransferBatchCompletion),
            sender=msg.header.sender_party, audience=msg.header.audience,
        )  # fmt: skip
        completion = record.msg
        transfer_id = proposed.item.transfer_id
        if isinstance(completion, TransferCompletion):
            names = completion.transfer_id == transfer_id
        else:
            assert isinstance(completion, TransferBatchCompletion)
            names = completion.batch_id == proposed.batch_id and any(
                item.transfer_id == transfer_id for item in completion.items
            )
        if not names or completion.acceptance_digest != digest(acceptance.payload):
            raise Rejected(
                RejectionCode.DIGEST_MISMATCH,
                f"the completion record does not complete {transfer_id} on the acceptance record",
            )
        return record

    def _record(
        self, tx: Tx, raw: bytes, kinds: tuple[type[Message], ...], *, sender: str, audience: str
    ) -> _Record:
        """Verify one record, signed by ``sender`` for ``audience``, then parse it as
        the one of ``kinds`` it names. A record of this node's own is verified with its
        own keys (those it can still load, less those it revoked), one of the partner's
        with the keys pinned here; each key must have been valid when it was sent."""
        if len(raw) > self.limits.max_message_bytes:
            raise Rejected(RejectionCode.MESSAGE_TOO_LARGE, "a record is too large")
        trust = self._own_trust(tx, raw) if sender == self.party else self.trust
        verified = open_envelope(raw, trust)
        if verified.signer_party != sender:
            raise Rejected(
                RejectionCode.SIGNER_NOT_PEER,
                f"a record signed by {verified.signer_party}, not {sender}",
            )
        kind = next((k for k in kinds if type_name(k) == verified.payload_type), None)
        if kind is None:
            raise Rejected(
                RejectionCode.UNEXPECTED_REPLY,
                f"a {verified.payload_type} record where a "
                f"{' or '.join(type_name(k) for k in kinds)} belongs",
            )
        msg = kind()
        try:
            msg.ParseFromString(verified.payload)
        except DecodeError as exc:
            raise Rejected(RejectionCode.MALFORMED_PAYLOAD, f"record payload: {exc}") from None
        validate(msg, max_blocks=self.limits.max_blocks)
        header = msg.header  # type: ignore[attr-defined]
        if header.sender_party != sender or header.audience != audience:
            raise Rejected(
                RejectionCode.SENDER_MISMATCH,
                f"a record from {header.sender_party} to {header.audience}, "
                f"not from {sender} to {audience}",
            )
        if not header.HasField("sent_at"):
            raise Rejected(RejectionCode.MISSING_FIELD, "a record has no sent_at")
        self._check_key_windows(trust, verified, from_us(timestamp_us(header.sent_at)))
        return _Record(msg, verified.payload, raw)

    def _own_trust(self, tx: Tx, raw: bytes) -> TrustStore:
        """This node's own verifying keys that may have signed ``raw``."""
        keys: dict[str, VerifyingKey] = {}
        for key in (self.signing_key, self.pending_key):
            if key is not None:
                keys[key.key_id] = key.verifying_key()
        for key_id in signing_key_ids(raw):
            if key_id in keys or self._key_loader is None:
                continue
            try:
                loaded = self._key_loader(key_id)
            except Exception as exc:  # not this node's, gone or unreadable: cannot verify
                log.info("no own signing key %s to check a record with: %s", key_id, exc)
                continue
            if loaded.key_id == key_id:
                keys[key_id] = loaded.verifying_key()
        trust = TrustStore(keys.values())
        for key_id, party in tx.revoked_keys().items():
            if party == self.party:
                trust.revoke(key_id)
        return trust

    @staticmethod
    def _check_key_windows(trust: TrustStore, verified: VerifiedEnvelope, at: dt.datetime) -> None:
        for key_id in verified.key_ids:
            key = trust.get(key_id)
            problem = None if key is None else key.valid_at(at)
            if problem is not None:
                raise Rejected(
                    RejectionCode.SIGNING_KEY_EXPIRED,
                    f"a record signed with key {key_id} when it was {problem}",
                )

    def _recover_outgoing(
        self,
        tx: Tx,
        partner: str,
        proposed: _Proposed,
        acceptance: _Record,
        completion: _Record | None,
        now_us: int,
    ) -> None:
        """A transfer this node sent and the partner completed: its blocks, still
        held here, are reserved for it and debited, and the sender's completion step
        books what it booked then (+CA of a first transfer, the give-back of an
        onward one)."""
        item = proposed.item
        blocks = [block_from_pb(b) for b in item.blocks]
        for block in blocks:
            # One block at a time: two blocks of the transfer may lie in one held row.
            rows = tx.blocks_held_over(block)
            for row in rows:
                if row.status != "held" or row.account != HOLDING_ACCOUNT:
                    raise Rejected(
                        RejectionCode.INSUFFICIENT_HOLDINGS,
                        f"{row.block.label()} of the transfer is {row.status} in account "
                        f"{row.account} here, not held: its units have moved since the "
                        "backup (settle it with the partner's operators)",
                    )
            held = [row.block for row in rows]
            tx.blocks_carve(
                held, cut_out(held, block), [(block, item.transfer_id)], account=HOLDING_ACCOUNT
            )
        tx.transfers_put(
            [self._row(proposed, Role.SENDER, partner, TransferState.PROPOSED, blocks)],
            now=now_us,
        )
        self._journal_record(tx, "out", partner, proposed.record, now_us)
        acceptance_id = self._journal_record(tx, "in", partner, acceptance, now_us)
        if completion is not None:
            self._journal_record(tx, "out", partner, completion, now_us)
            sent = completion.msg.header.message_id  # type: ignore[attr-defined]
            single = isinstance(completion.msg, TransferCompletion)
            if tx.outbox_get(sent) is None:
                tx.outbox_put_answered(
                    message_id=sent, partner=partner, payload_type=type_name(type(completion.msg)),
                    subject_id=item.transfer_id if single else proposed.batch_id,
                    envelope=completion.raw, answered_journal_id=None, now=now_us,
                )  # fmt: skip
        # As the proposal's delivery left it: answered by that acceptance (so that this
        # node can give the records in turn, §5.11).
        message_id = proposed.msg.header.message_id
        if tx.outbox_get(message_id) is None:
            tx.outbox_put_answered(
                message_id=message_id, partner=partner,
                payload_type=type_name(type(proposed.msg)),
                subject_id=proposed.batch_id or item.transfer_id,
                envelope=proposed.record.raw, answered_journal_id=acceptance_id, now=now_us,
            )  # fmt: skip
        record = tx.transfer_get(item.transfer_id)
        assert record is not None
        # The completion the partner received was sent then: nothing is sent now.
        done = self._complete_outgoing_many(
            tx, [record], digest(acceptance.payload), acceptance_id, now_us,
            event=Event.COMPLETED_ACCEPTANCE_RECEIVED,
        )  # fmt: skip
        if item.transfer_id not in done:
            raise RuntimeError(f"recovered transfer {item.transfer_id} was not completed")

    def _recover_incoming(
        self,
        tx: Tx,
        partner: str,
        proposed: _Proposed,
        acceptance: _Record,
        completion: _Record | None,
        now_us: int,
    ) -> None:
        """A transfer the partner sent, this node accepted and the partner completed:
        the receiver's checks on its blocks (T2a to T5: none of them held here), then
        the receiver's completion step (credit, −CA), its adjustment pointing at the
        partner's completion (for a one-round transfer, as the live step R1 does, at
        the proposal)."""
        item = proposed.item
        blocks = self._check_incoming(tx, partner, item, now_us)
        row = self._row(proposed, Role.RECEIVER, partner, TransferState.ACCEPTED, blocks)
        tx.transfers_put(
            [dataclasses.replace(row, acceptance_digest=digest(acceptance.payload))], now=now_us
        )
        proposal_id = self._journal_record(tx, "in", partner, proposed.record, now_us)
        self._journal_record(tx, "out", partner, acceptance, now_us)
        # As the proposal's delivery left it: its stored reply is the acceptance, which
        # a delivery of the same bytes gets again (§7.2) and the records give (§5.11).
        self._keep_delivery(tx, partner, proposed.record, acceptance.raw, proposal_id)
        record = tx.transfer_get(item.transfer_id)
        assert record is not None
        evidence = proposal_id
        if completion is not None:
            evidence = self._journal_record(tx, "in", partner, completion, now_us)
        _, refused = self._complete_incoming_many(
            tx, partner, [record], evidence, now_us, completion_journaled=completion is not None
        )
        if refused:
            raise RuntimeError(f"recovered transfer {item.transfer_id} was not completed")
        if completion is not None and self._completes_known(tx, partner, completion.msg):
            # A delivery of the completion again (its receipt was lost) gets the receipt
            # the live step gives a completion of a completed transfer (C3), as before.
            handler = self._request_handlers[type_name(type(completion.msg))]
            receipt = handler(
                self, tx, partner, completion.msg, completion.payload, evidence, now_us
            )
            self._keep_delivery(tx, partner, completion, receipt, evidence)

    @staticmethod
    def _keep_delivery(tx: Tx, partner: str, request: _Record, reply: bytes, entry: int) -> None:
        """The inbox entry a partner's request left when it was applied: its stored
        reply, which a delivery of the same bytes gets again (§7.2), and the records
        give (§5.11). Not when the inbox has it (or its sequence) already."""
        header = request.msg.header  # type: ignore[attr-defined]
        seen, owner = tx.inbox_lookup(partner, header.message_id, header.sequence)
        if seen is None and owner is None:
            tx.inbox_put(
                partner=partner, message_id=header.message_id,
                payload_digest=digest(pae(type_name(type(request.msg)), request.payload)),
                sequence=header.sequence, reply=reply, journal_id=entry,
            )  # fmt: skip

    @staticmethod
    def _completes_known(tx: Tx, partner: str, completion: Message) -> bool:
        """Whether every transfer a completion names is COMPLETED here, from
        ``partner`` (a batch completion: once its last item is recovered)."""
        if isinstance(completion, TransferCompletion):
            ids = [completion.transfer_id]
        else:
            assert isinstance(completion, TransferBatchCompletion)
            ids = [item.transfer_id for item in completion.items]
        records = tx.transfers_get(ids)
        return len(records) == len(ids) and all(
            r.state is TransferState.COMPLETED and r.partner == partner for r in records.values()
        )

    def _recover_unmoved(
        self,
        tx: Tx,
        partner: str,
        proposed: _Proposed,
        final: TransferState,
        state_name: str,
        now_us: int,
    ) -> Recovered:
        """A transfer that moved nothing at the partner: recorded here in the same
        final state, placed by its proposal's ``sent_at`` as the partner places it.
        Nothing else changes (an outgoing transfer's units were never debited)."""
        ours = proposed.msg.header.sender_party == self.party
        row = self._row(proposed, Role.SENDER if ours else Role.RECEIVER, partner, final, [])
        detail = f"recovered: {partner} reports {state_name}"
        tx.transfers_put([dataclasses.replace(row, rejection_detail=detail)], now=now_us)
        self._journal_record(tx, "out" if ours else "in", partner, proposed.record, now_us)
        transfer_id = proposed.item.transfer_id
        log.warning(
            "transfer %s recovered from %s's records: %s, nothing moved",
            transfer_id, partner, final.name,
            extra={"transfer_id": transfer_id, "partner": partner},
        )  # fmt: skip
        return Recovered(transfer_id, RECOVERED, state_name, f"{final.name}: nothing moved")

    @staticmethod
    def _row(
        proposed: _Proposed, role: Role, partner: str, state: TransferState, blocks: list[Block]
    ) -> NewTransfer:
        """The transfer as its proposal record describes it, in ``state``."""
        msg, item = proposed.msg, proposed.item
        return NewTransfer(
            transfer_id=item.transfer_id, direction=role, partner=partner, state=state,
            quantity=item.quantity, authorisation_id=item.authorisation_id,
            first_transfer=item.first_transfer, proposal_message_id=msg.header.message_id,
            proposal_digest=digest(proposed.record.payload),
            expires_at=timestamp_us(msg.expires_at), blocks=blocks,
            proposed_at=timestamp_us(msg.header.sent_at), batch_id=proposed.batch_id,
            complete_on_acceptance=isinstance(item, TransferProposal)
            and item.complete_on_acceptance,
        )  # fmt: skip

    @staticmethod
    def _journal_record(tx: Tx, direction: str, partner: str, record: _Record, now_us: int) -> int:
        """Journal a record as it was exchanged (unless the journal has it); its entry."""
        message_id = record.msg.header.message_id  # type: ignore[attr-defined]
        entry = tx.journal_new(
            direction=direction, partner=partner, message_id=message_id,
            payload_type=type_name(type(record.msg)), envelope=record.raw, now=now_us,
        )  # fmt: skip
        if entry is None:
            # Journaled already: the same message (an envelope of a batch recovered for
            # an earlier item), or another one reusing its id, which is refused.
            if tx.journal_envelope(direction, partner, message_id) != record.raw:
                raise Rejected(
                    RejectionCode.DUPLICATE_MESSAGE_CONFLICT,
                    f"a record reuses message id {message_id!r} of another message here",
                )
            known = tx.journal_id_of(direction, partner, message_id)
            assert known is not None
            return known
        return entry


def _completed_by(acceptance: _Record) -> bool:
    """Whether an acceptance record completed its transfer (one-round, §6.11 R1)."""
    msg = acceptance.msg
    return isinstance(msg, TransferAcceptance) and msg.completed
