"""Ed25519 through libsodium accepts exactly the signatures OpenSSL accepts.

``VerifyingKey.verify`` asks libsodium first and OpenSSL for what libsodium refuses
(crypto/keys.py). These tests build, with a small affine Edwards arithmetic written here,
the signatures on which Ed25519 verifiers are known to differ (small-order and mixed-order
public keys, a small-order R, non-canonical S, R and A) and check that the verdict is
OpenSSL's in every case, and that libsodium alone differs on some of them (so the second
check is needed, and these cases exercise it).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from itmolink.crypto.keys import SigningKey, VerifyingKey, key_id_for, openssl_verify

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def mul(k: int, point: Point) -> Point:
    result = IDENTITY
    while k:
        if k & 1:
            result = add(result, point)
        point = add(point, point)
        k >>= 1
    return result


def decode(raw: bytes) -> Point:
    """The point of a 32-byte encoding (y reduced mod p, as a lenient decoder does)."""
    value = int.from_bytes(raw, "little")
    y, sign = (value & ((1 << 255) - 1)) % P, value >> 255
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P != u:
        x = x * SQRT_M1 % P
    assert v * x * x % P == u, "not on the curve"
    if x & 1 != sign:
        x = (P - x) % P
    return x, y


def encode(point: Point) -> bytes:
    x, y = point
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


BASE = decode((4 * pow(5, P - 2, P) % P).to_bytes(32, "little"))
# A point of order 8 (its encoding is well known among the small-order points).
T8 = decode(bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"))


def h_int(*parts: bytes) -> int:
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little")


def secret_scalar(seed: bytes) -> tuple[int, bytes]:
    digest = hashlib.sha512(seed).digest()
    a = int.from_bytes(digest[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, digest[32:]


def sign_with(a: int, r: int, public: bytes, message: bytes) -> bytes:
    """S = r + k·a with R = r·B and k = H(R || A || M): the RFC 8032 equation, any r."""
    big_r = encode(mul(r, BASE))
    k = h_int(big_r, public, message) % L
    return big_r + ((r + k * a) % L).to_bytes(32, "little")


def sodium_alone(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        crypto_sign_open(signature + message, public)
    except BadSignatureError:
        return False
    return True


def verifier(public: bytes) -> VerifyingKey:
    return VerifyingKey("LAO", key_id_for("LAO", public), public)


def edge_cases() -> list[tuple[str, bytes, bytes, bytes]]:
    """(name, public key, signature, message), including the cases verifiers disagree on."""
    assert mul(8, T8) == IDENTITY
    assert mul(4, T8) != IDENTITY
    assert encode(BASE) == bytes.fromhex("58" + "66" * 31)
    seed = bytes(range(32))
    a, prefix = secret_scalar(seed)
    public = encode(mul(a, BASE))
    message = b"itmolink edge case"
    r = h_int(prefix, message) % L
    good = sign_with(a, r, public, message)
    cases = [("valid", public, good, message)]
    # S + L: the same equation with a non-canonical S (malleability).
    s_plus_l = int.from_bytes(good[32:], "little") + L
    cases.append(("S + L", public, good[:32] + s_plus_l.to_bytes(32, "little"), message))
    # r = 0: R is the identity, a small-order R, made by the key's owner.
    cases.append(("small-order R", public, sign_with(a, 0, public, message), message))
    # R = T8: S·B = T8 + k·A never holds, but both must say so.
    cases.append(("R of order 8", public, encode(T8) + good[32:], message))
    # Small-order public keys: with A and R of small order and S = 0 the equation
    # 0 = R + k·A holds whenever k·A = -R.
    for name, small in (("identity", IDENTITY), ("order 8", T8), ("order 2", (0, P - 1))):
        small_public = encode(small)
        cases.append(
            (f"key {name}, R identity, S 0", small_public, encode(IDENTITY) + bytes(32), message)
        )
        for counter in range(64):
            attempt = message + counter.to_bytes(1, "big")
            k = h_int(encode(small), small_public, attempt) % L
            if add(small, mul(k, small)) == IDENTITY:
                cases.append(
                    (f"key {name}, R = A, S 0", small_public, encode(small) + bytes(32), attempt)
                )
                break
    # A mixed-order public key A + T8: the signature verifies when 8 divides k.
    mixed_public = encode(add(mul(a, BASE), T8))
    for counter in range(256):
        attempt = message + counter.to_bytes(1, "big")
        signature = sign_with(a, r, mixed_public, attempt)
        if h_int(signature[:32], mixed_public, attempt) % L % 8 == 0:
            cases.append(("mixed-order key", mixed_public, signature, attempt))
            break
    # Non-canonical encodings: the identity as y = 1 + p, as R and as the public key; and
    # the identity with its sign bit set (x = -0).
    non_canonical_one = (1 + P).to_bytes(32, "little")
    cases.append(("non-canonical R", public, non_canonical_one + good[32:], message))
    negative_zero = (1 | (1 << 255)).to_bytes(32, "little")
    cases.append(("R = -0", public, negative_zero + good[32:], message))
    for name, key in (("non-canonical", non_canonical_one), ("-0", negative_zero)):
        cases.append((f"key {name}, R identity, S 0", key, encode(IDENTITY) + bytes(32), message))
    # Wrong message, wrong key, truncated signature.
    cases.append(("other message", public, good, message + b"!"))
    cases.append(("other key", encode(mul(a + 1, BASE)), good, message))
    cases.append(("short signature", public, good[:63], message))
    return cases


@pytest.mark.parametrize(("name", "public", "signature", "message"), edge_cases())
def test_verdict_is_openssls(name: str, public: bytes, signature: bytes, message: bytes) -> None:
    assert verifier(public).verify(signature, message) == openssl_verify(
        public, signature, message
    ), name


def test_edge_cases_cover_accepted_and_refused_and_libsodium_stricter() -> None:
    verdicts = {
        name: (openssl_verify(public, sig, msg), sodium_alone(public, sig, msg))
        for name, public, sig, msg in edge_cases()
        if len(sig) == 64
    }
    assert verdicts["valid"] == (True, True)
    assert verdicts["mixed-order key"] == (True, True)
    assert verdicts["S + L"] == (False, False)
    assert verdicts["non-canonical R"] == (False, False)
    # Where libsodium is stricter than OpenSSL, and the fallback decides.
    stricter = sorted(name for name, (ssl, sodium) in verdicts.items() if ssl and not sodium)
    assert "small-order R" in stricter
    assert any(name.startswith("key identity") for name in stricter)
    # libsodium never accepts what OpenSSL refuses: the premise of the fallback.
    assert not [name for name, (ssl, sodium) in verdicts.items() if sodium and not ssl]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=200),
    flip=st.integers(min_value=-1, max_value=8 * (64 + 32) - 1),
)
def test_signatures_match_openssl_and_verdicts_agree(
    seed: bytes, message: bytes, flip: int
) -> None:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    key = SigningKey.from_private("LAO", private)
    signature = key.sign(message)
    # Deterministic Ed25519: libsodium's signature is OpenSSL's, byte for byte.
    assert signature == private.sign(message)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if flip >= 0:  # one bit flipped in the signature or the public key
        blob = bytearray(signature + public)
        blob[flip // 8] ^= 1 << (flip % 8)
        signature, public = bytes(blob[:64]), bytes(blob[64:])
    assert verifier(public).verify(signature, message) == openssl_verify(public, signature, message)


def test_rfc8032_test_1() -> None:
    """RFC 8032 §7.1 TEST 1 (the key of PROTOCOL.md §3.3): the published signature."""
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = SigningKey.from_private("LAO", Ed25519PrivateKey.from_private_bytes(seed))
    signature = key.sign(b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert key.verifying_key().verify(signature, b"")
    assert not key.verifying_key().verify(signature, b"x")
    assert not key.verifying_key().verify(os.urandom(64), b"")


def test_a_libsodium_that_accepts_a_non_canonical_s_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An old or ED25519_COMPAT libsodium accepts S + L, which OpenSSL refuses: the
    import-time self-test finds it, and verification then goes to OpenSSL alone."""
    import itmolink.crypto.keys as keys

    assert keys._libsodium_refuses_non_canonical_s()  # the bundled libsodium is strict
    monkeypatch.setattr(keys, "crypto_sign_open", lambda signed, public: signed[64:])
    assert not keys._libsodium_refuses_non_canonical_s()

    def never(signed: bytes, public: bytes) -> bytes:
        raise AssertionError("libsodium used although it failed its self-test")

    monkeypatch.setattr(keys, "crypto_sign_open", never)
    monkeypatch.setattr(keys, "LIBSODIUM_VERIFIES", False)
    key = keys.SigningKey.generate("LAO")
    signature = key.sign(b"m")
    assert key.verifying_key().verify(signature, b"m")
    assert not key.verifying_key().verify(signature, b"n")
