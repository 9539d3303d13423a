"""Codes not triggered elsewhere: each raised by the check that owns it."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import ReplyError, digest
from itmolink.v1 import codes_pb2, reply_pb2, transfer_pb2

from .conftest import Pair
from .test_limits import code, deliver, header, proposal


def refused(pair: Pair, envelope: bytes, *, peer: str = "LAO") -> RejectionCode:
    return RejectionCode(rejection_of(pair, envelope, peer=peer).reasons[0].code)


def rejection_of(pair: Pair, envelope: bytes, *, peer: str = "LAO") -> reply_pb2.Rejection:
    """KOR's answer to ``envelope`` delivered by ``peer``: a Rejection, or the test fails.
    The refusal must be unrecorded (PROTOCOL §5.2 D1b to D8a): sequence 0, bound to the
    envelope by its digest, and KOR's journal and transfers as they were."""
    before = _ledger(pair.kor)
    reply = pair.kor.handle_delivery(peer, envelope, pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    assert verified.payload_type == "itmolink.v1.Rejection"
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    assert rejection.header.sequence == 0
    assert rejection.envelope_digest == hashlib.sha256(envelope).digest()
    assert _ledger(pair.kor) == before
    return rejection


def _ledger(engine: Any) -> tuple[int, list[Any]]:
    with engine.store.transaction() as tx:
        return sum(1 for _ in tx.journal_entries()), tx.transfers()


@pytest.fixture
def ready(pair: Pair) -> Pair:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    return pair


def _sealed(pair: Pair, msg: Any, party: str = "LAO") -> bytes:
    return seal(msg.DESCRIPTOR.full_name, msg.SerializeToString(), pair.keys[party])


def test_unsupported_version(ready: Pair) -> None:
    msg = proposal(ready, header=header(ready, protocol_version=2))
    assert code(deliver(ready, msg)) is RejectionCode.UNSUPPORTED_VERSION


def test_signer_not_peer(ready: Pair) -> None:
    envelope = _sealed(ready, proposal(ready))
    # Signed by LAO, but delivered over a connection authenticated as another party.
    rejection = rejection_of(ready, envelope, peer="JPN")
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SIGNER_NOT_PEER
    # D3 comes before the payload is read: no id of it is echoed (PROTOCOL §5.2).
    assert (rejection.header.in_reply_to, rejection.subject_id) == ("", "")
    assert rejection.header.audience == "JPN"  # the TLS peer party
    # The same envelope over LAO's own connection is accepted.
    assert deliver(ready, proposal(ready, header=header(ready))) is None


def test_sender_mismatch(ready: Pair) -> None:
    msg = proposal(ready, header=header(ready, sender_party="JPN", sender_registry="JPN-NR"))
    envelope = _sealed(ready, msg)
    rejection = rejection_of(ready, envelope)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SENDER_MISMATCH
    # D6 follows the field rules: the id of a well-formed payload is echoed.
    assert rejection.header.in_reply_to == msg.header.message_id
    assert rejection.subject_id == "LAO-T-1"


@pytest.mark.parametrize(
    "payload_type",
    ["itmolink.v1.NoSuchMessage", "itmolink.v1.TransferAcceptance", "itmolink.v1.Rejection",
     "itmolink.v2.TransferProposal"],
)  # fmt: skip
def test_unknown_payload_type(ready: Pair, payload_type: str) -> None:
    """Replies sent as requests and other protocol versions are no requests (D4)."""
    envelope = seal(payload_type, proposal(ready).SerializeToString(), ready.keys["LAO"])
    rejection = rejection_of(ready, envelope)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.UNKNOWN_PAYLOAD_TYPE
    assert (rejection.header.in_reply_to, rejection.subject_id) == ("", "")


def test_malformed_payload(ready: Pair) -> None:
    envelope = seal("itmolink.v1.TransferProposal", b"\xff\xff\xff", ready.keys["LAO"])
    rejection = rejection_of(ready, envelope)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.MALFORMED_PAYLOAD
    assert (rejection.header.in_reply_to, rejection.subject_id) == ("", "")


def test_invalid_utf8_in_a_string_field_is_a_malformed_payload(ready: Pair) -> None:
    payload = bytearray(proposal(ready).SerializeToString())
    at = payload.index(b"LAO-T-1")
    payload[at : at + 3] = b"\xc3\x28X"  # an invalid UTF-8 sequence in transfer_id
    envelope = seal("itmolink.v1.TransferProposal", bytes(payload), ready.keys["LAO"])
    rejection = rejection_of(ready, envelope)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.MALFORMED_PAYLOAD


def test_unknown_partner(ready: Pair) -> None:
    with pytest.raises(Rejected) as caught:
        ready.lao.start_transfer(
            to_party="CHE", authorisation_id="LAO-A-0001", vintage=2025, quantity=1,
            now=ready.now,
        )  # fmt: skip
    assert caught.value.code is RejectionCode.UNKNOWN_PARTNER


def _completion(pair: Pair, **fields: Any) -> transfer_pb2.TransferCompletion:
    return transfer_pb2.TransferCompletion(header=header(pair), **fields)


def test_unknown_transfer(ready: Pair) -> None:
    msg = _completion(ready, transfer_id="LAO-T-404", acceptance_digest=b"x" * 32)
    assert code(deliver(ready, msg)) is RejectionCode.UNKNOWN_TRANSFER


def _accepted(pair: Pair, msg: transfer_pb2.TransferProposal) -> bytes:
    """Deliver a proposal KOR accepts; the digest of KOR's acceptance payload."""
    reply = pair.kor.handle_delivery("LAO", _sealed(pair, msg), pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    assert verified.payload_type == "itmolink.v1.TransferAcceptance"
    return digest(verified.payload)


def _state(pair: Pair, transfer_id: str) -> TransferState | None:
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    return None if record is None else record.state


def _held_by_kor(pair: Pair) -> list[str]:
    with pair.kor.store.transaction() as tx:
        return [h.block.label() for h in tx.holdings() if h.status == "held"]


def test_digest_mismatch(ready: Pair) -> None:
    """C2: a completion that names another acceptance completes nothing; the
    right digest then does."""
    acceptance = _accepted(ready, proposal(ready))  # KOR accepts LAO-T-1
    msg = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=b"not the acceptance")
    rejection = deliver(ready, msg)
    assert code(rejection) is RejectionCode.DIGEST_MISMATCH
    assert rejection is not None
    assert rejection.header.sequence > 0  # D10: recorded
    assert rejection.header.in_reply_to == msg.header.message_id
    assert _state(ready, "LAO-T-1") is TransferState.ACCEPTED
    assert _held_by_kor(ready) == []
    right = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=acceptance)
    assert deliver(ready, right) is None
    assert _state(ready, "LAO-T-1") is TransferState.COMPLETED
    assert len(_held_by_kor(ready)) == 1


def test_sequence_reused(ready: Pair) -> None:
    first = proposal(ready, header=header(ready, sequence=777_777))
    assert deliver(ready, first) is None
    block = proposal(ready).blocks[0]
    block.serial_start, block.serial_end = 11, 20
    other = proposal(
        ready, header=header(ready, sequence=777_777), transfer_id="LAO-T-2", blocks=[block]
    )  # another message id with the same sequence number
    envelope = _sealed(ready, other)
    rejection = rejection_of(ready, envelope)  # unrecorded (D8)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SEQUENCE_REUSED
    assert rejection.header.in_reply_to == other.header.message_id
    assert _state(ready, "LAO-T-2") is None  # not even recorded as rejected
    with ready.kor.store.transaction() as tx:
        assert tx.inbox_get("LAO", other.header.message_id) is None
    # The sequence's owner, delivered again, still gets its stored reply.
    assert deliver(ready, first) is None
    # And the refused message with a fresh sequence number is accepted.
    other.header.sequence = 777_778
    assert deliver(ready, other) is None
    assert _state(ready, "LAO-T-2") is TransferState.ACCEPTED


def test_transfer_state_conflict_for_a_known_transfer_id(ready: Pair) -> None:
    """T2: a new message proposing a transfer id KOR knows, even with other
    blocks, is refused (recorded) and leaves the known transfer as it was."""
    assert deliver(ready, proposal(ready)) is None
    with ready.kor.store.transaction() as tx:
        before = tx.transfer_get("LAO-T-1")
        blocks_before = tx.blocks_of_transfer("LAO-T-1")
    assert before is not None
    block = proposal(ready).blocks[0]
    block.serial_start, block.serial_end = 11, 20
    again = proposal(ready, blocks=[block])  # a new message id, the same transfer id
    rejection = deliver(ready, again)
    assert code(rejection) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert rejection is not None
    assert rejection.header.sequence > 0  # refused at D10: recorded
    with ready.kor.store.transaction() as tx:
        assert tx.transfer_get("LAO-T-1") == before
        assert tx.blocks_of_transfer("LAO-T-1") == blocks_before
        assert tx.inbox_get("LAO", again.header.message_id) is not None


@pytest.mark.parametrize("how", ["voided", "rejected"])
def test_a_transfer_id_that_ended_cannot_be_proposed_again(ready: Pair, how: str) -> None:
    """T2 for ids of transfers that ended at KOR: a void tombstone, or a proposal
    KOR refused (recorded REJECTED, PROTOCOL §5.2 D10)."""
    if how == "voided":
        void = transfer_pb2.TransferVoid(header=header(ready), transfer_id="LAO-T-9", reason="x")
        assert deliver(ready, void) is None  # unknown: a tombstone
        assert _state(ready, "LAO-T-9") is TransferState.VOIDED
    else:
        wrong = proposal(ready, transfer_id="LAO-T-9", quantity=11)  # blocks add up to 10
        assert code(deliver(ready, wrong)) is RejectionCode.QUANTITY_MISMATCH
        assert _state(ready, "LAO-T-9") is TransferState.REJECTED
    rejection = deliver(ready, proposal(ready, transfer_id="LAO-T-9"))
    assert code(rejection) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert _state(ready, "LAO-T-9") in (TransferState.VOIDED, TransferState.REJECTED)


def test_a_completion_of_a_transfer_that_ended_is_a_state_conflict(ready: Pair) -> None:
    """C4: a completion for a VOIDED transfer credits nothing."""
    acceptance = _accepted(ready, proposal(ready))
    void = transfer_pb2.TransferVoid(header=header(ready), transfer_id="LAO-T-1", reason="late")
    assert deliver(ready, void) is None
    assert _state(ready, "LAO-T-1") is TransferState.VOIDED
    late = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=acceptance)
    assert code(deliver(ready, late)) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert _state(ready, "LAO-T-1") is TransferState.VOIDED
    assert _held_by_kor(ready) == []


def test_a_completion_of_a_rejected_transfer_is_a_state_conflict(ready: Pair) -> None:
    """C4 for a REJECTED transfer: it has no acceptance, so only a completion naming
    none (an empty digest) passes C2 and reaches C4; any other digest fails C2."""
    wrong = proposal(ready, quantity=11)  # blocks add up to 10: refused, recorded REJECTED
    assert code(deliver(ready, wrong)) is RejectionCode.QUANTITY_MISMATCH
    named = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=digest(b"x"))
    assert code(deliver(ready, named)) is RejectionCode.DIGEST_MISMATCH
    empty = _completion(ready, transfer_id="LAO-T-1")
    assert code(deliver(ready, empty)) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert _state(ready, "LAO-T-1") is TransferState.REJECTED
    assert _held_by_kor(ready) == []


def test_a_void_of_a_completed_transfer_is_a_state_conflict(ready: Pair) -> None:
    """V4: units credited by a completion are not taken back by a void."""
    acceptance = _accepted(ready, proposal(ready))
    completion = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=acceptance)
    assert deliver(ready, completion) is None
    void = transfer_pb2.TransferVoid(header=header(ready), transfer_id="LAO-T-1", reason="late")
    assert code(deliver(ready, void)) is RejectionCode.TRANSFER_STATE_CONFLICT
    assert _state(ready, "LAO-T-1") is TransferState.COMPLETED
    assert len(_held_by_kor(ready)) == 1


def _journal_size(engine: Any) -> int:
    with engine.store.transaction() as tx:
        return sum(1 for _ in tx.journal_entries())


def test_a_request_reusing_the_id_of_a_journaled_reply_is_refused_unrecorded(
    ready: Pair,
) -> None:
    # KOR's journal holds a reply from LAO with this message id (as if KOR had asked).
    with ready.kor.store.transaction() as tx:
        tx.journal(
            direction="in", partner="LAO", message_id="taken-id",
            payload_type="itmolink.v1.KeyRotationAcknowledgement", envelope=b"reply", now=1,
        )  # fmt: skip
    size = _journal_size(ready.kor)
    rejection = deliver(ready, proposal(ready, header=header(ready, message_id="taken-id")))
    assert code(rejection) is RejectionCode.DUPLICATE_MESSAGE_CONFLICT
    assert rejection is not None
    assert "already used by another message" in rejection.reasons[0].detail
    assert _journal_size(ready.kor) == size  # neither the request nor the rejection
    with ready.kor.store.transaction() as tx:
        assert tx.transfer_get("LAO-T-1") is None
        assert tx.inbox_get("LAO", "taken-id") is None


def test_a_reply_reusing_a_journaled_message_id_is_not_applied(ready: Pair) -> None:
    ready.lao.start_transfer(
        to_party="KOR", authorisation_id="LAO-A-0001", vintage=2025, quantity=5, now=ready.now
    )
    [(message_id, _, envelope)] = ready.lao.due_messages(ready.now)
    reply = ready.kor.handle_delivery("LAO", envelope, ready.now)
    payload = open_envelope(reply, TrustStore([ready.keys["KOR"].verifying_key()])).payload
    acceptance = transfer_pb2.TransferAcceptance()
    acceptance.ParseFromString(payload)
    with ready.lao.store.transaction() as tx:  # LAO's journal already has that id from KOR
        tx.journal(
            direction="in", partner="KOR", message_id=acceptance.header.message_id,
            payload_type="itmolink.v1.TransferAcceptance", envelope=b"other", now=1,
        )  # fmt: skip
    size = _journal_size(ready.lao)
    with pytest.raises(ReplyError) as caught:
        ready.lao.handle_reply(message_id, reply, ready.now)
    assert caught.value.code is RejectionCode.DUPLICATE_MESSAGE_CONFLICT
    assert _journal_size(ready.lao) == size
    with ready.lao.store.transaction() as tx:
        outbox = tx.outbox_get(message_id)
        assert outbox is not None
        assert outbox.state == "pending"  # retried later; nothing applied


def test_inbox_lookup_finds_the_message_and_the_sequence_owner(ready: Pair) -> None:
    assert (
        deliver(ready, proposal(ready, header=header(ready, message_id="m-1", sequence=901)))
        is None
    )
    with ready.kor.store.transaction() as tx:
        seen, owner = tx.inbox_lookup("LAO", "m-1", 901)
        assert seen is not None
        assert (seen.message_id, owner) == ("m-1", "m-1")
        seen, owner = tx.inbox_lookup("LAO", "m-2", 901)
        assert (seen, owner) == (None, "m-1")
        seen, owner = tx.inbox_lookup("LAO", "m-1", 902)
        assert seen is not None
        assert owner is None
        assert tx.inbox_lookup("LAO", "m-2", 902) == (None, None)
        assert tx.inbox_lookup("JPN", "m-1", 901) == (None, None)


# -- the requester's checks of a reply (PROTOCOL §5.3): requester-local, never sent --


def _proposal_and_reply(pair: Pair) -> tuple[str, bytes, bytes, transfer_pb2.TransferAcceptance]:
    """LAO proposes LAO-T-000001; (its message id, its envelope, KOR's acceptance
    envelope, the acceptance)."""
    pair.lao.start_transfer(
        to_party="KOR", authorisation_id="LAO-A-0001", vintage=2025, quantity=5, now=pair.now
    )
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    acceptance = transfer_pb2.TransferAcceptance()
    acceptance.ParseFromString(verified.payload)
    return message_id, envelope, reply, acceptance


def _refused_reply(pair: Pair, message_id: str, reply: bytes) -> RejectionCode:
    """LAO refuses ``reply``: nothing journaled, the proposal still pending."""
    size = _journal_size(pair.lao)
    with pytest.raises(ReplyError) as caught:
        pair.lao.handle_reply(message_id, reply, pair.now)
    assert _journal_size(pair.lao) == size
    with pair.lao.store.transaction() as tx:
        outbox = tx.outbox_get(message_id)
        assert outbox is not None
        assert outbox.state == "pending"
        record = tx.transfer_get(outbox.subject_id)
        assert record is not None
        assert record.state is TransferState.PROPOSED
    return caught.value.code


def _then_the_real_reply_applies(pair: Pair, message_id: str, reply: bytes) -> None:
    pair.lao.handle_reply(message_id, reply, pair.now)
    with pair.lao.store.transaction() as tx:
        outbox = tx.outbox_get(message_id)
        assert outbox is not None
        assert outbox.state != "pending"
        record = tx.transfer_get(outbox.subject_id)
        assert record is not None
        assert record.state is TransferState.COMPLETED


def test_a_reply_signed_by_a_pinned_third_party_is_signer_not_peer(ready: Pair) -> None:
    """P3: JPN's key is pinned at LAO, so its signature verifies, but JPN is not
    the partner the proposal went to."""
    jpn = SigningKey.generate("JPN")
    ready.lao.trust.add(jpn.verifying_key())
    message_id, _, reply, acceptance = _proposal_and_reply(ready)
    forged = _sealed_msg(acceptance, jpn)
    assert _refused_reply(ready, message_id, forged) is RejectionCode.SIGNER_NOT_PEER
    _then_the_real_reply_applies(ready, message_id, reply)


def _sealed_msg(msg: Any, key: SigningKey) -> bytes:
    return seal(msg.DESCRIPTOR.full_name, msg.SerializeToString(), key)


def test_a_reply_naming_another_sender_is_sender_mismatch(ready: Pair) -> None:
    """P6: signed by KOR, but its header names JPN as the sender."""
    message_id, _, reply, acceptance = _proposal_and_reply(ready)
    acceptance.header.sender_party, acceptance.header.sender_registry = "JPN", "JPN-NR"
    forged = _sealed_msg(acceptance, ready.keys["KOR"])
    assert _refused_reply(ready, message_id, forged) is RejectionCode.SENDER_MISMATCH
    _then_the_real_reply_applies(ready, message_id, reply)


def test_a_reply_that_does_not_parse_is_a_malformed_payload(ready: Pair) -> None:
    """P5: the reply type is right, its payload is not a message of it."""
    message_id, _, reply, _ = _proposal_and_reply(ready)
    forged = seal("itmolink.v1.TransferAcceptance", b"\xff\xff\xff", ready.keys["KOR"])
    assert _refused_reply(ready, message_id, forged) is RejectionCode.MALFORMED_PAYLOAD
    _then_the_real_reply_applies(ready, message_id, reply)


@pytest.mark.parametrize("change", ["transfer_id", "proposal_digest"])
def test_an_acceptance_of_another_proposal_is_a_digest_mismatch(ready: Pair, change: str) -> None:
    """P8 (§5.8): an acceptance naming another transfer, or the digest of another
    proposal, is not applied: nothing moves at LAO, and the proposal waits."""
    message_id, _, reply, acceptance = _proposal_and_reply(ready)
    if change == "transfer_id":
        acceptance.transfer_id = "LAO-T-000002"
    else:
        acceptance.proposal_digest = digest(b"another proposal")
    acceptance.header.message_id = "KOR-forged-acceptance"
    forged = _sealed_msg(acceptance, ready.keys["KOR"])
    with ready.lao.store.transaction() as tx:
        holdings = tx.holdings()
    assert _refused_reply(ready, message_id, forged) is RejectionCode.DIGEST_MISMATCH
    with ready.lao.store.transaction() as tx:
        assert tx.holdings() == holdings  # the reserved units did not leave
    _then_the_real_reply_applies(ready, message_id, reply)


def _kor_rejection(pair: Pair, rejection: reply_pb2.Rejection, in_reply_to: str = "") -> bytes:
    """``rejection`` with an unrecorded header of KOR's, sealed by KOR."""
    rejection.header.CopyFrom(
        header(
            pair, sender_party="KOR", sender_registry="KOR-NR", audience="LAO", sequence=0,
            in_reply_to=in_reply_to,
        )
    )  # fmt: skip
    return _sealed_msg(rejection, pair.keys["KOR"])


@pytest.mark.parametrize(
    "case",
    ["acceptance answering another message", "rejection without digest answering another",
     "rejection with the right digest answering another", "rejection with neither",
     "rejection with another envelope's digest"],
)  # fmt: skip
def test_a_reply_that_does_not_answer_the_request_is_unexpected(ready: Pair, case: str) -> None:
    """P7 step 1: a reply is bound to the request by in_reply_to, or a Rejection by
    the digest of the envelope sent (and then an in_reply_to that is empty or right)."""
    message_id, envelope, reply, acceptance = _proposal_and_reply(ready)
    reason = codes_pb2.RejectionReason(code=RejectionCode.INVALID_FIELD, detail="x")  # type: ignore[arg-type]
    rejection = reply_pb2.Rejection(subject_id="LAO-T-000001", reasons=[reason])
    if case == "acceptance answering another message":
        acceptance.header.in_reply_to = "LAO-msg-999"
        acceptance.header.message_id = "KOR-forged"
        forged = _sealed_msg(acceptance, ready.keys["KOR"])
    elif case == "rejection without digest answering another":
        forged = _kor_rejection(ready, rejection, in_reply_to="LAO-msg-999")
    elif case == "rejection with the right digest answering another":
        rejection.envelope_digest = digest(envelope)
        forged = _kor_rejection(ready, rejection, in_reply_to="LAO-msg-999")
    elif case == "rejection with neither":
        forged = _kor_rejection(ready, rejection)
    else:  # the right id does not save a rejection of another envelope
        rejection.envelope_digest = digest(b"another envelope")
        forged = _kor_rejection(ready, rejection, in_reply_to=message_id)
    assert _refused_reply(ready, message_id, forged) is RejectionCode.UNEXPECTED_REPLY
    _then_the_real_reply_applies(ready, message_id, reply)


def test_a_rejection_bound_by_its_digest_alone_applies(ready: Pair) -> None:
    """The counterpart of the case above: the right digest and an empty in_reply_to
    bind an (unrecorded) Rejection to the proposal, which is then rejected."""
    message_id, envelope, _, _ = _proposal_and_reply(ready)
    reason = codes_pb2.RejectionReason(code=RejectionCode.INVALID_FIELD, detail="x")  # type: ignore[arg-type]
    rejection = reply_pb2.Rejection(reasons=[reason], envelope_digest=digest(envelope))
    ready.lao.handle_reply(message_id, _kor_rejection(ready, rejection), ready.now)
    with ready.lao.store.transaction() as tx:
        record = tx.transfer_get("LAO-T-000001")
        assert record is not None
        assert record.state is TransferState.REJECTED


def test_a_reply_without_a_message_id_is_not_applied(ready: Pair) -> None:
    """P7 step 2 asks for a non-empty reply message id (it is journaled under it);
    the field rules (P5a, §4.1) find an empty one first: 2003, not 5001."""
    message_id, _, reply, acceptance = _proposal_and_reply(ready)
    acceptance.header.message_id = ""
    forged = _sealed_msg(acceptance, ready.keys["KOR"])
    assert _refused_reply(ready, message_id, forged) is RejectionCode.MISSING_FIELD
    _then_the_real_reply_applies(ready, message_id, reply)


# -- fixed since the first version (docs/SECURITY.md §9) -------------------------------


@pytest.mark.parametrize(
    "broken",
    ["a message id with a control character", "a vintage out of bounds", "an audience in "
     "lower case", "a transfer id too long"],
)  # fmt: skip
def test_a_rejection_echoes_no_id_of_a_payload_that_failed_the_field_rules(
    ready: Pair, broken: str
) -> None:
    """D5a (PROTOCOL §5.2): in_reply_to and subject_id are set only once the payload
    passed the field rules, so a malformed id is never echoed back."""
    msg = proposal(ready)
    if broken == "a message id with a control character":
        msg.header.message_id = "bad\x07id"
    elif broken == "a vintage out of bounds":
        msg.blocks[0].vintage = 1800
    elif broken == "an audience in lower case":
        msg.header.audience = "kor"
    else:
        msg.transfer_id = "LAO-" + "T" * 200
    envelope = _sealed(ready, msg)
    rejection = rejection_of(ready, envelope)  # unrecorded
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.INVALID_FIELD
    assert rejection.header.in_reply_to == ""
    assert rejection.subject_id == ""
    # The same payload with the field put right gets its id echoed (here at D6).
    good = proposal(ready, header=header(ready, audience="JPN"))
    rejection = rejection_of(ready, _sealed(ready, good))
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.WRONG_AUDIENCE
    assert (rejection.header.in_reply_to, rejection.subject_id) == (
        good.header.message_id, "LAO-T-1"
    )  # fmt: skip


def test_a_recorded_request_retried_after_the_window_gets_its_stored_reply(
    ready: Pair,
) -> None:
    """D7 before D7a: the sent_at window applies to requests not recorded yet only,
    so a request retried long after it was sent is answered as it was the first
    time, while a new one as old is refused with 5003."""
    msg = proposal(ready)
    envelope = _sealed(ready, msg)
    first = ready.kor.handle_delivery("LAO", envelope, ready.now)
    ready.advance(ready.kor.limits.max_message_age.total_seconds() + 3600)
    assert ready.kor.handle_delivery("LAO", envelope, ready.now) == first
    stale = proposal(
        ready, transfer_id="LAO-T-2",
        header=header(ready, sent_at=msg.header.sent_at),
    )  # fmt: skip
    rejection = rejection_of(ready, _sealed(ready, stale))
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SENT_AT_OUT_OF_WINDOW
