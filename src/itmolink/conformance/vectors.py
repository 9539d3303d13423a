"""Envelope test vectors for partner implementations (issue #6, item 2).

``python -m itmolink.conformance.vectors`` writes
``conformance/vectors/v1/envelopes.json``: signed envelopes as bytes, the keys
(test keys only, derived from fixed seeds), the receiving node's view (its
party, the authenticated peer, its clock, the pinned and revoked keys), and for
each delivery the verdict a conforming node gives: ``"accepted"`` or the
rejection code's wire name. Each vector starts from a fresh receiver that pins
``pinned_keys`` (with their windows), has revoked ``revoked_key_ids``, and
knows LAO and JPN as partners; its deliveries are made in order. Ed25519 signatures are
deterministic, so the file is byte-identical every time it is generated; a test
checks that the committed file is what this module produces, and that this
node reaches every verdict.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from itmolink.conformance.link import flip_signature
from itmolink.crypto.envelope import seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.convert import timestamp, to_us
from itmolink.v1 import common_pb2, envelope_pb2, transfer_pb2

VERSION = 1
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
PATH = Path("conformance/vectors/v1/envelopes.json")
# The receiver's windows (§2.5) that the sent_at verdicts assume.
MAX_CLOCK_SKEW = dt.timedelta(seconds=300)
MAX_MESSAGE_AGE = dt.timedelta(days=30)


def test_key(name: str, party: str) -> SigningKey:
    """A test signing key derived from a fixed seed: never use outside tests."""
    seed = hashlib.sha256(f"itmolink test vector key {name}".encode()).digest()
    return SigningKey.from_private(party, Ed25519PrivateKey.from_private_bytes(seed))


LAO = test_key("LAO-1", "LAO")
LAO_EXPIRED = test_key("LAO-expired", "LAO")
LAO_REVOKED = test_key("LAO-revoked", "LAO")
LAO_FUTURE = test_key("LAO-not-yet-valid", "LAO")
STRANGER = test_key("LAO-unpinned", "LAO")


def header(**overrides: Any) -> common_pb2.Header:
    fields: dict[str, Any] = dict(
        protocol_version=1, message_id="vector-1", sender_party="LAO", sender_registry="LAO-NR",
        audience="KOR", sent_at=timestamp(to_us(NOW)), sequence=1,
    )  # fmt: skip
    fields.update(overrides)
    return common_pb2.Header(**fields)


def query(**overrides: Any) -> bytes:
    return transfer_pb2.TransferStatusQuery(
        header=header(**overrides), transfer_id="LAO-T-000001"
    ).SerializeToString()


def sealed(payload: bytes, key: SigningKey = LAO, payload_type: str = "") -> bytes:
    return seal(payload_type or "itmolink.v1.TransferStatusQuery", payload, key)


def _mutate(envelope: bytes, **change: Any) -> bytes:
    message = envelope_pb2.Envelope()
    message.ParseFromString(envelope)
    if "payload" in change:
        message.payload = change["payload"]
    if "payload_type" in change:
        message.payload_type = change["payload_type"]
    mutated = message.SerializeToString()
    return flip_signature(mutated) if "flip_signature" in change else mutated


@dataclass
class Vector:
    name: str
    description: str
    deliveries: list[tuple[bytes, str]]
    peer: str = "LAO"
    extra: dict[str, Any] = field(default_factory=dict)


def vectors() -> list[Vector]:
    good = sealed(query())
    return [
        Vector("valid", "A well-formed status query signed with a pinned key.",
               [(good, "accepted")]),
        Vector("tampered-payload", "One payload byte changed after signing.",
               [(_mutate(good, payload=query(message_id="vector-2")),
                 "REJECTION_CODE_BAD_SIGNATURE")]),
        Vector("tampered-payload-type", "The payload type changed after signing.",
               [(_mutate(good, payload_type="itmolink.v1.TransferVoid"),
                 "REJECTION_CODE_BAD_SIGNATURE")]),
        Vector("tampered-signature", "One signature byte changed.",
               [(_mutate(good, flip_signature=True), "REJECTION_CODE_BAD_SIGNATURE")]),
        Vector("unpinned-key", "Signed with a key the receiver does not pin.",
               [(sealed(query(), STRANGER), "REJECTION_CODE_UNKNOWN_SIGNING_KEY")]),
        Vector("expired-key", "Signed with a pinned key whose validity ended before now.",
               [(sealed(query(), LAO_EXPIRED), "REJECTION_CODE_SIGNING_KEY_EXPIRED")]),
        Vector("not-yet-valid-key", "Signed with a pinned key whose validity starts after now.",
               [(sealed(query(), LAO_FUTURE), "REJECTION_CODE_SIGNING_KEY_NOT_YET_VALID")]),
        Vector("revoked-key", "Signed with a pinned key that was revoked.",
               [(sealed(query(), LAO_REVOKED), "REJECTION_CODE_SIGNING_KEY_REVOKED")]),
        Vector("not-an-envelope", "Bytes that do not decode as an Envelope.",
               [(b"\xff\xff\xff\xff", "REJECTION_CODE_MALFORMED_ENVELOPE")]),
        Vector("wrong-audience", "A message for JPN delivered to KOR.",
               [(sealed(query(audience="JPN")), "REJECTION_CODE_WRONG_AUDIENCE")]),
        Vector("unsupported-version", "protocol_version 2.",
               [(sealed(query(protocol_version=2)), "REJECTION_CODE_UNSUPPORTED_VERSION")]),
        Vector("sender-mismatch", "The header names JPN as sender; LAO's key signed it.",
               [(sealed(query(sender_party="JPN", sender_registry="JPN-NR")),
                 "REJECTION_CODE_SENDER_MISMATCH")]),
        Vector("signer-not-peer", "Signed by LAO, delivered over KOR's connection from JPN.",
               [(good, "REJECTION_CODE_SIGNER_NOT_PEER")], peer="JPN"),
        Vector("sent-at-ahead", "sent_at ten minutes ahead of the receiver's clock.",
               [(sealed(query(sent_at=timestamp(to_us(NOW + dt.timedelta(minutes=10))))),
                 "REJECTION_CODE_SENT_AT_OUT_OF_WINDOW")]),
        Vector("sent-at-too-old", "sent_at 31 days behind the receiver's clock (older than "
               "max_message_age_days).",
               [(sealed(query(sent_at=timestamp(to_us(NOW - MAX_MESSAGE_AGE
                                                     - dt.timedelta(days=1))))),
                 "REJECTION_CODE_SENT_AT_OUT_OF_WINDOW")]),
        Vector("unknown-payload-type", "A verified envelope of a type no node accepts.",
               [(sealed(b"", payload_type="itmolink.v1.NoSuchMessage"),
                 "REJECTION_CODE_UNKNOWN_PAYLOAD_TYPE")]),
        Vector("replay-same", "The same envelope delivered twice: the second gets the stored "
               "reply (accepted again, applied once).", [(good, "accepted"), (good, "accepted")]),
        Vector("replay-changed", "A second message reusing the first one's message id with "
               "different content.",
               [(good, "accepted"),
                (sealed(transfer_pb2.TransferStatusQuery(header=header(), transfer_id="LAO-T-9")
                        .SerializeToString()), "REJECTION_CODE_DUPLICATE_MESSAGE_CONFLICT")]),
    ]  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def document() -> dict[str, Any]:
    def key(k: SigningKey, **window: str) -> dict[str, Any]:
        public = k.verifying_key().public_bytes
        return {"key_id": k.key_id, "party": k.party, "public_key": _b64(public), **window}

    return {
        "version": VERSION,
        "description": __doc__.split("\n\n")[0] if __doc__ else "",
        "receiver": {
            "party": "KOR",
            "registry": "KOR-NR",
            "now": NOW.isoformat(),
            # The verdicts on sent_at assume these windows (docs/PROTOCOL.md §2.5).
            "max_clock_skew_seconds": MAX_CLOCK_SKEW // dt.timedelta(seconds=1),
            "max_message_age_days": MAX_MESSAGE_AGE.days,
        },
        "pinned_keys": [
            key(LAO),
            key(LAO_EXPIRED, not_after=(NOW - dt.timedelta(days=1)).isoformat()),
            key(LAO_REVOKED),
            key(LAO_FUTURE, not_before=(NOW + dt.timedelta(days=1)).isoformat()),
        ],
        "revoked_key_ids": [LAO_REVOKED.key_id],
        "private_key_seeds": {
            k.key_id: "sha256('itmolink test vector key " + name + "')"
            for k, name in (
                (LAO, "LAO-1"),
                (LAO_EXPIRED, "LAO-expired"),
                (LAO_REVOKED, "LAO-revoked"),
                (LAO_FUTURE, "LAO-not-yet-valid"),
                (STRANGER, "LAO-unpinned"),
            )
        },
        "vectors": [
            {
                "name": v.name,
                "description": v.description,
                "peer": v.peer,
                "deliveries": [
                    {"envelope": _b64(raw), "verdict": verdict} for raw, verdict in v.deliveries
                ],
            }
            for v in vectors()
        ],
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(render())
    sys.stdout.write(f"wrote {PATH}\n")
