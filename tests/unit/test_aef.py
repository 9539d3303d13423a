"""The five AEF v2 tables of a scripted year, compared with rows written out by hand."""

from __future__ import annotations

import datetime as dt

import pytest

from itmolink.core.accounting import NdcPeriod
from itmolink.core.actions import ActionType
from itmolink.core.aef import (
    ACTIONS_COLUMNS,
    AUTHORIZATIONS_COLUMNS,
    AUTHORIZED_ENTITIES_COLUMNS,
    HOLDINGS_COLUMNS,
    SUBMISSION_COLUMNS,
    ActionRecord,
    ActionSubtype,
    AuthorisationRecord,
    AuthorisedEntityRecord,
    HoldingsSnapshot,
    MitigationType,
    Submission,
    aef_report,
    holdings_table,
)
from itmolink.core.blocks import Block
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from tests.unit.article6 import NDC_AUTH, OIMP_AUTH, authorisation, block

UTC = dt.UTC
ICT = dt.timezone(dt.timedelta(hours=7))  # Vientiane
EST = dt.timezone(dt.timedelta(hours=-5))
A64 = UnitType.A6_4ER_AUTHORISED

# The year 2025 in Lao PDR's registry (LAO01).

SOLAR = NDC_AUTH  # LAO-A-0001: ITMOs for NDC use by KOR or JPN, 2021-2030, cap 100,000
FOREST = authorisation(
    OIMP_AUTH,
    terms={
        "authorisation_id": "LAO-A-0002",
        "activity_id": "LAO-FOREST",
        "acquiring_parties": frozenset({"KOR"}),
        "purposes": frozenset({Purpose.NDC, Purpose.OIMP}),
        "vintage_from": 2024,
        "vintage_to": 2026,
        "quantity_cap": 0,
        "unit_type": A64,
    },
    oimp_detail="CORSIA",
    first_transfer_definition=FirstTransferDefinition.AT_ISSUANCE,
)
SOLAR_V2 = authorisation(SOLAR, terms={"version": 2, "quantity_cap": 150_000})


def forest(start: int, end: int) -> Block:
    return block(start, end, unit_type=A64, activity_id="LAO-FOREST", authorisation_id="LAO-A-0002")


SUBMISSION = Submission(
    party="LAO",
    reported_year=2025,
    submission_date=dt.date(2026, 4, 15),
    ndc_period=NdcPeriod(1, 2021, 2030),
)
AUTHORISATIONS = [
    AuthorisationRecord(SOLAR_V2, dt.date(2026, 1, 20), sectors="Energy generation"),
    AuthorisationRecord(
        FOREST,
        dt.date(2025, 3, 1),
        sectors="Forestry and land use",
        activity_types="Reforestation",
        authorised_entities=("LA-0042",),
    ),
    AuthorisationRecord(
        SOLAR,
        dt.date(2025, 2, 10),
        sectors="Energy generation",
        activity_types="Solar",
        terms_and_conditions="JCM-style 80% share",
    ),
]
ACTIONS = [
    ActionRecord(
        at=dt.datetime(2025, 6, 15, 12, 0, 0, 123456, tzinfo=UTC),
        action_type=ActionType.VOLUNTARY_CANCELLATION,
        block=block(801, 810),
        registry_id="LAO01",
        subtype=ActionSubtype.VOLUNTARY_OMGE,
        using_party="LAO",
    ),
    ActionRecord(
        at=dt.datetime(2025, 4, 1, 9, 30, tzinfo=ICT),
        action_type=ActionType.FIRST_TRANSFER,
        block=block(1, 800),
        registry_id="LAO01",
        subtype=ActionSubtype.FIRST_TRANSFER_TO_ANOTHER_PARTY,
        acquiring_party="KOR",
    ),
    ActionRecord(
        at=dt.datetime(2025, 5, 1, tzinfo=UTC),
        action_type=ActionType.FIRST_TRANSFER,
        block=forest(5001, 5093),
        registry_id="LAO01",
        subtype=ActionSubtype.ISSUANCE,
        oimp_purpose="CORSIA",
    ),
    ActionRecord(
        at=dt.datetime(2025, 5, 1, tzinfo=UTC),
        action_type=ActionType.CANCELLATION,
        block=forest(5099, 5100),
        registry_id="LAO01",
        subtype=ActionSubtype.MANDATORY_OMGE,
    ),
    # 31 December in New York is 1 January 2026 in UTC: next year's report.
    ActionRecord(
        at=dt.datetime(2025, 12, 31, 23, 30, tzinfo=EST),
        action_type=ActionType.FIRST_TRANSFER,
        block=block(811, 820),
        registry_id="LAO01",
        acquiring_party="JPN",
    ),
    # 1 January in Vientiane is still 2024 in UTC: last year's report.
    ActionRecord(
        at=dt.datetime(2025, 1, 1, 3, 0, tzinfo=ICT),
        action_type=ActionType.FIRST_TRANSFER,
        block=block(821, 830),
        registry_id="LAO01",
        acquiring_party="JPN",
    ),
]
HOLDINGS = HoldingsSnapshot(
    registry_id="LAO01",
    at=dt.date(2025, 12, 31),
    blocks=(
        block(901, 1000),
        forest(5001, 5093),
        block(811, 900),
    ),
)
ENTITIES = [
    AuthorisedEntityRecord(dt.date(2024, 11, 5), "Old Hydro Co.", "LAO", "LA-0001", "CA0001"),
    AuthorisedEntityRecord(
        dt.date(2025, 3, 1),
        "Lao Forest Carbon Co.",
        "LAO",
        "LA-0042",
        "CA0001",
        conditions="CORSIA use only",
        change_and_revocation_conditions="Revocable before first transfer",
    ),
]
TYPES = {"LAO-FOREST": MitigationType.REMOVALS}

REPORT = aef_report(SUBMISSION, AUTHORISATIONS, ACTIONS, HOLDINGS, ENTITIES, TYPES)


def test_submission() -> None:
    assert REPORT.submission.name == "Table 1 Submission"
    assert REPORT.submission.columns == SUBMISSION_COLUMNS
    assert REPORT.submission.rows == (
        ("LAO", "1.0", "2025", "15/04/2026", "", "", "2021", "2030", ""),
    )


def test_authorizations() -> None:
    table = REPORT.authorizations
    assert table.columns == AUTHORIZATIONS_COLUMNS
    assert len(table.columns) == 19
    # Version 2 is dated 2026 and belongs to next year's report.
    assert table.rows == (
        (
            "LAO-A-0001", "10/02/2025", "CA0001", "1", "100000", "GHG", "", "NA",
            "Energy generation", "Solar", "NDC", "JPN, KOR", "", "NA", "2021 - 2030",
            "JCM-style 80% share", "", "NA", "",
        ),
        (
            "LAO-A-0002", "01/03/2025", "CA0001", "1", "", "GHG", "", "NA",
            "Forestry and land use", "Reforestation", "NDC and OIMP", "KOR", "LA-0042",
            "CORSIA", "2024 - 2026", "", "", "Issuance", "",
        ),
    )  # fmt: skip


def test_actions() -> None:
    table = REPORT.actions
    assert table.columns == ACTIONS_COLUMNS
    assert len(table.columns) == 27
    common = ("NA", "NA", "NA", "GHG", "", "NA")
    assert table.rows == (
        (
            "2025-04-01T02:30:00.000Z", "First transfer", "First transfer to another Party",
            "CA0001", "LAO-A-0001", "LAO", "LAO01", "1", "800", *common, "800", "NA",
            "Emission reductions", "2025", "NA", "KOR", "NA", "NA", "NA", "NA", "", "",
        ),
        (
            "2025-05-01T00:00:00.000Z", "First transfer", "Issuance",
            "CA0001", "LAO-A-0002", "LAO", "LAO01", "5001", "5093", *common, "93", "NA",
            "Removals", "2025", "NA", "NA", "CORSIA", "NA", "NA", "NA", "", "",
        ),
        (
            "2025-05-01T00:00:00.000Z", "Cancellation", "Mandatory cancellation to deliver OMGE",
            "CA0001", "LAO-A-0002", "LAO", "LAO01", "5099", "5100", *common, "2", "NA",
            "Removals", "2025", "NA", "NA", "NA", "NA", "NA", "NA", "", "",
        ),
        (
            "2025-06-15T12:00:00.123Z", "Voluntary Cancellation",
            "Voluntary cancellation to deliver OMGE",
            "CA0001", "LAO-A-0001", "LAO", "LAO01", "801", "810", *common, "10", "NA",
            "Emission reductions", "2025", "NA", "NA", "NA", "LAO", "NA", "NA", "", "",
        ),
    )  # fmt: skip
    assert table.as_dicts()[0]["Quantity (t CO2 eq)"] == "800"


def test_holdings_at_31_december() -> None:
    table = REPORT.holdings
    assert table.columns == HOLDINGS_COLUMNS
    assert len(table.columns) == 16
    common = ("NA", "NA", "NA", "GHG", "", "NA")
    # 811-900 and 901-1000 are one block once merged.
    assert table.rows == (
        ("CA0001", "LAO-A-0001", "LAO", "LAO01", "811", "1000", *common, "190", "NA",
         "Emission reductions", "2025"),
        ("CA0001", "LAO-A-0002", "LAO", "LAO01", "5001", "5093", *common, "93", "NA",
         "Removals", "2025"),
    )  # fmt: skip


def test_authorized_entities() -> None:
    table = REPORT.authorized_entities
    assert table.columns == AUTHORIZED_ENTITIES_COLUMNS
    assert len(table.columns) == 8
    assert table.rows == (
        (
            "01/03/2025", "Lao Forest Carbon Co.", "LAO", "LA-0042", "CA0001",
            "CORSIA use only", "Revocable before first transfer", "",
        ),
    )  # fmt: skip


def test_the_report_has_the_five_tables_in_order() -> None:
    assert [t.name for t in REPORT.tables()] == [
        "Table 1 Submission",
        "Table 2 Authorizations",
        "Table 3 Actions",
        "Table 4 Holdings",
        "Table 5 Authorized entities",
    ]
    for table in REPORT.tables():
        assert all(len(row) == len(table.columns) for row in table.rows)


def test_acquiring_party_side() -> None:
    # Korea's registry (KOR01) acquires 800 and uses 300 toward its NDC for 2025.
    actions = [
        ActionRecord(
            at=dt.datetime(2025, 4, 1, 2, 30, 5, tzinfo=UTC),
            action_type=ActionType.ACQUISITION,
            block=block(1, 800),
            registry_id="KOR01",
            transferring_party="LAO",
        ),
        ActionRecord(
            at=dt.datetime(2025, 9, 1, tzinfo=UTC),
            action_type=ActionType.USE_NDC,
            block=block(1, 300),
            registry_id="KOR01",
            using_party="KOR",
            use_year=2025,
        ),
    ]
    submission = Submission("KOR", 2025, dt.date(2026, 4, 15), NdcPeriod(1, 2021, 2030))
    snapshot = HoldingsSnapshot("KOR01", dt.date(2025, 12, 31), (block(301, 800),))
    report = aef_report(submission, [], actions, snapshot, [])
    rows = report.actions.as_dicts()
    assert [r["Action type"] for r in rows] == ["Acquisition", "Use"]
    assert rows[0]["Transferring participating Party ID"] == "LAO"
    assert rows[0]["Acquiring participating Party ID"] == "NA"
    assert rows[0]["Calendar year for which the ITMOs are used towards the Party's NDC"] == "NA"
    assert rows[1]["Transferring participating Party ID"] == "NA"
    assert rows[1]["Using/cancelling participating Party ID"] == "KOR"
    assert rows[1]["Calendar year for which the ITMOs are used towards the Party's NDC"] == "2025"
    assert rows[1]["Action subtype"] == ""
    assert report.authorizations.rows == ()
    assert report.holdings.as_dicts()[0]["Quantity (t CO2 eq)"] == "500"


def test_holdings_snapshot_must_be_at_31_december() -> None:
    snapshot = HoldingsSnapshot("LAO01", dt.date(2025, 12, 30), ())
    with pytest.raises(ValueError, match="31 December"):
        holdings_table(snapshot, 2025, {})
    assert holdings_table(HoldingsSnapshot("LAO01", dt.date(2025, 12, 31), ()), 2025, {}).rows == ()


def test_action_times_need_a_time_zone() -> None:
    naive = ActionRecord(
        at=dt.datetime(2025, 6, 1),
        action_type=ActionType.TRANSFER,
        block=block(1, 2),
        registry_id="LAO01",
    )
    with pytest.raises(ValueError, match="time zone"):
        aef_report(SUBMISSION, [], [naive], HOLDINGS, [])
