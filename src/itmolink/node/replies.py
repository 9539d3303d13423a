"""Replies to our requests: verified, journaled and applied with the answered request."""

from __future__ import annotations

import datetime as dt

from google.protobuf.message import Message

from itmolink.core.actions import (
    ActionType,
)
from itmolink.core.aef import ActionSubtype
from itmolink.core.blocks import total
from itmolink.core.codes import Rejected, RejectionCode, wire_name_of
from itmolink.core.transfer import Effect, Event, Role, TransferState, step
from itmolink.node.base import (
    AuthorisationStatement,
    EngineBase,
    KeyRotation,
    Rejection,
    ReplyError,
    TransferAcceptance,
    TransferCompletion,
    TransferProposal,
    TransferStatusQuery,
    TransferStatusReport,
    _rejection_reasons,
    digest,
    log,
    type_name,
)
from itmolink.node.convert import (
    to_us,
)
from itmolink.store.tx import Tx
from itmolink.v1 import (
    envelope_pb2,
    transfer_pb2,
)


class Replies(EngineBase):
    """The requester's side of the protocol."""

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
                    wire_name_of(code),
                    detail,
                    extra={
                        "partner": request.partner,
                        "message_id": message_id,
                        "subject_id": request.subject_id,
                        "code": wire_name_of(code),
                    },
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
        log.warning(
            "transfer %s from %s voided here: %s", transfer_id, partner, state_name,
            extra={"transfer_id": transfer_id, "partner": partner},
        )  # fmt: skip

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
            transfer_id,
            transition.state,
            now=now_us,
            acceptance_digest=digest(acceptance_payload),
            blocks=blocks,
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
            "transfer %s to %s completed: %d tCO2e debited", transfer_id, partner, total(blocks),
            extra={"transfer_id": transfer_id, "partner": partner},
        )  # fmt: skip
