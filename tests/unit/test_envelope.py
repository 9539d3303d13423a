"""Signed envelopes: DSSE PAE, sealing, and every way verification must fail."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import (
    SIGNATURE_LENGTH,
    TrustStore,
    VerifiedEnvelope,
    open_envelope,
    pae,
    seal,
    verify,
)
from itmolink.crypto.keys import SigningKey, VerifyingKey
from itmolink.v1 import envelope_pb2, transfer_pb2

PAYLOAD_TYPE = "itmolink.v1.TransferVoid"
PAYLOAD = transfer_pb2.TransferVoid(transfer_id="T-1", reason="timed out").SerializeToString()

# Generated once: Ed25519 key generation is cheap, but hypothesis calls tests many times.
LAO = SigningKey.generate("LAO")
LAO_SECOND = SigningKey.generate("LAO")
KOR = SigningKey.generate("KOR")
JPN = SigningKey.generate("JPN")


def trust() -> TrustStore:
    """What KOR pins: LAO's two keys and its own; not JPN's."""
    return TrustStore([LAO.verifying_key(), LAO_SECOND.verifying_key(), KOR.verifying_key()])


def code_of(raw: bytes, store: TrustStore | None = None) -> RejectionCode:
    with pytest.raises(Rejected) as excinfo:
        open_envelope(raw, store or trust())
    return excinfo.value.code


def signature(key: SigningKey, payload_type: str, payload: bytes) -> envelope_pb2.Signature:
    return envelope_pb2.Signature(key_id=key.key_id, sig=key.sign(pae(payload_type, payload)))


def envelope(
    payload_type: str = PAYLOAD_TYPE,
    payload: bytes = PAYLOAD,
    signatures: list[envelope_pb2.Signature] | None = None,
) -> bytes:
    if signatures is None:
        signatures = [signature(LAO, payload_type, payload)]
    return envelope_pb2.Envelope(
        payload_type=payload_type, payload=payload, signatures=signatures
    ).SerializeToString()


def decoded(raw: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(raw)


# PAE


def test_pae_matches_the_dsse_v1_example() -> None:
    # DSSE v1: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, LEN in ASCII decimal.
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert len(b"http://example.com/HelloWorld") == 29
    assert pae("http://example.com/HelloWorld", b"hello world") == expected


def test_pae_of_an_empty_body() -> None:
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def test_pae_counts_bytes_not_characters() -> None:
    # "é" is two bytes in UTF-8.
    assert pae("é", b"\x00\xff") == b"DSSEv1 2 \xc3\xa9 2 \x00\xff"


def test_pae_length_prefixes_keep_type_and_body_apart() -> None:
    assert pae("a b", b"c") != pae("a", b"b c")


# Round trip


def test_seal_then_open() -> None:
    opened = open_envelope(seal(PAYLOAD_TYPE, PAYLOAD, LAO), trust())
    assert opened == VerifiedEnvelope(
        payload_type=PAYLOAD_TYPE, payload=PAYLOAD, signer_party="LAO", key_ids=(LAO.key_id,)
    )


def test_sealed_signature_is_over_pae() -> None:
    env = decoded(seal(PAYLOAD_TYPE, PAYLOAD, LAO))
    [sig] = env.signatures
    assert sig.key_id == LAO.key_id
    assert len(sig.sig) == SIGNATURE_LENGTH == 64
    assert LAO.verifying_key().verify(sig.sig, pae(PAYLOAD_TYPE, PAYLOAD))


def test_verify_accepts_a_decoded_envelope() -> None:
    opened = verify(decoded(seal(PAYLOAD_TYPE, PAYLOAD, KOR)), trust())
    assert (opened.payload, opened.signer_party) == (PAYLOAD, "KOR")


@settings(max_examples=50)
@given(
    payload_type=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40),
    payload=st.binary(max_size=200),
)
def test_any_type_and_payload_round_trip(payload_type: str, payload: bytes) -> None:
    opened = open_envelope(seal(payload_type, payload, LAO), trust())
    assert (opened.payload_type, opened.payload) == (payload_type, payload)


def test_payload_is_exactly_the_signed_bytes_not_reserialised() -> None:
    # transfer_id (field 2) written after reason (field 3): valid protobuf, but not what
    # SerializeToString would produce, so a re-serialised payload would differ.
    payload = b"\x1a\x09timed out" + b"\x12\x03T-1"
    reserialised = transfer_pb2.TransferVoid.FromString(payload).SerializeToString()
    assert reserialised != payload
    opened = open_envelope(seal(PAYLOAD_TYPE, payload, LAO), trust())
    assert opened.payload == payload


def test_several_keys_of_one_party() -> None:
    raw = envelope(
        signatures=[
            signature(LAO, PAYLOAD_TYPE, PAYLOAD),
            signature(LAO_SECOND, PAYLOAD_TYPE, PAYLOAD),
        ]
    )
    opened = open_envelope(raw, trust())
    assert opened.signer_party == "LAO"
    assert opened.key_ids == (LAO.key_id, LAO_SECOND.key_id)


def test_signer_party_comes_from_the_pinned_key() -> None:
    # A key pinned for KOR whose id names LAO still signs as KOR: the pin decides.
    odd = VerifyingKey(
        party="KOR", key_id="LAO-looking-id", public_bytes=KOR.verifying_key().public_bytes
    )
    sig = envelope_pb2.Signature(key_id="LAO-looking-id", sig=KOR.sign(pae(PAYLOAD_TYPE, PAYLOAD)))
    opened = open_envelope(envelope(signatures=[sig]), TrustStore([odd]))
    assert opened.signer_party == "KOR"


# Rejections


def test_flipped_byte_in_payload() -> None:
    env = decoded(seal(PAYLOAD_TYPE, PAYLOAD, LAO))
    env.payload = bytes([env.payload[0] ^ 0x01]) + env.payload[1:]
    assert code_of(env.SerializeToString()) is RejectionCode.BAD_SIGNATURE


def test_flipped_byte_in_payload_type() -> None:
    env = decoded(seal(PAYLOAD_TYPE, PAYLOAD, LAO))
    env.payload_type = "itmolink.v1.TransferVoie"
    assert code_of(env.SerializeToString()) is RejectionCode.BAD_SIGNATURE


def test_signature_replayed_under_another_payload_type() -> None:
    env = decoded(seal("itmolink.v1.TransferVoid", PAYLOAD, LAO))
    env.payload_type = "itmolink.v1.TransferCompletion"
    assert code_of(env.SerializeToString()) is RejectionCode.BAD_SIGNATURE


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_flipped_byte_in_signature(index: int) -> None:
    env = decoded(seal(PAYLOAD_TYPE, PAYLOAD, LAO))
    sig = bytearray(env.signatures[0].sig)
    sig[index] ^= 0x80
    env.signatures[0].sig = bytes(sig)
    assert code_of(env.SerializeToString()) is RejectionCode.BAD_SIGNATURE


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_signature_of_wrong_length(length: int) -> None:
    good = LAO.sign(pae(PAYLOAD_TYPE, PAYLOAD))
    sig = (good * 2)[:length]
    raw = envelope(signatures=[envelope_pb2.Signature(key_id=LAO.key_id, sig=sig)])
    assert code_of(raw) is RejectionCode.BAD_SIGNATURE


def test_valid_signature_followed_by_junk_is_rejected() -> None:
    good = LAO.sign(pae(PAYLOAD_TYPE, PAYLOAD))
    raw = envelope(signatures=[envelope_pb2.Signature(key_id=LAO.key_id, sig=good + b"\x00")])
    assert code_of(raw) is RejectionCode.BAD_SIGNATURE


def test_unknown_key_id() -> None:
    assert code_of(seal(PAYLOAD_TYPE, PAYLOAD, JPN)) is RejectionCode.UNKNOWN_SIGNING_KEY


def test_unknown_key_id_among_good_signatures() -> None:
    raw = envelope(
        signatures=[signature(LAO, PAYLOAD_TYPE, PAYLOAD), signature(JPN, PAYLOAD_TYPE, PAYLOAD)]
    )
    assert code_of(raw) is RejectionCode.UNKNOWN_SIGNING_KEY


def test_pinned_key_id_with_a_signature_by_another_key() -> None:
    # JPN signs but claims LAO's key id: verified against LAO's pinned key, it fails.
    sig = envelope_pb2.Signature(key_id=LAO.key_id, sig=JPN.sign(pae(PAYLOAD_TYPE, PAYLOAD)))
    assert code_of(envelope(signatures=[sig])) is RejectionCode.BAD_SIGNATURE


def test_one_good_and_one_bad_signature() -> None:
    bad = envelope_pb2.Signature(
        key_id=LAO_SECOND.key_id, sig=LAO_SECOND.sign(pae(PAYLOAD_TYPE, b"other"))
    )
    raw = envelope(signatures=[signature(LAO, PAYLOAD_TYPE, PAYLOAD), bad])
    assert code_of(raw) is RejectionCode.BAD_SIGNATURE


def test_signatures_of_two_parties() -> None:
    raw = envelope(
        signatures=[signature(LAO, PAYLOAD_TYPE, PAYLOAD), signature(KOR, PAYLOAD_TYPE, PAYLOAD)]
    )
    assert code_of(raw) is RejectionCode.BAD_SIGNATURE


def test_no_signatures() -> None:
    assert code_of(envelope(signatures=[])) is RejectionCode.MALFORMED_ENVELOPE


def test_empty_payload_type() -> None:
    # Even with a signature that verifies over PAE("", payload).
    raw = envelope(payload_type="", signatures=[signature(LAO, "", PAYLOAD)])
    assert code_of(raw) is RejectionCode.MALFORMED_ENVELOPE


def test_verify_rejects_an_empty_decoded_envelope() -> None:
    with pytest.raises(Rejected) as excinfo:
        verify(envelope_pb2.Envelope(), trust())
    assert excinfo.value.code is RejectionCode.MALFORMED_ENVELOPE


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff",
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x0a\xff",
        b"\x0a\x10too short",
        b"\x0a\x02\xc3\x28",  # payload_type that is not UTF-8
        b"hello world",
        b"\x00\x00\x00\x00",
    ],
)
def test_garbage_bytes(garbage: bytes) -> None:
    assert code_of(garbage) is RejectionCode.MALFORMED_ENVELOPE


# Mutations: no change to the bytes of a sealed envelope may verify as something else.

SMALL = seal(PAYLOAD_TYPE, PAYLOAD, LAO)


def outcome(raw: bytes) -> RejectionCode | tuple[str, bytes]:
    """The code ``raw`` is rejected with, or the (type, payload) it verifies as."""
    try:
        opened = open_envelope(raw, trust())
    except Rejected as exc:
        return exc.code
    return (opened.payload_type, opened.payload)


def test_every_single_byte_mutation_is_rejected() -> None:
    # Exhaustive over one envelope: every position, every other byte value.
    accepted = []
    for index in range(len(SMALL)):
        for value in range(256):
            if value == SMALL[index]:
                continue
            mutated = SMALL[:index] + bytes([value]) + SMALL[index + 1 :]
            result = outcome(mutated)
            if not isinstance(result, RejectionCode):
                accepted.append((index, value, result))
    # An accepted mutation could only be harmless framing; none exists for this envelope.
    assert accepted == []


def test_every_truncation_is_rejected() -> None:
    for length in range(len(SMALL)):
        assert isinstance(outcome(SMALL[:length]), RejectionCode), length


@settings(max_examples=300)
@given(
    payload_type=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),
    payload=st.binary(max_size=100),
    data=st.data(),
)
def test_single_byte_mutation_never_verifies_as_something_else(
    payload_type: str, payload: bytes, data: st.DataObject
) -> None:
    raw = seal(payload_type, payload, LAO)
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != raw[index]), label="value")
    mutated = raw[:index] + bytes([value]) + raw[index + 1 :]
    # Protobuf parsing tolerates some framing changes (unknown fields, for one), so a mutation
    # is allowed to verify, but only as exactly what was signed.
    result = outcome(mutated)
    assert isinstance(result, RejectionCode) or result == (payload_type, payload)


# TrustStore


def test_trust_store_refuses_one_key_id_with_two_keys() -> None:
    store = TrustStore([LAO.verifying_key()])
    impostor = VerifyingKey(
        party="LAO", key_id=LAO.key_id, public_bytes=JPN.verifying_key().public_bytes
    )
    with pytest.raises(ValueError, match="pinned twice"):
        store.add(impostor)
    assert store.get(LAO.key_id) == LAO.verifying_key()
    with pytest.raises(ValueError, match="pinned twice"):
        TrustStore([LAO.verifying_key(), impostor])


def test_trust_store_accepts_the_same_key_twice() -> None:
    store = TrustStore([LAO.verifying_key(), LAO.verifying_key()])
    assert store.get(LAO.key_id) == LAO.verifying_key()


def test_trust_store_lookup_and_parties() -> None:
    store = trust()
    assert store.get(JPN.key_id) is None
    assert store.get(KOR.key_id) == KOR.verifying_key()
    assert store.parties() == {"LAO", "KOR"}
    assert TrustStore().parties() == set()


def test_two_signatures_by_one_key_id_are_refused_before_any_is_checked() -> None:
    good = signature(LAO, PAYLOAD_TYPE, PAYLOAD)
    assert code_of(envelope(signatures=[good, good])) is RejectionCode.MALFORMED_ENVELOPE
    forged = envelope_pb2.Signature(key_id=LAO.key_id, sig=b"\0" * SIGNATURE_LENGTH)
    assert code_of(envelope(signatures=[good, forged])) is RejectionCode.MALFORMED_ENVELOPE
    two = envelope(signatures=[good, signature(LAO_SECOND, PAYLOAD_TYPE, PAYLOAD)])
    assert open_envelope(two, trust()).key_ids == (LAO.key_id, LAO_SECOND.key_id)


def test_more_signatures_than_the_limit_are_refused() -> None:
    from itmolink.crypto.envelope import MAX_SIGNATURES

    keys = [SigningKey.generate("LAO") for _ in range(MAX_SIGNATURES + 1)]
    store = TrustStore([key.verifying_key() for key in keys])
    sigs = [signature(key, PAYLOAD_TYPE, PAYLOAD) for key in keys]
    assert open_envelope(envelope(signatures=sigs[:MAX_SIGNATURES]), store).key_ids
    assert code_of(envelope(signatures=sigs), store) is RejectionCode.MALFORMED_ENVELOPE
