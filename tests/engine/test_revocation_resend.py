"""A revocation a partner refused is sent again at the next start unless that
partner has one at least as wide on its way or acknowledged (PROTOCOL §5.12;
SECURITY §9, formerly known problem 8): an acknowledged retirement does not tell a
partner of a later compromise instant."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import sealed_payload
from itmolink.crypto.keys import SigningKey
from itmolink.node.convert import timestamp_us, to_us
from itmolink.v1 import keys_pb2

from .conftest import Pair
from .test_key_revocation_reach import _announce, _rotate, _signs_at_kor

OUTAGE = 31 * 86_400  # longer than max_message_age: a delivery sealed before it is refused


def _refused_by_kor(pair: Pair, send: Callable[[], object]) -> None:
    """Run ``send`` (which queues a revocation for KOR), while KOR is unreachable for
    31 days: the delivery, sealed before the outage, is then refused as too old."""
    reachable = False
    network = pair.network
    pair.network = lambda sender, receiver, envelope: envelope if reachable else None
    send()
    pair.pump()
    pair.advance(OUTAGE)
    reachable = True
    pair.pump()
    pair.network = network
    assert pair.lao.due_messages(pair.now) == []


def _queued(pair: Pair) -> list[tuple[str, list[str], int | None]]:
    """(partner, revoked key ids, compromise instant) of each revocation LAO has due."""
    queued = []
    for _, partner, envelope in pair.lao.due_messages(pair.now):
        sent = keys_pb2.KeyRotation.FromString(sealed_payload(envelope))
        since = timestamp_us(sent.compromised_since) if sent.HasField("compromised_since") else None
        queued.append((partner, list(sent.revoked_key_ids), since))
    return queued


def test_a_wider_revocation_refused_after_an_acknowledged_retirement_is_sent_again(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """LAO retired K1 (KOR acknowledged), then learns that K1 was stolen at T, when
    the thief had announced K3 with it: the revocation with T is refused by KOR (an
    outage). At the next start LAO sends it again, freshly sealed with T, once; K3
    falls at KOR when it arrives; after that acknowledgement nothing is sent."""
    k1, _ = _rotate(pair)
    pair.advance(3_600)
    theft = pair.now
    pair.advance(60)
    k3 = SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    pair.pump()
    assert pair.kor.trust.is_revoked(k1.key_id)
    assert _signs_at_kor(pair, k3) is None  # a retirement: K3 stands
    pair.advance(60)
    with caplog.at_level("ERROR"):
        _refused_by_kor(
            pair, lambda: pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=theft)
        )
    assert any("ALARM" in r.getMessage() and k1.key_id in r.getMessage() for r in caplog.records)
    assert _signs_at_kor(pair, k3) is None

    assert pair.lao.announce_revocations(pair.now) == 1
    assert _queued(pair) == [("KOR", [k1.key_id], to_us(theft))]
    pair.pump()
    assert _signs_at_kor(pair, k3) is RejectionCode.SIGNING_KEY_REVOKED
    assert pair.lao.announce_revocations(pair.now) == 0


def test_a_delivery_on_its_way_must_be_as_wide_to_count(pair: Pair) -> None:
    """LAO's retirement of K1 is still on its way to KOR (never gets through) when
    LAO widens K1's revocation, which KOR refuses: at a start the wider one is sent
    again (the retirement under way does not tell KOR of the instant); at a second
    start nothing is added while that one is on its way."""
    k1, _ = _rotate(pair)
    pair.advance(3_600)
    since = pair.now
    pair.advance(60)

    def refuse(*args: object) -> bytes:
        raise Rejected(RejectionCode.INVALID_FIELD, "not now")

    def retirements_lost(sender: str, receiver: str, envelope: bytes) -> bytes | None:
        sent = keys_pb2.KeyRotation.FromString(sealed_payload(envelope))
        return envelope if sent.HasField("compromised_since") else None

    pair.network = retirements_lost
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    pair.pump()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(pair.kor._request_handlers, "itmolink.v1.KeyRotation", refuse)
        pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)
        pair.pump()
    assert _queued(pair) == []  # the retirement waits for its next attempt
    assert pair.lao.announce_revocations(pair.now) == 1
    assert pair.lao.announce_revocations(pair.now) == 0
    pair.advance(3_600)
    assert sorted(_queued(pair), key=str) == sorted(
        [("KOR", [k1.key_id], None), ("KOR", [k1.key_id], to_us(since))], key=str
    )
    pair.pump()
    assert _signs_at_kor(pair, k1) is RejectionCode.SIGNING_KEY_REVOKED


def test_an_acknowledged_revocation_at_least_as_wide_counts_as_told(pair: Pair) -> None:
    """K1: KOR acknowledged its revocation with T; a later revocation with a later
    instant, and a plain retirement, both narrower, were refused: K1 is not sent
    again. K2: KOR acknowledged its retirement, and refused the revocation with T:
    it is sent again. Then K1's record is set by hand (the ledger keeps the earliest
    instant given, so this pins the direction of the comparison): to an instant
    later than T, KOR's acknowledgement of T is wider and K1 is still not sent; to one
    earlier than T, it is narrower and K1 is sent with the recorded instant."""
    k1, k2 = _rotate(pair)
    pair.advance(3_600)
    _rotate(pair)
    pair.advance(3_600)
    since = pair.now
    pair.advance(60)
    pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)
    pair.lao.revoke_signing_key(k2.key_id, pair.now)
    pair.pump()
    pair.advance(60)
    later = since + dt.timedelta(seconds=60)

    def narrower_revocations() -> None:
        pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=later)
        pair.lao.revoke_signing_key(k1.key_id, pair.now)
        pair.lao.revoke_signing_key(k2.key_id, pair.now, compromised_since=since)

    _refused_by_kor(pair, narrower_revocations)
    with pair.lao.store.transaction() as tx:
        assert {k: s for k, _, _, _, s in tx.revocations()}[k1.key_id] == to_us(since)
    assert pair.lao.announce_revocations(pair.now) == 1
    assert _queued(pair) == [("KOR", [k2.key_id], to_us(since))]
    pair.pump()
    assert pair.lao.announce_revocations(pair.now) == 0

    with pair.lao.store.transaction() as tx:
        tx._exec(
            "UPDATE revoked_keys SET compromised_since = ? WHERE key_id = ?",
            (to_us(later), k1.key_id),
        )
    assert pair.lao.announce_revocations(pair.now) == 0
    with pair.lao.store.transaction() as tx:
        tx._exec(
            "UPDATE revoked_keys SET compromised_since = ? WHERE key_id = ?",
            (to_us(since - dt.timedelta(seconds=1)), k1.key_id),
        )
    assert pair.lao.announce_revocations(pair.now) == 1
    assert _queued(pair) == [("KOR", [k1.key_id], to_us(since - dt.timedelta(seconds=1)))]


def test_a_partner_that_refused_the_keys_announcement_is_still_not_sent_it(pair: Pair) -> None:
    """KOR refused the announcement of K9 and LAO gave K9 up; LAO's operator then
    revoked K9 with a compromise instant, and KOR refused that too: KOR pinned
    nothing, so K9's revocation is not sent to it again. K1 in the same ledger,
    retired with KOR's acknowledgement and then refused wider, is."""
    k1, _ = _rotate(pair)
    pair.advance(3_600)
    since = pair.now
    pair.advance(60)
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    pair.pump()

    def refuse(*args: object) -> bytes:
        raise Rejected(RejectionCode.INVALID_FIELD, "KOR does not want this key")

    k9 = SigningKey.generate("LAO")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(pair.kor._request_handlers, "itmolink.v1.KeyRotation", refuse)
        pair.lao.rotate_signing_key(k9, pair.now)
        pair.pump()
    assert pair.lao.cancel_key_rotation(pair.now) == k9.key_id
    assert pair.lao.due_messages(pair.now) == []
    pair.advance(60)

    def revocations_with_an_instant() -> None:
        pair.lao.revoke_signing_key(k9.key_id, pair.now, compromised_since=since)
        pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)

    _refused_by_kor(pair, revocations_with_an_instant)
    assert pair.lao.announce_revocations(pair.now) == 1
    assert _queued(pair) == [("KOR", [k1.key_id], to_us(since))]
