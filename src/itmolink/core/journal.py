"""The tamper-evident journal: every envelope sent or received, in a hash chain.

Each entry's hash covers the previous entry's hash and every field of the
entry, length-prefixed so that no two different entries encode alike::

    entry_hash = SHA-256(prev_hash || F(id) || F(direction) || F(partner) ||
                         F(message_id) || F(payload_type) || F(recorded_at) || F(envelope))
    F(x) = 8-byte big-endian length of x || x   (integers as 8-byte big-endian)

The first entry's prev_hash is 32 zero bytes. ``verify_chain`` finds an
edited, removed, inserted or reordered entry. Removing entries from the end
leaves a valid shorter chain; the recorded head (kept beside the journal) and
the partner's own journal catch that.

The operators' audit trail (every admin request, "started" and then its
outcome) is chained the same way, over its own fields::

    audit_hash = SHA-256(prev_hash || F(id) || F(operator) || F(method) ||
                         F(request) || F(outcome) || F(recorded_at))
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

GENESIS_HASH = b"\x00" * 32


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: int
    direction: str
    partner: str
    message_id: str
    payload_type: str
    recorded_at: int
    envelope: bytes
    prev_hash: bytes
    entry_hash: bytes

    def computed_hash(self) -> bytes:
        return expected_hash(self)


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(8, "big") + value


def link_hash(prev_hash: bytes, fields: Iterable[bytes]) -> bytes:
    """SHA-256 over the previous hash and each field, length-prefixed."""
    # One buffer, hashed at once: the same bytes as one update per field.
    return hashlib.sha256(prev_hash + b"".join([_field(value) for value in fields])).digest()


def _int(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


_LENGTH_OF_INT = (8).to_bytes(8, "big")
# F(id) and F(recorded_at): the length 8, then the 8-byte signed value.
_FIELD_INT = struct.Struct(">8sq")
_LENGTH = struct.Struct(">Q")


def entry_hash(
    prev_hash: bytes,
    *,
    id: int,
    direction: str,
    partner: str,
    message_id: str,
    payload_type: str,
    recorded_at: int,
    envelope: bytes,
) -> bytes:
    # link_hash over the seven fields, spelt out (it runs for every message sent
    # or received): the same bytes, with fewer intermediate objects.
    direction_bytes = direction.encode()
    partner_bytes = partner.encode()
    message_bytes = message_id.encode()
    type_bytes = payload_type.encode()
    length = _LENGTH.pack
    return hashlib.sha256(
        b"".join((
            prev_hash,
            _FIELD_INT.pack(_LENGTH_OF_INT, id),
            length(len(direction_bytes)), direction_bytes,
            length(len(partner_bytes)), partner_bytes,
            length(len(message_bytes)), message_bytes,
            length(len(type_bytes)), type_bytes,
            _FIELD_INT.pack(_LENGTH_OF_INT, recorded_at),
            length(len(envelope)), envelope,
        ))
    ).digest()  # fmt: skip


def audit_hash(
    prev_hash: bytes,
    *,
    id: int,
    operator: str,
    method: str,
    request: str,
    outcome: str,
    recorded_at: int,
) -> bytes:
    return link_hash(
        prev_hash,
        (
            _int(id),
            operator.encode(),
            method.encode(),
            request.encode(),
            outcome.encode(),
            _int(recorded_at),
        ),
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the operators' audit trail."""

    id: int
    operator: str
    method: str
    request: str
    outcome: str
    recorded_at: int
    prev_hash: bytes
    entry_hash: bytes

    def computed_hash(self) -> bytes:
        return audit_hash(
            self.prev_hash,
            id=self.id,
            operator=self.operator,
            method=self.method,
            request=self.request,
            outcome=self.outcome,
            recorded_at=self.recorded_at,
        )


class Chained(Protocol):
    """A link of a hash chain: its position, its predecessor's hash and its own."""

    @property
    def id(self) -> int: ...

    @property
    def prev_hash(self) -> bytes: ...

    @property
    def entry_hash(self) -> bytes: ...

    def computed_hash(self) -> bytes: ...


def expected_hash(entry: JournalEntry) -> bytes:
    return entry_hash(
        entry.prev_hash,
        id=entry.id,
        direction=entry.direction,
        partner=entry.partner,
        message_id=entry.message_id,
        payload_type=entry.payload_type,
        recorded_at=entry.recorded_at,
        envelope=entry.envelope,
    )


@dataclass(frozen=True, slots=True)
class ChainProblem:
    entry_id: int
    problem: str


def verify_chain(
    entries: Iterable[Chained],
    *,
    recorded_head: tuple[int, bytes] | None = None,
    first_id: int = 1,
) -> list[ChainProblem]:
    """Every break in the chain, in order; an empty list when the chain is intact.

    ``entries`` must be in id order, the first with id ``first_id``.
    ``recorded_head`` is the (id, hash) of the last entry as recorded when it
    was appended.
    """
    problems: list[ChainProblem] = []
    prev_hash = GENESIS_HASH
    expected_id = first_id
    last: Chained | None = None
    for entry in entries:
        if entry.id != expected_id:
            problems.append(
                ChainProblem(entry.id, f"entry {expected_id} expected here: removed or reordered")
            )
        if entry.prev_hash != prev_hash:
            problems.append(ChainProblem(entry.id, "does not follow the previous entry"))
        if entry.computed_hash() != entry.entry_hash:
            problems.append(ChainProblem(entry.id, "content does not match its hash: edited"))
        prev_hash = entry.entry_hash
        expected_id = entry.id + 1
        last = entry
    if recorded_head is not None:
        head_id, head_hash = recorded_head
        if last is None or (last.id, last.entry_hash) != (head_id, head_hash):
            problems.append(
                ChainProblem(
                    head_id, "the chain does not end at its recorded head: entries removed"
                )
            )
    return problems
