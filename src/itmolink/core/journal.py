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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

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


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(8, "big") + value


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
    digest = hashlib.sha256(prev_hash)
    for value in (
        id.to_bytes(8, "big", signed=True),
        direction.encode(),
        partner.encode(),
        message_id.encode(),
        payload_type.encode(),
        recorded_at.to_bytes(8, "big", signed=True),
        envelope,
    ):
        digest.update(_field(value))
    return digest.digest()


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
    entries: Iterable[JournalEntry], *, recorded_head: tuple[int, bytes] | None = None
) -> list[ChainProblem]:
    """Every break in the chain, in order; an empty list when the journal is intact.

    ``entries`` must be in id order. ``recorded_head`` is the (id, hash) of the
    last entry as recorded when it was appended.
    """
    problems: list[ChainProblem] = []
    prev_hash = GENESIS_HASH
    expected_id = 1
    last: JournalEntry | None = None
    for entry in entries:
        if entry.id != expected_id:
            problems.append(
                ChainProblem(entry.id, f"entry {expected_id} expected here: removed or reordered")
            )
        if entry.prev_hash != prev_hash:
            problems.append(ChainProblem(entry.id, "does not follow the previous entry"))
        if expected_hash(entry) != entry.entry_hash:
            problems.append(ChainProblem(entry.id, "content does not match its hash: edited"))
        prev_hash = entry.entry_hash
        expected_id = entry.id + 1
        last = entry
    if recorded_head is not None:
        head_id, head_hash = recorded_head
        if last is None or (last.id, last.entry_hash) != (head_id, head_hash):
            problems.append(
                ChainProblem(
                    head_id, "the journal does not end at its recorded head: entries removed"
                )
            )
    return problems
