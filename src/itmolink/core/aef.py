"""The five tables of the Agreed Electronic Format, version 2 (decision 4/CMA.6).

Pure functions from plain records to rows of text, ready for CSV or XLSX:
Submission, Authorizations, Actions, Holdings (the 31 December snapshot) and
Authorized entities. Column names and controlled values follow the AEF
template and the UNFCCC list of common nomenclatures as closely as we could
determine them, American spelling included, and are kept as constants here
so a revision of the template is a change in one place.

What goes in the report for year Y:

- Submission: one row.
- Authorizations and Authorized entities: the versions and entities dated
  in Y (an amendment is a new version and so a new row).
- Actions: the actions whose date, in UTC, falls in Y, in date order.
- Holdings: the snapshot at 31 December of Y, blocks merged where adjacent.

Conventions: "NA" where the template says a field is not applicable to the
row, or the row has no such party (a first transfer at issuance has no
acquiring party); an empty cell where a field is optional and unknown, or is filled in by
the CARP (review status, consistency check results, documentation links).
Dates are dd/mm/yyyy; action dates are ISO 8601 UTC with milliseconds.
Quantities are whole tCO2e in the GHG metric; this registry holds no units
from an underlying crediting registry, so those fields are "NA".
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from itmolink.core.accounting import NdcPeriod
from itmolink.core.actions import ActionType, FirstTransferTrigger
from itmolink.core.authorisation import Authorisation
from itmolink.core.blocks import Block, coalesce
from itmolink.core.units import FirstTransferDefinition, Purpose

NA = "NA"
METRIC_GHG = "GHG"

SUBMISSION_COLUMNS = (
    "Party",
    "Version",
    "Reported year",
    "Date of submission",
    "Review status of the initial report",
    "Result of the consistency check of this AEF submission",
    "First year of the NDC implementation period",
    "Last year of the NDC implementation period",
    "Reference to the Article 6 technical expert review report of the initial report",
)
AUTHORIZATIONS_COLUMNS = (
    "Authorization ID",
    "Date of authorization",
    "Cooperative approach ID",
    "Version of the authorization",
    "Authorized quantity",
    "Metric",
    "Applicable GWP value(s)",
    "Applicable non-GHG metric",
    "Sector(s)",
    "Activity type(s)",
    "Purposes for authorization",
    "Authorized Party(ies) ID",
    "Authorized entity(ies) ID",
    "OIMP authorized by the Party",
    "Authorized timeframe",
    "Authorization terms and conditions",
    "Authorization documentation",
    "First transfer definition for OIMP",
    "Additional explanatory information",
)
ACTIONS_COLUMNS = (
    "Action date",
    "Action type",
    "Action subtype",
    "Cooperative approach ID",
    "Authorization ID",
    "First transferring participating Party ID",
    "Party ITMO registry ID",
    "First ID",
    "Last ID",
    "Underlying unit registry ID",
    "First unit ID",
    "Last unit ID",
    "Metric",
    "Applicable GWP value(s)",
    "Applicable non-GHG metric",
    "Quantity (t CO2 eq)",
    "Quantity (in non-GHG metric)",
    "Mitigation type",
    "Vintage",
    "Transferring participating Party ID",
    "Acquiring participating Party ID",
    "Purpose for which the ITMO has been used towards or cancelled for OIMP",
    "Using/cancelling participating Party ID",
    "Using/cancelling authorized entity ID",
    "Calendar year for which the ITMOs are used towards the Party's NDC",
    "Result of the consistency checks",
    "Additional explanatory information",
)
HOLDINGS_COLUMNS = (
    "Cooperative approach ID",
    "Authorization ID",
    "First transferring participating Party ID",
    "Party ITMO registry ID",
    "First ID",
    "Last ID",
    "Underlying unit registry ID",
    "First unit ID",
    "Last unit ID",
    "Metric",
    "Applicable GWP value(s)",
    "Applicable non-GHG metric",
    "Quantity (t CO2 eq)",
    "Quantity (in non-GHG metric)",
    "Mitigation type",
    "Vintage",
)
AUTHORIZED_ENTITIES_COLUMNS = (
    "Date of the authorization",
    "Name",
    "Country of incorporation",
    "Identification number",
    "Cooperative approach ID",
    "Conditions",
    "Change and revocation conditions",
    "Additional explanatory information",
)

ACTION_TYPE_LABELS: dict[ActionType, str] = {
    ActionType.AUTHORISATION: "Authorization",
    ActionType.FIRST_TRANSFER: "First transfer",
    ActionType.TRANSFER: "Transfer",
    ActionType.ACQUISITION: "Acquisition",
    ActionType.USE_NDC: "Use",
    ActionType.USE_OIMP: "Use",
    ActionType.CANCELLATION: "Cancellation",
    ActionType.VOLUNTARY_CANCELLATION: "Voluntary Cancellation",
}
FIRST_TRANSFER_DEFINITION_LABELS: dict[FirstTransferDefinition, str] = {
    FirstTransferDefinition.AT_AUTHORISATION: "Authorisation",
    FirstTransferDefinition.AT_ISSUANCE: "Issuance",
    FirstTransferDefinition.AT_USE_OR_CANCELLATION: "Use or Cancellation",
}


class ActionSubtype(enum.Enum):
    """AEF action subtypes; the value is the label in the table."""

    FIRST_TRANSFER_TO_ANOTHER_PARTY = "First transfer to another Party"
    AUTHORISATION = "Authorization"
    ISSUANCE = "Issuance"
    USE_OR_CANCELLATION = "Use or cancellation"
    MANDATORY_ADAPTATION_FUND = "Mandatory transfer to the Adaptation Fund (A6.4 ERs)"
    VOLUNTARY_ADAPTATION_FUND = "Voluntary transfer to the Adaptation Fund (A6.4 ERs)"
    MANDATORY_OMGE = "Mandatory cancellation to deliver OMGE"
    VOLUNTARY_OMGE = "Voluntary cancellation to deliver OMGE"
    OTHER_CANCELLATION = "Other cancellations"


FIRST_TRANSFER_SUBTYPES: dict[FirstTransferTrigger, ActionSubtype] = {
    FirstTransferTrigger.INTERNATIONAL_TRANSFER: ActionSubtype.FIRST_TRANSFER_TO_ANOTHER_PARTY,
    FirstTransferTrigger.AUTHORISATION: ActionSubtype.AUTHORISATION,
    FirstTransferTrigger.ISSUANCE: ActionSubtype.ISSUANCE,
    FirstTransferTrigger.USE_OR_CANCELLATION: ActionSubtype.USE_OR_CANCELLATION,
}


class MitigationType(enum.Enum):
    EMISSION_REDUCTIONS = "Emission reductions"
    REMOVALS = "Removals"
    REDUCTIONS_AND_REMOVALS = "Emission reductions and removals"


# -- input records -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submission:
    party: str
    reported_year: int
    submission_date: dt.date
    ndc_period: NdcPeriod
    version: str = "1.0"


@dataclass(frozen=True, slots=True)
class AuthorisationRecord:
    """One version of an authorisation, with the facts the AEF asks beyond its terms."""

    authorisation: Authorisation
    date: dt.date  # when this version was issued
    sectors: str
    activity_types: str = ""
    authorised_entities: tuple[str, ...] = ()
    terms_and_conditions: str = ""
    additional_information: str = ""


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One action on one block, as the registry's action log holds it."""

    at: dt.datetime  # timezone-aware
    action_type: ActionType
    block: Block
    registry_id: str  # the Party ITMO registry that tracked the action
    subtype: ActionSubtype | None = None
    transferring_party: str = ""  # acquisitions
    acquiring_party: str = ""  # first transfers and transfers
    oimp_purpose: str = ""  # use or cancellation for OIMP, e.g. "CORSIA"
    using_party: str = ""  # uses and cancellations
    using_entity: str = ""
    use_year: int | None = None  # use toward the NDC
    additional_information: str = ""


@dataclass(frozen=True, slots=True)
class HoldingsSnapshot:
    registry_id: str
    at: dt.date  # 31 December of the reported year
    blocks: tuple[Block, ...]


@dataclass(frozen=True, slots=True)
class AuthorisedEntityRecord:
    authorisation_date: dt.date
    name: str
    country_of_incorporation: str
    identification_number: str
    cooperative_approach_id: str
    conditions: str = ""
    change_and_revocation_conditions: str = ""
    additional_information: str = ""


# -- output ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AefTable:
    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


@dataclass(frozen=True, slots=True)
class AefReport:
    submission: AefTable
    authorizations: AefTable
    actions: AefTable
    holdings: AefTable
    authorized_entities: AefTable

    def tables(self) -> tuple[AefTable, ...]:
        return (
            self.submission,
            self.authorizations,
            self.actions,
            self.holdings,
            self.authorized_entities,
        )


def _date(value: dt.date) -> str:
    return value.strftime("%d/%m/%Y")


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"action time {value} has no time zone")
    utc = value.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _purposes(purposes: frozenset[Purpose]) -> str:
    return " and ".join(p.name for p in sorted(purposes))


def submission_table(submission: Submission) -> AefTable:
    row = (
        submission.party,
        submission.version,
        str(submission.reported_year),
        _date(submission.submission_date),
        "",
        "",
        str(submission.ndc_period.first_year),
        str(submission.ndc_period.last_year),
        "",
    )
    return AefTable("Table 1 Submission", SUBMISSION_COLUMNS, (row,))


def _authorisation_information(record: AuthorisationRecord) -> str:
    """The additional information of a version; a revocation says so first."""
    notes = [record.additional_information] if record.additional_information else []
    if record.authorisation.revoked:
        notes.insert(
            0,
            "This version revokes the authorization: units not yet first transferred "
            "are no longer authorized",
        )
    return "; ".join(notes)


def authorizations_table(records: Iterable[AuthorisationRecord], year: int) -> AefTable:
    chosen = sorted(
        (r for r in records if r.date.year == year),
        key=lambda r: (r.authorisation.authorisation_id, r.authorisation.version),
    )
    rows = []
    for record in chosen:
        auth = record.authorisation
        terms = auth.terms
        oimp = Purpose.OIMP in terms.purposes
        rows.append(
            (
                terms.authorisation_id,
                _date(record.date),
                terms.cooperative_approach_id,
                str(terms.version),
                str(terms.quantity_cap) if terms.quantity_cap else "",
                METRIC_GHG,
                "",
                NA,
                record.sectors,
                record.activity_types,
                _purposes(terms.purposes),
                ", ".join(sorted(terms.acquiring_parties)),
                ", ".join(record.authorised_entities),
                auth.oimp_detail if oimp else NA,
                f"{terms.vintage_from} - {terms.vintage_to}",
                record.terms_and_conditions,
                "",
                FIRST_TRANSFER_DEFINITION_LABELS[auth.first_transfer_definition] if oimp else NA,
                _authorisation_information(record),
            )
        )
    return AefTable("Table 2 Authorizations", AUTHORIZATIONS_COLUMNS, tuple(rows))


_TRANSFERS = (ActionType.FIRST_TRANSFER, ActionType.TRANSFER)
_USES_AND_CANCELLATIONS = (
    ActionType.FIRST_TRANSFER,
    ActionType.USE_NDC,
    ActionType.USE_OIMP,
    ActionType.CANCELLATION,
    ActionType.VOLUNTARY_CANCELLATION,
)


def actions_table(
    actions: Iterable[ActionRecord],
    year: int,
    mitigation_types: Mapping[str, MitigationType],
) -> AefTable:
    """Actions dated in ``year`` (UTC); ``mitigation_types`` is keyed by activity id."""
    actions = list(actions)
    for action in actions:
        if action.at.tzinfo is None:
            raise ValueError(f"action time {action.at} has no time zone")
    chosen = sorted(
        (a for a in actions if a.at.astimezone(dt.UTC).year == year),
        key=lambda a: (a.at, a.block.originating_registry, a.block.serial_start),
    )
    rows = []
    for action in chosen:
        kind, block = action.action_type, action.block
        use_year = "" if action.use_year is None else str(action.use_year)
        rows.append(
            (
                _instant(action.at),
                ACTION_TYPE_LABELS[kind],
                action.subtype.value if action.subtype else "",
                block.cooperative_approach_id,
                block.authorisation_id,
                block.first_transferring_party,
                action.registry_id,
                str(block.serial_start),
                str(block.serial_end),
                NA,
                NA,
                NA,
                METRIC_GHG,
                "",
                NA,
                str(block.quantity),
                NA,
                _mitigation_type(mitigation_types, block),
                str(block.vintage),
                _only(
                    kind is ActionType.ACQUISITION and bool(action.transferring_party),
                    action.transferring_party,
                ),
                _only(kind in _TRANSFERS and bool(action.acquiring_party), action.acquiring_party),
                _only(
                    kind in _USES_AND_CANCELLATIONS and bool(action.oimp_purpose),
                    action.oimp_purpose,
                ),
                _only(
                    kind in _USES_AND_CANCELLATIONS and bool(action.using_party), action.using_party
                ),
                _only(
                    kind in _USES_AND_CANCELLATIONS and bool(action.using_entity),
                    action.using_entity,
                ),
                _only(kind is ActionType.USE_NDC, use_year),
                "",
                action.additional_information,
            )
        )
    return AefTable("Table 3 Actions", ACTIONS_COLUMNS, tuple(rows))


def holdings_table(
    snapshot: HoldingsSnapshot, year: int, mitigation_types: Mapping[str, MitigationType]
) -> AefTable:
    """The holdings at 31 December of ``year``, adjacent equal blocks merged."""
    if snapshot.at != dt.date(year, 12, 31):
        raise ValueError(f"holdings snapshot of {snapshot.at} is not at 31 December {year}")
    blocks = sorted(
        coalesce(snapshot.blocks),
        key=lambda b: (
            b.cooperative_approach_id,
            b.authorisation_id,
            b.originating_registry,
            b.serial_start,
        ),
    )
    rows = tuple(
        (
            block.cooperative_approach_id,
            block.authorisation_id,
            block.first_transferring_party,
            snapshot.registry_id,
            str(block.serial_start),
            str(block.serial_end),
            NA,
            NA,
            NA,
            METRIC_GHG,
            "",
            NA,
            str(block.quantity),
            NA,
            _mitigation_type(mitigation_types, block),
            str(block.vintage),
        )
        for block in blocks
    )
    return AefTable("Table 4 Holdings", HOLDINGS_COLUMNS, rows)


def authorized_entities_table(records: Iterable[AuthorisedEntityRecord], year: int) -> AefTable:
    chosen = sorted(
        (r for r in records if r.authorisation_date.year == year),
        key=lambda r: (r.authorisation_date, r.name),
    )
    rows = tuple(
        (
            _date(r.authorisation_date),
            r.name,
            r.country_of_incorporation,
            r.identification_number,
            r.cooperative_approach_id,
            r.conditions,
            r.change_and_revocation_conditions,
            r.additional_information,
        )
        for r in chosen
    )
    return AefTable("Table 5 Authorized entities", AUTHORIZED_ENTITIES_COLUMNS, rows)


def aef_report(
    submission: Submission,
    authorisations: Iterable[AuthorisationRecord],
    actions: Iterable[ActionRecord],
    holdings: HoldingsSnapshot,
    entities: Iterable[AuthorisedEntityRecord],
    mitigation_types: Mapping[str, MitigationType] | None = None,
) -> AefReport:
    """All five tables for ``submission.reported_year``.

    ``mitigation_types`` maps activity ids to their mitigation type; an
    activity not in it is reported as emission reductions.
    """
    year = submission.reported_year
    types = mitigation_types or {}
    return AefReport(
        submission=submission_table(submission),
        authorizations=authorizations_table(authorisations, year),
        actions=actions_table(actions, year, types),
        holdings=holdings_table(holdings, year, types),
        authorized_entities=authorized_entities_table(entities, year),
    )


def _only(applies: bool, value: str) -> str:
    """``value`` where the column applies to the row, else "NA"."""
    return value if applies else NA


def _mitigation_type(types: Mapping[str, MitigationType], block: Block) -> str:
    return types.get(block.activity_id, MitigationType.EMISSION_REDUCTIONS).value
