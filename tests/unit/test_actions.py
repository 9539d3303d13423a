"""Actions and their checks: each case changes one fact of a passing case and names the code."""

from __future__ import annotations

from typing import Any

import pytest

from itmolink.core.accounting import NdcPeriod
from itmolink.core.actions import (
    FirstTransferTrigger,
    check_acquisition,
    check_first_transfer,
    check_held,
    check_transfer,
    check_use_ndc,
    check_use_oimp,
    check_voluntary_cancellation,
    first_transfer_triggers,
    is_first_transfer,
)
from itmolink.core.authorisation import Authorisation
from itmolink.core.codes import RejectionCode
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from tests.unit.article6 import NDC_AUTH, OIMP_AUTH, authorisation, block, code_of

C = RejectionCode
FTD = FirstTransferDefinition
TR = FirstTransferTrigger
NDC, OIMP = Purpose.NDC, Purpose.OIMP
FIRST_NDC = NdcPeriod(1, 2021, 2030)
SECOND_NDC = NdcPeriod(2, 2031, 2035)

MCU = UnitType.A6_4ER_MITIGATION_CONTRIBUTION
MCU_AUTH = authorisation(terms={"unit_type": MCU})
CER_AUTH = authorisation(
    terms={"unit_type": UnitType.TRANSITIONED_CER, "vintage_from": 2015, "vintage_to": 2020}
)
REVOKED = authorisation(revoked=True)
WIDE = authorisation(terms={"vintage_to": 2035})
HELD = [block(1, 1000)]


def oimp(definition: FirstTransferDefinition, *purposes: Purpose) -> Authorisation:
    return authorisation(
        OIMP_AUTH,
        terms={"purposes": frozenset(purposes or (OIMP,))},
        first_transfer_definition=definition,
    )


# first transfer: when it happens


@pytest.mark.parametrize(
    ("auth", "triggers"),
    [
        (NDC_AUTH, {TR.INTERNATIONAL_TRANSFER}),
        (oimp(FTD.AT_AUTHORISATION), {TR.AUTHORISATION}),
        (oimp(FTD.AT_ISSUANCE), {TR.ISSUANCE}),
        (oimp(FTD.AT_USE_OR_CANCELLATION), {TR.USE_OR_CANCELLATION}),
        (oimp(FTD.AT_ISSUANCE, NDC, OIMP), {TR.INTERNATIONAL_TRANSFER, TR.ISSUANCE}),
    ],
)
def test_first_transfer_triggers(auth: Authorisation, triggers: set[FirstTransferTrigger]) -> None:
    assert first_transfer_triggers(auth) == triggers


@pytest.mark.parametrize(
    ("auth", "event", "expected"),
    [
        # NDC: the first international transfer, nothing else.
        (NDC_AUTH, TR.INTERNATIONAL_TRANSFER, True),
        (NDC_AUTH, TR.ISSUANCE, False),
        (NDC_AUTH, TR.AUTHORISATION, False),
        (NDC_AUTH, TR.USE_OR_CANCELLATION, False),
        # OIMP: as the host defined it. Units exist from issuance, so "at
        # authorisation" first-transfers them when they are issued.
        (oimp(FTD.AT_AUTHORISATION), TR.AUTHORISATION, True),
        (oimp(FTD.AT_AUTHORISATION), TR.ISSUANCE, True),
        (oimp(FTD.AT_AUTHORISATION), TR.INTERNATIONAL_TRANSFER, False),
        (oimp(FTD.AT_ISSUANCE), TR.ISSUANCE, True),
        (oimp(FTD.AT_ISSUANCE), TR.INTERNATIONAL_TRANSFER, False),
        (oimp(FTD.AT_ISSUANCE), TR.AUTHORISATION, False),
        (oimp(FTD.AT_USE_OR_CANCELLATION), TR.USE_OR_CANCELLATION, True),
        (oimp(FTD.AT_USE_OR_CANCELLATION), TR.INTERNATIONAL_TRANSFER, False),
        (oimp(FTD.AT_USE_OR_CANCELLATION), TR.ISSUANCE, False),
        # Both: whichever event comes first.
        (oimp(FTD.AT_USE_OR_CANCELLATION, NDC, OIMP), TR.INTERNATIONAL_TRANSFER, True),
        (oimp(FTD.AT_USE_OR_CANCELLATION, NDC, OIMP), TR.USE_OR_CANCELLATION, True),
        (oimp(FTD.AT_ISSUANCE, NDC, OIMP), TR.ISSUANCE, True),
    ],
)
def test_is_first_transfer(
    auth: Authorisation, event: FirstTransferTrigger, expected: bool
) -> None:
    assert is_first_transfer(auth, event, already_first_transferred=False) is expected
    # A unit is first-transferred once.
    assert is_first_transfer(auth, event, already_first_transferred=True) is False


def test_oimp_without_a_definition_has_no_first_transfer() -> None:
    broken = oimp(FTD.UNSPECIFIED)
    assert code_of(lambda: first_transfer_triggers(broken)) is C.MISSING_OIMP_DETAIL


# check_held

BAD_RANGE = block(1, 100, serial_start=50, serial_end=10)


@pytest.mark.parametrize(
    ("blocks", "holdings", "expected"),
    [
        ([block(1, 100)], HELD, None),
        ([block(1, 1000)], HELD, None),
        ([block(1, 10), block(990, 1000)], HELD, None),
        # Adjacent held blocks with equal attributes count as one.
        ([block(400, 600)], [block(1, 500), block(501, 1000)], None),
        ([block(400, 600)], [block(1, 500), block(502, 1000)], C.INSUFFICIENT_HOLDINGS),
        ([block(1001, 1100)], HELD, C.INSUFFICIENT_HOLDINGS),
        ([block(900, 1100)], HELD, C.INSUFFICIENT_HOLDINGS),
        ([block(1, 100)], [], C.INSUFFICIENT_HOLDINGS),
        # The serials are held, but as other units.
        ([block(1, 100, vintage=2026)], HELD, C.INSUFFICIENT_HOLDINGS),
        ([block(1, 100, originating_registry="JPN-NR")], HELD, C.INSUFFICIENT_HOLDINGS),
        ([], HELD, C.MISSING_FIELD),
        ([block(1, 100), block(50, 150)], HELD, C.OVERLAPPING_BLOCKS),
        ([BAD_RANGE], HELD, C.INVALID_BLOCK),
    ],
)
def test_check_held(blocks: list[Any], holdings: list[Any], expected: C | None) -> None:
    assert code_of(lambda: check_held(blocks, holdings)) is expected


# check_first_transfer

FIRST: dict[str, Any] = {
    "authorisation": NDC_AUTH,
    "me": "LAO",
    "to_party": "KOR",
    "blocks": [block(1, 100)],
    "holdings": HELD,
    "acknowledged": True,
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"to_party": "JPN"}, None),
        ({"host_period": FIRST_NDC}, None),
        ({"me": "KOR"}, C.NOT_HOST_PARTY),
        (
            {"authorisation": MCU_AUTH, "blocks": [block(1, 9, unit_type=MCU)]},
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        ({"authorisation": REVOKED}, C.AUTHORISATION_REVOKED),
        ({"already_first_transferred": True}, C.ALREADY_FIRST_TRANSFERRED),
        ({"to_party": "CHE"}, C.NOT_ACQUIRING_PARTY),
        ({"to_party": "LAO"}, C.NOT_ACQUIRING_PARTY),
        ({"acknowledged": False}, C.AUTHORISATION_NOT_ACKNOWLEDGED),
        ({"host_period": NdcPeriod(1, 2021, 2024)}, C.VINTAGE_OUTSIDE_NDC_PERIOD),
        # Units without a corresponding adjustment are not held to the host's period.
        (
            {
                "authorisation": CER_AUTH,
                "blocks": [block(1, 9, unit_type=UnitType.TRANSITIONED_CER, vintage=2015)],
                "holdings": [block(1, 9, unit_type=UnitType.TRANSITIONED_CER, vintage=2015)],
                "host_period": FIRST_NDC,
            },
            None,
        ),
        ({"blocks": [block(1, 100, activity_id="LAO-WIND")]}, C.BLOCK_ATTRIBUTE_MISMATCH),
        ({"blocks": [block(1, 100, vintage=2031)]}, C.VINTAGE_NOT_AUTHORISED),
        ({"blocks": [block(1001, 1100)]}, C.INSUFFICIENT_HOLDINGS),
        ({"blocks": []}, C.MISSING_FIELD),
    ],
)
def test_check_first_transfer(changes: dict[str, Any], expected: C | None) -> None:
    kwargs = FIRST | changes
    assert code_of(lambda: check_first_transfer(**kwargs)) is expected


# check_transfer (subsequent, including onward to a third party)

ONWARD: dict[str, Any] = {
    "authorisation": NDC_AUTH,
    "me": "KOR",
    "to_party": "JPN",
    "blocks": [block(1, 100)],
    "holdings": HELD,
    "already_first_transferred": True,
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        # Revocation spares units already first-transferred...
        ({"authorisation": REVOKED}, None),
        # ...but not units whose first transfer is still to come (OIMP at use).
        (
            {
                "authorisation": authorisation(oimp(FTD.AT_USE_OR_CANCELLATION), revoked=True),
                "me": "LAO",
                "already_first_transferred": False,
            },
            C.AUTHORISATION_REVOKED,
        ),
        (
            {"authorisation": oimp(FTD.AT_USE_OR_CANCELLATION), "me": "LAO", "to_party": "KOR"},
            None,
        ),
        ({"to_party": "KOR"}, C.NOT_ACQUIRING_PARTY),
        ({"to_party": "CHE"}, C.NOT_ACQUIRING_PARTY),
        ({"to_party": "LAO"}, C.NOT_ACQUIRING_PARTY),
        (
            {"authorisation": MCU_AUTH, "blocks": [block(1, 9, unit_type=MCU)]},
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        ({"blocks": [block(1, 100, authorisation_id="LAO-A-0002")]}, C.BLOCK_ATTRIBUTE_MISMATCH),
        ({"holdings": [block(1, 99)]}, C.INSUFFICIENT_HOLDINGS),
    ],
)
def test_check_transfer(changes: dict[str, Any], expected: C | None) -> None:
    kwargs = ONWARD | changes
    assert code_of(lambda: check_transfer(**kwargs)) is expected


# check_acquisition

ACQUIRE: dict[str, Any] = {
    "authorisation": NDC_AUTH,
    "authorisation_id": "LAO-A-0001",
    "me": "KOR",
    "from_party": "LAO",
    "quantity": 100,
    "blocks": [block(1, 100)],
    "existing": [block(101, 200)],
    "already_first_transferred": False,
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        # An onward transfer from another acquiring party.
        ({"from_party": "JPN", "already_first_transferred": True}, None),
        ({"authorisation": None}, C.UNKNOWN_AUTHORISATION),
        ({"me": "CHE"}, C.NOT_ACQUIRING_PARTY),
        ({"from_party": "KOR"}, C.NOT_ACQUIRING_PARTY),
        ({"quantity": 99}, C.QUANTITY_MISMATCH),
        ({"blocks": [block(1, 100, vintage=2031)]}, C.VINTAGE_NOT_AUTHORISED),
        (
            {"authorisation": MCU_AUTH, "blocks": [block(1, 100, unit_type=MCU)]},
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        ({"authorisation": REVOKED}, C.AUTHORISATION_REVOKED),
        ({"authorisation": REVOKED, "already_first_transferred": True}, None),
        ({"existing": [block(100, 100)]}, C.SERIALS_ALREADY_HELD),
    ],
)
def test_check_acquisition(changes: dict[str, Any], expected: C | None) -> None:
    kwargs = ACQUIRE | changes
    assert code_of(lambda: check_acquisition(**kwargs)) is expected


# check_use_ndc

CER_BLOCKS = [block(1, 9, unit_type=UnitType.TRANSITIONED_CER, vintage=2015)]
USE: dict[str, Any] = {
    "authorisation": NDC_AUTH,
    "me": "KOR",
    "blocks": [block(1, 100)],
    "holdings": HELD,
    "use_year": 2030,
    "ndc_period": FIRST_NDC,
}
CER_USE: dict[str, Any] = {"authorisation": CER_AUTH, "blocks": CER_BLOCKS, "holdings": CER_BLOCKS}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"use_year": 2021}, None),
        ({"me": "JPN"}, None),
        ({"authorisation": oimp(FTD.AT_ISSUANCE, NDC, OIMP)}, None),
        (
            {"authorisation": MCU_AUTH, "blocks": [block(1, 9, unit_type=MCU)]},
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        # Transitioned CERs: pre-2021, toward a first NDC only, by any party.
        (CER_USE, None),
        (CER_USE | {"me": "LAO"}, None),
        (CER_USE | {"ndc_period": SECOND_NDC, "use_year": 2032}, C.UNIT_TYPE_NOT_ALLOWED_FOR_USE),
        ({"authorisation": oimp(FTD.AT_ISSUANCE)}, C.PURPOSE_NOT_AUTHORISED),
        ({"me": "CHE"}, C.NOT_ACQUIRING_PARTY),
        # The host does not "use" its own authorised units: it simply does not transfer them.
        ({"me": "LAO"}, C.NOT_ACQUIRING_PARTY),
        ({"authorisation": REVOKED}, None),
        ({"authorisation": REVOKED, "already_first_transferred": False}, C.AUTHORISATION_REVOKED),
        ({"use_year": 2031}, C.VINTAGE_OUTSIDE_NDC_PERIOD),
        ({"use_year": 2020}, C.VINTAGE_OUTSIDE_NDC_PERIOD),
        # No carry-over: 2025 units cannot count toward the second NDC...
        (
            {"authorisation": WIDE, "ndc_period": SECOND_NDC, "use_year": 2032},
            C.CARRY_OVER_NOT_ALLOWED,
        ),
        # ...while its own vintages can.
        (
            {
                "authorisation": WIDE,
                "ndc_period": SECOND_NDC,
                "use_year": 2032,
                "blocks": [block(1, 100, vintage=2033)],
                "holdings": [block(1, 100, vintage=2033)],
            },
            None,
        ),
        # No borrowing from a later period either.
        (
            {"ndc_period": NdcPeriod(1, 2021, 2024), "use_year": 2024},
            C.VINTAGE_OUTSIDE_NDC_PERIOD,
        ),
        ({"blocks": [block(1, 100, cooperative_approach_id="CA0009")]}, C.BLOCK_ATTRIBUTE_MISMATCH),
        ({"holdings": []}, C.INSUFFICIENT_HOLDINGS),
    ],
)
def test_check_use_ndc(changes: dict[str, Any], expected: C | None) -> None:
    kwargs = USE | changes
    assert code_of(lambda: check_use_ndc(**kwargs)) is expected


# check_use_oimp

USE_OIMP: dict[str, Any] = {
    "authorisation": OIMP_AUTH,
    "me": "KOR",
    "blocks": [block(1, 100)],
    "holdings": HELD,
    "already_first_transferred": True,
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"me": "JPN"}, None),
        # The host cancels for CORSIA itself: with "at use or cancellation" that is
        # the first transfer.
        (
            {
                "me": "LAO",
                "authorisation": oimp(FTD.AT_USE_OR_CANCELLATION),
                "already_first_transferred": False,
            },
            None,
        ),
        (
            {"authorisation": MCU_AUTH, "blocks": [block(1, 9, unit_type=MCU)]},
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        (CER_USE, C.UNIT_TYPE_NOT_ALLOWED_FOR_USE),
        ({"authorisation": NDC_AUTH}, C.PURPOSE_NOT_AUTHORISED),
        ({"me": "CHE"}, C.NOT_ACQUIRING_PARTY),
        ({"authorisation": authorisation(OIMP_AUTH, revoked=True)}, None),
        (
            {
                "authorisation": authorisation(oimp(FTD.AT_USE_OR_CANCELLATION), revoked=True),
                "me": "LAO",
                "already_first_transferred": False,
            },
            C.AUTHORISATION_REVOKED,
        ),
        ({"blocks": [block(1, 100, first_transferring_party="THA")]}, C.BLOCK_ATTRIBUTE_MISMATCH),
        ({"holdings": [block(2, 1000)]}, C.INSUFFICIENT_HOLDINGS),
    ],
)
def test_check_use_oimp(changes: dict[str, Any], expected: C | None) -> None:
    kwargs = USE_OIMP | changes
    assert code_of(lambda: check_use_oimp(**kwargs)) is expected


# check_voluntary_cancellation


@pytest.mark.parametrize(
    ("blocks", "holdings", "expected"),
    [
        ([block(1, 100)], HELD, None),
        # Any held unit may be cancelled, mitigation contribution units included.
        ([block(1, 9, unit_type=MCU)], [block(1, 9, unit_type=MCU)], None),
        ([block(1, 100)], [], C.INSUFFICIENT_HOLDINGS),
    ],
)
def test_check_voluntary_cancellation(
    blocks: list[Any], holdings: list[Any], expected: C | None
) -> None:
    check = lambda: check_voluntary_cancellation(blocks=blocks, holdings=holdings)  # noqa: E731
    assert code_of(check) is expected
