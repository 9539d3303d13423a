"""Codes not triggered elsewhere: each raised by the check that owns it."""

from __future__ import annotations

from typing import Any

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.node.base import ReplyError
from itmolink.v1 import reply_pb2, transfer_pb2

from .conftest import Pair
from .test_limits import code, deliver, header, proposal


def refused(pair: Pair, envelope: bytes, *, peer: str = "LAO") -> RejectionCode:
    reply = pair.kor.handle_delivery(peer, envelope, pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys["KOR"].verifying_key()]))
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return RejectionCode(rejection.reasons[0].code)


@pytest.fixture
def ready(pair: Pair) -> Pair:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    return pair


def test_unsupported_version(ready: Pair) -> None:
    msg = proposal(ready, header=header(ready, protocol_version=2))
    assert code(deliver(ready, msg)) is RejectionCode.UNSUPPORTED_VERSION


def test_signer_not_peer(ready: Pair) -> None:
    msg = proposal(ready)
    envelope = seal(msg.DESCRIPTOR.full_name, msg.SerializeToString(), ready.keys["LAO"])
    # Signed by LAO, but delivered over a connection authenticated as another party.
    assert refused(ready, envelope, peer="JPN") is RejectionCode.SIGNER_NOT_PEER


def test_sender_mismatch(ready: Pair) -> None:
    msg = proposal(ready, header=header(ready, sender_party="JPN", sender_registry="JPN-NR"))
    assert code(deliver(ready, msg)) is RejectionCode.SENDER_MISMATCH


def test_unknown_payload_type(ready: Pair) -> None:
    envelope = seal("itmolink.v1.NoSuchMessage", b"", ready.keys["LAO"])
    assert refused(ready, envelope) is RejectionCode.UNKNOWN_PAYLOAD_TYPE


def test_malformed_payload(ready: Pair) -> None:
    envelope = seal("itmolink.v1.TransferProposal", b"\xff\xff\xff", ready.keys["LAO"])
    assert refused(ready, envelope) is RejectionCode.MALFORMED_PAYLOAD


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


def test_digest_mismatch(ready: Pair) -> None:
    assert deliver(ready, proposal(ready)) is None  # KOR accepts LAO-T-1
    msg = _completion(ready, transfer_id="LAO-T-1", acceptance_digest=b"not the acceptance")
    assert code(deliver(ready, msg)) is RejectionCode.DIGEST_MISMATCH


def test_sequence_reused(ready: Pair) -> None:
    first = proposal(ready, header=header(ready, sequence=777_777))
    assert deliver(ready, first) is None
    other = proposal(
        ready, header=header(ready, sequence=777_777), transfer_id="LAO-T-2"
    )  # another message id with the same sequence number
    assert code(deliver(ready, other)) is RejectionCode.SEQUENCE_REUSED


def test_transfer_state_conflict_for_a_known_transfer_id(ready: Pair) -> None:
    assert deliver(ready, proposal(ready)) is None
    again = proposal(ready)  # a new message proposing the same transfer id
    assert code(deliver(ready, again)) is RejectionCode.TRANSFER_STATE_CONFLICT


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
