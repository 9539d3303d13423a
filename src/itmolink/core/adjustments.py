"""Corresponding adjustments: what each party books when a transfer completes.

The first transferring (host) party adds the transferred tCO2e to its
reported emissions; the acquiring party subtracts it. In this version both
book the adjustment to the vintage year of the units, the year in which the
mitigation occurred, and the year is recorded explicitly on every entry so a
later accounting method can book it elsewhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from itmolink.core.blocks import Block
from itmolink.core.transfer import Role
from itmolink.core.units import UnitType

METHOD_VINTAGE_YEAR = "vintage-year"


@dataclass(frozen=True, slots=True)
class AdjustmentEntry:
    party: str
    partner: str
    transfer_id: str
    year: int
    amount: int
    unit_type: UnitType
    method: str


def adjustments_for(
    role: Role, party: str, partner: str, transfer_id: str, blocks: Iterable[Block]
) -> list[AdjustmentEntry]:
    """One entry per (year, unit type) for the blocks of a completed transfer.

    The sender's entries are positive, the receiver's negative, so the two
    ledgers of a completed transfer are equal and opposite. Unit types that
    carry no corresponding adjustment produce no entry.
    """
    sums: dict[tuple[int, UnitType], int] = defaultdict(int)
    for block in blocks:
        if block.unit_type.requires_adjustment:
            sums[(block.vintage, block.unit_type)] += block.quantity
    sign = 1 if role is Role.SENDER else -1
    return [
        AdjustmentEntry(
            party=party,
            partner=partner,
            transfer_id=transfer_id,
            year=year,
            amount=sign * amount,
            unit_type=unit_type,
            method=METHOD_VINTAGE_YEAR,
        )
        for (year, unit_type), amount in sorted(sums.items())
    ]
