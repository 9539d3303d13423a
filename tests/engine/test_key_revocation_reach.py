"""Revocations that reach every partner, and keys that fall with the key that
announced them (PROTOCOL §3.8, §5.12; SECURITY §9, formerly known problems 1 and 3)."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.base import cascade_revocations
from itmolink.node.convert import timestamp, to_us
from itmolink.node.engine import Engine, Partner
from itmolink.v1 import keys_pb2

from ..conftest import Databases
from .conftest import START, Pair
from .test_limits import deliver, header, proposal


def _announce(pair: Pair, signer: SigningKey, new: SigningKey) -> None:
    """``signer`` (held by a thief, say) announces ``new`` to KOR in-band."""
    pair.keys["LAO"] = signer
    rotation = keys_pb2.KeyRotation(
        header=header(pair),
        rotation_id=new.key_id,
        new_key=keys_pb2.SigningKeyRecord(
            key_id=new.key_id,
            public_key=new.verifying_key().public_bytes,
            not_before=timestamp(to_us(pair.now - dt.timedelta(minutes=5))),
        ),
    )
    assert deliver(pair, rotation) is None


def _signs_at_kor(pair: Pair, key: SigningKey) -> RejectionCode | None:
    """What KOR answers to a proposal signed with ``key`` (None: not a key refusal)."""
    pair.keys["LAO"] = key
    rejection = deliver(pair, proposal(pair))
    code = None if rejection is None else RejectionCode(rejection.reasons[0].code)
    key_codes = (RejectionCode.SIGNING_KEY_REVOKED, RejectionCode.UNKNOWN_SIGNING_KEY)
    return code if code in key_codes else None


def _rotate(pair: Pair) -> tuple[SigningKey, SigningKey]:
    """LAO rotates from its first key to a new one, acknowledged by KOR."""
    old, new = pair.lao.signing_key, SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(new, pair.now)
    pair.pump()
    assert pair.lao.signing_key is new
    return old, new


def test_keys_a_thief_announced_with_a_stolen_key_fall_with_it(pair: Pair) -> None:
    """LAO rotated K1 -> K2 (signed by K1) long ago; later a thief with K1 announces
    K3, and with K3 announces K4. LAO revokes K1 as compromised since before the
    thief's announcements: K3 and K4 fall at KOR, K2 stands."""
    k1, k2 = _rotate(pair)
    pair.advance(86_400)
    compromised_since = pair.now
    pair.advance(60)
    k3, k4 = SigningKey.generate("LAO"), SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    _announce(pair, k3, k4)  # transitively: announced by a key that falls
    assert _signs_at_kor(pair, k3) is None
    assert _signs_at_kor(pair, k4) is None

    pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=compromised_since)
    pair.pump()
    for key in (k1, k3, k4):
        assert pair.kor.trust.is_revoked(key.key_id), key.key_id
        assert _signs_at_kor(pair, key) is RejectionCode.SIGNING_KEY_REVOKED
    assert not pair.kor.trust.is_revoked(k2.key_id)
    assert _signs_at_kor(pair, k2) is None

    restarted = Engine(
        party="KOR", registry="KOR-NR", signing_key=pair.keys["KOR"],
        trust=TrustStore([k1.verifying_key()]), partners=[Partner("LAO", "LAO-NR", "x")],
        store=pair.kor.store,
    )  # fmt: skip
    assert [restarted.trust.is_revoked(k.key_id) for k in (k1, k2, k3, k4)] == [
        True, False, True, True,
    ]  # fmt: skip


def test_a_retirement_revokes_the_key_alone(pair: Pair) -> None:
    """Without a compromise instant a revocation is a retirement (the v1 semantics
    of an unset field): the key announced with it stands."""
    k1, k2 = _rotate(pair)
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    pair.pump()
    assert pair.kor.trust.is_revoked(k1.key_id)
    assert not pair.kor.trust.is_revoked(k2.key_id)


def test_the_revocations_signer_is_spared_so_a_stolen_signing_key_is_recoverable(
    pair: Pair,
) -> None:
    """K1, the key LAO signs with, is stolen at T; the thief announces K3 with it.
    LAO rotates to K2 (announced with K1, after T), then revokes K1 as compromised
    since T, signing the revocation with K2: at KOR K1 and K3 fall, and K2, which
    signed the revocation giving the instant, stands (also after a restart)."""
    k1 = pair.lao.signing_key
    pair.advance(86_400)
    theft = pair.now
    pair.advance(60)
    k3 = SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    pair.advance(60)
    _, k2 = _rotate(pair)
    pair.advance(60)
    pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=theft)
    pair.pump()
    assert pair.kor.trust.is_revoked(k1.key_id)
    assert pair.kor.trust.is_revoked(k3.key_id)
    assert not pair.kor.trust.is_revoked(k2.key_id)
    assert _signs_at_kor(pair, k2) is None
    pair.kor.reload_trust()
    assert [pair.kor.trust.is_revoked(k.key_id) for k in (k1, k2, k3)] == [True, False, True]


def test_a_revocations_signer_is_spared_from_that_revocation_only(pair: Pair) -> None:
    """The thief's K3 signs a revocation of another key with a compromise instant:
    that spares K3 from nothing when LAO revokes K1, the key that announced K3."""
    k1 = pair.keys["LAO"]
    since = pair.now
    pair.advance(60)
    k3 = SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    pair.keys["LAO"] = k3
    decoy = keys_pb2.KeyRotation(
        header=header(pair), rotation_id="decoy",
        revoked_key_ids=[SigningKey.generate("LAO").key_id],
        compromised_since=timestamp(to_us(since)),
    )  # fmt: skip
    assert deliver(pair, decoy) is None
    pair.kor.reload_trust()
    assert not pair.kor.trust.is_revoked(k3.key_id)
    _, k2 = _rotate(pair)
    pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)
    pair.pump()
    assert pair.kor.trust.is_revoked(k3.key_id)
    assert not pair.kor.trust.is_revoked(k2.key_id)


def test_a_key_the_card_pins_never_falls_with_an_announcer(databases: Databases) -> None:
    """KOR pins LAO's card, which lists K0 (LAO signs with it) and an old K1. A
    thief with K1 "announces" K0 to KOR, signed with K1; K1 is then revoked as
    compromised since before that, by KOR's operator or by LAO (signing with K0):
    K0 stands either way."""
    k0, k1, kor_key = (SigningKey.generate(p) for p in ("LAO", "LAO", "KOR"))
    counter = itertools.count(1)
    stores = [databases.open("LAO"), databases.open("KOR")]

    def engine(party: str, other: str, key: SigningKey, trust: TrustStore, store: object) -> Engine:
        return Engine(
            party=party, registry=f"{party}-NR", signing_key=key, trust=trust,
            partners=[Partner(other, f"{other}-NR", "x")], store=store,  # type: ignore[arg-type]
            new_id=lambda: f"{party}-{next(counter)}",
        )  # fmt: skip

    lao = engine("LAO", "KOR", k0, TrustStore([kor_key.verifying_key()]), stores[0])
    kor = engine(
        "KOR", "LAO", kor_key, TrustStore([k0.verifying_key(), k1.verifying_key()]), stores[1]
    )
    pair = Pair(lao=lao, kor=kor, keys={"LAO": k0, "KOR": kor_key})
    try:
        since = pair.now
        pair.advance(60)
        _announce(pair, k1, k0)
        kor.revoke_signing_key(k1.key_id, pair.now, partner="LAO", compromised_since=since)
        assert kor.trust.is_revoked(k1.key_id)
        assert not kor.trust.is_revoked(k0.key_id)
        assert _signs_at_kor(pair, k0) is None
        lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)
        pair.pump()
        kor.reload_trust()
        assert not kor.trust.is_revoked(k0.key_id)
    finally:
        for store in stores:
            store.close()


def test_a_partners_revocation_widens_to_a_compromise_instant_given_later(pair: Pair) -> None:
    """A key retired first, then reported compromised: the second revocation's
    instant is kept (the key stays revoked, and now its announcements fall)."""
    k1, _ = _rotate(pair)
    pair.advance(60)
    k3 = SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    pair.keys["LAO"] = pair.lao.signing_key
    retire = keys_pb2.KeyRotation(
        header=header(pair), rotation_id="r1", revoked_key_ids=[k1.key_id]
    )
    assert deliver(pair, retire) is None
    pair.kor.reload_trust()
    assert not pair.kor.trust.is_revoked(k3.key_id)
    compromised = keys_pb2.KeyRotation(
        header=header(pair), rotation_id="r2", revoked_key_ids=[k1.key_id],
        compromised_since=timestamp(to_us(pair.now - dt.timedelta(minutes=1))),
    )  # fmt: skip
    assert deliver(pair, compromised) is None
    pair.kor.reload_trust()
    assert pair.kor.trust.is_revoked(k3.key_id)


def test_an_operator_revoking_a_stolen_partner_key_fells_what_it_announced(pair: Pair) -> None:
    k1 = pair.keys["LAO"]
    since = pair.now
    k3 = SigningKey.generate("LAO")
    _announce(pair, k1, k3)
    pair.kor.revoke_signing_key(k1.key_id, pair.now, partner="LAO", compromised_since=since)
    assert _signs_at_kor(pair, k3) is RejectionCode.SIGNING_KEY_REVOKED


def test_the_cascade_is_transitive_and_bounded_by_the_instant() -> None:
    announcers = [
        ("K2", "K1", 100),  # before the compromise: stands
        ("K3", "K1", 200),
        ("K4", "K3", 50),  # announced by a fallen key: falls whenever
        ("K5", "K2", 300),
        ("K6", "K9 K4", 400),  # co-signed by a fallen key
    ]
    result = cascade_revocations({"K1": 150, "K7": None}, announcers)
    assert set(result) == {"K1", "K3", "K4", "K6", "K7"}
    assert result["K7"] is None
    assert cascade_revocations({"K1": None}, announcers) == {"K1": None}


def test_a_revocation_reaches_a_partner_added_later(databases: Databases) -> None:
    """JPN pinned a copy of LAO's card listing K1 and K2, and becomes LAO's partner
    after LAO revoked K1: at its next start LAO announces the revocation to JPN only
    (KOR acknowledged it already), once."""
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR", "JPN")}
    counter = itertools.count(1)

    def engine(party: str, partners: list[str], signing_key: SigningKey, **kw: object) -> Engine:
        return Engine(
            party=party, registry=f"{party}-NR", signing_key=signing_key,
            partners=[Partner(p, f"{p}-NR", "x") for p in partners],
            new_id=lambda: f"{party}-{next(counter)}", **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    lao_store = databases.open("LAO")
    lao = engine("LAO", ["KOR"], keys["LAO"], trust=TrustStore([keys["KOR"].verifying_key()]),
                 store=lao_store)  # fmt: skip
    kor = engine("KOR", ["LAO"], keys["KOR"], trust=TrustStore([keys["LAO"].verifying_key()]),
                 store=databases.open("KOR"))  # fmt: skip
    pair = Pair(lao=lao, kor=kor, keys={"LAO": keys["LAO"], "KOR": keys["KOR"]})
    k1, k2 = _rotate(pair)
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    pair.pump()
    assert kor.trust.is_revoked(k1.key_id)

    old_card = [k1.verifying_key(), k2.verifying_key()]  # copied between the two
    jpn = engine(
        "JPN", ["LAO"], keys["JPN"], trust=TrustStore(old_card), store=databases.open("JPN")
    )
    restarted = engine(
        "LAO", ["KOR", "JPN"], k2,
        trust=TrustStore([keys["KOR"].verifying_key(), keys["JPN"].verifying_key()]),
        store=lao_store,
    )  # fmt: skip
    assert not jpn.trust.is_revoked(k1.key_id)
    assert restarted.announce_revocations(pair.now) == 1
    [(message_id, partner, envelope)] = restarted.due_messages(pair.now)
    assert partner == "JPN"
    reply = jpn.handle_delivery("LAO", envelope, pair.now)
    restarted.handle_reply(message_id, reply, pair.now)
    assert jpn.trust.is_revoked(k1.key_id)
    assert restarted.announce_revocations(pair.now) == 0  # JPN acknowledged it
    for store in (lao_store, kor.store, jpn.store):
        store.close()


def test_a_revocation_is_not_announced_to_a_partner_that_refused_the_key(pair: Pair) -> None:
    """A rotation KOR refused and LAO gave up: KOR pinned nothing, so the revocation
    of the given-up key is not sent to it, at the cancellation nor at a restart."""
    from itmolink.core.codes import Rejected as Refused

    def refuse(*args: object) -> bytes:
        raise Refused(RejectionCode.INVALID_FIELD, "KOR does not want this key")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(pair.kor._request_handlers, "itmolink.v1.KeyRotation", refuse)
        pair.lao.rotate_signing_key(SigningKey.generate("LAO"), pair.now)
        pair.pump()
    pair.lao.cancel_key_rotation(pair.now)
    assert pair.lao.announce_revocations(pair.now) == 0
    assert pair.lao.due_messages(pair.now) == []


def test_a_card_that_lists_a_key_as_revoked_wins_over_an_older_copy(pair: Pair) -> None:
    """KOR pins LAO's current card: it lists K1 among its revoked keys, compromised
    since an instant; a key announced in-band with K1 since then falls too."""
    k1 = pair.keys["LAO"]
    k3 = SigningKey.generate("LAO")
    since = pair.now
    _announce(pair, k1, k3)
    card = TrustStore([k1.verifying_key()])
    card.revoke(k1.key_id, since)
    kor = Engine(
        party="KOR", registry="KOR-NR", signing_key=pair.keys["KOR"], trust=card,
        partners=[Partner("LAO", "LAO-NR", "x")], store=pair.kor.store,
    )  # fmt: skip
    assert kor.trust.is_revoked(k1.key_id)
    assert kor.trust.is_revoked(k3.key_id)
    kor.reload_trust()  # the card's revocations survive a reload
    assert kor.trust.is_revoked(k1.key_id)
    assert kor.trust.is_revoked(k3.key_id)


def test_a_version_5_ledger_is_upgraded_and_its_learned_keys_kept(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0006 on both stores: announced keys and revocations of schema
    version 5 are kept; a key announced then has no known announcer and so does not
    fall with it; one announced after the upgrade does."""
    from itmolink.store import open_store
    from itmolink.store import postgres as postgres_module
    from itmolink.store import sqlite as sqlite_module
    from itmolink.store.migrate import latest_version, migrations

    lao, kor = SigningKey.generate("LAO"), SigningKey.generate("KOR")
    old_key, retired = SigningKey.generate("LAO"), SigningKey.generate("LAO")
    database = databases.new("kor")
    with monkeypatch.context() as patch:  # a node of schema version 5
        patch.setattr(sqlite_module, "migrations", lambda: migrations()[:5])
        patch.setattr(postgres_module, "migrations", lambda: migrations()[:5])
        old = open_store(database, party="KOR", registry="KOR-NR")
        assert old.schema_version() == 5
        with old.transaction() as tx:
            tx._exec(
                "INSERT INTO partner_keys (key_id, party, public_key, not_before, not_after, "
                "added_at) VALUES (?, 'LAO', ?, NULL, NULL, 5)",
                (old_key.key_id, old_key.verifying_key().public_bytes),
            )
            tx._exec(
                "INSERT INTO revoked_keys (key_id, party, source, revoked_at) "
                "VALUES (?, 'LAO', 'LAO', 6)",
                (retired.key_id,),
            )
        old.close()
    store = open_store(database, party="KOR", registry="KOR-NR")
    assert store.schema_version() == latest_version() >= 6
    engine = Engine(
        party="KOR", registry="KOR-NR", signing_key=kor, trust=TrustStore([lao.verifying_key()]),
        partners=[Partner("LAO", "LAO-NR", "x")], store=store,
    )  # fmt: skip
    try:
        assert engine.trust.get(old_key.key_id) is not None
        assert not engine.trust.is_revoked(old_key.key_id)
        assert engine.trust.is_revoked(retired.key_id)
        with store.transaction() as tx:
            assert tx.partner_key_announcers() == []
            assert tx.revocations() == [(retired.key_id, "LAO", "LAO", 6, None)]
        pair = Pair(lao=engine, kor=engine, keys={"LAO": lao, "KOR": kor})
        new = SigningKey.generate("LAO")
        _announce(pair, lao, new)
        engine.revoke_signing_key(lao.key_id, pair.now, "LAO", compromised_since=pair.now)
        assert engine.trust.is_revoked(new.key_id)
        assert not engine.trust.is_revoked(old_key.key_id)
    finally:
        store.close()


def test_the_owners_guard_follows_its_own_chain_of_rotations(pair: Pair) -> None:
    """K1 -> K2 -> K3: K3, which LAO signs with, was announced with K2, itself
    announced with K1. A compromise instant for K1 before K2's announcement fells K2
    at KOR, but not K3, which signs the revocation."""
    k1, k2 = _rotate(pair)
    pair.advance(3_600)
    _, k3 = _rotate(pair)
    pair.advance(3_600)
    pair.lao.revoke_signing_key(
        k1.key_id, pair.now, compromised_since=pair.now - dt.timedelta(hours=3)
    )
    pair.pump()
    assert pair.kor.trust.is_revoked(k1.key_id)
    assert pair.kor.trust.is_revoked(k2.key_id)
    assert not pair.kor.trust.is_revoked(k3.key_id)
    assert _signs_at_kor(pair, k3) is None


def test_the_owners_guard_bounds_a_partners_record_by_its_acknowledgements_clock(
    pair: Pair,
) -> None:
    """KOR's clock runs an hour fast: it recorded K2 an hour after LAO saw the
    acknowledgement. LAO now signs with K3, and a request signed with K2 is still
    undelivered: a compromise instant for K1 ten minutes after the acknowledgement
    (by LAO's clock) would fell K2 at KOR, so it is refused, naming K2."""
    k1, k2 = pair.lao.signing_key, SigningKey.generate("LAO")
    pair.lao.rotate_signing_key(k2, pair.now)
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    reply = pair.kor.handle_delivery("LAO", envelope, pair.now + dt.timedelta(hours=1))
    pair.lao.handle_reply(message_id, reply, pair.now)
    assert pair.lao.signing_key is k2
    acknowledged = pair.now
    pair.network = lambda s, r, e: None if b"AuthorisationStatement" in e else e
    pair.authorise()
    pair.pump()
    _, k3 = _rotate(pair)
    pair.advance(1_200)
    with pytest.raises(Rejected) as caught:
        pair.lao.revoke_signing_key(
            k1.key_id, pair.now, compromised_since=acknowledged + dt.timedelta(minutes=10)
        )
    assert caught.value.code is RejectionCode.INVALID_FIELD
    assert k2.key_id in str(caught.value)
    assert k3.key_id not in str(caught.value)


def test_revocations_the_own_card_lists_come_back_to_a_restored_ledger(pair: Pair) -> None:
    """LAO's ledger lost a revocation (restored from an older backup) that its card
    file lists: at start LAO records it again and announces it; a card entry naming
    the key LAO signs with is not recorded (an alarm)."""
    lost = SigningKey.generate("LAO")
    since = pair.now - dt.timedelta(days=1)
    restored = [(lost.key_id, since), (pair.lao.signing_key.key_id, None)]
    assert pair.lao.announce_revocations(pair.now, restored) == 1
    with pair.lao.store.transaction() as tx:
        assert [(k, cs) for k, _, _, _, cs in tx.revocations()] == [(lost.key_id, to_us(since))]
    pair.pump()
    assert pair.kor.trust.is_revoked(lost.key_id)  # revoked before it was ever pinned
    assert not pair.kor.trust.is_revoked(pair.lao.signing_key.key_id)
    assert pair.lao.announce_revocations(pair.now, restored) == 0


def test_a_refused_revocation_is_sent_again_at_the_next_start(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """KOR is unreachable for 31 days after LAO revokes K1: the delivery, sealed
    before the outage, is refused as too old and KOR records nothing. LAO raises an
    alarm, does not count KOR as told, and at its next start sends the revocation
    again, freshly sealed, once; KOR acknowledges it this time."""
    k1, _ = _rotate(pair)
    pair.lao.revoke_signing_key(k1.key_id, pair.now)
    reachable = False
    pair.network = lambda sender, receiver, envelope: envelope if reachable else None
    pair.pump()
    pair.advance(31 * 86_400)
    reachable = True
    with caplog.at_level("ERROR"):
        pair.pump()
    assert not pair.kor.trust.is_revoked(k1.key_id)
    assert any("ALARM" in r.getMessage() and k1.key_id in r.getMessage() for r in caplog.records)
    assert pair.lao.due_messages(pair.now) == []
    assert pair.lao.announce_revocations(pair.now) == 1
    assert len(pair.lao.due_messages(pair.now)) == 1  # once, not once per refusal
    pair.pump()
    assert pair.kor.trust.is_revoked(k1.key_id)
    assert pair.lao.announce_revocations(pair.now) == 0


def test_an_announcement_signed_twice_by_one_key_is_refused(pair: Pair) -> None:
    """5,000 copies of one signature once made a 145 KB announced_by: an envelope
    with two signatures by one key id is malformed (1002), and nothing is pinned."""
    from itmolink.crypto.envelope import seal
    from itmolink.v1 import envelope_pb2

    k1, new = pair.keys["LAO"], SigningKey.generate("LAO")
    rotation = keys_pb2.KeyRotation(
        header=header(pair), rotation_id=new.key_id,
        new_key=keys_pb2.SigningKeyRecord(
            key_id=new.key_id, public_key=new.verifying_key().public_bytes
        ),
    )  # fmt: skip
    sealed = envelope_pb2.Envelope()
    sealed.ParseFromString(seal(rotation.DESCRIPTOR.full_name, rotation.SerializeToString(), k1))
    sealed.signatures.extend([sealed.signatures[0]] * 3)
    pair.kor.handle_delivery("LAO", sealed.SerializeToString(), pair.now)
    assert pair.kor.trust.get(new.key_id) is None
    with pair.kor.store.transaction() as tx:
        assert tx.partner_key_announcers() == []
    del sealed.signatures[1:]
    pair.kor.handle_delivery("LAO", sealed.SerializeToString(), pair.now)
    pair.kor.reload_trust()
    assert pair.kor.trust.get(new.key_id) is not None


def test_a_card_written_before_it_listed_revocations_gets_the_ledgers(
    pair: Pair, tmp_path: Path
) -> None:
    """An upgraded node: its ledger records revocations its card file never listed
    (the old `keys revoke` only dropped the key). At start the card gets them, with
    their compromise instants, once; an instant the ledger widened later is taken."""
    from itmolink.crypto.pki import PartnerCard, RevokedKey, init_party

    card = PartnerCard.load(init_party(tmp_path / "lao", "LAO", "LAO-NR", now=START).card)
    k1, _ = _rotate(pair)
    retired = SigningKey.generate("LAO")
    since = pair.now - dt.timedelta(hours=1)
    pair.lao.revoke_signing_key(k1.key_id, pair.now, compromised_since=since)
    pair.lao.revoke_signing_key(retired.key_id, pair.now)
    listing = card.listing(pair.lao.own_revocations())
    expected = [
        RevokedKey(k1.key_id, pair.now, since), RevokedKey(retired.key_id, pair.now, None),
    ]  # fmt: skip
    assert sorted(listing.revoked_keys, key=lambda r: r.key_id) == sorted(
        expected, key=lambda r: r.key_id
    )
    path = tmp_path / "card.toml"
    path.write_text(listing.to_toml())
    loaded = PartnerCard.load(path)
    assert loaded.listing(pair.lao.own_revocations()) is loaded  # nothing missing now
    pair.lao.revoke_signing_key(
        retired.key_id, pair.now, compromised_since=since - dt.timedelta(days=1)
    )
    widened = loaded.listing(pair.lao.own_revocations())
    assert {r.key_id: r.compromised_since for r in widened.revoked_keys}[retired.key_id] == (
        since - dt.timedelta(days=1)
    )


def test_a_compromise_instant_with_a_fraction_of_a_second_is_refused(pair: Pair) -> None:
    """The card file keeps whole seconds: a fraction would be dropped there, widening
    the cascade past the instant the owner's guard checked."""
    k1, _ = _rotate(pair)
    with pytest.raises(Rejected) as caught:
        pair.lao.revoke_signing_key(
            k1.key_id, pair.now, compromised_since=pair.now - dt.timedelta(microseconds=1)
        )
    assert caught.value.code is RejectionCode.INVALID_FIELD
    assert pair.lao.due_messages(pair.now) == []
