"""What each unit type may be used for, which levies it carries and which vintages it has."""

from __future__ import annotations

import pytest

from itmolink.core.units import Purpose, UnitType

U = UnitType
NDC, OIMP = Purpose.NDC, Purpose.OIMP


@pytest.mark.parametrize(
    ("unit_type", "adjustment", "purposes", "first_ndc_only", "levies"),
    [
        (U.ITMO, True, {NDC, OIMP}, False, False),
        (U.A6_4ER_AUTHORISED, True, {NDC, OIMP}, False, True),
        (U.A6_4ER_MITIGATION_CONTRIBUTION, False, set(), False, True),
        (U.TRANSITIONED_CER, False, {NDC}, True, False),
        (U.UNSPECIFIED, False, set(), False, False),
    ],
)
def test_unit_type_properties(
    unit_type: UnitType,
    adjustment: bool,
    purposes: set[Purpose],
    first_ndc_only: bool,
    levies: bool,
) -> None:
    assert unit_type.requires_adjustment is adjustment
    assert unit_type.allowed_purposes == purposes
    assert unit_type.first_ndc_only is first_ndc_only
    assert unit_type.mandatory_levies is levies


@pytest.mark.parametrize(
    ("unit_type", "vintage", "allowed"),
    [
        (U.ITMO, 2021, True),
        (U.ITMO, 2020, False),
        (U.A6_4ER_AUTHORISED, 2035, True),
        (U.A6_4ER_MITIGATION_CONTRIBUTION, 2019, False),
        (U.TRANSITIONED_CER, 2020, True),
        (U.TRANSITIONED_CER, 2013, True),
        (U.TRANSITIONED_CER, 2021, False),
    ],
)
def test_vintage_allowed(unit_type: UnitType, vintage: int, allowed: bool) -> None:
    assert unit_type.vintage_allowed(vintage) is allowed


def test_wire_values_are_kept() -> None:
    assert {u.name: u.value for u in UnitType} == {
        "UNSPECIFIED": 0,
        "ITMO": 1,
        "A6_4ER_AUTHORISED": 2,
        "A6_4ER_MITIGATION_CONTRIBUTION": 3,
        "TRANSITIONED_CER": 4,
    }
