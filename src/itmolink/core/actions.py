"""The actions a registry performs on authorised units, and the checks each needs.

Actions (decision 2/CMA.3, annex, para. 20(a); the AEF Actions table):
first transfer, transfer (including onward to a third party), acquisition,
use toward an NDC, use for OIMP, and voluntary cancellation. Each
``check_*`` function raises :class:`Rejected` with the code of the first
failed check and returns nothing when all pass. The node gathers the facts
(the authorisation, the blocks the action is on, what the account holds,
whether the units were already first-transferred) and calls it; nothing here
reads anything itself.

Checks run in the same order everywhere: who may act, the unit type, the
purpose, revocation, vintages and periods, then the blocks themselves and the
holdings. So the code names the most fundamental reason an action is
refused.

When is an action the *first transfer* (decision 2/CMA.3, annex, para. 2)?
For units authorised for NDC use, the first international transfer. For
OIMP, whatever the host defined: the authorisation, the issuance, or the use
or cancellation. Units authorised for both are first-transferred by the
earliest of the events that apply. Units only come into existence at
issuance, so "at authorisation" takes effect for each unit when it is
issued. A unit is first-transferred once; later events are not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from itmolink.core.accounting import NdcPeriod
from itmolink.core.authorisation import Authorisation
from itmolink.core.blocks import Block, check_disjoint, coalesce, validate_block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.rules import (
    check_blocks_under,
    check_not_held,
    check_transfer_proposal,
)
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType


class ActionType(enum.Enum):
    """What a registry did with units, as the AEF Actions table reports it."""

    AUTHORISATION = "authorisation"
    FIRST_TRANSFER = "first-transfer"
    TRANSFER = "transfer"
    ACQUISITION = "acquisition"
    USE_NDC = "use-ndc"
    USE_OIMP = "use-oimp"
    # A cancellation the rules require, e.g. OMGE at issuance.
    CANCELLATION = "cancellation"
    VOLUNTARY_CANCELLATION = "voluntary-cancellation"


class FirstTransferTrigger(enum.Enum):
    """The events that can make units first-transferred."""

    AUTHORISATION = "authorisation"
    ISSUANCE = "issuance"
    INTERNATIONAL_TRANSFER = "international-transfer"
    USE_OR_CANCELLATION = "use-or-cancellation"


_OIMP_TRIGGERS = {
    FirstTransferDefinition.AT_AUTHORISATION: FirstTransferTrigger.AUTHORISATION,
    FirstTransferDefinition.AT_ISSUANCE: FirstTransferTrigger.ISSUANCE,
    FirstTransferDefinition.AT_USE_OR_CANCELLATION: FirstTransferTrigger.USE_OR_CANCELLATION,
}


def first_transfer_triggers(authorisation: Authorisation) -> frozenset[FirstTransferTrigger]:
    """The events that first-transfer units under ``authorisation``."""
    triggers = set()
    if Purpose.NDC in authorisation.terms.purposes:
        triggers.add(FirstTransferTrigger.INTERNATIONAL_TRANSFER)
    if Purpose.OIMP in authorisation.terms.purposes:
        trigger = _OIMP_TRIGGERS.get(authorisation.first_transfer_definition)
        if trigger is None:
            raise Rejected(
                RejectionCode.MISSING_OIMP_DETAIL,
                f"authorisation {authorisation.authorisation_id} is for OIMP but does not "
                "define the first transfer",
            )
        triggers.add(trigger)
    return frozenset(triggers)


def is_first_transfer(
    authorisation: Authorisation,
    event: FirstTransferTrigger,
    *,
    already_first_transferred: bool,
) -> bool:
    """Whether ``event`` first-transfers units (not yet first-transferred) it acts on."""
    if already_first_transferred:
        return False
    triggers = first_transfer_triggers(authorisation)
    if event is FirstTransferTrigger.ISSUANCE and FirstTransferTrigger.AUTHORISATION in triggers:
        return True
    return event in triggers


# -- shared checks -----------------------------------------------------------------------


def check_held(blocks: Sequence[Block], holdings: Sequence[Block]) -> None:
    """Every serial of ``blocks`` is held, with the same attributes, in ``holdings``."""
    if not blocks:
        raise Rejected(RejectionCode.MISSING_FIELD, "the action names no blocks")
    for block in blocks:
        validate_block(block)
    check_disjoint(blocks)
    held = coalesce(holdings)
    for block in blocks:
        if not any(
            h.attributes() == block.attributes()
            and h.serial_start <= block.serial_start
            and block.serial_end <= h.serial_end
            for h in held
        ):
            raise Rejected(
                RejectionCode.INSUFFICIENT_HOLDINGS,
                f"block {block.label()} is not held in this account",
            )


def _check_blocks_of(authorisation: Authorisation, blocks: Sequence[Block]) -> None:
    check_blocks_under(authorisation.terms, blocks)


def _check_unit_type_for(unit_type: UnitType, purpose: Purpose) -> None:
    if purpose not in unit_type.allowed_purposes:
        raise Rejected(
            RejectionCode.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
            f"{unit_type.name} units cannot be used for {purpose.name}",
        )


def _check_purpose(authorisation: Authorisation, purpose: Purpose) -> None:
    if purpose not in authorisation.terms.purposes:
        raise Rejected(
            RejectionCode.PURPOSE_NOT_AUTHORISED,
            f"authorisation {authorisation.authorisation_id} does not authorise {purpose.name} use",
        )


def _check_not_revoked(authorisation: Authorisation, *, already_first_transferred: bool) -> None:
    # Revocation spares units already first-transferred (see core.authorisation).
    if authorisation.revoked and not already_first_transferred:
        raise Rejected(
            RejectionCode.AUTHORISATION_REVOKED,
            f"authorisation {authorisation.authorisation_id} is revoked for units not yet "
            "first-transferred",
        )


def _check_acquiring_party(authorisation: Authorisation, party: str) -> None:
    if party not in authorisation.terms.acquiring_parties:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"authorisation {authorisation.authorisation_id} does not name {party} "
            "as an acquiring party",
        )


def _check_transferable(unit_type: UnitType) -> None:
    # Units that may be used for nothing abroad are not transferred abroad.
    if not unit_type.allowed_purposes:
        raise Rejected(
            RejectionCode.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
            f"{unit_type.name} units are not authorised and cannot be transferred internationally",
        )


# -- the actions -------------------------------------------------------------------------


def check_first_transfer(
    authorisation: Authorisation,
    *,
    me: str,
    to_party: str,
    blocks: Sequence[Block],
    holdings: Sequence[Block],
    acknowledged: bool,
    already_first_transferred: bool = False,
    host_period: NdcPeriod | None = None,
) -> None:
    """The host's checks before first-transferring ``blocks`` to ``to_party``.

    ``host_period``, if given, is the host's NDC period: the adjustment for
    the first transfer is booked to the vintage, which must lie in it.
    """
    terms = authorisation.terms
    if me != terms.host_party:
        raise Rejected(
            RejectionCode.NOT_HOST_PARTY,
            f"only the host {terms.host_party} first-transfers units of "
            f"{terms.authorisation_id}, not {me}",
        )
    _check_transferable(terms.unit_type)
    _check_not_revoked(authorisation, already_first_transferred=False)
    if already_first_transferred:
        raise Rejected(
            RejectionCode.ALREADY_FIRST_TRANSFERRED,
            "these units are already first-transferred; transfer them as a subsequent transfer",
        )
    _check_acquiring_party(authorisation, to_party)
    if not acknowledged:
        raise Rejected(
            RejectionCode.AUTHORISATION_NOT_ACKNOWLEDGED,
            f"{to_party} has not acknowledged authorisation {terms.authorisation_id} yet",
        )
    if host_period is not None and terms.unit_type.requires_adjustment:
        for block in blocks:
            if block.vintage not in host_period:
                raise Rejected(
                    RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD,
                    f"block {block.label()} of vintage {block.vintage} is outside the host's "
                    f"NDC period {host_period.first_year}-{host_period.last_year}",
                )
    _check_blocks_of(authorisation, blocks)
    check_held(blocks, holdings)


def check_transfer(
    authorisation: Authorisation,
    *,
    me: str,
    to_party: str,
    blocks: Sequence[Block],
    holdings: Sequence[Block],
    already_first_transferred: bool,
) -> None:
    """A holder's checks before a transfer that is not a first transfer.

    This covers onward transfers by an acquiring party to a third party's
    registry, and OIMP units whose first transfer happens only at use or
    cancellation. The receiving party must be one the host authorised.
    """
    terms = authorisation.terms
    if to_party == me:
        raise Rejected(RejectionCode.NOT_ACQUIRING_PARTY, f"{me} cannot transfer units to itself")
    _check_transferable(terms.unit_type)
    _check_not_revoked(authorisation, already_first_transferred=already_first_transferred)
    _check_acquiring_party(authorisation, to_party)
    _check_blocks_of(authorisation, blocks)
    check_held(blocks, holdings)


def check_acquisition(
    authorisation: Authorisation | None,
    *,
    authorisation_id: str,
    me: str,
    from_party: str,
    quantity: int,
    blocks: Sequence[Block],
    existing: Sequence[Block],
    already_first_transferred: bool,
) -> None:
    """A receiving registry's checks on units it is offered.

    ``existing`` are the blocks this registry holds or expects whose serials
    could overlap; ``already_first_transferred`` is false when the offer is
    itself the first transfer.
    """
    if from_party == me:
        raise Rejected(RejectionCode.NOT_ACQUIRING_PARTY, f"{me} cannot acquire from itself")
    check_transfer_proposal(
        None if authorisation is None else authorisation.terms,
        authorisation_id=authorisation_id,
        me=me,
        quantity=quantity,
        blocks=blocks,
    )
    assert authorisation is not None
    _check_transferable(authorisation.terms.unit_type)
    _check_not_revoked(authorisation, already_first_transferred=already_first_transferred)
    check_not_held(blocks, existing)


def check_use_ndc(
    authorisation: Authorisation,
    *,
    me: str,
    blocks: Sequence[Block],
    holdings: Sequence[Block],
    use_year: int,
    ndc_period: NdcPeriod,
    already_first_transferred: bool = True,
) -> None:
    """A party's checks before using ``blocks`` toward its NDC for ``use_year``.

    The vintage must lie in the NDC period used toward: an earlier vintage
    would carry units over from a previous period (CARRY_OVER_NOT_ALLOWED),
    a later one borrows from the future (VINTAGE_OUTSIDE_NDC_PERIOD). The one
    exception is transitioned CERs, pre-2021 by definition, which count
    toward a first NDC and no other.
    """
    terms = authorisation.terms
    unit_type = terms.unit_type
    _check_unit_type_for(unit_type, Purpose.NDC)
    if unit_type.first_ndc_only and ndc_period.number != 1:
        raise Rejected(
            RejectionCode.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
            f"{unit_type.name} units count only toward a first NDC, not NDC {ndc_period.number}",
        )
    _check_purpose(authorisation, Purpose.NDC)
    host_using_cers = unit_type is UnitType.TRANSITIONED_CER and me == terms.host_party
    if not host_using_cers:
        _check_acquiring_party(authorisation, me)
    _check_not_revoked(authorisation, already_first_transferred=already_first_transferred)
    if use_year not in ndc_period:
        raise Rejected(
            RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD,
            f"use year {use_year} is outside the NDC period "
            f"{ndc_period.first_year}-{ndc_period.last_year}",
        )
    for block in blocks:
        if block.vintage < ndc_period.first_year and not unit_type.first_ndc_only:
            raise Rejected(
                RejectionCode.CARRY_OVER_NOT_ALLOWED,
                f"block {block.label()} of vintage {block.vintage} belongs before the NDC "
                f"period {ndc_period.first_year}-{ndc_period.last_year}; units do not carry over",
            )
        if block.vintage > ndc_period.last_year:
            raise Rejected(
                RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD,
                f"block {block.label()} of vintage {block.vintage} is after the NDC period "
                f"{ndc_period.first_year}-{ndc_period.last_year}",
            )
    _check_blocks_of(authorisation, blocks)
    check_held(blocks, holdings)


def check_use_oimp(
    authorisation: Authorisation,
    *,
    me: str,
    blocks: Sequence[Block],
    holdings: Sequence[Block],
    already_first_transferred: bool,
) -> None:
    """A party's checks before using or cancelling ``blocks`` for OIMP (e.g. CORSIA).

    The host itself may do so: with a first transfer defined "at use or
    cancellation", that is how OIMP units leave its accounts.
    """
    terms = authorisation.terms
    _check_unit_type_for(terms.unit_type, Purpose.OIMP)
    _check_purpose(authorisation, Purpose.OIMP)
    if me != terms.host_party:
        _check_acquiring_party(authorisation, me)
    _check_not_revoked(authorisation, already_first_transferred=already_first_transferred)
    _check_blocks_of(authorisation, blocks)
    check_held(blocks, holdings)


def check_voluntary_cancellation(*, blocks: Sequence[Block], holdings: Sequence[Block]) -> None:
    """Any held unit may be cancelled voluntarily; it then counts for no one.

    Mitigation contribution units and units of a revoked authorisation
    included: cancelling claims nothing, so nothing can be double counted.
    """
    check_held(blocks, holdings)
