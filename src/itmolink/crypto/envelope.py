"""Signed envelopes: Ed25519 over a DSSE pre-authentication encoding.

The signature covers ``PAE(payload_type, payload)`` where ``payload`` is the
exact byte string the sender serialised once. The receiver verifies those
bytes before it parses anything inside them, and never re-serialises a
message to verify it (protobuf serialisation is not canonical).

PAE is the DSSE v1 encoding::

    "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

with LEN the ASCII decimal byte length and SP one space (0x20).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.keys import SigningKey, VerifyingKey
from itmolink.v1 import envelope_pb2

SIGNATURE_LENGTH = 64


# Signatures one envelope may carry (PROTOCOL §3.6 step 3): a party signs with one key,
# or a few during a rotation; more is refused before any signature is checked.
MAX_SIGNATURES = 4


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding of (payload_type, payload)."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def seal(payload_type: str, payload: bytes, key: SigningKey) -> bytes:
    """Sign ``payload`` and return the serialised Envelope bytes."""
    envelope = envelope_pb2.Envelope(
        payload_type=payload_type,
        payload=payload,
        signatures=[
            envelope_pb2.Signature(key_id=key.key_id, sig=key.sign(pae(payload_type, payload)))
        ],
    )
    return envelope.SerializeToString()


def _own(sealed: bytes) -> envelope_pb2.Envelope:
    envelope = envelope_pb2.Envelope()
    envelope.ParseFromString(sealed)
    return envelope


def signing_key_ids(sealed: bytes) -> list[str]:
    """The key ids an envelope of our own (sealed by :func:`seal`) was signed with.
    Not a verification: for envelopes this node made and stored itself."""
    return [signature.key_id for signature in _own(sealed).signatures]


def sealed_payload(sealed: bytes) -> bytes:
    """The payload of an envelope of our own (sealed by :func:`seal`), unverified:
    for envelopes this node made and stored itself."""
    return bytes(_own(sealed).payload)


@dataclass(frozen=True, slots=True)
class VerifiedEnvelope:
    """An envelope whose every signature verified against a pinned key."""

    payload_type: str
    payload: bytes
    signer_party: str
    key_ids: tuple[str, ...]


class TrustStore:
    """The pinned signing keys of partner parties, looked up by key id."""

    def __init__(self, keys: Iterable[VerifyingKey] = ()) -> None:
        self._keys: dict[str, VerifyingKey] = {}
        # Revoked key id -> the instant it was compromised from (its cascade), or None.
        self._revoked: dict[str, dt.datetime | None] = {}
        for key in keys:
            self.add(key)

    def add(self, key: VerifyingKey) -> None:
        existing = self._keys.get(key.key_id)
        if existing is not None and existing != key:
            raise ValueError(
                f"key id {key.key_id!r} is pinned twice with different keys or parties"
            )
        self._keys[key.key_id] = key

    def replace(self, key: VerifyingKey) -> None:
        """Pin ``key``, replacing a key with the same id (e.g. a new validity window)."""
        self._keys[key.key_id] = key

    def get(self, key_id: str) -> VerifyingKey | None:
        return self._keys.get(key_id)

    def revoke(self, key_id: str, compromised_since: dt.datetime | None = None) -> None:
        """No signature by this key verifies from now on. ``compromised_since``, kept
        for the caller (the earliest given wins), says from when the keys announced
        with it fall with it (PROTOCOL §3.8)."""
        known = self._revoked.get(key_id)
        if key_id not in self._revoked or (
            compromised_since is not None and (known is None or compromised_since < known)
        ):
            self._revoked[key_id] = compromised_since

    def revocations(self) -> dict[str, dt.datetime | None]:
        """Revoked key id -> the instant it was compromised from, or None."""
        return dict(self._revoked)

    def is_revoked(self, key_id: str) -> bool:
        return key_id in self._revoked

    def all(self) -> list[VerifyingKey]:
        return list(self._keys.values())

    def keys_of(self, party: str) -> list[VerifyingKey]:
        return [k for k in self._keys.values() if k.party == party]

    def parties(self) -> set[str]:
        return {key.party for key in self._keys.values()}


def open_envelope(
    raw: bytes, trust: TrustStore, now: dt.datetime | None = None
) -> VerifiedEnvelope:
    """Verify a serialised Envelope and return its still-unparsed payload.

    Raises :class:`Rejected` with the code of the first failed check. The
    payload is not parsed here: the caller checks ``payload_type`` first and
    parses only a verified payload.
    """
    envelope = envelope_pb2.Envelope()
    try:
        envelope.ParseFromString(raw)
    except DecodeError as exc:
        raise Rejected(
            RejectionCode.MALFORMED_ENVELOPE, f"envelope does not decode: {exc}"
        ) from None
    return verify(envelope, trust, now)


def verify(
    envelope: envelope_pb2.Envelope, trust: TrustStore, now: dt.datetime | None = None
) -> VerifiedEnvelope:
    """Verify an already-decoded Envelope (see :func:`open_envelope`).

    With ``now``, each signing key must also be inside its validity window.
    """
    if not envelope.payload_type:
        raise Rejected(RejectionCode.MALFORMED_ENVELOPE, "envelope has no payload_type")
    if not envelope.signatures:
        raise Rejected(RejectionCode.MALFORMED_ENVELOPE, "envelope carries no signature")
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise Rejected(
            RejectionCode.MALFORMED_ENVELOPE,
            f"envelope carries {len(envelope.signatures)} signatures, more than {MAX_SIGNATURES}",
        )
    named = [signature.key_id for signature in envelope.signatures]
    if len(set(named)) != len(named):
        raise Rejected(
            RejectionCode.MALFORMED_ENVELOPE, "envelope carries two signatures by one key id"
        )
    message = pae(envelope.payload_type, envelope.payload)
    parties: set[str] = set()
    key_ids: list[str] = []
    for signature in envelope.signatures:
        key = trust.get(signature.key_id)
        if key is None:
            raise Rejected(
                RejectionCode.UNKNOWN_SIGNING_KEY,
                f"signing key {signature.key_id!r} is not pinned for any partner",
            )
        if trust.is_revoked(key.key_id):
            raise Rejected(
                RejectionCode.SIGNING_KEY_REVOKED, f"signing key {key.key_id!r} is revoked"
            )
        problem = key.valid_at(now) if now is not None else None
        if problem is not None:
            code = (
                RejectionCode.SIGNING_KEY_EXPIRED
                if problem == "expired"
                else RejectionCode.SIGNING_KEY_NOT_YET_VALID
            )
            raise Rejected(
                code, f"signing key {key.key_id!r} is {problem} at {now:%Y-%m-%dT%H:%M:%SZ}"
            )
        if len(signature.sig) != SIGNATURE_LENGTH or not key.verify(signature.sig, message):
            raise Rejected(
                RejectionCode.BAD_SIGNATURE,
                f"signature by key {signature.key_id!r} does not verify over the payload",
            )
        parties.add(key.party)
        key_ids.append(signature.key_id)
    if len(parties) != 1:
        raise Rejected(
            RejectionCode.BAD_SIGNATURE,
            f"envelope is signed by keys of several parties: {sorted(parties)}",
        )
    return VerifiedEnvelope(
        payload_type=envelope.payload_type,
        payload=envelope.payload,
        signer_party=parties.pop(),
        key_ids=tuple(key_ids),
    )
