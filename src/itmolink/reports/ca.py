"""The adjusted emissions balance (``core.accounting.BalanceReport``) as text and rows.

``balance_rows(report)`` gives one row per year of the NDC period and a last
row, ``year == "period"``, with the period totals; ``format_balance(report)``
prints the same rows as a plain-text table with a verdict line under it.

What the target is depends on the method (see ``core.accounting``):

- multi-year trajectory: each year against that year's trajectory point;
- multi-year budget: the period's adjusted total against the budget (the
  "period" row);
- averaging: the target year's emissions plus the period's average
  adjustment against the single-year target.

Numbers are whole tCO2e without separators; adjustments carry their sign
(a host's first transfer adds, an acquisition subtracts). A value not known
yet (emissions not reported) is an empty string in the rows and "-" in the
table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from itmolink.core.accounting import AccountingMethod, BalanceReport

PERIOD = "period"

BALANCE_COLUMNS = (
    "party",
    "method",
    "year",
    "reported_emissions",
    "booked_adjustment",
    "applied_adjustment",
    "adjusted_emissions",
    "target",
    "met",
)

METHOD_LABELS: dict[AccountingMethod, str] = {
    AccountingMethod.TRAJECTORY: "multi-year trajectory",
    AccountingMethod.BUDGET: "multi-year budget",
    AccountingMethod.AVERAGING: "averaging, single-year target",
}

_TABLE_HEADERS = (
    "Year",
    "Reported",
    "Booked adj.",
    "Applied adj.",
    "Adjusted",
    "Target",
    "Met",
)
_UNKNOWN = "-"


def balance_rows(report: BalanceReport) -> list[dict[str, int | str]]:
    """One dict per year of the period, then the ``"period"`` totals row.

    Keys are ``BALANCE_COLUMNS``. ``met`` is "yes", "no" or "" (no target
    that row, or not assessable yet); an unknown number is "". In the period
    row, ``target`` and ``met`` are the budget and its verdict under the
    budget method and "" otherwise, and a total that needs an unreported
    year is "".
    """
    common: dict[str, int | str] = {"party": report.party, "method": report.method.value}
    rows = [
        {
            **common,
            "year": row.year,
            "reported_emissions": _value(row.reported_emissions),
            "booked_adjustment": row.booked_adjustment,
            "applied_adjustment": row.applied_adjustment,
            "adjusted_emissions": _value(row.adjusted_emissions),
            "target": _value(row.target),
            "met": _verdict_word(row.met),
        }
        for row in report.rows
    ]
    budget = report.method is AccountingMethod.BUDGET
    rows.append(
        {
            **common,
            "year": PERIOD,
            "reported_emissions": _value(_total(r.reported_emissions for r in report.rows)),
            "booked_adjustment": sum(r.booked_adjustment for r in report.rows),
            "applied_adjustment": sum(r.applied_adjustment for r in report.rows),
            "adjusted_emissions": _value(
                report.period_adjusted_total
                if budget
                else _total(r.adjusted_emissions for r in report.rows)
            ),
            "target": _value(report.period_target) if budget else "",
            "met": _verdict_word(report.met) if budget else "",
        }
    )
    return rows


def format_balance(report: BalanceReport) -> str:
    """The balance as a plain-text table, a title line above and a verdict line below.

    Ends with a newline.
    """
    rows = balance_rows(report)
    years = [row.year for row in report.rows]
    title = f"Adjusted emissions balance of {report.party}, {METHOD_LABELS[report.method]}"
    if years:
        title += f", {years[0]}-{years[-1]}"
    title += " (tCO2e)"
    body = [
        [
            str(row["year"]),
            _text(row["reported_emissions"]),
            _signed(row["booked_adjustment"]),
            _signed(row["applied_adjustment"]),
            _text(row["adjusted_emissions"]),
            _text(row["target"]),
            _text(row["met"]),
        ]
        for row in rows
    ]
    lines = [title, "", *_table(_TABLE_HEADERS, body), "", verdict(report)]
    return "\n".join(lines) + "\n"


def verdict(report: BalanceReport) -> str:
    """One sentence: whether the target is met after adjustments, and by how many tCO2e."""
    if report.method is AccountingMethod.BUDGET:
        return _budget_verdict(report)
    if report.method is AccountingMethod.AVERAGING:
        return _averaging_verdict(report)
    return _trajectory_verdict(report)


# -- verdicts ---------------------------------------------------------------------------


def _budget_verdict(report: BalanceReport) -> str:
    budget, total = report.period_target, report.period_adjusted_total
    if budget is None or total is None:
        missing = [row.year for row in report.rows if row.adjusted_emissions is None]
        return _open(missing)
    against = f"adjusted total {total} against a budget of {budget} tCO2e"
    return _met_or_not(budget - total, against)


def _averaging_verdict(report: BalanceReport) -> str:
    targeted = [row for row in report.rows if row.target is not None]
    if len(targeted) != 1:
        return "No target year in the balance: nothing to assess."
    row = targeted[0]
    if row.target is None or row.adjusted_emissions is None:
        return _open([row.year])
    against = (
        f"{row.year} adjusted emissions {row.adjusted_emissions} "
        f"against a target of {row.target} tCO2e"
    )
    return _met_or_not(row.target - row.adjusted_emissions, against)


def _trajectory_verdict(report: BalanceReport) -> str:
    margins = {
        row.year: row.target - row.adjusted_emissions
        for row in report.rows
        if row.target is not None and row.adjusted_emissions is not None
    }
    over = {year: -margin for year, margin in margins.items() if margin < 0}
    missing = [
        row.year for row in report.rows if row.target is not None and row.adjusted_emissions is None
    ]
    over_text = ", ".join(f"{year} by {excess}" for year, excess in over.items())
    if missing:
        sentence = _open(missing)
        if over:
            sentence += f" Already above the trajectory in {over_text} tCO2e."
        return sentence
    if not margins:
        return "No trajectory points in the balance: nothing to assess."
    if over:
        return (
            f"Target not met after adjustments: {sum(over.values())} tCO2e above the "
            f"trajectory ({over_text} tCO2e)."
        )
    tightest = min(margins, key=lambda year: (margins[year], year))
    return (
        f"Target met after adjustments: every year at or below the trajectory; "
        f"{margins[tightest]} tCO2e to spare in the tightest year, {tightest}."
    )


def _met_or_not(margin: int, against: str) -> str:
    if margin >= 0:
        return f"Target met after adjustments: {margin} tCO2e to spare ({against})."
    return f"Target not met after adjustments: {-margin} tCO2e over ({against})."


def _open(missing: Sequence[int]) -> str:
    return f"Target not yet assessable: emissions not reported for {_year_ranges(missing)}."


# -- formatting -------------------------------------------------------------------------


def _table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        cells = [
            value.rjust(width) if index else value.ljust(width)
            for index, (value, width) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in body)]


def _value(value: int | None) -> int | str:
    return "" if value is None else value


def _text(value: int | str) -> str:
    return _UNKNOWN if value == "" else str(value)


def _signed(value: int | str) -> str:
    if isinstance(value, int) and value > 0:
        return f"+{value}"
    return _text(value)


def _verdict_word(met: bool | None) -> str:
    return "" if met is None else "yes" if met else "no"


def _total(values: Iterable[int | None]) -> int | None:
    values = list(values)
    if any(value is None for value in values):
        return None
    return sum(value for value in values if value is not None)


def _year_ranges(years: Sequence[int]) -> str:
    """2021, 2023-2025: consecutive years joined into ranges."""
    spans: list[list[int]] = []
    for year in sorted(years):
        if spans and year == spans[-1][1] + 1:
            spans[-1][1] = year
        else:
            spans.append([year, year])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
