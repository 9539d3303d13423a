"""How one issuance is split between its destinations, in whole tonnes.

An issuance of Q tCO2e goes, in this order of serials, to:

1. the Adaptation Fund account: the share of proceeds, 5% of Q, for every
   A6.4ER (authorised or mitigation contribution unit);
2. the OMGE cancellation account: the mandatory 2% of Q for A6.4ERs;
3. the OMGE cancellation account again, as a voluntary cancellation: the
   cooperative approach's voluntary OMGE rate (Article 6.2 "strongly
   encourages" OMGE; any unit type may carry it);
4. the acquiring party: the cooperative approach's sharing ratio of what is
   left (JCM-style, e.g. 80%);
5. the host's holding account: the rest.

Rounding. Units are whole tonnes, so every percentage must be rounded, and
the parts must add up to Q exactly:

- Levies (share of proceeds, mandatory and voluntary OMGE) are rounded *up*:
  ``ceil(Q * rate)``. The fund is never short-changed, and OMGE, which the
  rules set as "at least 2%", is never below its rate. If the rounded levies
  would exceed Q (only Q = 1 for A6.4ERs: 1 + 1 > 1) the issuance is refused
  with QUANTITY_TOO_SMALL_FOR_LEVIES rather than shorting a levy.
- The acquiring party's share is rounded *down*: ``floor(net * ratio)``, and
  the host keeps the remainder. The units are issued in the host's registry
  and the host bears the corresponding adjustment, so the fractional tonne
  stays where the mitigation happened; the buyer's share never exceeds the
  agreed ratio.

Transitioned CERs carry no share of proceeds and no mandatory OMGE.
Rates are integer basis points (1/100 of a percent), so the arithmetic is
exact for any Q up to the largest serial.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import UnitType

BASIS_POINTS = 10_000
SHARE_OF_PROCEEDS_BP = 500  # 5% to the Adaptation Fund
MANDATORY_OMGE_BP = 200  # 2% cancelled for overall mitigation in global emissions


class Destination(enum.Enum):
    """Where a part of an issuance goes, in the serial order it is allocated."""

    ADAPTATION_FUND = "adaptation-fund"
    OMGE_CANCELLATION = "omge-cancellation"
    VOLUNTARY_OMGE_CANCELLATION = "voluntary-omge-cancellation"
    BUYER_SHARE = "buyer-share"
    HOST_HOLDING = "host-holding"


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """A cooperative approach's terms for splitting issued units."""

    # Share of the units left after levies that goes to the acquiring party.
    buyer_share_bp: int = 0
    # Voluntary OMGE cancellation, on top of any mandatory OMGE.
    voluntary_omge_bp: int = 0

    def __post_init__(self) -> None:
        for name in ("buyer_share_bp", "voluntary_omge_bp"):
            value = getattr(self, name)
            if not 0 <= value <= BASIS_POINTS:
                raise ValueError(f"{name} is {value}; it must be 0 to {BASIS_POINTS} basis points")


@dataclass(frozen=True, slots=True)
class IssuanceSplit:
    """The quantities of one issuance per destination; they add up to ``issued``."""

    issued: int
    adaptation_fund: int
    omge_cancellation: int
    voluntary_omge_cancellation: int
    buyer_share: int
    host_holding: int

    def __post_init__(self) -> None:
        parts = self.parts()
        assert all(quantity >= 0 for _, quantity in parts), self
        assert sum(quantity for _, quantity in parts) == self.issued, self

    def parts(self) -> tuple[tuple[Destination, int], ...]:
        """(destination, quantity) in serial order, zero quantities included."""
        return (
            (Destination.ADAPTATION_FUND, self.adaptation_fund),
            (Destination.OMGE_CANCELLATION, self.omge_cancellation),
            (Destination.VOLUNTARY_OMGE_CANCELLATION, self.voluntary_omge_cancellation),
            (Destination.BUYER_SHARE, self.buyer_share),
            (Destination.HOST_HOLDING, self.host_holding),
        )


def _ceil_rate(quantity: int, bp: int) -> int:
    return -(-quantity * bp // BASIS_POINTS)


def split_issuance(unit_type: UnitType, quantity: int, policy: IssuancePolicy) -> IssuanceSplit:
    """Split an issuance of ``quantity`` tCO2e of ``unit_type`` (see the module docstring)."""
    if quantity <= 0:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH, f"quantity must be positive, not {quantity}"
        )
    mandatory = unit_type.mandatory_levies
    fund = _ceil_rate(quantity, SHARE_OF_PROCEEDS_BP) if mandatory else 0
    omge = _ceil_rate(quantity, MANDATORY_OMGE_BP) if mandatory else 0
    voluntary = _ceil_rate(quantity, policy.voluntary_omge_bp)
    levies = fund + omge + voluntary
    if levies > quantity:
        raise Rejected(
            RejectionCode.QUANTITY_TOO_SMALL_FOR_LEVIES,
            f"{quantity} tCO2e of {unit_type.name} cannot carry its levies in whole tonnes "
            f"(share of proceeds {fund}, OMGE {omge}, voluntary OMGE {voluntary}): "
            "issue a larger quantity",
        )
    net = quantity - levies
    buyer = net * policy.buyer_share_bp // BASIS_POINTS
    return IssuanceSplit(
        issued=quantity,
        adaptation_fund=fund,
        omge_cancellation=omge,
        voluntary_omge_cancellation=voluntary,
        buyer_share=buyer,
        host_holding=net - buyer,
    )


def allocate_block(block: Block, split: IssuanceSplit) -> list[tuple[Destination, Block]]:
    """Cut the issued ``block`` into one contiguous block per non-empty destination."""
    if block.quantity != split.issued:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH,
            f"block {block.label()} holds {block.quantity} tCO2e but the split is of "
            f"{split.issued}",
        )
    allocated: list[tuple[Destination, Block]] = []
    rest: Block | None = block
    for destination, quantity in split.parts():
        if quantity == 0:
            continue
        assert rest is not None
        head, rest = rest.split(quantity)
        allocated.append((destination, head))
    assert rest is None
    return allocated
