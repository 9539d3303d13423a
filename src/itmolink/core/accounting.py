"""Corresponding adjustments under a party's accounting method, and the host threshold.

Each party keeps its own :class:`AccountingConfig`: its method, its NDC
period, its target and (for reports) its baseline. Adjustment entries
(``adjustments.AdjustmentEntry``) record year, amount, party, partner,
transfer, unit type and method; this module decides the year and the method
they carry, and how they count against the target.

The year an adjustment is booked to (:func:`booking_year`) is the vintage,
the year the mitigation occurred, under every method. For the first
transferring party that is decision 2/CMA.3 (annex, para. 8). For the
acquiring party the decision speaks of the year of use, but this project
applies the adjustment atomically when the transfer is acknowledged, before
any use year exists (docs/DESIGN.md decision 8), so it books to the vintage
too and records the use year on the use action instead. The booked year must
lie in the party's NDC period, which is also what forbids carry-over.

The method decides how booked entries are *applied* to the emissions balance
(:func:`emissions_balance`):

- multi-year trajectory: each year's booked adjustments apply to that year
  and the adjusted emissions are compared with that year's trajectory point;
- multi-year budget: adjustments apply to their years and the sum of
  adjusted emissions over the period is compared with the budget;
- averaging (single-year target, e.g. Lao PDR's 2030): the cumulative
  adjustments booked over the NDC period, divided by the number of years in
  the period, apply once, to the target year, compared with the target.
  The average is rounded up (toward higher adjusted emissions): a host's
  addition is never understated and a buyer's subtraction never overstated,
  so rounding flatters neither side's balance.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from itmolink.core.adjustments import AdjustmentEntry, adjustments_for
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Role


class AccountingMethod(enum.Enum):
    """How a party applies its adjustments; the value is stored on each entry."""

    TRAJECTORY = "multi-year-trajectory"
    BUDGET = "multi-year-budget"
    AVERAGING = "averaging"


@dataclass(frozen=True, slots=True, order=True)
class NdcPeriod:
    """An NDC implementation period, e.g. the first NDC, 2021-2030."""

    number: int  # 1 for a party's first NDC
    first_year: int
    last_year: int

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"NDC period number {self.number} must be at least 1")
        if self.last_year < self.first_year:
            raise ValueError(f"NDC period {self.first_year}-{self.last_year} is empty")

    @property
    def years(self) -> range:
        return range(self.first_year, self.last_year + 1)

    def __contains__(self, year: object) -> bool:
        return isinstance(year, int) and self.first_year <= year <= self.last_year


@dataclass(frozen=True)
class AccountingConfig:
    """A party's accounting method and target for one NDC period."""

    party: str
    method: AccountingMethod
    ndc_period: NdcPeriod
    # Averaging: target-year emissions; budget: total over the period; trajectory: unused.
    target_emissions: int = 0
    # The single target year (required for averaging), inside the NDC period.
    target_year: int | None = None
    # Trajectory: the indicative emissions for each year of the period.
    trajectory: Mapping[int, int] = field(default_factory=dict)
    # For reports only, e.g. Lao PDR: 2000.
    baseline_year: int | None = None
    baseline_emissions: int | None = None

    def __post_init__(self) -> None:
        period = self.ndc_period
        if self.target_year is not None and self.target_year not in period:
            raise ValueError(f"target year {self.target_year} is outside NDC period {period}")
        if self.method is AccountingMethod.AVERAGING and self.target_year is None:
            raise ValueError("averaging needs a single target year")
        if self.method is AccountingMethod.TRAJECTORY and set(self.trajectory) != set(period.years):
            raise ValueError(
                f"a trajectory needs exactly one point for each year {period.first_year}-"
                f"{period.last_year}, not for {sorted(self.trajectory)}"
            )


def booking_year(config: AccountingConfig, *, vintage: int) -> int:
    """The year an adjustment for units of ``vintage`` is booked to (the vintage).

    Refused with VINTAGE_OUTSIDE_NDC_PERIOD when the vintage lies outside the
    party's NDC period: an adjustment there would count toward no target of
    this period (or carry over into the next).
    """
    if vintage not in config.ndc_period:
        period = config.ndc_period
        raise Rejected(
            RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD,
            f"vintage {vintage} is outside {config.party}'s NDC period "
            f"{period.first_year}-{period.last_year}",
        )
    return vintage


def adjustment_entries(
    config: AccountingConfig,
    role: Role,
    partner: str,
    transfer_id: str,
    blocks: Iterable[Block],
) -> list[AdjustmentEntry]:
    """``adjustments_for`` with the year and method of ``config``."""
    entries = adjustments_for(role, config.party, partner, transfer_id, blocks)
    return [
        replace(entry, year=booking_year(config, vintage=entry.year), method=config.method.value)
        for entry in entries
    ]


@dataclass(frozen=True, slots=True)
class BalanceRow:
    """One year of the adjusted emissions balance."""

    year: int
    reported_emissions: int | None  # None: not reported yet
    booked_adjustment: int  # sum of entries booked to this year
    applied_adjustment: int  # what the method applies to this year
    adjusted_emissions: int | None  # reported + applied
    target: int | None  # the year's target, if the method sets one

    @property
    def met(self) -> bool | None:
        if self.target is None or self.adjusted_emissions is None:
            return None
        return self.adjusted_emissions <= self.target


@dataclass(frozen=True, slots=True)
class BalanceReport:
    """The adjusted emissions balance of one party over its NDC period."""

    party: str
    method: AccountingMethod
    rows: tuple[BalanceRow, ...]
    # Budget only: the budget and the period's adjusted total.
    period_target: int | None
    period_adjusted_total: int | None

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None while a needed year is unreported."""
        if self.method is AccountingMethod.BUDGET:
            if self.period_target is None or self.period_adjusted_total is None:
                return None
            return self.period_adjusted_total <= self.period_target
        verdicts = [row.met for row in self.rows if row.target is not None]
        if not verdicts or None in verdicts:
            return None
        return all(verdicts)


def emissions_balance(
    config: AccountingConfig,
    reported: Mapping[int, int],
    entries: Iterable[AdjustmentEntry],
) -> BalanceReport:
    """Reported emissions plus adjustments, per year of the NDC period, against the target.

    Entries of other parties or booked outside the period are ignored here;
    ``booking_year`` keeps them from being booked in the first place.
    """
    period = config.ndc_period
    booked: dict[int, int] = defaultdict(int)
    for entry in entries:
        if entry.party == config.party and entry.year in period:
            booked[entry.year] += entry.amount
    applied = dict(booked)
    if config.method is AccountingMethod.AVERAGING:
        assert config.target_year is not None
        total = sum(booked.values())
        applied = {config.target_year: -(-total // len(period.years))}
    rows = []
    for year in period.years:
        reported_emissions = reported.get(year)
        applied_here = applied.get(year, 0)
        rows.append(
            BalanceRow(
                year=year,
                reported_emissions=reported_emissions,
                booked_adjustment=booked.get(year, 0),
                applied_adjustment=applied_here,
                adjusted_emissions=(
                    None if reported_emissions is None else reported_emissions + applied_here
                ),
                target=_target(config, year),
            )
        )
    period_target = period_total = None
    if config.method is AccountingMethod.BUDGET:
        period_target = config.target_emissions
        adjusted = [row.adjusted_emissions for row in rows]
        period_total = None if None in adjusted else sum(a for a in adjusted if a is not None)
    return BalanceReport(
        party=config.party,
        method=config.method,
        rows=tuple(rows),
        period_target=period_target,
        period_adjusted_total=period_total,
    )


def _target(config: AccountingConfig, year: int) -> int | None:
    if config.method is AccountingMethod.TRAJECTORY:
        return config.trajectory[year]
    if config.method is AccountingMethod.AVERAGING and year == config.target_year:
        return config.target_emissions
    return None


@dataclass(frozen=True, slots=True)
class HostThreshold:
    """The most tCO2e a host lets be first-transferred abroad (seed section 5.2).

    Either limit may be None (no limit). Amounts count by booking year, i.e.
    by vintage, and only units that carry a corresponding adjustment count:
    the point is to keep enough mitigation at home to meet the host's NDC.
    """

    per_year: int | None = None
    per_period: int | None = None


def check_host_threshold(
    threshold: HostThreshold,
    period: NdcPeriod,
    first_transferred: Mapping[int, int],
    *,
    year: int,
    quantity: int,
) -> None:
    """Refuse a first transfer of ``quantity`` booked to ``year`` that would pass a limit.

    ``first_transferred`` is what is already first-transferred (or reserved
    for a pending first transfer) per booking year.
    """
    if threshold.per_year is not None:
        after = first_transferred.get(year, 0) + quantity
        if after > threshold.per_year:
            raise Rejected(
                RejectionCode.HOST_THRESHOLD_EXCEEDED,
                f"first-transferring {quantity} tCO2e of {year} would bring {year} to {after}, "
                f"above the host threshold of {threshold.per_year} a year",
            )
    if threshold.per_period is not None:
        already = sum(q for y, q in first_transferred.items() if y in period)
        after = already + (quantity if year in period else 0)
        if after > threshold.per_period:
            raise Rejected(
                RejectionCode.HOST_THRESHOLD_EXCEEDED,
                f"first-transferring {quantity} tCO2e would bring the NDC period "
                f"{period.first_year}-{period.last_year} to {after}, above the host threshold "
                f"of {threshold.per_period}",
            )
