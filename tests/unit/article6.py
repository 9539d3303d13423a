"""Builders shared by the Article 6 rule tests: one passing authorisation and its blocks.

Each test changes one fact of these and names the code it expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from itmolink.core.authorisation import Authorisation
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType

TERMS = AuthorisationTerms(
    authorisation_id="LAO-A-0001",
    version=1,
    host_party="LAO",
    activity_id="LAO-SOLAR-1GW",
    cooperative_approach_id="CA0001",
    acquiring_parties=frozenset({"KOR", "JPN"}),
    purposes=frozenset({Purpose.NDC}),
    vintage_from=2021,
    vintage_to=2030,
    quantity_cap=100_000,
    unit_type=UnitType.ITMO,
)
NDC_AUTH = Authorisation(terms=TERMS)
OIMP_AUTH = Authorisation(
    terms=dataclasses.replace(TERMS, purposes=frozenset({Purpose.NDC, Purpose.OIMP})),
    oimp_detail="CORSIA",
    first_transfer_definition=FirstTransferDefinition.AT_ISSUANCE,
)


def authorisation(
    base: Authorisation = NDC_AUTH, *, terms: dict[str, object] | None = None, **changes: object
) -> Authorisation:
    """``base`` with some of its terms and some of its other fields changed."""
    new_terms = dataclasses.replace(base.terms, **(terms or {}))  # type: ignore[arg-type]
    return dataclasses.replace(base, terms=new_terms, **changes)  # type: ignore[arg-type]


def block(start: int, end: int, **changes: object) -> Block:
    """A block issued under TERMS."""
    base = Block(
        originating_registry="LAO-NR",
        serial_start=start,
        serial_end=end,
        unit_type=UnitType.ITMO,
        vintage=2025,
        activity_id="LAO-SOLAR-1GW",
        authorisation_id="LAO-A-0001",
        cooperative_approach_id="CA0001",
        first_transferring_party="LAO",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def code_of(check: Callable[[], object]) -> RejectionCode | None:
    """The code ``check`` rejects with, or None when it passes."""
    try:
        check()
    except Rejected as exc:
        return exc.code
    return None
