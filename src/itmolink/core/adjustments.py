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
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType

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


def oimp_at_issuance(purposes: Iterable[Purpose], definition: int) -> bool:
    """Whether an authorisation's units may be first transferred, and adjusted by the
    host, at their issuance: OIMP first transferred at authorisation or issuance."""
    return Purpose.OIMP in set(purposes) and definition in (
        FirstTransferDefinition.AT_AUTHORISATION,
        FirstTransferDefinition.AT_ISSUANCE,
    )


def books_adjustment(
    role: Role, *, host_sends: bool, first_transfer: bool, ndc: bool, oimp_at_issuance: bool
) -> bool:
    """Whether the party in ``role`` books adjustments for a completed transfer (§6.6).

    ``host_sends``: the sender is the host of the units (their first transferring
    party); ``first_transfer``: the proposal's flag (§5.8); ``ndc``: the authorisation
    includes use toward an NDC; ``oimp_at_issuance``: it also includes OIMP with the
    first transfer at authorisation or at issuance. Every party but a sending host
    books only units authorised for NDC use. The host books its transfer of units
    authorised for NDC use, as their first transfer, unless they were first
    transferred (and adjusted) at their issuance already, which only an
    ``oimp_at_issuance`` authorisation amended to add NDC after the issuance allows:
    there, and only there, the proposal's flag tells. Both parties hold all four
    facts: the blocks, the signed proposal and the authorisation are shared.
    """
    if role is Role.SENDER and host_sends:
        return ndc and (first_transfer or not oimp_at_issuance)
    return ndc


def expected_adjustments(role: Role, blocks: Iterable[Block]) -> tuple[tuple[int, int], ...]:
    """The (year, amount) pairs a party in ``role`` books for ``blocks`` when it books
    (:func:`books_adjustment`), as :func:`adjustments_for` books them: one per
    (vintage, unit type that carries an adjustment), to the vintage, positive for
    the sender and negative for the receiver; sorted."""
    return tuple(sorted((e.year, e.amount) for e in adjustments_for(role, "", "", "", blocks)))
