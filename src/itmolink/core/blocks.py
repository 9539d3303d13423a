"""Serial blocks: ranges of unit serial numbers that share every attribute.

Units are never stored one per tonne. A block is ``[serial_start, serial_end]``
(inclusive) plus its attributes, so moving 1 tCO2e or 10^9 tCO2e costs the
same. A partial transfer splits a block; blocks of one originating registry
never overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import UnitType

# Serials are stored as signed 64-bit integers by both SQLite and PostgreSQL.
MAX_SERIAL = 2**63 - 1


@dataclass(frozen=True, slots=True, order=True)
class Block:
    """A contiguous serial range with its attributes."""

    originating_registry: str
    serial_start: int
    serial_end: int
    unit_type: UnitType
    vintage: int
    activity_id: str
    authorisation_id: str
    cooperative_approach_id: str
    first_transferring_party: str

    @property
    def quantity(self) -> int:
        return self.serial_end - self.serial_start + 1

    def attributes(self) -> tuple[str, UnitType, int, str, str, str, str]:
        """Everything but the serial range: blocks merge only when these match."""
        return (
            self.originating_registry,
            self.unit_type,
            self.vintage,
            self.activity_id,
            self.authorisation_id,
            self.cooperative_approach_id,
            self.first_transferring_party,
        )

    def split(self, quantity: int) -> tuple[Block, Block | None]:
        """The first ``quantity`` units, and what remains (None if nothing)."""
        if not 0 < quantity <= self.quantity:
            raise ValueError(f"cannot split {quantity} from a block of {self.quantity}")
        # The fields spelt out rather than dataclasses.replace (twice as fast; a
        # proposal splits a block).
        cut = self.serial_start + quantity
        head = Block(
            self.originating_registry, self.serial_start, cut - 1, self.unit_type, self.vintage,
            self.activity_id, self.authorisation_id, self.cooperative_approach_id,
            self.first_transferring_party,
        )  # fmt: skip
        if cut > self.serial_end:
            return head, None
        return head, Block(
            self.originating_registry, cut, self.serial_end, self.unit_type, self.vintage,
            self.activity_id, self.authorisation_id, self.cooperative_approach_id,
            self.first_transferring_party,
        )  # fmt: skip

    def overlaps(self, other: Block) -> bool:
        return (
            self.originating_registry == other.originating_registry
            and self.serial_start <= other.serial_end
            and other.serial_start <= self.serial_end
        )

    def label(self) -> str:
        return f"{self.originating_registry}:{self.serial_start}-{self.serial_end}"


def validate_block(block: Block) -> None:
    """Reject a block whose range or attributes are not well formed."""
    if not block.originating_registry:
        raise Rejected(RejectionCode.INVALID_BLOCK, "block has no originating_registry")
    if not 1 <= block.serial_start <= block.serial_end <= MAX_SERIAL:
        raise Rejected(
            RejectionCode.INVALID_BLOCK,
            f"block {block.label()} is not a range 1 <= start <= end <= {MAX_SERIAL}",
        )
    if block.unit_type == UnitType.UNSPECIFIED:
        raise Rejected(RejectionCode.INVALID_BLOCK, f"block {block.label()} has no unit_type")


def check_disjoint(blocks: Iterable[Block]) -> None:
    """Reject a set of blocks in which two ranges overlap."""
    ordered = sorted(blocks, key=lambda b: (b.originating_registry, b.serial_start))
    for before, after in itertools.pairwise(ordered):
        if before.overlaps(after):
            raise Rejected(
                RejectionCode.OVERLAPPING_BLOCKS,
                f"blocks {before.label()} and {after.label()} overlap",
            )


def total(blocks: Iterable[Block]) -> int:
    return sum(block.quantity for block in blocks)


def take(blocks: Sequence[Block], quantity: int) -> tuple[list[Block], list[Block]]:
    """Choose ``quantity`` units from ``blocks`` in serial order.

    Returns the blocks taken and the remainders left behind by a split (at
    most one). Raises INSUFFICIENT_HOLDINGS when the blocks hold too little.
    """
    if quantity <= 0:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH, f"quantity must be positive, not {quantity}"
        )
    available = total(blocks)
    if available < quantity:
        raise Rejected(
            RejectionCode.INSUFFICIENT_HOLDINGS,
            f"{quantity} tCO2e requested but only {available} tCO2e held that match",
        )
    taken: list[Block] = []
    remainders: list[Block] = []
    needed = quantity
    for block in sorted(blocks, key=lambda b: (b.originating_registry, b.serial_start)):
        if needed == 0:
            break
        head, tail = block.split(min(needed, block.quantity))
        taken.append(head)
        needed -= head.quantity
        if tail is not None:
            remainders.append(tail)
    return taken, remainders


def coalesce(blocks: Iterable[Block]) -> list[Block]:
    """Merge adjacent blocks with equal attributes into as few blocks as possible."""
    merged: list[Block] = []
    for block in sorted(blocks, key=lambda b: (b.attributes(), b.serial_start)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.attributes() == block.attributes()
            and last.serial_end + 1 == block.serial_start
        ):
            merged[-1] = replace(last, serial_end=block.serial_end)
        else:
            merged.append(block)
    return merged


def cut_out(sources: Sequence[Block], wanted: Block) -> list[Block]:
    """What is left of ``sources`` once ``wanted`` is cut out of them.

    ``sources`` must cover every serial of ``wanted``, each with ``wanted``'s
    attributes; the pieces of the sources outside ``wanted`` (at most one before it
    and one after it) are returned. Raises INSUFFICIENT_HOLDINGS otherwise, naming
    the first serial not covered."""
    ordered = sorted(sources, key=lambda b: b.serial_start)
    remainders: list[Block] = []
    serial = wanted.serial_start
    for block in ordered:
        if not block.overlaps(wanted):
            continue
        if block.attributes() != wanted.attributes():
            raise Rejected(
                RejectionCode.INSUFFICIENT_HOLDINGS,
                f"{block.label()} is held here with other attributes than {wanted.label()}",
            )
        if block.serial_start > serial:
            break
        if block.serial_start < wanted.serial_start:
            remainders.append(replace(block, serial_end=wanted.serial_start - 1))
        if block.serial_end > wanted.serial_end:
            remainders.append(replace(block, serial_start=wanted.serial_end + 1))
        serial = block.serial_end + 1
    if serial <= wanted.serial_end:
        raise Rejected(
            RejectionCode.INSUFFICIENT_HOLDINGS,
            f"serial {wanted.originating_registry}:{serial} of {wanted.label()} is not held here",
        )
    return remainders
