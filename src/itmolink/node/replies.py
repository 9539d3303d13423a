"""Replies to our requests: verified, journaled and applied with the answered request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from google.protobuf.message import DecodeError, Message

from itmolink.core.actions import (
    ActionType,
)
from itmolink.core.aef import ActionSubtype
from itmolink.core.blocks import Block, total
from itmolink.core.codes import Rejected, RejectionCode, wire_name_of
from itmolink.core.transfer import Effect, Event, Role, TransferState, step
from itmolink.crypto.envelope import sealed_payload
from itmolink.node.base import (
    HELD,
    ORDER_RECHECK_US,
    ORDERED_TYPES,
    REQUEST_TYPES,
    RESTORED_GAP,
    AuthorisationStatement,
    EngineBase,
    KeyRotation,
    Rejection,
    ReplyError,
    TransferAcceptance,
    TransferBatchAcceptance,
    TransferBatchCompletion,
    TransferBatchCompletionItem,
    TransferBatchCompletionReceipt,
    TransferBatchProposal,
    TransferCompletion,
    TransferProposal,
    TransferStatusQuery,
    TransferStatusReport,
    TransferVoid,
    TransferVoidReceipt,
    _rejection_reasons,
    digest,
    log,
    retry_delay_us,
    type_name,
)
from itmolink.node.convert import (
    from_us,
    to_us,
)
from itmolink.store.tx import NewAction, TransferRecord, Tx
from itmolink.v1 import (
    envelope_pb2,
    transfer_pb2,
)


class Replies(EngineBase):
    """The requester's side of the protocol."""

    # -- replies to our requests -----------------------------------------------------

    def handle_reply(
        self, message_id: str, raw: bytes, now: dt.datetime, *, sent_at: dt.datetime | None = None
    ) -> bool:
        """Apply a partner's reply to our outbox message ``message_id``.

        ``sent_at`` is when the attempt this reply answers was sent, on this node's
        clock (the runtime passes the instant it started the call). Only S5 of the
        one-round transfer uses it: an unrecorded refusal settles a one-round
        proposal only if the refused attempt was sent strictly after ``expires_at +
        2 × max_clock_skew``. A caller that passes nothing (one that applies the
        reply at the instant it sent the request, as the tests and the simulator
        do) gets ``now`` in its place.

        Returns False if the reply settles nothing yet and the request is delivered
        again later (S5: an unrecorded refusal of a one-round proposal kept as a
        failed attempt), True otherwise (the reply was applied, or the request was
        no longer pending). Raises :class:`ReplyError` for a reply that cannot be
        trusted or does not answer the request; the request then stays pending and
        is retried.
        """
        now_us = to_us(now)
        sent_us = now_us if sent_at is None else to_us(sent_at)
        with self._transaction() as tx:
            request = tx.outbox_get(message_id)
            if request is None or request.state != "pending":
                return True  # already answered (a duplicate reply) or cancelled
            reply, payload, _ = self._open_reply(
                tx, request.partner, request.payload_type, request.envelope, message_id, raw,
                now_us, journal=False,
            )  # fmt: skip
            retry = self._refusal_to_retry(
                tx, request.payload_type, request.subject_id, reply, sent_us
            )
            if retry is not None:
                # S5: not an answer yet; the same proposal is delivered again later. Like
                # any failed attempt it is not journaled (its last error says why).
                tx.outbox_retry_later(
                    message_id, next_attempt_at=now_us + retry_delay_us(request.attempts),
                    error=retry,
                )  # fmt: skip
                return False
            journal_id = self._journal_reply(tx, request.partner, reply, raw, now_us)
            tx.outbox_answered(message_id, journal_id)
            if isinstance(reply, Rejection):
                code, detail = _rejection_reasons(reply)
                log.info(
                    "%s rejected %s %s: %s %s",
                    request.partner,
                    request.payload_type,
                    request.subject_id,
                    wire_name_of(code),
                    detail,
                    extra={
                        "partner": request.partner,
                        "message_id": message_id,
                        "subject_id": request.subject_id,
                        "code": wire_name_of(code),
                    },
                )
                if code == RejectionCode.SEQUENCE_REUSED:
                    self._sequence_reused(
                        tx, request.partner, request.payload_type, request.subject_id,
                        message_id, request.envelope,
                    )  # fmt: skip
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
            if self._amendments_pending and request.payload_type in ORDERED_TYPES:
                # What waited for this request to its partner is looked at again at
                # once (decision 55), not at its next look.
                tx.outbox_release_held(
                    request.partner, now_us, note_prefix=HELD,
                    held_until_at_most=now_us + ORDER_RECHECK_US,
                )  # fmt: skip
        return True

    def _sequence_reused(
        self, tx: Tx, partner: str, payload_type: str, subject_id: str, message_id: str,
        envelope: bytes,
    ) -> None:  # fmt: skip
        """A partner refused one of our requests because it holds its sequence from
        another message of ours: the ledger went back in time (docs/OPERATIONS.md §7)."""
        try:
            request = REQUEST_TYPES[payload_type].FromString(sealed_payload(envelope))
            sequence = int(request.header.sequence)  # type: ignore[attr-defined]
        except (KeyError, DecodeError):
            sequence = 0
        extra = {"partner": partner, "message_id": message_id, "subject_id": subject_id}
        if sequence and tx.link_sequence(partner) > sequence + RESTORED_GAP:
            # `itmolink node restored` ran after this was sealed: the step is done, and
            # this message keeps the number it was sealed with.
            log.error(
                "ALARM: %s refused %s %s (%s), sealed on the restored ledger before "
                "`itmolink node restored`, for its reused sequence %d: the refusal is final "
                "here; reconcile with %s and make the request again if it is still wanted",
                partner, payload_type, message_id, subject_id, sequence, partner, extra=extra,
            )  # fmt: skip
            return
        log.error(
            "ALARM: %s already holds sequence %d of %s %s (%s) from another message of this "
            "node: the ledger has probably been restored from a backup older than its last "
            "transaction; stop the node and run `itmolink node restored` "
            "(docs/OPERATIONS.md §7)",
            partner, sequence, payload_type, message_id, subject_id, extra=extra,
        )  # fmt: skip

    def _refusal_to_retry(
        self, tx: Tx, request_type: str, transfer_id: str, reply: Message, sent_us: int
    ) -> str | None:
        """S5 of the one-round transfer: whether an unrecorded Rejection (sequence 0)
        of a proposal that asked the receiver to complete on acceptance leaves it
        unsettled. Returns why (the outbox's last error: a failed attempt, the same
        bytes delivered again with the usual backoff), or None for a reply to apply.

        The receiver evaluates the same bytes again on each delivery, so such a
        refusal says only that this attempt was not recorded:

        - With an empty ``in_reply_to`` (PROTOCOL §5.2 D1b to D5a: size, signature,
          key validity at the receiver's clock, signer, payload type, parse, field
          rules) the receiver refused before it looked the message up (D7): it may
          have recorded and completed the proposal on an earlier delivery, and only
          its stored reply can say. Such a refusal never settles the proposal; the
          units stay reserved until the receiver can read it again, and an ALARM
          (once per transfer and process) asks the operator to restore trust.
        - With ``in_reply_to`` set (D6 to D8a: header checks, the sent_at window,
          5001, 5002) the receiver looked the message up and had not recorded it.
          A later delivery could still pass and complete while the proposal has
          not expired on the receiver's clock (until ``expires_at +
          max_clock_skew`` on it, ``+ 2 × max_clock_skew`` on ours). Such a refusal
          settles the proposal only if the refused attempt was sent (``sent_us``)
          strictly after ``expires_at + 2 × max_clock_skew``: every later attempt
          is then refused too (3011 or the same), and none sent earlier can have
          completed after this one was looked up."""
        if (
            request_type != type_name(TransferProposal)
            or not isinstance(reply, Rejection)
            or reply.header.sequence != 0
        ):
            return None
        record = tx.transfer_get(transfer_id)
        if (
            record is None
            or not record.complete_on_acceptance
            or record.state is not TransferState.PROPOSED
        ):
            return None
        code, detail = _rejection_reasons(reply)
        fields = {"transfer_id": transfer_id, "partner": record.partner, "code": wire_name_of(code)}
        if not reply.header.in_reply_to:
            self._unreadable_proposal(record, transfer_id, code, detail, fields)
            return f"unrecorded rejection before the look-up {wire_name_of(code)}: {detail}"
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        if sent_us > record.expires_at + 2 * skew:
            return None
        log.warning(
            "%s refused transfer %s without recording it (%s %s); it asked to complete on "
            "acceptance, so the proposal stands for an attempt sent until %s: delivering "
            "it again",
            record.partner, transfer_id, wire_name_of(code), detail,
            from_us(record.expires_at + 2 * skew).isoformat(), extra=fields,
        )  # fmt: skip
        return f"unrecorded rejection {wire_name_of(code)}: {detail}"

    def _unreadable_proposal(
        self, record: TransferRecord, transfer_id: str, code: int, detail: str,
        fields: dict[str, str],
    ) -> None:  # fmt: skip
        """Log that the receiver of one-round transfer ``transfer_id`` cannot read its
        proposal: an ALARM the first time in this process, then at INFO."""
        if transfer_id in self._unreadable_alarmed:
            log.info(
                "%s still cannot read the proposal of one-round transfer %s (%s %s); "
                "its units stay reserved: delivering it again",
                record.partner, transfer_id, wire_name_of(code), detail, extra=fields,
            )  # fmt: skip
            return
        self._unreadable_alarmed.add(transfer_id)
        log.error(
            "ALARM: %s cannot read the proposal of one-round transfer %s (%s %s): it refused "
            "it before looking it up, so it may have completed the transfer on an earlier "
            "delivery. The %d tCO2e stay reserved and the proposal is delivered again "
            "until %s can read it: re-establish trust with %s (for example it pins this "
            "node's signing key); the next delivery then gets its stored answer or a "
            "recorded refusal (3011)",
            record.partner, transfer_id, wire_name_of(code), detail, record.quantity,
            record.partner, record.partner, extra=fields,
        )  # fmt: skip

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
        elif request_type == type_name(TransferBatchProposal):
            if isinstance(reply, Rejection):
                self._batch_rejected(tx, subject_id, partner, reply, now_us)
            else:
                assert isinstance(reply, TransferBatchAcceptance)
                self._batch_accepted(
                    tx, subject_id, partner, reply, reply_payload, journal_id, now_us
                )
        elif request_type == type_name(TransferBatchCompletion):
            self._batch_completion_answered(
                tx, subject_id, partner, reply, request_envelope, now_us
            )
        elif request_type == type_name(TransferStatusQuery) and isinstance(
            reply, TransferStatusReport
        ):
            self._status_reported(tx, subject_id, partner, reply, now_us)
        elif request_type == type_name(TransferVoid):
            self._withdrawal_answered(tx, subject_id, partner, reply, now_us)
        elif request_type == type_name(KeyRotation):
            self._rotation_answered(tx, subject_id, partner, rejected)
            if isinstance(reply, Rejection) and subject_id.startswith("revoke-"):
                log.error(
                    "ALARM: %s refused the revocation of signing key %s (%s); it may still "
                    "trust the key: it is sent again at the next start",
                    partner, subject_id.removeprefix("revoke-"),
                    wire_name_of(_rejection_reasons(reply)[0]),
                )  # fmt: skip
        elif request_type == type_name(TransferCompletion) and isinstance(reply, Rejection):
            code = _rejection_reasons(reply)[0]
            if reply.header.sequence == 0 and self._fresh_seal_helps(code, request_envelope):
                # Refused before it was recorded because it was too old or signed with a
                # key no longer valid there: the completion is a commitment already
                # carried out here, so it is sent again, freshly sealed with today's key.
                log.warning(
                    "%s could not record the completion of %s (%s): sending it again",
                    partner, subject_id, wire_name_of(_rejection_reasons(reply)[0]),
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

    def _status_reported(
        self, tx: Tx, transfer_id: str, partner: str, report: TransferStatusReport, now_us: int
    ) -> None:
        """Resolve a transfer accepted here from the sender's own view of it (§7.7), or
        a withdrawn one-round transfer proposed here from the receiver's (§6.11 S7)."""
        record = tx.transfer_get(transfer_id)
        if record is None or record.partner != partner:
            return
        if record.direction is Role.SENDER:
            self._withdrawn_reported(tx, record, report, now_us)
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
        log.warning(
            "transfer %s from %s voided here: %s", transfer_id, partner, state_name,
            extra={"transfer_id": transfer_id, "partner": partner},
        )  # fmt: skip

    def _withdrawal_answered(
        self, tx: Tx, transfer_id: str, partner: str, reply: Message, now_us: int
    ) -> None:
        """S7 of the one-round transfer: the answer to the void that withdraws a
        one-round proposal unanswered past ``expires_at + 2 × max_clock_skew``
        (:meth:`Operations.query_pending_transfers`). A void of a two-phase transfer
        (sent as it was voided here) changes nothing.

        - A ``TransferVoidReceipt``: the receiver had not completed the transfer and,
          having recorded the void, never will (PROTOCOL §5.10 V3: a tombstone that
          refuses a late proposal with this id; V4: an ACCEPTED or REJECTED transfer
          does not complete either). VOIDED here, the blocks released, the proposal
          withdrawn from the outbox. No clock is trusted for this: the receipt is the
          receiver's own signed statement, made under its ledger's lock.
        - A ``Rejection``: recorded with 3008 (``TRANSFER_STATE_CONFLICT``), the
          receiver holds the transfer final, COMPLETED (R3) or VOIDED by an earlier void
          of ours whose receipt was lost: it is asked which (a TransferStatusQuery,
          :meth:`_withdrawn_reported`), and no further void is sent. Anything else
          (refused unread, for instance) settles nothing, and the void is sent again
          later.
        """
        record = tx.transfer_get(transfer_id)
        if (
            record is None
            or record.direction is not Role.SENDER
            or record.partner != partner
            or not record.complete_on_acceptance
            or record.state is not TransferState.PROPOSED
        ):
            return  # a two-phase void, or a transfer settled meanwhile
        fields = {"transfer_id": transfer_id, "partner": partner}
        if isinstance(reply, Rejection):
            code, detail = _rejection_reasons(reply)
            if code == RejectionCode.TRANSFER_STATE_CONFLICT and reply.header.sequence != 0:
                # The receiver holds the transfer final: COMPLETED, or VOIDED by an
                # earlier void of ours whose receipt was lost (V4 answers both with
                # 3008). Its report says which; no further void is sent.
                log.warning(
                    "%s refused to void one-round transfer %s (%s): it holds it final; "
                    "asking it which state",
                    partner, transfer_id, detail, extra=fields,
                )  # fmt: skip
                query = TransferStatusQuery(transfer_id=transfer_id)
                self._send(tx, partner, query, transfer_id, now_us)
            else:
                log.warning(
                    "%s refused the void of one-round transfer %s (%s %s): it stays "
                    "PROPOSED, %d tCO2e reserved; the void is sent again later",
                    partner, transfer_id, wire_name_of(code), detail, record.quantity,
                    extra=fields,
                )  # fmt: skip
            return
        if not isinstance(reply, TransferVoidReceipt) or reply.transfer_id != transfer_id:
            return
        self._settle_withdrawn(tx, record, f"withdrawn: {partner} acknowledged the void", now_us)

    def _withdrawn_reported(
        self, tx: Tx, record: TransferRecord, report: TransferStatusReport, now_us: int
    ) -> None:
        """S7: the receiver's report on a withdrawn one-round transfer, asked after it
        refused the void with 3008. VOIDED or REJECTED there is final with nothing
        moved, and a later proposal with this id is refused (T2): settled as the
        receipt settles it. COMPLETED: its stored acceptance, returned with a
        delivery of the proposal, completes the transfer here. Anything else:
        nothing."""
        if not record.complete_on_acceptance or record.state is not TransferState.PROPOSED:
            return
        final = (transfer_pb2.TRANSFER_STATE_VOIDED, transfer_pb2.TRANSFER_STATE_REJECTED)
        state_name = transfer_pb2.TransferState.Name(report.state)
        if report.state in final:
            self._settle_withdrawn(
                tx, record, f"withdrawn: {record.partner} reports {state_name}", now_us
            )
        elif report.state == transfer_pb2.TRANSFER_STATE_COMPLETED:
            log.warning(
                "%s reports one-round transfer %s completed: waiting for its acceptance, "
                "which a delivery of the proposal brings back",
                record.partner, record.transfer_id,
                extra={"transfer_id": record.transfer_id, "partner": record.partner},
            )  # fmt: skip

    def _settle_withdrawn(self, tx: Tx, record: TransferRecord, detail: str, now_us: int) -> None:
        """A withdrawn one-round transfer the receiver holds final with nothing moved:
        VOIDED here, the blocks released, the proposal no longer delivered."""
        transition = step(Role.SENDER, record.state, Event.WITHDRAWAL_ACKNOWLEDGED)
        self._apply(tx, transition.effects, record.transfer_id, record.partner, [], 0, now_us)
        tx.transfer_set_state(
            record.transfer_id, transition.state, now=now_us, rejection_detail=detail
        )
        tx.outbox_cancel(payload_type=type_name(TransferProposal), subject_id=record.transfer_id)
        log.warning(
            "one-round transfer %s to %s voided (%s); %d tCO2e released",
            record.transfer_id, record.partner, detail, record.quantity,
            extra={"transfer_id": record.transfer_id, "partner": record.partner},
        )  # fmt: skip

    def _proposal_rejected(self, tx: Tx, transfer_id: str, reply: Rejection, now_us: int) -> None:
        record = tx.transfer_get(transfer_id)
        if record is None:
            raise RuntimeError(f"rejected transfer {transfer_id} is not recorded")
        code, detail = _rejection_reasons(reply)
        self._reject_outgoing(tx, record, code, detail, now_us)

    def _reject_outgoing(
        self, tx: Tx, record: TransferRecord, code: int, detail: str, now_us: int
    ) -> None:
        """The receiver rejected our proposal of a transfer (alone or as an item of a
        batch): release its blocks, unless it is no longer PROPOSED here."""
        try:
            transition = step(Role.SENDER, record.state, Event.REJECTION_RECEIVED)
        except Rejected:
            log.info(
                "late rejection of transfer %s in state %s ignored",
                record.transfer_id, record.state.name,
            )  # fmt: skip
            return
        self._apply(tx, transition.effects, record.transfer_id, record.partner, [], 0, now_us)
        tx.transfer_set_state(
            record.transfer_id, transition.state, now=now_us, rejection_code=code,
            rejection_detail=detail,
        )  # fmt: skip

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
        found = tx.transfer_with_blocks(transfer_id)
        if found is None:
            raise RuntimeError(f"accepted transfer {transfer_id} is not recorded")
        record, blocks = found
        if (
            acceptance.transfer_id != transfer_id
            or acceptance.proposal_digest != record.proposal_digest
        ):
            raise ReplyError(
                RejectionCode.DIGEST_MISMATCH,
                f"acceptance from {partner} does not match proposal of transfer {transfer_id}",
            )
        if acceptance.completed and not record.complete_on_acceptance:
            # S6: the partner claims to have credited units this node never let go.
            log.error(
                "ALARM: %s says it completed transfer %s on acceptance, which its proposal "
                "did not ask: the acceptance is not applied; reconcile with the partner",
                partner, transfer_id,
                extra={"transfer_id": transfer_id, "partner": partner},
            )  # fmt: skip
            raise ReplyError(
                RejectionCode.UNEXPECTED_REPLY,
                f"acceptance from {partner} says transfer {transfer_id} completed, but its "
                "proposal did not ask to complete on acceptance",
            )
        if not acceptance.completed and acceptance.adjustment_year:
            raise ReplyError(
                RejectionCode.UNEXPECTED_REPLY,
                f"acceptance from {partner} of transfer {transfer_id} gives an adjustment "
                f"year ({acceptance.adjustment_year}) but does not say it completed",
            )
        acceptance_digest = digest(acceptance_payload)
        if acceptance.completed:
            # S2, the one-round transfer: the receiver completed when it accepted; the
            # same step as below, and no completion to send.
            if record.state is not TransferState.PROPOSED:
                log.error(
                    "ALARM: %s completed transfer %s on acceptance, but it is %s here; "
                    "reconcile with the partner",
                    partner, transfer_id, record.state.name,
                    extra={"transfer_id": transfer_id, "partner": partner},
                )  # fmt: skip
            self._complete_outgoing_many(
                tx, [record], acceptance_digest, journal_id, now_us,
                event=Event.COMPLETED_ACCEPTANCE_RECEIVED, blocks={transfer_id: blocks},
            )  # fmt: skip
            return
        # S3: an ordinary acceptance (also of a proposal that asked: the receiver chose
        # the two-phase flow, or does not know the one-round transfer).
        if (
            record.complete_on_acceptance
            and record.state is TransferState.PROPOSED
            and tx.outbox_last_created(payload_type=type_name(TransferVoid), subject_id=transfer_id)
            is not None
        ):
            # S7: the proposal was withdrawn, and the void voids a transfer the receiver
            # holds ACCEPTED (V4): completing now would debit units it never credits.
            # The void's answer settles the transfer.
            log.warning(
                "%s accepted transfer %s in two phases after this node withdrew its "
                "proposal (S7): not completed; the answer to the void settles it",
                partner, transfer_id, extra={"transfer_id": transfer_id, "partner": partner},
            )  # fmt: skip
            return
        year = self._complete_outgoing_many(
            tx, [record], acceptance_digest, journal_id, now_us, blocks={transfer_id: blocks}
        ).get(transfer_id)
        if year is not None:
            completion = TransferCompletion(
                transfer_id=transfer_id, acceptance_digest=acceptance_digest, adjustment_year=year
            )
            self._send(tx, partner, completion, transfer_id, now_us)

    def _complete_outgoing_many(
        self,
        tx: Tx,
        records: Sequence[TransferRecord],
        acceptance_digest: bytes,
        journal_id: int,
        now_us: int,
        *,
        event: Event = Event.ACCEPTANCE_RECEIVED,
        blocks: dict[str, list[Block]] | None = None,
    ) -> dict[str, int]:
        """The sender's completion step for accepted transfers (one proposed alone, or
        the accepted items of a batch), in the transaction that journals the
        acceptance: debit the reserved blocks, book +CA, record the AEF actions,
        COMPLETED. Returns the year of each one's adjustment, for the completion to
        send; a transfer no longer PROPOSED here (voided by its time-out before the
        acceptance arrived) is left out and nothing is applied to it. ``event``
        COMPLETED_ACCEPTANCE_RECEIVED: the receiver completed on acceptance (one-round
        transfer), the same step with no completion to send. ``blocks``: each one's
        blocks, if the caller read them with its record (else read here)."""
        live: list[TransferRecord] = []
        transition = None
        for record in records:
            try:
                transition = step(Role.SENDER, record.state, event)
            except Rejected:
                # Voided on our clock before the acceptance arrived: the void we sent
                # tells the receiver; nothing is applied here.
                log.info(
                    "late acceptance of transfer %s in state %s ignored",
                    record.transfer_id, record.state.name,
                )  # fmt: skip
                continue
            live.append(record)
        if transition is None or not live:
            return {}
        assert (Effect.SEND_COMPLETION in transition.effects) is (
            event is Event.ACCEPTANCE_RECEIVED
        )
        ids = [record.transfer_id for record in live]
        if blocks is None:
            blocks = tx.blocks_of_transfers(ids)
        booked: dict[str, list[tuple[int, int]]] = {}
        years = self._apply_many(
            tx, transition.effects,
            [(r.transfer_id, r.partner, blocks[r.transfer_id]) for r in live],
            journal_id, now_us, {r.transfer_id: r.first_transfer for r in live}, booked,
        )  # fmt: skip
        tx.transfers_set_state(
            ids, transition.state, now=now_us, acceptance_digest=acceptance_digest, blocks=blocks,
            records={r.transfer_id: r for r in live},
            adjustments=booked if Effect.APPLY_ADJUSTMENT in transition.effects else None,
        )  # fmt: skip
        actions: list[NewAction] = []
        for record in live:
            kind, subtype = (
                (ActionType.FIRST_TRANSFER, ActionSubtype.FIRST_TRANSFER_TO_ANOTHER_PARTY.value)
                if record.first_transfer
                else (ActionType.TRANSFER, "")
            )
            actions.extend(
                NewAction(
                    action_type=kind.value, subtype=subtype, block=block, at=now_us,
                    acquiring_party=record.partner, transfer_id=record.transfer_id,
                )
                for block in blocks[record.transfer_id]
            )  # fmt: skip
        tx.actions_put(actions)
        if len(live) == 1:  # a batch logs one line for all (Replies._batch_accepted)
            log.info(
                "transfer %s to %s completed: %d tCO2e debited", ids[0], live[0].partner,
                total(blocks[ids[0]]), extra={"transfer_id": ids[0], "partner": live[0].partner},
            )  # fmt: skip
        return years

    # -- batches (docs/PROTOCOL.md §5.15) -----------------------------------------------

    def _batch_rejected(
        self, tx: Tx, batch_id: str, partner: str, reply: Rejection, now_us: int
    ) -> None:
        """The whole batch was refused: each item is rejected with the reason."""
        code, detail = _rejection_reasons(reply)
        for record in tx.transfers_of_batch(batch_id, partner):
            if record.direction is Role.SENDER:
                self._reject_outgoing(tx, record, code, detail, now_us)

    def _batch_accepted(
        self,
        tx: Tx,
        batch_id: str,
        partner: str,
        acceptance: TransferBatchAcceptance,
        acceptance_payload: bytes,
        journal_id: int,
        now_us: int,
    ) -> None:
        """Apply each item's outcome as for a transfer proposed alone, then send one
        completion for the items completed here."""
        records = {
            r.transfer_id: r
            for r in tx.transfers_of_batch(batch_id, partner)
            if r.direction is Role.SENDER
        }
        answered = [outcome.transfer_id for outcome in acceptance.items]
        if (
            acceptance.batch_id != batch_id
            or not records
            or any(r.proposal_digest != acceptance.proposal_digest for r in records.values())
            or len(answered) != len(records)
            or set(answered) != set(records)
        ):
            raise ReplyError(
                RejectionCode.DIGEST_MISMATCH,
                f"batch acceptance from {partner} does not match the proposal of batch {batch_id}",
            )
        acceptance_digest = digest(acceptance_payload)
        accepted: list[TransferRecord] = []
        for outcome in acceptance.items:
            record = records[outcome.transfer_id]
            if outcome.HasField("rejection"):
                code, detail = int(outcome.rejection.code), outcome.rejection.detail
                if not code:
                    code, detail = int(RejectionCode.UNSPECIFIED), detail or "rejected"
                self._reject_outgoing(tx, record, code, detail, now_us)
            else:
                accepted.append(record)
        years = self._complete_outgoing_many(tx, accepted, acceptance_digest, journal_id, now_us)
        completed = [
            TransferBatchCompletionItem(transfer_id=record.transfer_id, adjustment_year=year)
            for record in accepted
            if (year := years.get(record.transfer_id)) is not None
        ]
        if completed:
            completion = TransferBatchCompletion(
                batch_id=batch_id, acceptance_digest=acceptance_digest, items=completed
            )
            self._send(tx, partner, completion, batch_id, now_us)
        log.info(
            "batch %s answered by %s: %d of %d transfers completed", batch_id, partner,
            len(completed), len(records), extra={"subject_id": batch_id, "partner": partner},
        )  # fmt: skip

    def _batch_completion_answered(
        self,
        tx: Tx,
        batch_id: str,
        partner: str,
        reply: Message,
        request_envelope: bytes,
        now_us: int,
    ) -> None:
        """A receipt, or a refusal, of our batch completion."""
        if isinstance(reply, TransferBatchCompletionReceipt):
            completion = TransferBatchCompletion()
            completion.ParseFromString(sealed_payload(request_envelope))
            asked = {item.transfer_id for item in completion.items}
            answered = {outcome.transfer_id for outcome in reply.items}
            if asked != answered:
                log.error(
                    "ALARM: %s's receipt of the completion of batch %s does not answer the "
                    "transfers completed (missing %s, not asked %s); reconcile with the partner",
                    partner, batch_id, sorted(asked - answered) or "none",
                    sorted(answered - asked) or "none",
                )  # fmt: skip
            for outcome in reply.items:
                if outcome.HasField("rejection"):
                    log.error(
                        "ALARM: %s refused the completion of transfer %s (batch %s), which is "
                        "complete here: %s %s; reconcile with the partner",
                        partner, outcome.transfer_id, batch_id,
                        wire_name_of(outcome.rejection.code), outcome.rejection.detail,
                    )  # fmt: skip
            return
        assert isinstance(reply, Rejection)
        code = _rejection_reasons(reply)[0]
        if reply.header.sequence == 0 and self._fresh_seal_helps(code, request_envelope):
            # Refused before it was recorded (too old, or a key no longer valid there):
            # each completed item is sent again as a freshly sealed TransferCompletion.
            log.warning(
                "%s could not record the completion of batch %s (%s): sending each "
                "transfer's completion again", partner, batch_id, wire_name_of(code),
            )  # fmt: skip
            for record in tx.transfers_of_batch(batch_id, partner):
                self._resend_completion(tx, record.transfer_id, now_us)
        else:
            log.error(
                "ALARM: %s refused the completion of batch %s, which is complete here; "
                "reconcile with the partner",
                partner, batch_id,
            )  # fmt: skip
