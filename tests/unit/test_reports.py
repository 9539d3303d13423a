"""AEF report files (CSV and XLSX) and the adjusted emissions balance printout."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import zipfile
from pathlib import Path

import pytest
from openpyxl import load_workbook

from itmolink.core.accounting import (
    AccountingConfig,
    AccountingMethod,
    BalanceReport,
    NdcPeriod,
    emissions_balance,
)
from itmolink.core.actions import ActionType
from itmolink.core.adjustments import AdjustmentEntry
from itmolink.core.aef import (
    ActionRecord,
    ActionSubtype,
    AefReport,
    AefTable,
    AuthorisationRecord,
    AuthorisedEntityRecord,
    HoldingsSnapshot,
    Submission,
    aef_report,
)
from itmolink.core.units import UnitType
from itmolink.reports import balance_rows, format_balance, write_aef
from itmolink.reports.aef_files import aef_file_names, csv_bytes, reported_year, xlsx_bytes
from itmolink.reports.ca import BALANCE_COLUMNS, verdict
from tests.unit.article6 import NDC_AUTH, block

UTC = dt.UTC

# -- a small year in Lao PDR's registry (LAO01) ------------------------------------------

SUBMISSION = Submission("LAO", 2025, dt.date(2026, 4, 15), NdcPeriod(1, 2021, 2030))
AUTHORISATIONS = [
    AuthorisationRecord(
        NDC_AUTH, dt.date(2025, 2, 10), sectors="Energy generation", activity_types="Solar"
    )
]
ACTIONS = [
    # Out of date order on purpose: the table sorts them.
    ActionRecord(
        at=dt.datetime(2025, 9, 1, tzinfo=UTC),
        action_type=ActionType.CANCELLATION,
        block=block(811, 820),
        registry_id="LAO01",
        subtype=ActionSubtype.OTHER_CANCELLATION,
        using_party="LAO",
        additional_information="=1+2",  # text, not a formula
    ),
    ActionRecord(
        at=dt.datetime(2025, 4, 1, 2, 30, tzinfo=UTC),
        action_type=ActionType.FIRST_TRANSFER,
        block=block(1, 800),
        registry_id="LAO01",
        subtype=ActionSubtype.FIRST_TRANSFER_TO_ANOTHER_PARTY,
        acquiring_party="KOR",
    ),
    ActionRecord(
        at=dt.datetime(2025, 6, 15, 12, 0, 0, 123456, tzinfo=UTC),
        action_type=ActionType.VOLUNTARY_CANCELLATION,
        block=block(801, 810),
        registry_id="LAO01",
        subtype=ActionSubtype.VOLUNTARY_OMGE,
        using_party="LAO",
        additional_information='Retired for "Green Vientiane", phase 1 ',
    ),
]
HOLDINGS = HoldingsSnapshot(
    "LAO01",
    dt.date(2025, 12, 31),
    (block(901, 1000), block(2001, 2050, vintage=2024), block(821, 900)),
)
ENTITIES = [
    AuthorisedEntityRecord(
        dt.date(2025, 2, 10),
        'Sun & Co., "Lao" Ltd.',
        "LAO",
        "LA-0007",
        "CA0001",
        conditions="ສປປ ລາວ only",
    )
]
REPORT = aef_report(SUBMISSION, AUTHORISATIONS, ACTIONS, HOLDINGS, ENTITIES)

NAMES = [
    "2025-submission.csv",
    "2025-authorizations.csv",
    "2025-actions.csv",
    "2025-holdings.csv",
    "2025-authorized-entities.csv",
    "aef-2025.xlsx",
]


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


# -- CSV ---------------------------------------------------------------------------------


def test_write_aef_writes_five_csvs_and_a_workbook(tmp_path: Path) -> None:
    out = tmp_path / "aef"  # created if missing
    paths = write_aef(REPORT, out)
    assert paths == [out / name for name in NAMES]
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    assert aef_file_names(REPORT) == NAMES
    assert reported_year(REPORT) == 2025


def test_holdings_csv_bytes(tmp_path: Path) -> None:
    write_aef(REPORT, tmp_path)
    # 821-900 and 901-1000 merge; rows by cooperative approach, authorisation, serial.
    assert (tmp_path / "2025-holdings.csv").read_bytes() == (
        b"Cooperative approach ID,Authorization ID,First transferring participating Party ID,"
        b"Party ITMO registry ID,First ID,Last ID,Underlying unit registry ID,First unit ID,"
        b"Last unit ID,Metric,Applicable GWP value(s),Applicable non-GHG metric,"
        b"Quantity (t CO2 eq),Quantity (in non-GHG metric),Mitigation type,Vintage\n"
        b"CA0001,LAO-A-0001,LAO,LAO01,821,1000,NA,NA,NA,GHG,,NA,180,NA,Emission reductions,2025\n"
        b"CA0001,LAO-A-0001,LAO,LAO01,2001,2050,NA,NA,NA,GHG,,NA,50,NA,Emission reductions,2024\n"
    )


def test_actions_csv_bytes(tmp_path: Path) -> None:
    write_aef(REPORT, tmp_path)
    # In date order; a field with a comma, a quote or trailing space is quoted, quotes doubled.
    assert (tmp_path / "2025-actions.csv").read_bytes() == (
        b"Action date,Action type,Action subtype,Cooperative approach ID,Authorization ID,"
        b"First transferring participating Party ID,Party ITMO registry ID,First ID,Last ID,"
        b"Underlying unit registry ID,First unit ID,Last unit ID,Metric,Applicable GWP value(s),"
        b"Applicable non-GHG metric,Quantity (t CO2 eq),Quantity (in non-GHG metric),"
        b"Mitigation type,Vintage,Transferring participating Party ID,"
        b"Acquiring participating Party ID,"
        b"Purpose for which the ITMO has been used towards or cancelled for OIMP,"
        b"Using/cancelling participating Party ID,Using/cancelling authorized entity ID,"
        b"Calendar year for which the ITMOs are used towards the Party's NDC,"
        b"Result of the consistency checks,Additional explanatory information\n"
        b"2025-04-01T02:30:00.000Z,First transfer,First transfer to another Party,CA0001,"
        b"LAO-A-0001,LAO,LAO01,1,800,NA,NA,NA,GHG,,NA,800,NA,Emission reductions,2025,"
        b"NA,KOR,NA,NA,NA,NA,,\n"
        b"2025-06-15T12:00:00.123Z,Voluntary Cancellation,Voluntary cancellation to deliver OMGE,"
        b"CA0001,LAO-A-0001,LAO,LAO01,801,810,NA,NA,NA,GHG,,NA,10,NA,Emission reductions,2025,"
        b'NA,NA,NA,LAO,NA,NA,,"Retired for ""Green Vientiane"", phase 1 "\n'
        b"2025-09-01T00:00:00.000Z,Cancellation,Other cancellations,CA0001,LAO-A-0001,LAO,LAO01,"
        b"811,820,NA,NA,NA,GHG,,NA,10,NA,Emission reductions,2025,NA,NA,NA,LAO,NA,NA,,=1+2\n"
    )


def test_submission_and_entities_csv_bytes(tmp_path: Path) -> None:
    write_aef(REPORT, tmp_path)
    assert (tmp_path / "2025-submission.csv").read_bytes() == (
        b"Party,Version,Reported year,Date of submission,Review status of the initial report,"
        b"Result of the consistency check of this AEF submission,"
        b"First year of the NDC implementation period,Last year of the NDC implementation period,"
        b"Reference to the Article 6 technical expert review report of the initial report\n"
        b"LAO,1.0,2025,15/04/2026,,,2021,2030,\n"
    )
    # UTF-8, no byte order mark.
    assert (tmp_path / "2025-authorized-entities.csv").read_bytes() == (
        "Date of the authorization,Name,Country of incorporation,Identification number,"
        "Cooperative approach ID,Conditions,Change and revocation conditions,"
        "Additional explanatory information\n"
        '10/02/2025,"Sun & Co., ""Lao"" Ltd.",LAO,LA-0007,CA0001,ສປປ ລາວ only,,\n'
    ).encode()


def test_every_csv_reads_back_as_the_table(tmp_path: Path) -> None:
    paths = write_aef(REPORT, tmp_path)
    for table, path in zip(REPORT.tables(), paths, strict=False):
        data = path.read_bytes()
        assert b"\r" not in data
        assert not any(line.endswith(b" ") for line in data.split(b"\n"))
        rows = csv_rows(data)
        assert rows[0] == list(table.columns)
        assert [tuple(row) for row in rows[1:]] == list(table.rows)


def test_csv_edge_cases() -> None:
    table = AefTable("T", ("a", "b"), ((" lead", "multi\nline"), ("", "")))
    assert csv_bytes(table) == b'a,b\n" lead","multi\nline"\n,\n'
    # A one-column row with an empty cell is not a blank line.
    assert csv_bytes(AefTable("T", ("a",), (("",),))) == b'a\n""\n'
    assert csv_rows(csv_bytes(AefTable("T", ("a",), (("",),)))) == [["a"], [""]]


def test_empty_tables_have_a_header_only(tmp_path: Path) -> None:
    snapshot = HoldingsSnapshot("KOR01", dt.date(2025, 12, 31), ())
    submission = dataclasses.replace(SUBMISSION, party="KOR")
    report = aef_report(submission, [], [], snapshot, [])
    write_aef(report, tmp_path)
    assert (tmp_path / "2025-holdings.csv").read_bytes().count(b"\n") == 1
    sheet = load_workbook(tmp_path / "aef-2025.xlsx")["Table 4 Holdings"]
    assert sheet.max_row == 1


def test_the_same_report_gives_the_same_bytes(tmp_path: Path) -> None:
    first = write_aef(REPORT, tmp_path / "one")
    # Rebuilt from the same records given in another order.
    again = aef_report(SUBMISSION, AUTHORISATIONS, ACTIONS[::-1], HOLDINGS, ENTITIES)
    second = write_aef(again, tmp_path / "two")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert xlsx_values(first[-1]) == xlsx_values(second[-1])


# -- XLSX --------------------------------------------------------------------------------


def xlsx_values(path: Path) -> dict[str, list[list[str]]]:
    workbook = load_workbook(path)
    return {
        sheet.title: [
            ["" if value is None else str(value) for value in row]
            for row in sheet.iter_rows(values_only=True)
        ]
        for sheet in workbook.worksheets
    }


def test_xlsx_sheets_hold_exactly_the_csv_rows(tmp_path: Path) -> None:
    paths = write_aef(REPORT, tmp_path)
    values = xlsx_values(paths[-1])
    assert list(values) == [
        "Table 1 Submission",
        "Table 2 Authorizations",
        "Table 3 Actions",
        "Table 4 Holdings",
        "Table 5 Authorized entities",
    ]
    assert all(len(name) <= 31 for name in values)
    for sheet_rows, csv_path in zip(values.values(), paths[:5], strict=True):
        assert sheet_rows == csv_rows(csv_path.read_bytes()), csv_path.name


def test_xlsx_header_cells_and_layout(tmp_path: Path) -> None:
    path = write_aef(REPORT, tmp_path)[-1]
    workbook = load_workbook(path)
    for table, sheet in zip(REPORT.tables(), workbook.worksheets, strict=True):
        header = next(sheet.iter_rows(min_row=1, max_row=1))
        assert tuple(cell.value for cell in header) == table.columns
        assert all(cell.font.bold for cell in header)
        assert sheet.freeze_panes == "A2"
        for row in sheet.iter_rows(min_row=2):
            assert not any(cell.font.bold for cell in row)
            # Every value is text: quantities and serials too, and "=1+2" is no formula.
            assert all(cell.data_type == "s" for cell in row if cell.value is not None)
        for letter in ("A", "B"):
            assert 6 <= sheet.column_dimensions[letter].width <= 60
    actions = workbook["Table 3 Actions"]
    # Fitted: the action date column fits "2025-04-01T02:30:00.000Z" (24 characters).
    assert actions.column_dimensions["A"].width == 26
    assert actions["AA4"].value == "=1+2"
    assert actions["AA3"].value == 'Retired for "Green Vientiane", phase 1 '
    assert actions["P2"].value == "800"


def test_xlsx_is_stamped_with_the_submission_date(tmp_path: Path) -> None:
    path = write_aef(REPORT, tmp_path)[-1]
    props = load_workbook(path).properties
    assert props.created == props.modified == dt.datetime(2026, 4, 15)
    with zipfile.ZipFile(path) as archive:
        assert {info.date_time for info in archive.infolist()} == {(2026, 4, 15, 0, 0, 0)}
    assert xlsx_bytes(REPORT) == path.read_bytes()


def test_a_control_character_is_refused_before_writing(tmp_path: Path) -> None:
    bad = dataclasses.replace(ACTIONS[0], additional_information="bell\x07")
    report = aef_report(SUBMISSION, AUTHORISATIONS, [bad], HOLDINGS, ENTITIES)
    with pytest.raises(ValueError, match="control character"):
        write_aef(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- overwriting -------------------------------------------------------------------------


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "aef-2025.xlsx").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"aef-2025\.xlsx.*overwrite=True"):
        write_aef(REPORT, tmp_path)
    # Checked before writing: no CSV written either.
    assert [p.name for p in tmp_path.iterdir()] == ["aef-2025.xlsx"]
    assert (tmp_path / "aef-2025.xlsx").read_bytes() == b"keep me"


def test_overwrite_replaces(tmp_path: Path) -> None:
    write_aef(REPORT, tmp_path)
    with pytest.raises(FileExistsError):
        write_aef(REPORT, tmp_path)
    (tmp_path / "2025-holdings.csv").write_bytes(b"stale")
    paths = write_aef(REPORT, tmp_path, overwrite=True)
    assert paths[3].read_bytes() == csv_bytes(REPORT.holdings)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)


def test_report_year_and_date_come_from_the_submission_table() -> None:
    broken = AefReport(
        dataclasses.replace(REPORT.submission, rows=()),
        REPORT.authorizations,
        REPORT.actions,
        REPORT.holdings,
        REPORT.authorized_entities,
    )
    with pytest.raises(ValueError, match="Submission table has 0 rows"):
        aef_file_names(broken)


# -- the adjusted emissions balance ------------------------------------------------------

M = AccountingMethod
SHORT = NdcPeriod(1, 2021, 2023)
REPORTED = {2021: 95, 2022: 85, 2023: 70}
TRAJECTORY = AccountingConfig(
    party="LAO", method=M.TRAJECTORY, ndc_period=SHORT, trajectory={2021: 100, 2022: 90, 2023: 80}
)
BUDGET = AccountingConfig(party="LAO", method=M.BUDGET, ndc_period=SHORT, target_emissions=260)
AVERAGING = AccountingConfig(
    party="LAO", method=M.AVERAGING, ndc_period=SHORT, target_year=2023, target_emissions=80
)


def entry(year: int, amount: int) -> AdjustmentEntry:
    return AdjustmentEntry("LAO", "KOR", "LAO-T-000001", year, amount, UnitType.ITMO, "x")


def balance(config: AccountingConfig, *entries: AdjustmentEntry) -> BalanceReport:
    return emissions_balance(config, REPORTED, entries)


def test_trajectory_not_met() -> None:
    assert format_balance(balance(TRAJECTORY, entry(2022, 3), entry(2023, 11))) == (
        "Adjusted emissions balance of LAO, multi-year trajectory, 2021-2023 (tCO2e)\n"
        "\n"
        "Year    Reported  Booked adj.  Applied adj.  Adjusted  Target  Met\n"
        "------  --------  -----------  ------------  --------  ------  ---\n"
        "2021          95            0             0        95     100  yes\n"
        "2022          85           +3            +3        88      90  yes\n"
        "2023          70          +11           +11        81      80   no\n"
        "period       250          +14           +14       264       -    -\n"
        "\n"
        "Target not met after adjustments: 1 tCO2e above the trajectory (2023 by 1 tCO2e).\n"
    )


def test_trajectory_met() -> None:
    assert verdict(balance(TRAJECTORY, entry(2022, 3))) == (
        "Target met after adjustments: every year at or below the trajectory; "
        "2 tCO2e to spare in the tightest year, 2022."
    )


def test_budget_met() -> None:
    # A buyer's acquisition subtracts.
    report = balance(BUDGET, entry(2022, -11))
    assert format_balance(report) == (
        "Adjusted emissions balance of LAO, multi-year budget, 2021-2023 (tCO2e)\n"
        "\n"
        "Year    Reported  Booked adj.  Applied adj.  Adjusted  Target  Met\n"
        "------  --------  -----------  ------------  --------  ------  ---\n"
        "2021          95            0             0        95       -    -\n"
        "2022          85          -11           -11        74       -    -\n"
        "2023          70            0             0        70       -    -\n"
        "period       250          -11           -11       239     260  yes\n"
        "\n"
        "Target met after adjustments: 21 tCO2e to spare "
        "(adjusted total 239 against a budget of 260 tCO2e).\n"
    )


def test_budget_not_met() -> None:
    assert verdict(balance(BUDGET, entry(2021, 4), entry(2023, 7))) == (
        "Target not met after adjustments: 1 tCO2e over "
        "(adjusted total 261 against a budget of 260 tCO2e)."
    )


def test_averaging_not_met() -> None:
    # (10 + 21) / 3 years = 10.33, rounded up: 11 applied to 2023.
    assert format_balance(balance(AVERAGING, entry(2021, 10), entry(2022, 21))) == (
        "Adjusted emissions balance of LAO, averaging, single-year target, 2021-2023 (tCO2e)\n"
        "\n"
        "Year    Reported  Booked adj.  Applied adj.  Adjusted  Target  Met\n"
        "------  --------  -----------  ------------  --------  ------  ---\n"
        "2021          95          +10             0        95       -    -\n"
        "2022          85          +21             0        85       -    -\n"
        "2023          70            0           +11        81      80   no\n"
        "period       250          +31           +11       261       -    -\n"
        "\n"
        "Target not met after adjustments: 1 tCO2e over "
        "(2023 adjusted emissions 81 against a target of 80 tCO2e).\n"
    )


def test_averaging_met_exactly() -> None:
    assert verdict(balance(AVERAGING, entry(2021, 10), entry(2022, 20))) == (
        "Target met after adjustments: 0 tCO2e to spare "
        "(2023 adjusted emissions 80 against a target of 80 tCO2e)."
    )


@pytest.mark.parametrize("config", [TRAJECTORY, BUDGET, AVERAGING], ids=lambda c: c.method.value)
@pytest.mark.parametrize("amount", [-20, 0, 5, 11, 40])
def test_the_verdict_agrees_with_the_core(config: AccountingConfig, amount: int) -> None:
    report = balance(config, entry(2023, amount))
    assert report.met is not None
    assert verdict(report).startswith("Target met after" if report.met else "Target not met after")
    assert format_balance(report).endswith(verdict(report) + "\n")


def test_unreported_years_leave_the_verdict_open() -> None:
    partial = {2021: 95, 2022: 91}
    trajectory = emissions_balance(TRAJECTORY, partial, [])
    assert verdict(trajectory) == (
        "Target not yet assessable: emissions not reported for 2023. "
        "Already above the trajectory in 2022 by 1 tCO2e."
    )
    assert verdict(emissions_balance(BUDGET, {2022: 1}, [])) == (
        "Target not yet assessable: emissions not reported for 2021, 2023."
    )
    # Averaging needs only the target year.
    assert verdict(emissions_balance(AVERAGING, {2021: 1}, [])) == (
        "Target not yet assessable: emissions not reported for 2023."
    )
    assert emissions_balance(AVERAGING, {2023: 80}, []).met is True
    assert verdict(emissions_balance(AVERAGING, {2023: 80}, [])).startswith("Target met")


def test_balance_rows() -> None:
    rows = balance_rows(balance(BUDGET, entry(2022, 11)))
    assert all(tuple(row) == BALANCE_COLUMNS for row in rows)
    assert rows[1] == {
        "party": "LAO",
        "method": "multi-year-budget",
        "year": 2022,
        "reported_emissions": 85,
        "booked_adjustment": 11,
        "applied_adjustment": 11,
        "adjusted_emissions": 96,
        "target": "",
        "met": "",
    }
    assert rows[-1] == {
        "party": "LAO",
        "method": "multi-year-budget",
        "year": "period",
        "reported_emissions": 250,
        "booked_adjustment": 11,
        "applied_adjustment": 11,
        "adjusted_emissions": 261,
        "target": 260,
        "met": "no",
    }
    trajectory = balance_rows(emissions_balance(TRAJECTORY, {2021: 95}, []))
    assert [(r["year"], r["adjusted_emissions"], r["target"], r["met"]) for r in trajectory] == [
        (2021, 95, 100, "yes"),
        (2022, "", 90, ""),
        (2023, "", 80, ""),
        ("period", "", "", ""),
    ]
