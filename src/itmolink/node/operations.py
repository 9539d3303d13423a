"""Operator requests, time-outs, the outbox and reconciliation's requester side."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from itmolink.core import rules
from itmolink.core.actions import (
    ActionType,
    FirstTransferTrigger,
    check_use_ndc,
    check_use_oimp,
    check_voluntary_cancellation,
    first_transfer_triggers,
)
from itmolink.core.aef import ActionSubtype
from itmolink.core.authorisation import (
    Authorisation,
    Revocation,
    UnitStatus,
    check_amendment,
    check_authorisation,
    revoke,
)
from itmolink.core.blocks import Block, take, total
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.issuance import Destination, IssuancePolicy, allocate_block, split_issuance
from itmolink.core.reconcile import Bucket, Total
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Effect, Event, Role, step
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import sealed_payload, signing_key_ids
from itmolink.crypto.keys import SigningKey, VerifyingKey, is_key_id_of
from itmolink.crypto.pki import RevokedKey
from itmolink.node.base import (
    ISSUANCE_DESTINATIONS,
    MAX_BATCH_ITEMS,
    ORDERED_TYPES,
    RETIREMENTS,
    STATUS_QUERY_GRACE_US,
    STATUS_QUERY_INTERVAL_US,
    WITHDRAWAL_INTERVAL_US,
    WITHDRAWAL_REASON,
    AuthorisationStatement,
    EngineBase,
    FirstTransferNotice,
    IssuanceNotice,
    KeyRotation,
    Outgoing,
    ReconciliationAnswer,
    ReconciliationQuery,
    Rejection,
    ReplyError,
    TransferBatchItem,
    TransferBatchProposal,
    TransferProposal,
    TransferStatusQuery,
    TransferVoid,
    _rejection_reasons,
    cascade_revocations,
    log,
    retry_delay_us,
    serial_counter,
    type_name,
)
from itmolink.node.convert import (
    block_to_pb,
    from_us,
    timestamp,
    timestamp_us,
    to_us,
)
from itmolink.store.sqlite import HOLDING_ACCOUNT
from itmolink.store.tx import HeldBlock, OutboxMessage, Tx
from itmolink.v1 import (
    envelope_pb2,
    keys_pb2,
)


class Operations(EngineBase):
    """What a registry's operator asks of its node, and what its clock drives."""

    # -- reconciliation (requester side) ------------------------------------------------

    def reconciliation_query(
        self, partner: str, query: ReconciliationQuery, now: dt.datetime
    ) -> tuple[str, bytes]:
        """Seal and journal a query to send now; (message id, envelope)."""
        return self._journaled_query(partner, query, now)

    def reconciliation_answer(
        self, partner: str, message_id: str, request: bytes, raw: bytes, now: dt.datetime
    ) -> ReconciliationAnswer:
        """Verify and journal the partner's answer to a reconciliation query."""
        with self._transaction() as tx:
            reply, _, _ = self._open_reply(
                tx, partner, type_name(ReconciliationQuery), request, message_id, raw, to_us(now)
            )
        if isinstance(reply, Rejection):
            code, detail = _rejection_reasons(reply)
            if code == RejectionCode.SEQUENCE_REUSED:
                detail += (
                    " (this node's ledger has probably been restored from a backup older than "
                    "its last transaction: stop it and run `itmolink node restored`, "
                    "docs/OPERATIONS.md §7)"
                )
            raise ReplyError(RejectionCode(code), f"{partner} refused the query: {detail}")
        assert isinstance(reply, ReconciliationAnswer)
        return reply

    def local_buckets(self, partner: str, snapshot_us: int, view: str, prefix: str) -> list[Bucket]:
        with self._transaction() as tx:
            return tx.reconcile_buckets(partner, snapshot_us, view, prefix)

    def local_leaves(
        self, partner: str, snapshot_us: int, view: str, prefix: str
    ) -> dict[str, bytes]:
        with self._transaction() as tx:
            return tx.reconcile_leaves(partner, snapshot_us, view, prefix)

    def local_totals(self, partner: str, snapshot_us: int) -> list[Total]:
        with self._transaction() as tx:
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
        with self._transaction() as tx:
            tx.discrepancy_put(
                reconciliation_id=reconciliation_id, partner=partner, phase=phase,
                subject=subject, detail=detail, now=to_us(now),
            )  # fmt: skip
            frozen = tx.freeze_blocks_of(subject, partner) if freeze else 0
        log.error("ALARM: reconciliation with %s: %s %s: %s", partner, phase, subject, detail)
        return frozen

    def unfreeze(self, transfer_id: str, reason: str) -> list[HeldBlock]:
        """Make the blocks a reconciliation discrepancy about ``transfer_id`` froze
        held again, once the operator resolved it with the partner (a local action:
        the partner is not told; the admin audit trail keeps who did it and why)."""
        if not reason.strip():
            raise Rejected(
                RejectionCode.MISSING_FIELD,
                "say why the blocks may be held again (how the discrepancy was resolved)",
            )
        with self._transaction() as tx:
            released = tx.unfreeze_blocks_of(transfer_id)
            if not released:
                raise Rejected(
                    RejectionCode.UNKNOWN_TRANSFER,
                    f"no block is frozen for transfer {transfer_id!r}",
                )
        log.warning(
            "%d block(s) frozen for %s are held again: %s",
            len(released),
            transfer_id,
            reason,
            extra={"transfer_id": transfer_id},
        )
        return released

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

    def revoke_signing_key(
        self,
        key_id: str,
        now: dt.datetime,
        partner: str = "",
        compromised_since: dt.datetime | None = None,
    ) -> None:
        """Revoke an earlier key of ours at every partner, or a partner's key here.

        With ``compromised_since`` the keys announced with it (in a KeyRotation it
        signed) that were recorded at or after that instant are revoked with it, and
        what they announced, transitively (PROTOCOL §3.8); without it only the key
        is revoked (a retirement)."""
        now_us = to_us(now)
        if compromised_since is not None and compromised_since.microsecond:
            # The card file keeps whole seconds: a fraction dropped there would widen
            # the cascade past the instant the guard below checked.
            raise Rejected(
                RejectionCode.INVALID_FIELD, "give the compromise instant in whole seconds"
            )
        since_us = None if compromised_since is None else to_us(compromised_since)
        with self._transaction() as tx:
            if partner:
                self._require_partner(partner)
                known = self.trust.get(key_id)
                if known is None or known.party != partner:
                    raise Rejected(
                        RejectionCode.UNKNOWN_SIGNING_KEY, f"{partner} has no pinned key {key_id!r}"
                    )
                tx.revoked_key_put(
                    key_id=key_id, party=partner, source="operator", now=now_us,
                    compromised_since=since_us,
                )  # fmt: skip
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
            if any(key_id in signing_key_ids(e) for e in tx.outbox_pending_envelopes()):
                raise Rejected(
                    RejectionCode.TRANSFER_STATE_CONFLICT,
                    f"messages signed with {key_id} are still being delivered: revoke it once "
                    "they are answered",
                )
            if since_us is not None:
                self._check_cascade_spares_our_keys(tx, key_id, since_us)
            tx.revoked_key_put(
                key_id=key_id, party=self.party, source="self", now=now_us,
                compromised_since=since_us,
            )  # fmt: skip
            for other in sorted(self.partners):
                self._send(tx, other, _revocation(key_id, since_us), f"revoke-{key_id}", now_us)
            self._after_commit.append(self.reload_trust)

    def _check_cascade_spares_our_keys(self, tx: Tx, key_id: str, since_us: int) -> None:
        """Refuse a compromise instant that would make a partner revoke, with
        ``key_id``, a key this node still uses (signs with, is announcing, or signed
        an undelivered request with): one announced with ``key_id``, directly or
        through keys announced with it, that a partner may have recorded at or after
        ``since_us``. A partner recorded an announcement before it answered, by a clock
        at most ``max_clock_skew`` ahead of ours; one not answered yet, at any time."""
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        latest: list[tuple[str, str, int]] = []
        # Announced key -> (partner, its answer's time) of the latest-recorded one.
        answers: dict[str, tuple[str, int | None, int]] = {}
        for subject, partner, state, envelope, answered_at, answer in tx.outbox_deliveries_of(
            payload_type=type_name(KeyRotation)
        ):
            if state == "cancelled" or subject.startswith("revoke-"):
                continue
            at = _NEVER_ANSWERED if answered_at is None else answered_at + skew
            if answer is not None:
                # The partner's own clock when it recorded the key: the
                # acknowledgement's sent_at (a partner whose clock runs fast).
                at = max(at, _acknowledged_at(answer))
            latest.append((subject, " ".join(signing_key_ids(envelope)), at))
            if subject not in answers or at > answers[subject][2]:
                answers[subject] = (partner, answered_at, at)
        # The revocation is signed with the key this node signs with: a partner
        # spares it (and so what it announced) from the cascade (PROTOCOL §3.8).
        fallen = cascade_revocations(
            {key_id: since_us}, latest, {key_id: [self.signing_key.key_id]}
        )
        ours = {self.signing_key.key_id, tx.meta_get("pending_signing_key")}
        ours |= {k for e in tx.outbox_pending_envelopes() for k in signing_key_ids(e)}
        for own in sorted(k for k in ours if k and k != key_id and k in fallen):
            partner, answered_at, _ = answers.get(own, ("a partner", None, 0))
            raise Rejected(
                RejectionCode.INVALID_FIELD,
                f"{own}, a key this node still uses, was announced with {key_id} (or a key "
                f"announced with it) to {partner}"
                + (
                    f", which acknowledged it at {from_us(answered_at).isoformat()}: give a "
                    "compromise instant later than that plus max_clock_skew, or rotate first"
                    if answered_at is not None
                    else ", which has not acknowledged it yet"
                ),
            )

    def announce_revocations(
        self, now: dt.datetime, restored: Sequence[tuple[str, dt.datetime | None]] = ()
    ) -> int:
        """Announce each revocation of a key of ours to every partner not told of it
        yet (a partner added since, which may have pinned a copy of our card that
        still lists the key), at start. ``restored`` lists the revocations our own card
        file names, recorded here if the ledger lost them (rebuilt). Returns how many
        revocations were queued."""
        now_us = to_us(now)
        queued = 0
        rotation = type_name(KeyRotation)
        with self._transaction() as tx:
            recorded = set(tx.revoked_keys())
            in_use = {self.signing_key.key_id, tx.meta_get("pending_signing_key")}
            for key_id, compromised in restored:
                if key_id in recorded or not is_key_id_of(self.party, key_id):
                    continue
                if key_id in in_use:
                    log.error(
                        "ALARM: our card lists %s as revoked, but this node signs with it",
                        key_id,
                    )
                    continue
                tx.revoked_key_put(
                    key_id=key_id, party=self.party, source="self", now=now_us,
                    compromised_since=None if compromised is None else to_us(compromised),
                )  # fmt: skip
            for key_id, party, _source, _at, since_us in tx.revocations():
                if party != self.party:
                    continue
                subject = f"revoke-{key_id}"
                # A partner told is one to which a revocation of the key at least as
                # wide as this one is under way or which acknowledged one: one that
                # refused it (too old after an outage, signed with a key it does not
                # pin yet) recorded nothing, and one told only of a narrower one (a
                # retirement, a later instant) has not let fall what this one fells;
                # each is sent the revocation again, freshly sealed, once at each start.
                told = {
                    p for p, state, answer, envelope in tx.outbox_requests_of(
                        payload_type=rotation, subject_id=subject)
                    if state != "cancelled" and answer != type_name(Rejection)
                    and _at_least_as_wide(envelope, since_us)
                }  # fmt: skip
                # A partner that refused the key's announcement pinned nothing.
                told |= {
                    p for p, _, answer in tx.outbox_answers_of(payload_type=rotation,
                                                               subject_id=key_id)
                    if answer == type_name(Rejection)
                }  # fmt: skip
                for partner in sorted(set(self.partners) - told):
                    self._send(tx, partner, _revocation(key_id, since_us), subject, now_us)
                    queued += 1
            if restored:
                self._after_commit.append(self.reload_trust)
        if queued:
            log.warning("announced %d earlier revocation(s) to partners not told yet", queued)
        return queued

    def own_revocations(self) -> list[RevokedKey]:
        """The revocations of keys of ours this ledger records, for our card file
        (one revoked before cards listed revocations is missing there)."""
        with self.store.transaction(exclusive=False) as tx:
            return [
                RevokedKey(key_id, from_us(at), None if since is None else from_us(since))
                for key_id, party, _source, at, since in tx.revocations()
                if party == self.party
            ]

    def cancel_key_rotation(self, now: dt.datetime) -> str:
        """Give up the key being announced (refused by a partner, or never answered):
        stop announcing it, revoke it at the partners that may have pinned it, and go
        on signing with the current key. Returns the key id given up; the caller
        deletes its private key file once this has committed, so that a copy pinned by
        a late announcement can never verify anything new."""
        now_us = to_us(now)
        with self._transaction() as tx:
            key_id = tx.meta_get("pending_signing_key")
            if not key_id:
                raise Rejected(RejectionCode.INVALID_FIELD, "no key rotation is pending")
            rotation = type_name(KeyRotation)
            answers = tx.outbox_answers_of(payload_type=rotation, subject_id=key_id)
            tx.outbox_cancel(payload_type=rotation, subject_id=key_id)
            tx.set_meta("pending_signing_key", "")
            tx.set_meta("pending_signing_key_refused_by", "")
            tx.revoked_key_put(key_id=key_id, party=self.party, source="self", now=now_us)
            # Every partner that acknowledged the key, or may yet (an announcement still
            # on its way); not one that refused it (it pinned nothing).
            refused = {p for p, _, answer in answers if answer == type_name(Rejection)}
            for partner in sorted({p for p, _, _ in answers} - refused):
                self._send(tx, partner, _revocation(key_id, None), f"revoke-{key_id}", now_us)
            self._after_commit.append(lambda: setattr(self, "pending_key", None))
        log.warning("gave up the rotation to signing key %s", key_id)
        return key_id

    def signing_keys_view(self) -> list[tuple[str, str, str, VerifyingKey | None]]:
        """(party, key id, status, key) for our keys and the partners'."""
        with self._transaction() as tx:
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
        with self._transaction() as tx:
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
            ca_point = self._ca_point(authorisation)
            if action_type is ActionType.USE_OIMP and not received and ca_point == "transfer":
                # As a transfer would: units booked at issuance (before an amendment
                # added NDC) and units never adjusted are not used together, or the
                # second kind would leave unbooked (4013).
                self._check_one_kind(tx, authorisation_id, taken)
            if (
                action_type is ActionType.USE_OIMP
                and not received
                and (
                    (
                        ca_point == "use"
                        and FirstTransferTrigger.USE_OR_CANCELLATION
                        in first_transfer_triggers(authorisation)
                    )
                    or (
                        ca_point == "transfer" and self._first_transfer(tx, authorisation_id, taken)
                    )
                )
            ):
                # The host uses its own OIMP units: that use is their first transfer. Units
                # authorised for an NDC too are adjusted at their first international
                # transfer, whatever the OIMP definition (decision 26): those it still
                # holds, never adjusted, are first transferred by this use (decision 59).
                self._book_first_transfer(
                    tx, taken, reference=f"use:{authorisation_id}:{now_us}",
                    subtype=ActionSubtype.USE_OR_CANCELLATION, now_us=now_us,
                )  # fmt: skip
            elif (
                action_type is ActionType.USE_OIMP
                and received
                and ca_point == "transfer"
                and (subtracted := [b for b in taken if tx.acquired_with_adjustment(b)])
            ):
                # An acquiring party subtracted units authorised for an NDC when it
                # acquired them; used for OIMP they count toward no NDC of its own, so it
                # gives back what it subtracted (the units it acquired with a -CA: not
                # those acquired while the authorisation was for OIMP only), as at an
                # onward transfer (decision 59).
                entries = self._adjustment_entries(Role.SENDER, "", "", subtracted)
                tx.adjustments_put(
                    entries, evidence_journal_id=None, now=now_us,
                    reference=f"return:{authorisation_id}:{now_us}",
                )  # fmt: skip
            elif action_type is ActionType.USE_OIMP and received and ca_point == "use":
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
        with self._transaction() as tx:
            taken_now = tx.snapshot_take(year, to_us(now))
            snapshot = tx.snapshot(year)
        assert snapshot is not None
        return taken_now, snapshot[0], len(snapshot[1])

    def record_admin_action(
        self, *, operator: str, method: str, request: str, outcome: str, now: dt.datetime
    ) -> None:
        with self._transaction() as tx:
            tx.admin_audit_put(
                operator=operator, method=method, request=request, outcome=outcome,
                now=to_us(now),
            )  # fmt: skip

    # -- time-outs and the outbox ------------------------------------------------------

    def expire_transfers(self, now: dt.datetime) -> list[str]:
        """Void our proposals left unanswered past their time-out (the sender decides)."""
        now_us = to_us(now)
        voided: list[str] = []
        with self._transaction() as tx:
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
                if record.batch_id:
                    # The items of a batch share its expires_at: all of them are voided
                    # now, each with its own void, and the batch proposal is withdrawn.
                    tx.outbox_cancel(
                        payload_type=type_name(TransferBatchProposal), subject_id=record.batch_id
                    )
                if Effect.SEND_VOID in transition.effects:
                    void = _void(tx, record.transfer_id, "no acceptance before the time-out")
                    self._send(tx, record.partner, void, record.transfer_id, now_us)
                voided.append(record.transfer_id)
                log.warning(
                    "transfer %s to %s voided: time-out", record.transfer_id, record.partner,
                    extra={"transfer_id": record.transfer_id, "partner": record.partner},
                )  # fmt: skip
        return voided

    def query_pending_transfers(self, now: dt.datetime) -> list[str]:
        """Ask the partner about transfers that outlived their time-out undecided.

        As the receiver (PROTOCOL §7.7): transfers accepted here. The receiver never
        credits without a completion; when none has come, the sender's answer tells
        whether one ever will. As the sender of a one-round transfer (§6.11 S7):
        proposals still unanswered past ``expires_at + 2 × max_clock_skew``. The
        sender never settles them on its own clock (S4), and a receiver that can no
        longer read the proposal refuses it before looking it up (S5): the sender
        withdraws the proposal with a ``TransferVoid`` sealed with its current key,
        and the transfer stays PROPOSED until the receiver acknowledges the void
        (:meth:`Replies._withdrawal_answered`). Returns the transfer ids asked about
        or withdrawn.
        """
        now_us = to_us(now)
        skew = self.limits.max_clock_skew // dt.timedelta(microseconds=1)
        asked: list[str] = []
        with self._transaction() as tx:
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
            for record in tx.transfers_one_round_unanswered(
                now_us - STATUS_QUERY_GRACE_US - 2 * skew
            ):
                # Once the receiver refused a void with 3008 (it holds the transfer
                # final), it is asked which state instead (Replies._withdrawal_answered),
                # again at the same pace; else one void at a time, a new one only if the
                # last was answered without settling (refused unread, say).
                queried = tx.outbox_last_created(
                    payload_type=type_name(TransferStatusQuery), subject_id=record.transfer_id
                )
                last = queried or tx.outbox_last_created(
                    payload_type=type_name(TransferVoid), subject_id=record.transfer_id
                )
                if last is not None and (
                    last[0] == "pending" or last[1] > now_us - WITHDRAWAL_INTERVAL_US
                ):
                    continue
                if queried is not None:
                    query = TransferStatusQuery(transfer_id=record.transfer_id)
                    self._send(tx, record.partner, query, record.transfer_id, now_us)
                    asked.append(record.transfer_id)
                    continue
                void = _void(tx, record.transfer_id, WITHDRAWAL_REASON)
                self._send(tx, record.partner, void, record.transfer_id, now_us)
                asked.append(record.transfer_id)
                log.warning(
                    "one-round transfer %s to %s unanswered past expires_at + 2 x skew: "
                    "withdrawing its proposal (TransferVoid); it stays PROPOSED, its %d tCO2e "
                    "reserved, until %s acknowledges the void",
                    record.transfer_id, record.partner, record.quantity, record.partner,
                    extra={"transfer_id": record.transfer_id, "partner": record.partner},
                )  # fmt: skip
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
        # Not exclusive: on PostgreSQL several processes claim at once, each message
        # by one of them (FOR UPDATE SKIP LOCKED), without the registry lock.
        with self.store.transaction(exclusive=False) as tx:
            due = tx.outbox_due(now_us, limit, lease_until=lease_until)
            ordered = [m for m in due if m.payload_type in ORDERED_TYPES]
            if ordered:
                held = self._held_back(tx, ordered, now_us)
                if held:
                    due = [m for m in due if m.message_id not in held]
        return [(m.message_id, m.partner, m.envelope) for m in due]

    def _held_back(self, tx: Tx, ordered: Sequence[OutboxMessage], now_us: int) -> set[str]:
        """The due statements and completions that must wait for another request to
        their partner (decision 55), each held back until it is looked at again."""
        if not self._amendments_pending and tx.shared_state() != self._shared_seen:
            self._amendments_pending = True  # another process may have amended
        if not self._amendments_pending and all(
            m.payload_type != type_name(AuthorisationStatement) for m in ordered
        ):
            return set()
        held = set()
        for m in ordered:
            note = self._order_hold(tx, m.payload_type, m.partner, m.subject_id, m.message_id)
            if note is not None:
                self._hold(tx, m.message_id, m.partner, note, now_us)
                held.add(m.message_id)
        return held

    def next_due(self) -> int | None:
        with self.store.transaction(exclusive=False) as tx:  # a read: no registry lock
            return tx.outbox_next_due()

    def delivery_failed(self, message_id: str, error: str, now: dt.datetime) -> None:
        with self.store.transaction() as tx:
            message = tx.outbox_get(message_id)
            if message is None or message.state != "pending":
                return
            delay = retry_delay_us(message.attempts)
            tx.outbox_retry_later(message_id, next_attempt_at=to_us(now) + delay, error=error)

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
        with self._transaction() as tx:
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
        with self._transaction() as tx:
            current = self._authorisation(tx, self.party, authorisation_id)
            self._require_delivered(tx, current)
            one_round = tx.transfers_one_round_in_flight(authorisation_id)
            if one_round:
                # Its receiver completed, or will, under the version it holds now, and
                # this node completes when the answer comes, under the latest it holds
                # then: no order of delivery makes the two agree (decision 55).
                raise Rejected(
                    RejectionCode.TRANSFER_STATE_CONFLICT,
                    f"one-round transfer {one_round[0]} under {authorisation_id} is not yet "
                    "answered: amend once it is",
                )
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
                removed=current.terms.acquiring_parties - proposed.terms.acquiring_parties,
            )  # fmt: skip
        return proposed.terms

    def revoke_authorisation(self, authorisation_id: str, now: dt.datetime) -> Revocation:
        """Revoke what may still be revoked of one of our authorisations.

        Units already first-transferred (or transferred to the Adaptation Fund or
        cancelled at issuance) keep their authorisation; units still held here
        move to the 'revoked' account; the unissued rest of the cap lapses.
        """
        now_us = to_us(now)
        with self._transaction() as tx:
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
        with self._transaction() as tx:
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
            start = tx.next_counter(serial_counter(self.registry), quantity)
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

    def _check_transfer_request(
        self, tx: Tx, *, to_party: str, host: str, authorisation_id: str, vintage: int
    ) -> tuple[AuthorisationTerms, bytes]:
        """The sender's checks on a transfer before it looks at its holdings
        (docs/PROTOCOL.md §5.8, "Sender"): (terms, onward-transfer evidence)."""
        terms = tx.authorisation_get(host, authorisation_id)
        if terms is None:
            raise Rejected(
                RejectionCode.UNKNOWN_AUTHORISATION,
                f"no authorisation {authorisation_id!r} of {host} is recorded here",
            )
        evidence = b""
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
        return terms, evidence

    def _take_for_transfers(
        self, tx: Tx, to_party: str, requests: Sequence[BatchItemRequest]
    ) -> list[Outgoing]:
        """The sender's checks on each requested transfer, in order, each counting the
        ones before it against the holdings and the host threshold; then the held
        blocks each takes (in serial order, the last one split) are reserved for it,
        and it gets its id. One transfer proposed alone is a list of one.

        All or nothing: the first transfer that fails a check refuses the request
        (in a batch, its detail names the item), and nothing is reserved."""
        pools: dict[tuple[str, int], tuple[list[Block], list[Block]]] = {}
        pending: dict[int, int] = {}
        chosen: list[tuple[AuthorisationTerms, list[Block], bytes]] = []
        for number, request in enumerate(requests, start=1):
            host = request.host_party or self.party
            try:
                terms, evidence = self._check_transfer_request(
                    tx, to_party=to_party, host=host, authorisation_id=request.authorisation_id,
                    vintage=request.vintage,
                )  # fmt: skip
                key = (request.authorisation_id, request.vintage)
                if key not in pools:
                    held = tx.blocks_held(
                        account=HOLDING_ACCOUNT, authorisation_id=request.authorisation_id,
                        vintage=request.vintage,
                    )  # fmt: skip
                    pools[key] = (held, held)
                originals, current = pools[key]
                taken, remainders = take(current, request.quantity)
                # What is left, in serial order: the split tail, then the blocks untouched.
                pools[key] = (originals, remainders + current[len(taken) :])
                self._check_one_kind(tx, request.authorisation_id, taken)
                self._check_booking(tx, Role.SENDER, taken)
                if self._first_transfer(tx, request.authorisation_id, taken):
                    # Only where the host books (not for units first transferred already).
                    self._check_threshold(tx, terms, request.vintage, request.quantity, pending)
            except Rejected as rejected:
                if len(requests) == 1:
                    raise
                raise Rejected(
                    rejected.code, f"item {number} of the batch: {rejected.detail}"
                ) from None
            chosen.append((terms, taken, evidence))
        first = tx.next_counter("transfer", len(chosen))
        ids = [f"{self.party}-T-{first + n:06d}" for n in range(len(chosen))]
        sources: list[Block] = []
        left: list[Block] = []
        for originals, current in pools.values():
            before, after = set(originals), set(current)
            sources.extend(b for b in originals if b not in after)
            left.extend(b for b in current if b not in before)
        tx.blocks_carve(
            sources, left,
            [(b, transfer_id) for transfer_id, (_, taken, _) in zip(ids, chosen, strict=True)
             for b in taken],
            account=HOLDING_ACCOUNT,
        )  # fmt: skip
        return [
            Outgoing(
                transfer_id, terms.authorisation_id, total(taken), taken,
                self._first_transfer(tx, terms.authorisation_id, taken), evidence,
            )
            for transfer_id, (terms, taken, evidence) in zip(ids, chosen, strict=True)
        ]  # fmt: skip

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
        request = BatchItemRequest(authorisation_id, vintage, quantity, host_party)
        with self._transaction() as tx:
            [item] = self._take_for_transfers(tx, to_party, [request])
            return self._send_proposal(tx, to_party, item, now_us=now_us, expires_us=expires_us)

    def start_transfer_batch(
        self,
        *,
        to_party: str,
        items: Sequence[BatchItemRequest],
        now: dt.datetime,
        timeout: dt.timedelta | None = None,
    ) -> tuple[str, list[str]]:
        """Reserve units for several transfers to ``to_party`` and persist one
        TransferBatchProposal of them (docs/PROTOCOL.md §5.15); returns the batch id
        and the transfer ids, in the order of ``items``.

        All or nothing: if any item fails the sender's checks, nothing is reserved
        and the request is refused with that item's code.
        """
        now_us = to_us(now)
        self._require_partner(to_party)
        if not items:
            raise Rejected(RejectionCode.MISSING_FIELD, "a batch needs at least one transfer")
        if len(items) > MAX_BATCH_ITEMS:
            raise Rejected(
                RejectionCode.TOO_MANY_ITEMS,
                f"a batch of {len(items)} transfers; at most {MAX_BATCH_ITEMS}",
            )
        expires_us = now_us + (timeout or self.default_timeout) // dt.timedelta(microseconds=1)
        with self._transaction() as tx:
            outgoing = self._take_for_transfers(tx, to_party, items)
            batch_id = f"{self.party}-B-{tx.next_counter('batch'):06d}"
            proposal = TransferBatchProposal(
                batch_id=batch_id,
                expires_at=timestamp(expires_us),
                items=[
                    TransferBatchItem(
                        transfer_id=o.transfer_id, authorisation_id=o.authorisation_id,
                        quantity=o.quantity, blocks=[block_to_pb(b) for b in o.blocks],
                        first_transfer=o.first_transfer, authorisation_evidence=o.evidence,
                    )
                    for o in outgoing
                ],
            )  # fmt: skip
            # What the partner would refuse as a whole (B3, D1b) is refused here, before
            # anything is reserved (the limits are assumed to be the partners' too, §2.5).
            blocks = sum(len(item.blocks) for item in proposal.items)
            if blocks > self.limits.max_blocks:
                raise Rejected(
                    RejectionCode.TOO_MANY_BLOCKS,
                    f"the batch's transfers take {blocks} blocks; at most "
                    f"{self.limits.max_blocks} in one batch: split it",
                )
            if proposal.ByteSize() + ENVELOPE_OVERHEAD > self.limits.max_message_bytes:
                raise Rejected(
                    RejectionCode.MESSAGE_TOO_LARGE,
                    f"the batch would take about {proposal.ByteSize() + ENVELOPE_OVERHEAD} "
                    f"bytes; at most {self.limits.max_message_bytes}: split it",
                )
            payload = self._send(tx, to_party, proposal, batch_id, now_us)
            self._record_outgoing(
                tx, to_party, outgoing, message_id=proposal.header.message_id, payload=payload,
                expires_us=expires_us, now_us=now_us, batch_id=batch_id,
            )  # fmt: skip
        log.info(
            "batch %s proposed: %d transfers, %d tCO2e to %s", batch_id, len(outgoing),
            sum(o.quantity for o in outgoing), to_party,
            extra={"subject_id": batch_id, "partner": to_party},
        )  # fmt: skip
        return batch_id, [o.transfer_id for o in outgoing]


# What an envelope adds to its payload, at most: the header, the payload type, one
# signature and its key id, and protobuf framing.
ENVELOPE_OVERHEAD = 1024


@dataclass(frozen=True, slots=True)
class BatchItemRequest:
    """One transfer of an operator's batch request (:meth:`Operations.start_transfer_batch`)."""

    authorisation_id: str
    vintage: int
    quantity: int
    # For an onward transfer: the party that authorised the units (empty: this node's).
    host_party: str = ""


# An announcement not answered yet may be recorded by the partner at any time.
_NEVER_ANSWERED = 2**63 - 1


def _acknowledged_at(answer: bytes) -> int:
    """The sent_at of a KeyRotationAcknowledgement (0 for another answer)."""
    sealed = envelope_pb2.Envelope()
    sealed.ParseFromString(answer)
    if sealed.payload_type != type_name(keys_pb2.KeyRotationAcknowledgement):
        return 0
    ack = keys_pb2.KeyRotationAcknowledgement()
    ack.ParseFromString(sealed.payload)
    return timestamp_us(ack.header.sent_at) if ack.header.HasField("sent_at") else 0


def _at_least_as_wide(sealed: bytes, since_us: int | None) -> bool:
    """Whether a revocation of ours, as sealed in the outbox, fells at least what one
    compromised since ``since_us`` fells (None: a retirement, the narrowest): it
    carries a compromise instant no later than that one."""
    if since_us is None:
        return True
    sent = KeyRotation.FromString(sealed_payload(sealed))
    return sent.HasField("compromised_since") and timestamp_us(sent.compromised_since) <= since_us


def _revocation(key_id: str, compromised_since_us: int | None) -> KeyRotation:
    """The KeyRotation that revokes one key of ours (PROTOCOL §5.12)."""
    revocation = KeyRotation(rotation_id=f"revoke-{key_id}", revoked_key_ids=[key_id])
    if compromised_since_us is not None:
        revocation.compromised_since.CopyFrom(timestamp(compromised_since_us))
    return revocation


def _void(tx: Tx, transfer_id: str, reason: str) -> TransferVoid:
    """A void of this node's transfer, with its proposal's ``sent_at``, so that a receiver
    the proposal never reached records its tombstone where the proposal would have placed
    the transfer in a reconciliation snapshot (docs/PROTOCOL.md §5.10 V3, §11.1)."""
    void = TransferVoid(transfer_id=transfer_id, reason=reason)
    proposed_at = tx.transfer_proposed_at(transfer_id)
    if proposed_at is not None:
        void.proposal_sent_at.CopyFrom(timestamp(proposed_at))
    return void
