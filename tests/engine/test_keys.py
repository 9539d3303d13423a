"""Signing keys: validity windows, rotation announced in-band, revocation."""

from __future__ import annotations

import datetime as dt

import pytest

from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.v1 import keys_pb2, reply_pb2

from ..conftest import Databases
from .conftest import START, Pair
from .test_limits import deliver, proposal


def code_of(reply: bytes, key: SigningKey) -> RejectionCode | None:
    verified = open_envelope(reply, TrustStore([key.verifying_key()]))
    if verified.payload_type != "itmolink.v1.Rejection":
        return None
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return RejectionCode(rejection.reasons[0].code)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"not_after": START - dt.timedelta(days=1)}, RejectionCode.SIGNING_KEY_EXPIRED),
        ({"not_before": START + dt.timedelta(days=1)}, RejectionCode.SIGNING_KEY_NOT_YET_VALID),
        ({"not_before": START - dt.timedelta(days=1), "not_after": START + dt.timedelta(days=1)},
         None),
    ],
    ids=["expired", "not-yet-valid", "valid"],
)  # fmt: skip
def test_a_key_outside_its_validity_window_signs_nothing(
    databases: Databases, window: dict[str, dt.datetime], expected: RejectionCode | None
) -> None:
    lao, kor = SigningKey.generate("LAO"), SigningKey.generate("KOR")
    engine = Engine(
        party="KOR", registry="KOR-NR", signing_key=kor,
        trust=TrustStore([lao.verifying_key(**window)]),
        partners=[Partner("LAO", "LAO-NR", "x")],
        store=databases.open("KOR"),
    )  # fmt: skip
    pair = Pair(lao=engine, kor=engine, keys={"LAO": lao, "KOR": kor})
    query = proposal(pair)
    envelope = seal(query.DESCRIPTOR.full_name, query.SerializeToString(), lao)
    assert code_of(engine.handle_delivery("LAO", envelope, START), kor) in (
        {expected} if expected else {None, RejectionCode.UNKNOWN_AUTHORISATION}
    )
    engine.store.close()


def test_a_rotated_key_is_announced_acknowledged_then_used(pair: Pair) -> None:
    old = pair.lao.signing_key
    new = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(new, pair.now)
    assert pair.lao.signing_key is old  # still signing with the old key until KOR has the new
    assert pair.lao.pending_key is new
    pair.pump()
    assert pair.lao.signing_key is new
    assert pair.lao.pending_key is None
    assert pair.kor.trust.get(new.key_id) is not None

    authorisation_id = pair.authorise()  # signed with the new key, verified by KOR
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=10, now=pair.now)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.COMPLETED

    # The old key is then revoked everywhere: nothing it signs is accepted.
    pair.lao.revoke_signing_key(old.key_id, pair.now)
    pair.pump()
    pair.keys["LAO"] = old
    rejection = deliver(pair, proposal(pair))
    assert rejection is not None
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SIGNING_KEY_REVOKED


def test_learned_keys_and_revocations_survive_a_restart(pair: Pair) -> None:
    new = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(new, pair.now)
    pair.pump()
    pair.lao.revoke_signing_key(pair.keys["LAO"].key_id, pair.now)
    pair.pump()
    restarted = Engine(
        party="KOR", registry="KOR-NR", signing_key=pair.keys["KOR"],
        trust=TrustStore([pair.keys["LAO"].verifying_key()]),  # only the card's (old) key
        partners=[Partner("LAO", "LAO-NR", "x")], store=pair.kor.store,
    )  # fmt: skip
    assert restarted.trust.get(new.key_id) is not None
    assert restarted.trust.is_revoked(pair.keys["LAO"].key_id)


def test_the_signing_key_cannot_be_revoked_before_a_rotation(pair: Pair) -> None:
    from itmolink.core.codes import Rejected

    with pytest.raises(Rejected) as caught:
        pair.lao.revoke_signing_key(pair.lao.signing_key.key_id, pair.now)
    assert caught.value.code is RejectionCode.INVALID_FIELD


def test_a_partner_cannot_revoke_someone_elses_key(pair: Pair) -> None:
    rotation = keys_pb2.KeyRotation(rotation_id="evil", revoked_key_ids=[pair.keys["KOR"].key_id])
    rejection = deliver(pair, _with_header(pair, rotation))
    assert rejection is not None
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.INVALID_FIELD
    assert not pair.kor.trust.is_revoked(pair.keys["KOR"].key_id)


def test_an_operator_can_revoke_a_partners_key_reported_stolen(pair: Pair) -> None:
    pair.kor.revoke_signing_key(pair.keys["LAO"].key_id, pair.now, partner="LAO")
    rejection = deliver(pair, proposal(pair))
    assert rejection is not None
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SIGNING_KEY_REVOKED


def _with_header(pair: Pair, msg: keys_pb2.KeyRotation) -> keys_pb2.KeyRotation:
    from .test_limits import header

    msg.header.CopyFrom(header(pair))
    return msg


def test_a_refused_rotation_can_be_given_up_and_another_key_rotated_to(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    from itmolink.core.codes import Rejected

    def refuse(*args: object) -> bytes:
        raise Rejected(RejectionCode.INVALID_FIELD, "KOR's operator does not want this key")

    monkeypatch.setitem(pair.kor._request_handlers, "itmolink.v1.KeyRotation", refuse)
    old = pair.lao.signing_key
    refused = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(refused, pair.now)
    pair.pump()
    assert pair.lao.signing_key is old
    with pytest.raises(Rejected) as caught:  # stuck: one rotation at a time
        pair.lao.rotate_signing_key(SigningKey.generate("LAO"), pair.now)
    assert caught.value.code is RejectionCode.INVALID_FIELD
    monkeypatch.undo()

    assert pair.lao.cancel_key_rotation(pair.now) == refused.key_id
    assert pair.lao.pending_key is None
    assert pair.lao.due_messages(pair.now) == []  # KOR refused it: nothing to revoke there
    with pytest.raises(Rejected):
        pair.lao.cancel_key_rotation(pair.now)  # nothing pending any more
    newer = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(newer, pair.now)
    pair.pump()
    assert pair.lao.signing_key is newer


def test_a_revocation_that_overtakes_a_given_up_announcement_keeps_the_key_revoked(
    pair: Pair,
) -> None:
    """The announcement is on its way (claimed, not answered) when the operator gives
    the key up: the revocation reaches KOR first, then the announcement; the key ends
    up pinned but revoked there, so nothing it signs is accepted."""
    given_up = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(given_up, pair.now)
    [(_, _, announcement)] = pair.lao.due_messages(pair.now)
    assert pair.lao.cancel_key_rotation(pair.now) == given_up.key_id
    [(revocation_id, _, revocation)] = pair.lao.due_messages(pair.now)  # not the cancelled one
    assert b"revoke-" in revocation
    reply = pair.kor.handle_delivery("LAO", revocation, pair.now)
    pair.lao.handle_reply(revocation_id, reply, pair.now)
    assert code_of(reply, pair.keys["KOR"]) is None  # acknowledged, although not pinned yet
    assert (
        code_of(pair.kor.handle_delivery("LAO", announcement, pair.now), pair.keys["KOR"]) is None
    )
    assert pair.kor.trust.get(given_up.key_id) is not None
    assert pair.kor.trust.is_revoked(given_up.key_id)
    pair.keys["LAO"] = given_up
    rejection = deliver(pair, proposal(pair))
    assert rejection is not None
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.SIGNING_KEY_REVOKED


def test_a_partner_can_revoke_only_key_ids_of_its_own_form(pair: Pair) -> None:
    for key_id in ("KOR-ed25519-0123456789abcdef", "LAO-ed25519-0123", "LAO-ed25519-XYZ"):
        rotation = keys_pb2.KeyRotation(rotation_id=f"r-{key_id}", revoked_key_ids=[key_id])
        rejection = deliver(pair, _with_header(pair, rotation))
        assert rejection is not None, key_id
        assert RejectionCode(rejection.reasons[0].code) is RejectionCode.INVALID_FIELD


def test_revocations_of_keys_never_announced_are_bounded(pair: Pair) -> None:
    """KR3 keeps a revocation of a key not pinned yet, but one at a time and at most
    MAX_UNPINNED_REVOCATIONS per partner: a partner cannot fill the table."""
    from itmolink.node.requests import MAX_UNPINNED_REVOCATIONS

    def revoke(*key_ids: str) -> reply_pb2.Rejection | None:
        rotation = keys_pb2.KeyRotation(rotation_id=f"r-{key_ids[0]}", revoked_key_ids=key_ids)
        return deliver(pair, _with_header(pair, rotation))

    ids = [SigningKey.generate("LAO").key_id for _ in range(MAX_UNPINNED_REVOCATIONS + 1)]
    two = revoke(ids[0], ids[1])
    assert two is not None
    assert RejectionCode(two.reasons[0].code) is RejectionCode.INVALID_FIELD
    for key_id in ids[:-1]:
        assert revoke(key_id) is None
    assert revoke(ids[0]) is None  # already revoked: nothing new kept
    over = revoke(ids[-1])
    assert over is not None
    assert RejectionCode(over.reasons[0].code) is RejectionCode.INVALID_FIELD
    pair.kor.reload_trust()
    assert not pair.kor.trust.is_revoked(ids[-1])
    assert all(pair.kor.trust.is_revoked(key_id) for key_id in ids[:-1])
