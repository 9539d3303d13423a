"""Authorisations: their full terms, amendments and revocation.

``rules.AuthorisationTerms`` is what the transfer checks need; an
:class:`Authorisation` adds what the host states in its Letter of
Authorisation beyond that: the OIMP purpose (e.g. CORSIA), how the host
defines the first transfer for OIMP (decision 2/CMA.3, annex, para. 2(b)),
each acquiring party's own authorisation reference (seed Table 11.3 step 4:
both governments authorise), and whether it has been revoked.

Versions. An amendment is a new version of the same authorisation: version
n + 1 replaces version n; nothing is edited in place, so every version stays
reportable (the AEF Authorizations table has a version column). What an
amendment may change, and why (:func:`check_amendment`):

- Never: the authorisation id, host party, activity, cooperative approach
  and unit type. They are part of every issued unit's identity; changing
  them would relabel units already in circulation.
- Once units are issued: purposes may be added but not removed, the first
  transfer definition may not change and the OIMP purpose may not be
  replaced, because units already issued (and possibly first-transferred,
  with adjustments booked) were issued on those terms.
- The quantity cap may change but not fall below what is already issued
  (0 still means no cap).
- The vintage range may change but must keep every vintage already issued.
- Acquiring parties may be added; a party that has already received units
  may not be removed, since its holdings were acquired under this
  authorisation.
- A revoked authorisation cannot be amended.

Revocation is a pending matter in the negotiations (seed section 2.3).
This registry does the least that is safe: units already first-transferred
keep their authorisation (revoking them would undo a corresponding
adjustment the partner has booked, i.e. double counting), and everything
else, the units not yet first-transferred and the quantity not yet issued,
is revoked and recorded as a new version with ``revoked=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.rules import AuthorisationTerms, check_authorisation_terms
from itmolink.core.units import FirstTransferDefinition, Purpose


@dataclass(frozen=True, slots=True)
class Authorisation:
    """One version of a host party's authorisation, with everything it states."""

    terms: AuthorisationTerms
    # For OIMP: which purpose, e.g. "CORSIA". Empty without OIMP.
    oimp_detail: str = ""
    # For OIMP: when units are first transferred. UNSPECIFIED without OIMP.
    first_transfer_definition: FirstTransferDefinition = FirstTransferDefinition.UNSPECIFIED
    # (acquiring party, its own authorisation reference), one pair per party that gave one.
    acquiring_party_references: tuple[tuple[str, str], ...] = ()
    revoked: bool = False

    @property
    def authorisation_id(self) -> str:
        return self.terms.authorisation_id

    @property
    def version(self) -> int:
        return self.terms.version

    def reference_of(self, party: str) -> str | None:
        """The acquiring party's own authorisation reference, if recorded."""
        return dict(self.acquiring_party_references).get(party)


def with_acquiring_party_reference(
    authorisation: Authorisation, party: str, reference: str
) -> Authorisation:
    """Record ``party``'s own authorisation reference (from its acknowledgement).

    This is the buying government's authorisation, not a new version of the
    host's: the version does not change.
    """
    if party not in authorisation.terms.acquiring_parties:
        raise Rejected(
            RejectionCode.NOT_ACQUIRING_PARTY,
            f"authorisation {authorisation.authorisation_id} does not name {party}",
        )
    if not reference:
        raise Rejected(RejectionCode.MISSING_FIELD, f"{party}'s authorisation reference is empty")
    references = dict(authorisation.acquiring_party_references)
    references[party] = reference
    return replace(authorisation, acquiring_party_references=tuple(sorted(references.items())))


def check_authorisation(authorisation: Authorisation) -> None:
    """Well-formedness of a whole authorisation, beyond ``check_authorisation_terms``."""
    terms = authorisation.terms
    check_authorisation_terms(terms)
    if not terms.cooperative_approach_id:
        raise Rejected(RejectionCode.MISSING_FIELD, "authorisation has no cooperative approach id")
    if terms.quantity_cap < 0:
        raise Rejected(
            RejectionCode.QUANTITY_MISMATCH,
            f"quantity cap {terms.quantity_cap} is negative (0 means no cap)",
        )
    not_allowed = terms.purposes - terms.unit_type.allowed_purposes
    if not_allowed:
        names = ", ".join(sorted(p.name for p in not_allowed))
        raise Rejected(
            RejectionCode.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
            f"unit type {terms.unit_type.name} cannot be authorised for {names}",
        )
    definition = authorisation.first_transfer_definition
    if Purpose.OIMP in terms.purposes:
        if not authorisation.oimp_detail.strip():
            raise Rejected(
                RejectionCode.MISSING_OIMP_DETAIL,
                "an OIMP authorisation must name the purpose, e.g. CORSIA",
            )
        if definition is FirstTransferDefinition.UNSPECIFIED:
            raise Rejected(
                RejectionCode.MISSING_OIMP_DETAIL,
                "an OIMP authorisation must define the first transfer: at authorisation, "
                "at issuance or at use or cancellation",
            )
    else:
        if authorisation.oimp_detail:
            raise Rejected(
                RejectionCode.OIMP_TERMS_WITHOUT_OIMP,
                f"OIMP detail {authorisation.oimp_detail!r} given but OIMP is not authorised",
            )
        if definition is not FirstTransferDefinition.UNSPECIFIED:
            raise Rejected(
                RejectionCode.OIMP_TERMS_WITHOUT_OIMP,
                f"first transfer definition {definition.name} is only meaningful for OIMP; "
                "for NDC use the first transfer is the first international transfer",
            )
    for party, _ in authorisation.acquiring_party_references:
        if party not in terms.acquiring_parties:
            raise Rejected(
                RejectionCode.NOT_ACQUIRING_PARTY,
                f"a reference is recorded for {party}, which is not an acquiring party",
            )


def check_amendment(
    current: Authorisation,
    proposed: Authorisation,
    *,
    issued_by_vintage: Mapping[int, int],
    received_by: Iterable[str],
) -> None:
    """Whether ``proposed`` may replace ``current`` (see the module docstring).

    ``issued_by_vintage`` is what has been issued under the authorisation so
    far; ``received_by`` names the parties that have received any of its units.
    """
    old, new = current.terms, proposed.terms

    def refuse(detail: str) -> Rejected:
        return Rejected(
            RejectionCode.AMENDMENT_NOT_ALLOWED,
            f"amendment of authorisation {old.authorisation_id}: {detail}",
        )

    if current.revoked:
        raise Rejected(
            RejectionCode.AUTHORISATION_REVOKED,
            f"authorisation {old.authorisation_id} is revoked and cannot be amended",
        )
    if new.version != old.version + 1:
        raise refuse(f"version {new.version} does not follow version {old.version}")
    if proposed.revoked:
        raise refuse("revocation is recorded with revoke(), not by amendment")
    for name in (
        "authorisation_id",
        "host_party",
        "activity_id",
        "cooperative_approach_id",
        "unit_type",
    ):
        if getattr(old, name) != getattr(new, name):
            raise refuse(f"{name} cannot change ({getattr(old, name)!r} to {getattr(new, name)!r})")
    check_authorisation(proposed)
    issued = sum(issued_by_vintage.values())
    if issued:
        if not old.purposes <= new.purposes:
            removed = ", ".join(sorted(p.name for p in old.purposes - new.purposes))
            raise refuse(f"purposes {removed} cannot be removed once units are issued")
        if Purpose.OIMP in old.purposes and (
            proposed.first_transfer_definition != current.first_transfer_definition
            or proposed.oimp_detail != current.oimp_detail
        ):
            raise refuse("the OIMP purpose and first transfer definition are fixed once issued")
    if new.quantity_cap and new.quantity_cap < issued:
        raise refuse(f"cap {new.quantity_cap} is below the {issued} tCO2e already issued")
    outside = sorted(
        vintage
        for vintage, quantity in issued_by_vintage.items()
        if quantity and not new.vintage_from <= vintage <= new.vintage_to
    )
    if outside:
        raise refuse(f"vintages {outside} are already issued and must stay in range")
    dropped = sorted(set(received_by) & (old.acquiring_parties - new.acquiring_parties))
    if dropped:
        raise refuse(f"parties {dropped} have already received units and cannot be removed")


@dataclass(frozen=True, slots=True)
class UnitStatus:
    """A block issued under an authorisation, and whether it was first-transferred."""

    block: Block
    first_transferred: bool


@dataclass(frozen=True, slots=True)
class Revocation:
    """What a revocation did: the new version, the blocks revoked and those refused."""

    authorisation: Authorisation
    revoked: tuple[Block, ...]
    refused: tuple[tuple[Block, RejectionCode], ...]
    # Quantity under the cap that was never issued and now never will be.
    unissued_revoked: int

    @property
    def revoked_quantity(self) -> int:
        return sum(block.quantity for block in self.revoked)


def revoke(authorisation: Authorisation, units: Sequence[UnitStatus]) -> Revocation:
    """Revoke everything that may still be revoked; refuse the rest.

    ``units`` are all blocks issued under the authorisation, wherever held.
    Blocks already first-transferred are refused with ALREADY_FIRST_TRANSFERRED
    and keep their authorisation; the others are revoked. The result carries
    the next version of the authorisation, marked revoked.
    """
    if authorisation.revoked:
        raise Rejected(
            RejectionCode.AUTHORISATION_REVOKED,
            f"authorisation {authorisation.authorisation_id} is already revoked",
        )
    revoked: list[Block] = []
    refused: list[tuple[Block, RejectionCode]] = []
    for unit in sorted(units, key=lambda u: (u.block.originating_registry, u.block.serial_start)):
        if unit.block.authorisation_id != authorisation.authorisation_id:
            raise Rejected(
                RejectionCode.BLOCK_ATTRIBUTE_MISMATCH,
                f"block {unit.block.label()} belongs to authorisation "
                f"{unit.block.authorisation_id}, not {authorisation.authorisation_id}",
            )
        if unit.first_transferred:
            refused.append((unit.block, RejectionCode.ALREADY_FIRST_TRANSFERRED))
        else:
            revoked.append(unit.block)
    issued = sum(unit.block.quantity for unit in units)
    cap = authorisation.terms.quantity_cap
    next_version = replace(
        authorisation,
        terms=replace(authorisation.terms, version=authorisation.version + 1),
        revoked=True,
    )
    return Revocation(
        authorisation=next_version,
        revoked=tuple(revoked),
        refused=tuple(refused),
        unissued_revoked=max(cap - issued, 0) if cap else 0,
    )
