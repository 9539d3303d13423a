"""A rotated key is announced valid from the sender's clock minus max_clock_skew
(PROTOCOL §3.8), so a partner whose clock lags, by less than the skew, accepts the
first messages signed with it."""

from __future__ import annotations

import datetime as dt

from itmolink.core.transfer import TransferState
from itmolink.crypto.envelope import TrustStore, open_envelope
from itmolink.crypto.keys import SigningKey
from itmolink.v1 import keys_pb2

from .conftest import Pair

LAG = dt.timedelta(seconds=200)  # KOR's clock, behind LAO's; max_clock_skew is 300 s


def _pump_with_kor_behind(pair: Pair) -> int:
    """Pair.pump, but KOR reads its clock LAG behind LAO's."""
    clocks = {"LAO": pair.now, "KOR": pair.now - LAG}
    delivered = 0
    for _ in range(20):
        moved = False
        for sender, receiver in (("LAO", "KOR"), ("KOR", "LAO")):
            engine = pair.engine(sender)
            for message_id, _, envelope in engine.due_messages(clocks[sender]):
                reply = pair.engine(receiver).handle_delivery(sender, envelope, clocks[receiver])
                engine.handle_reply(message_id, reply, clocks[sender])
                moved = True
                delivered += 1
        if not moved:
            break
    return delivered


def test_a_partner_whose_clock_lags_accepts_the_rotated_key_at_once(pair: Pair) -> None:
    skew = pair.lao.limits.max_clock_skew
    assert skew > LAG
    new = SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(new, pair.now)
    [(_, _, envelope)] = pair.lao.due_messages(pair.now)  # the KeyRotation, old key
    rotation = keys_pb2.KeyRotation()
    rotation.ParseFromString(
        open_envelope(envelope, TrustStore([pair.lao.signing_key.verifying_key()])).payload
    )
    assert rotation.new_key.not_before.ToDatetime(dt.UTC) == pair.now - skew
    # KOR pins it with that window, and, LAG behind, takes what the new key signs.
    assert _pump_with_kor_behind(pair) >= 1
    assert pair.lao.signing_key is new
    pinned = pair.kor.trust.get(new.key_id)
    assert pinned is not None
    assert pinned.not_before == pair.now - skew

    authorisation_id = pair.authorise()  # signed with the new key
    assert _pump_with_kor_behind(pair) == 1  # KOR acknowledges it
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=10, now=pair.now)
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    _pump_with_kor_behind(pair)
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.COMPLETED
