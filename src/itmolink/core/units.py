"""Unit types and purposes, mirrored from proto/itmolink/v1/common.proto.

Besides the wire values, this module says what each unit type may be used for
and which levies apply to it, because those are properties of the unit, not
of any one check (seed chapter section 2.2):

| unit type | CA | share of proceeds / OMGE | may be used for |
| --- | --- | --- | --- |
| Article 6.2 ITMO | yes | voluntary (6.2 only encourages) | NDC, OIMP |
| A6.4ER authorised | yes | 5% / 2% at issuance | NDC, OIMP |
| A6.4ER mitigation contribution unit | no | 5% / 2% at issuance | neither |
| transitioned pre-2021 CDM CER | no | none | a first NDC only |

Every unit type may be cancelled voluntarily: that is how mitigation
contribution units support results-based finance without a claim.
"""

from __future__ import annotations

import enum

FIRST_ARTICLE6_VINTAGE = 2021
# CERs transitioned from the CDM are pre-2021 emission reductions by definition.
LAST_TRANSITIONED_CER_VINTAGE = FIRST_ARTICLE6_VINTAGE - 1


class UnitType(enum.IntEnum):
    """The kind of unit a serial block holds (wire values of itmolink.v1.UnitType)."""

    UNSPECIFIED = 0
    ITMO = 1
    A6_4ER_AUTHORISED = 2
    A6_4ER_MITIGATION_CONTRIBUTION = 3
    TRANSITIONED_CER = 4

    @property
    def requires_adjustment(self) -> bool:
        """Whether transferring this unit type carries a corresponding adjustment.

        Mitigation contribution units and transitioned CERs carry none.
        """
        return self in (UnitType.ITMO, UnitType.A6_4ER_AUTHORISED)

    @property
    def allowed_purposes(self) -> frozenset[Purpose]:
        """The uses this unit type may ever be authorised or used for.

        Mitigation contribution units are by definition not authorised, so
        neither NDC nor OIMP use is open to them; transitioned CERs count
        only toward an NDC, and only a first one (see ``first_ndc_only``).
        """
        if self in (UnitType.ITMO, UnitType.A6_4ER_AUTHORISED):
            return frozenset({Purpose.NDC, Purpose.OIMP})
        if self is UnitType.TRANSITIONED_CER:
            return frozenset({Purpose.NDC})
        return frozenset()

    @property
    def first_ndc_only(self) -> bool:
        """Whether the unit counts only toward a party's first NDC (transitioned CERs)."""
        return self is UnitType.TRANSITIONED_CER

    @property
    def mandatory_levies(self) -> bool:
        """Whether issuance carries the mandatory 5% share of proceeds and 2% OMGE.

        They apply to every A6.4ER the mechanism issues, authorised or not,
        but not to CERs transitioned from the CDM nor to Article 6.2 ITMOs.
        """
        return self in (UnitType.A6_4ER_AUTHORISED, UnitType.A6_4ER_MITIGATION_CONTRIBUTION)

    def vintage_allowed(self, vintage: int) -> bool:
        """Whether ``vintage`` can exist for this unit type.

        Article 6 outcomes start in 2021; transitioned CERs end in 2020.
        """
        if self is UnitType.TRANSITIONED_CER:
            return vintage <= LAST_TRANSITIONED_CER_VINTAGE
        return vintage >= FIRST_ARTICLE6_VINTAGE


class Purpose(enum.IntEnum):
    """A use for which units are authorised (wire values of itmolink.v1.Purpose)."""

    UNSPECIFIED = 0
    NDC = 1
    OIMP = 2


class FirstTransferDefinition(enum.IntEnum):
    """When OIMP units are first transferred (itmolink.v1.FirstTransferDefinition)."""

    UNSPECIFIED = 0
    AT_AUTHORISATION = 1
    AT_ISSUANCE = 2
    AT_USE_OR_CANCELLATION = 3
