"""Ed25519 signing keys, their ids, and private-key files written 0600.

Signatures are made and checked with libsodium (PyNaCl), which does both faster than the
OpenSSL bundled in ``cryptography`` (DESIGN.md, "Ed25519 through libsodium"); key files,
PEM and X.509 stay with ``cryptography``. A signature libsodium refuses is checked again with
``cryptography``, so that the signatures accepted are exactly those OpenSSL accepts: libsodium
also refuses small-order and non-canonical public keys and a small-order R, which RFC 8032
§5.1.7 and OpenSSL accept.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

PRIVATE_FILE_MODE = 0o600


def key_id_for(party: str, public_bytes: bytes) -> str:
    """A stable key id: the party code and a digest of the raw public key."""
    return f"{party}-ed25519-{hashlib.sha256(public_bytes).hexdigest()[:16]}"


def is_key_id_of(party: str, key_id: str) -> bool:
    """Whether ``key_id`` has the form of a key id of ``party`` (see :func:`key_id_for`)."""
    prefix = f"{party}-ed25519-"
    digits = key_id[len(prefix) :]
    return (
        key_id.startswith(prefix)
        and len(digits) == 16
        and all(c in "0123456789abcdef" for c in digits)
    )


@functools.lru_cache(maxsize=256)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    """The key object for 32 raw bytes, made once per key rather than per signature."""
    return Ed25519PublicKey.from_public_bytes(raw)


def openssl_verify(public_bytes: bytes, signature: bytes, message: bytes) -> bool:
    """The verdict of ``cryptography`` (OpenSSL) alone: the reference for what is accepted."""
    try:
        _public_key(public_bytes).verify(signature, message)
    except InvalidSignature:
        return False
    return True


# The order of the Ed25519 base point (RFC 8032 §5.1): a signature's S must be below it.
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def _libsodium_refuses_non_canonical_s() -> bool:
    """Whether this libsodium refuses a signature whose S is S + L (non-canonical), as
    OpenSSL does. libsodium 1.0.16 and later do unless built with ED25519_COMPAT; an
    older or compatible build accepts it, and would make every signature malleable, so
    such a build is not used to verify (DESIGN.md decision 42)."""
    seed = bytes(range(32))
    public, secret = crypto_sign_seed_keypair(seed)
    message = b"itmolink libsodium self-test"
    signature = crypto_sign(message, secret)[:64]
    s = int.from_bytes(signature[32:], "little") + _GROUP_ORDER
    forged = signature[:32] + s.to_bytes(32, "little")
    try:
        crypto_sign_open(forged + message, public)
    except BadSignatureError:
        return True
    return False


# Checked once, at import: otherwise every signature is verified by OpenSSL alone.
LIBSODIUM_VERIFIES = _libsodium_refuses_non_canonical_s()
if not LIBSODIUM_VERIFIES:
    logging.getLogger(__name__).warning(
        "this libsodium accepts non-canonical Ed25519 signatures: verifying with OpenSSL only"
    )


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    """A partner's pinned Ed25519 public key."""

    party: str
    key_id: str
    public_bytes: bytes
    # Validity window (aware datetimes); None means unbounded on that side.
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None

    def valid_at(self, now: dt.datetime) -> str | None:
        """Why the key is not valid at ``now`` ("not yet valid" / "expired"), else None."""
        if self.not_before is not None and now < self.not_before:
            return "not yet valid"
        if self.not_after is not None and now >= self.not_after:
            return "expired"
        return None

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is a valid Ed25519 signature of ``message`` by this key.

        libsodium first (fast); what it refuses is decided by OpenSSL, whose accepted set
        contains libsodium's, so the answer is OpenSSL's (module docstring).
        """
        if len(signature) == 64 and LIBSODIUM_VERIFIES:
            try:
                crypto_sign_open(signature + message, self.public_bytes)
            except BadSignatureError:
                pass
            else:
                return True
        return openssl_verify(self.public_bytes, signature, message)

    @classmethod
    def from_raw(
        cls,
        party: str,
        key_id: str,
        raw: bytes,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> VerifyingKey:
        """A key from its 32 raw bytes, refusing an id that does not match them."""
        if len(raw) != 32:
            raise ValueError(
                f"signing key {key_id!r}: an Ed25519 public key has 32 bytes, not {len(raw)}"
            )
        if key_id_for(party, raw) != key_id:
            raise ValueError(
                f"signing key {key_id!r} does not match its public key for party {party}"
            )
        if not_before and not_after and not_after <= not_before:
            raise ValueError(f"signing key {key_id!r}: not_after is not after not_before")
        return cls(party, key_id, raw, not_before, not_after)

    @classmethod
    def from_base64(cls, party: str, key_id: str, value: str) -> VerifyingKey:
        raw = base64.b64decode(value, validate=True)
        if len(raw) != 32:
            raise ValueError(
                f"signing key {key_id!r}: an Ed25519 public key has 32 bytes, not {len(raw)}"
            )
        if key_id_for(party, raw) != key_id:
            raise ValueError(
                f"signing key {key_id!r} does not match its public key for party {party}"
            )
        return cls(party=party, key_id=key_id, public_bytes=raw)

    def to_base64(self) -> str:
        return base64.b64encode(self.public_bytes).decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """This node's Ed25519 private signing key. Its repr never shows the key."""

    party: str
    key_id: str
    _private: Ed25519PrivateKey = field(repr=False)
    # libsodium's 64-byte secret key (seed and public key), for signing.
    _secret: bytes = field(repr=False)

    @classmethod
    def generate(cls, party: str) -> SigningKey:
        return cls.from_private(party, Ed25519PrivateKey.generate())

    @classmethod
    def from_private(cls, party: str, private: Ed25519PrivateKey) -> SigningKey:
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        sodium_public, secret = crypto_sign_seed_keypair(seed)
        if sodium_public != public:  # the same key in both libraries, or no key at all
            raise ValueError("libsodium and OpenSSL derive different Ed25519 public keys")
        return cls(party=party, key_id=key_id_for(party, public), _private=private, _secret=secret)

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message`` (deterministic: the same bytes as OpenSSL's)."""
        signed: bytes = crypto_sign(message, self._secret)
        return signed[:64]

    def verifying_key(
        self, *, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None
    ) -> VerifyingKey:
        public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return VerifyingKey(self.party, self.key_id, public, not_before, not_after)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def load(cls, party: str, path: Path) -> SigningKey:
        check_private_file(path)
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls.from_private(party, private)


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def check_private_file(path: Path) -> None:
    """Refuse a private key file that group or others can read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} has mode {mode:o}; private keys must not be readable by group or "
            f"others: run 'chmod 600 {path}'"
        )
