"""Reconciliation between two registries, in three phases like the ITL's.

Both registries describe every transfer between them that was proposed before
the snapshot time and is final on their side, the same way:

1. totals: tCO2e moved per (sender, unit type, vintage, authorisation);
2. blocks: per transfer, whether units moved, which blocks, and the
   corresponding adjustments each party books for it (the *blocks leaf*);
3. journal: per transfer, the digests of the signed messages that decided it
   (the *journal leaf*).

Leaves are placed in a 16-ary tree by the hex digits of SHA-256(transfer id).
A bucket is summarised by its leaf count and two 31-bit sums of its leaves'
digests, which a database can aggregate over a range of ids without reading
each leaf. Comparing the root, then only the children that differ, finds d
differing transfers among n with O(d log n) buckets exchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from itmolink.core.blocks import Block

HEX = "0123456789abcdef"
# Below this many leaves a bucket is compared leaf by leaf.
LEAF_LIMIT = 16
_SLICE = 2**31 - 1


def id_hash(transfer_id: str) -> str:
    """Where a transfer sits in the tree: the hex SHA-256 of its id."""
    return hashlib.sha256(transfer_id.encode()).hexdigest()


def slices(digest: bytes) -> tuple[int, int]:
    """Two 31-bit numbers from a leaf digest: summable in any SQL database."""
    return (
        int.from_bytes(digest[0:4], "big") & _SLICE,
        int.from_bytes(digest[4:8], "big") & _SLICE,
    )


@dataclass(frozen=True, slots=True)
class TransferFacts:
    """What both registries must agree on about one transfer between them."""

    transfer_id: str
    sender: str
    receiver: str
    moved: bool
    blocks: tuple[Block, ...]
    # (year, tCO2e) pairs the sender books for the transfer (positive), and those the
    # receiver books (negative). Each node states its own role's from its ledger and
    # the partner's from the rule both know (core.adjustments.books_adjustment).
    sender_adjustments: tuple[tuple[int, int], ...]
    receiver_adjustments: tuple[tuple[int, int], ...]
    proposal_digest: bytes
    acceptance_digest: bytes


_LENGTH_8 = (8).to_bytes(4, "big")


def _encode(*parts: bytes | str | int) -> bytes:
    """Each part as its length (4 bytes, big-endian) and its bytes: text in UTF-8,
    integers as 8 bytes, big-endian, signed."""
    out: list[bytes] = []
    for part in parts:
        if isinstance(part, int):
            out += (_LENGTH_8, part.to_bytes(8, "big", signed=True))
        else:
            raw = part.encode() if isinstance(part, str) else part
            out += (len(raw).to_bytes(4, "big"), raw)
    return b"".join(out)


# The definition of the blocks leaf below (docs/PROTOCOL.md §11.4), stated in every BLOCKS
# query and answer (§11.2): 2 states both parties' adjustments (schema version 7 of the
# reference); 1, the entries a node booked with the sender's sign, was never stated (0).
BLOCKS_LEAF_DEFINITION = 2


def blocks_leaf(facts: TransferFacts) -> bytes:
    """Digest of what moved: nothing, or the blocks and both parties' adjustments."""
    parts: list[bytes | str | int] = [facts.transfer_id, facts.sender, facts.receiver]
    if facts.moved:
        parts.append("moved")
        for block in sorted(facts.blocks):
            parts += [
                block.originating_registry, block.serial_start, block.serial_end,
                int(block.unit_type), block.vintage, block.authorisation_id,
                block.activity_id, block.cooperative_approach_id, block.first_transferring_party,
            ]  # fmt: skip
        parts.append("sender")
        for year, amount in sorted(facts.sender_adjustments):
            parts += [year, amount]
        parts.append("receiver")
        for year, amount in sorted(facts.receiver_adjustments):
            parts += [year, amount]
    else:
        parts.append("not moved")
    return hashlib.sha256(_encode(*parts)).digest()


def journal_leaf(facts: TransferFacts) -> bytes:
    """Digest of the signed messages that moved the units: the proposal and the
    acceptance. A transfer that moved nothing has no such evidence on both sides
    (a receiver may never have seen the proposal), so only the fact is hashed."""
    parts: list[bytes | str | int] = [facts.transfer_id]
    if facts.moved:
        parts += [facts.proposal_digest, facts.acceptance_digest]
    else:
        parts.append("not moved")
    return hashlib.sha256(_encode(*parts)).digest()


@dataclass(frozen=True, slots=True)
class Bucket:
    prefix: str
    count: int
    h1: int
    h2: int

    def same_as(self, other: Bucket) -> bool:
        return (self.count, self.h1, self.h2) == (other.count, other.h1, other.h2)


@dataclass(frozen=True, slots=True)
class Total:
    sender: str
    unit_type: int
    vintage: int
    authorisation_id: str
    quantity: int
    transfers: int


def compare_totals(ours: Iterable[Total], theirs: Iterable[Total]) -> list[str]:
    """Every (sender, unit type, vintage, authorisation) whose totals differ."""

    def key(t: Total) -> tuple[str, int, int, str]:
        return (t.sender, t.unit_type, t.vintage, t.authorisation_id)

    mine = {key(t): (t.quantity, t.transfers) for t in ours}
    other = {key(t): (t.quantity, t.transfers) for t in theirs}
    differences = []
    for k in sorted(set(mine) | set(other)):
        if mine.get(k, (0, 0)) != other.get(k, (0, 0)):
            sender, unit_type, vintage, authorisation = k
            differences.append(
                f"{sender} {authorisation} vintage {vintage} unit type {unit_type}: "
                f"here {mine.get(k, (0, 0))[0]} tCO2e in {mine.get(k, (0, 0))[1]} transfers, "
                f"partner {other.get(k, (0, 0))[0]} in {other.get(k, (0, 0))[1]}"
            )
    return differences


def children(prefix: str) -> list[str]:
    return [prefix + digit for digit in HEX]


def differing_children(
    ours: Sequence[Bucket], theirs: Sequence[Bucket]
) -> tuple[list[str], list[str]]:
    """Compare the children of some buckets: (prefixes to open further,
    prefixes small enough to compare leaf by leaf)."""
    mine = {b.prefix: b for b in ours}
    other = {b.prefix: b for b in theirs}
    descend, compare = [], []
    for prefix in sorted(set(mine) | set(other)):
        a = mine.get(prefix, Bucket(prefix, 0, 0, 0))
        b = other.get(prefix, Bucket(prefix, 0, 0, 0))
        if a.same_as(b):
            continue
        if max(a.count, b.count) <= LEAF_LIMIT or len(prefix) >= 64:
            compare.append(prefix)
        else:
            descend.append(prefix)
    return descend, compare


def differing_leaves(ours: dict[str, bytes], theirs: dict[str, bytes]) -> list[str]:
    """Transfer ids whose leaf differs or exists on one side only."""
    return sorted(t for t in set(ours) | set(theirs) if ours.get(t) != theirs.get(t))
