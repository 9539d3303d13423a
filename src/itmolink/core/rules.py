"""Article 6 checks a registry applies to authorisations, issuances and transfers.

Each function raises :class:`Rejected` with the code of the first failed
check, and returns nothing when every check passes. The node gathers the
facts (from its store) and calls these; no check reads anything itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from itmolink.core.blocks import Block, check_disjoint, total, validate_block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import (
    FIRST_ARTICLE6_VINTAGE,
    LAST_TRANSITIONED_CER_VINTAGE,
    Purpose,
    UnitType,
)


@dataclass(frozen=True, slots=True)
class AuthorisationTerms:
    """What a host party authorised, as the node needs it for checks."""

    authorisation_id: str
    version: int
    host_party: str
    activity_id: str
    cooperative_approach_id: str
    acquiring_parties: frozenset[str]
    purposes: frozenset[Purpose]
    vintage_from: int
    vintage_to: int
    quantity_cap: int  # 0: no cap
    unit_type: UnitType


def check_authorisation_terms(terms: AuthorisationTerms) -> None:
    """Well-formedness of an authorisation, wherever it was written."""
    if not terms.authorisation_id:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation has no authorisation_id")
    if not terms.activity_id:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation has no activity id")
    if not terms.acquiring_parties:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation names no acquiring party")
    if terms.host_party in terms.acquiring_parties:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"host party {terms.host_party} cannot be an acquiring party of its own authorisation",
        )
    if not terms.purposes or Purpose.UNSPECIFIED in terms.purposes:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation needs purposes NDC and/or OIMP")
    if terms.unit_type == UnitType.UNSPECIFIED:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation has no unit_type")
    if terms.version < 1:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation version starts at 1")
    if terms.unit_type is UnitType.TRANSITIONED_CER:
        if terms.vintage_to > LAST_TRANSITIONED_CER_VINTAGE:
            raise Rejected(
                RejectionCode.VINTAGE_NOT_AUTHORISED,
                f"vintage_to {terms.vintage_to} is after {LAST_TRANSITIONED_CER_VINTAGE}: "
                "transitioned CERs are pre-2021 emission reductions",
            )
    elif terms.vintage_from < FIRST_ARTICLE6_VINTAGE:
        raise Rejected(
            RejectionCode.VINTAGE_BEFORE_2021,
            f"vintage_from {terms.vintage_from} is before {FIRST_ARTICLE6_VINTAGE}",
        )
    if terms.vintage_to < terms.vintage_from:
        raise Rejected(
            RejectionCode.VINTAGE_NOT_AUTHORISED,
            f"vintage range {terms.vintage_from}-{terms.vintage_to} is empty",
        )


def check_received_authorisation(
    terms: AuthorisationTerms, *, me: str, sender: str, named_before: bool = False
) -> None:
    """An acquiring party's checks on an AuthorisationStatement it received.

    ``named_before``: an earlier version recorded here named ``me``, so a version
    that no longer does is an amendment removing ``me``, which is recorded too.
    """
    check_authorisation_terms(terms)
    if terms.host_party != sender:
        raise Rejected(
            RejectionCode.NOT_HOST_PARTY,
            f"authorisation names host {terms.host_party} but was sent by {sender}",
        )
    if me not in terms.acquiring_parties and not named_before:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"authorisation {terms.authorisation_id} does not name {me} as an acquiring party",
        )


def check_vintage(terms: AuthorisationTerms, vintage: int) -> None:
    """A vintage exists for the unit type and lies in the authorised range.

    Article 6 outcomes start in 2021; transitioned CERs are the one unit type
    whose vintages are all before 2021 (see ``UnitType.vintage_allowed``).
    """
    if terms.unit_type is UnitType.TRANSITIONED_CER:
        if not terms.unit_type.vintage_allowed(vintage):
            raise Rejected(
                RejectionCode.VINTAGE_NOT_AUTHORISED,
                f"vintage {vintage} is after {LAST_TRANSITIONED_CER_VINTAGE}: "
                "transitioned CERs are pre-2021 emission reductions",
            )
    elif vintage < FIRST_ARTICLE6_VINTAGE:
        raise Rejected(
            RejectionCode.VINTAGE_BEFORE_2021,
            f"vintage {vintage} is before {FIRST_ARTICLE6_VINTAGE}",
        )
    if not terms.vintage_from <= vintage <= terms.vintage_to:
        raise Rejected(
            RejectionCode.VINTAGE_NOT_AUTHORISED,
            f"vintage {vintage} is outside authorisation {terms.authorisation_id}'s "
            f"range {terms.vintage_from}-{terms.vintage_to}",
        )


def check_issuance(terms: AuthorisationTerms, *, vintage: int, quantity: int, issued: int) -> None:
    """The host's checks before issuing ``quantity`` units of ``vintage``."""
    if quantity <= 0:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH, f"quantity must be positive, not {quantity}"
        )
    check_vintage(terms, vintage)
    if terms.quantity_cap and issued + quantity > terms.quantity_cap:
        raise Rejected(
            RejectionCode.AUTHORISATION_CAP_EXCEEDED,
            f"issuing {quantity} would bring authorisation {terms.authorisation_id} to "
            f"{issued + quantity} tCO2e, above its cap of {terms.quantity_cap}",
        )


def check_transfer_request(
    terms: AuthorisationTerms, *, to_party: str, vintage: int, acknowledged: bool
) -> None:
    """The sender's checks before proposing a transfer to ``to_party``."""
    if to_party not in terms.acquiring_parties:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"authorisation {terms.authorisation_id} does not name {to_party} "
            "as an acquiring party",
        )
    if not acknowledged:
        raise Rejected(
            RejectionCode.AUTHORISATION_NOT_ACKNOWLEDGED,
            f"{to_party} has not acknowledged authorisation {terms.authorisation_id} yet",
        )
    check_vintage(terms, vintage)


def check_transfer_proposal(
    terms: AuthorisationTerms | None,
    *,
    authorisation_id: str,
    me: str,
    quantity: int,
    blocks: Sequence[Block],
) -> None:
    """A receiver's checks on a TransferProposal's content."""
    if terms is None:
        raise Rejected(
            RejectionCode.UNKNOWN_AUTHORISATION,
            f"authorisation {authorisation_id!r} was never received from the sender",
        )
    if me not in terms.acquiring_parties:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"authorisation {terms.authorisation_id} does not name {me} as an acquiring party",
        )
    if not blocks:
        raise Rejected(RejectionCode.MISSING_FIELD, "proposal carries no blocks")
    for block in blocks:
        validate_block(block)
    if total(blocks) != quantity:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH,
            f"blocks add up to {total(blocks)} tCO2e but the proposal says {quantity}",
        )
    check_disjoint(blocks)
    check_blocks_under(terms, blocks)


def check_blocks_under(terms: AuthorisationTerms, blocks: Sequence[Block]) -> None:
    """Each block carries the authorisation's attributes and an authorised vintage."""
    expected = (
        terms.authorisation_id,
        terms.unit_type,
        terms.cooperative_approach_id,
        terms.host_party,
        terms.activity_id,
    )
    for block in blocks:
        actual = (
            block.authorisation_id,
            block.unit_type,
            block.cooperative_approach_id,
            block.first_transferring_party,
            block.activity_id,
        )
        if actual != expected:
            raise Rejected(
                RejectionCode.BLOCK_ATTRIBUTE_MISMATCH,
                f"block {block.label()} attributes {actual} do not match authorisation "
                f"{terms.authorisation_id} {expected}",
            )
        check_vintage(terms, block.vintage)


def check_not_held(incoming: Sequence[Block], existing: Sequence[Block]) -> None:
    """Reject incoming serials that this registry already holds or expects."""
    for block in incoming:
        for other in existing:
            if block.overlaps(other):
                raise Rejected(
                    RejectionCode.SERIALS_ALREADY_HELD,
                    f"serials {block.label()} overlap {other.label()} already recorded here",
                )
