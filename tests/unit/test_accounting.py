"""Accounting methods, booking years, the adjusted emissions balance and the host threshold."""

from __future__ import annotations

import dataclasses

import pytest

from itmolink.core.accounting import (
    AccountingConfig,
    AccountingMethod,
    HostThreshold,
    NdcPeriod,
    adjustment_entries,
    booking_year,
    check_host_threshold,
    emissions_balance,
)
from itmolink.core.adjustments import AdjustmentEntry
from itmolink.core.codes import RejectionCode
from itmolink.core.transfer import Role
from itmolink.core.units import UnitType
from tests.unit.article6 import block, code_of

C = RejectionCode
M = AccountingMethod
FIRST_NDC = NdcPeriod(1, 2021, 2030)
SHORT = NdcPeriod(1, 2021, 2023)

LAO = AccountingConfig(
    party="LAO",
    method=M.AVERAGING,
    ndc_period=FIRST_NDC,
    target_year=2030,
    target_emissions=1030,
    baseline_year=2000,
    baseline_emissions=2500,
)


def entry(year: int, amount: int, party: str = "LAO", partner: str = "KOR") -> AdjustmentEntry:
    return AdjustmentEntry(party, partner, "LAO-T-000001", year, amount, UnitType.ITMO, "x")


# NdcPeriod and AccountingConfig


def test_ndc_period() -> None:
    assert list(SHORT.years) == [2021, 2022, 2023]
    assert all(year in SHORT for year in (2021, 2022, 2023))
    assert not any(year in SHORT for year in (2020, 2024, "2021"))
    with pytest.raises(ValueError, match="empty"):
        NdcPeriod(1, 2030, 2021)
    with pytest.raises(ValueError, match="at least 1"):
        NdcPeriod(0, 2021, 2030)


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"target_year": None}, "single target year"),
        ({"target_year": 2031}, "outside"),
        ({"method": M.TRAJECTORY}, "trajectory"),
        ({"method": M.TRAJECTORY, "trajectory": {2021: 1}}, "trajectory"),
    ],
)
def test_config_is_checked(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        dataclasses.replace(LAO, **changes)  # type: ignore[arg-type]


# booking_year and adjustment_entries


@pytest.mark.parametrize(
    ("vintage", "expected"),
    [
        (2021, None),
        (2025, None),
        (2030, None),
        (2020, C.VINTAGE_OUTSIDE_NDC_PERIOD),
        (2031, C.VINTAGE_OUTSIDE_NDC_PERIOD),
    ],
)
def test_booking_year_is_the_vintage_inside_the_period(vintage: int, expected: C | None) -> None:
    assert code_of(lambda: booking_year(LAO, vintage=vintage)) is expected
    if expected is None:
        assert booking_year(LAO, vintage=vintage) == vintage


@pytest.mark.parametrize("method", list(AccountingMethod))
def test_adjustment_entries_carry_the_method_and_booking_year(method: AccountingMethod) -> None:
    config = dataclasses.replace(
        LAO, method=method, trajectory={year: 0 for year in FIRST_NDC.years}
    )
    blocks = [block(1, 100, vintage=2023), block(101, 130, vintage=2030)]
    entries = adjustment_entries(config, Role.SENDER, "KOR", "LAO-T-000001", blocks)
    assert [(e.year, e.amount, e.method, e.party, e.partner) for e in entries] == [
        (2023, 100, method.value, "LAO", "KOR"),
        (2030, 30, method.value, "LAO", "KOR"),
    ]
    outside = [block(1, 100, vintage=2031)]
    assert (
        code_of(lambda: adjustment_entries(config, Role.SENDER, "KOR", "T", outside))
        is C.VINTAGE_OUTSIDE_NDC_PERIOD
    )


def test_method_values_are_stable() -> None:
    assert {m.value for m in AccountingMethod} == {
        "multi-year-trajectory",
        "multi-year-budget",
        "averaging",
    }


# emissions_balance: averaging (Lao PDR's single-year 2030 target)

REPORTED = {year: 1000 for year in FIRST_NDC.years}
FIRST_TRANSFERS = [entry(2023, 100), entry(2025, 200), entry(2030, 55)]


def test_averaging_applies_the_period_average_in_the_target_year() -> None:
    report = emissions_balance(LAO, REPORTED, FIRST_TRANSFERS)
    by_year = {row.year: row for row in report.rows}
    assert [row.year for row in report.rows] == list(FIRST_NDC.years)
    assert by_year[2023].booked_adjustment == 100
    assert by_year[2023].applied_adjustment == 0
    assert by_year[2023].adjusted_emissions == 1000
    assert by_year[2023].target is None
    # (100 + 200 + 55) / 10 years = 35.5, rounded up for the host.
    assert by_year[2030].booked_adjustment == 55
    assert by_year[2030].applied_adjustment == 36
    assert by_year[2030].adjusted_emissions == 1036
    assert by_year[2030].target == 1030
    assert report.met is False
    assert emissions_balance(
        dataclasses.replace(LAO, target_emissions=1036), REPORTED, FIRST_TRANSFERS
    ).met


def test_averaging_rounds_a_buyer_subtraction_toward_zero() -> None:
    kor = dataclasses.replace(LAO, party="KOR")
    acquisitions = [entry(2023, -100, "KOR", "LAO"), entry(2025, -255, "KOR", "LAO")]
    report = emissions_balance(kor, REPORTED, acquisitions)
    # -355 / 10 = -35.5: a buyer subtracts 35, never 36.
    assert report.rows[-1].applied_adjustment == -35
    assert report.rows[-1].adjusted_emissions == 965


def test_balance_ignores_other_parties_and_other_periods() -> None:
    noise = [entry(2025, 999, party="KOR"), entry(2031, 999), entry(2020, 999)]
    report = emissions_balance(LAO, REPORTED, FIRST_TRANSFERS + noise)
    assert report.rows[-1].applied_adjustment == 36


def test_unreported_years_leave_the_verdict_open() -> None:
    report = emissions_balance(LAO, {2023: 1000}, FIRST_TRANSFERS)
    assert report.rows[-1].adjusted_emissions is None
    assert report.rows[-1].met is None
    assert report.met is None


# emissions_balance: trajectory and budget

TRAJECTORY = AccountingConfig(
    party="LAO",
    method=M.TRAJECTORY,
    ndc_period=SHORT,
    trajectory={2021: 100, 2022: 90, 2023: 80},
)
BUDGET = AccountingConfig(party="LAO", method=M.BUDGET, ndc_period=SHORT, target_emissions=260)
SHORT_REPORTED = {2021: 95, 2022: 85, 2023: 70}


@pytest.mark.parametrize(
    ("entries", "adjusted", "met"),
    [
        ([], [95, 85, 70], True),
        ([entry(2022, 5)], [95, 90, 70], True),
        ([entry(2022, 6)], [95, 91, 70], False),
        ([entry(2023, 10), entry(2023, 1)], [95, 85, 81], False),
        ([entry(2021, -10, "LAO", "CHE")], [85, 85, 70], True),
    ],
)
def test_trajectory_compares_every_year(
    entries: list[AdjustmentEntry], adjusted: list[int], met: bool
) -> None:
    report = emissions_balance(TRAJECTORY, SHORT_REPORTED, entries)
    assert [row.adjusted_emissions for row in report.rows] == adjusted
    assert [row.target for row in report.rows] == [100, 90, 80]
    assert [row.applied_adjustment for row in report.rows] == [
        row.booked_adjustment for row in report.rows
    ]
    assert report.met is met
    assert report.period_target is None


@pytest.mark.parametrize(
    ("entries", "total", "met"),
    [
        ([], 250, True),
        ([entry(2021, 4), entry(2023, 6)], 260, True),
        ([entry(2022, 11)], 261, False),
    ],
)
def test_budget_compares_the_period_total(
    entries: list[AdjustmentEntry], total: int, met: bool
) -> None:
    report = emissions_balance(BUDGET, SHORT_REPORTED, entries)
    assert report.period_target == 260
    assert report.period_adjusted_total == total
    assert all(row.target is None for row in report.rows)
    assert report.met is met
    unreported = emissions_balance(BUDGET, {2021: 95}, entries)
    assert unreported.period_adjusted_total is None
    assert unreported.met is None


# check_host_threshold

T = C.HOST_THRESHOLD_EXCEEDED


@pytest.mark.parametrize(
    ("threshold", "already", "year", "quantity", "expected"),
    [
        (HostThreshold(), {2025: 10**12}, 2025, 10**12, None),
        (HostThreshold(per_year=1000), {}, 2025, 1000, None),
        (HostThreshold(per_year=1000), {}, 2025, 1001, T),
        (HostThreshold(per_year=1000), {2025: 600}, 2025, 400, None),
        (HostThreshold(per_year=1000), {2025: 600}, 2025, 401, T),
        # Other years do not count against this year's limit.
        (HostThreshold(per_year=1000), {2024: 1000, 2026: 1000}, 2025, 1000, None),
        (HostThreshold(per_period=5000), {2022: 2000, 2025: 2000}, 2030, 1000, None),
        (HostThreshold(per_period=5000), {2022: 2000, 2025: 2000}, 2030, 1001, T),
        # Only years of the NDC period count toward its limit.
        (HostThreshold(per_period=5000), {2031: 9000}, 2030, 5000, None),
        (HostThreshold(per_year=1000, per_period=1500), {2021: 1000}, 2022, 501, T),
        (HostThreshold(per_year=1000, per_period=1500), {2021: 1000}, 2022, 500, None),
        (HostThreshold(per_year=0), {}, 2025, 1, T),
    ],
)
def test_check_host_threshold(
    threshold: HostThreshold,
    already: dict[int, int],
    year: int,
    quantity: int,
    expected: C | None,
) -> None:
    check = lambda: check_host_threshold(  # noqa: E731
        threshold, FIRST_NDC, already, year=year, quantity=quantity
    )
    assert code_of(check) is expected
