"""Unit types and purposes, mirrored from proto/itmolink/v1/common.proto."""

from __future__ import annotations

import enum

FIRST_ARTICLE6_VINTAGE = 2021


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
