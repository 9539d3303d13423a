"""Build a registry's AEF report and adjusted-emissions balance from its ledger."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from itmolink.core.accounting import AccountingConfig, BalanceReport, emissions_balance
from itmolink.core.actions import ActionType
from itmolink.core.aef import (
    ActionRecord,
    ActionSubtype,
    AefReport,
    AuthorisationRecord,
    HoldingsSnapshot,
    Submission,
    aef_report,
)
from itmolink.core.authorisation import Authorisation
from itmolink.core.units import FirstTransferDefinition
from itmolink.store.tx import Tx


class ReportError(ValueError):
    """The ledger or configuration cannot give this report; the message says why."""


def _instant(micros: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)


def build_aef(
    tx: Tx,
    *,
    party: str,
    registry: str,
    year: int,
    accounting: AccountingConfig,
    submission_date: dt.date,
    when: Callable[[int], dt.datetime] = _instant,
) -> AefReport:
    """The five AEF tables of ``year``; the holdings are the frozen 31 December snapshot.

    ``when`` turns a ledger time (microseconds since 1970) into the instant reported; a
    simulation maps it to its simulated year.
    """
    snapshot = tx.snapshot(year)
    if snapshot is None:
        raise ReportError(
            f"the holdings of 31 December {year} have not been frozen yet: the node takes the "
            "snapshot when asked ('itmolink report aef' does so through the running node)"
        )
    authorisations = []
    for terms in tx.authorisations():
        if terms.host_party != party:
            continue  # a Party reports the authorisations it gave
        # Every version is reported, each in the year it was issued: an amendment or a
        # revocation is a new row, and the earlier rows stay as they were reported.
        for version, details in tx.authorisation_versions(party, terms.authorisation_id):
            authorisations.append(
                AuthorisationRecord(
                    authorisation=Authorisation(
                        version,
                        oimp_detail=details["oimp_detail"],
                        first_transfer_definition=FirstTransferDefinition(
                            details["first_transfer_definition"]
                        ),
                        revoked=bool(details["revoked"]),
                    ),
                    date=when(details["created_at"]).date(),
                    sectors=details["activity_name"],
                )
            )
    actions = [
        ActionRecord(
            at=when(row["at"]),
            action_type=ActionType(row["action_type"]),
            block=row["block"],
            registry_id=registry,
            subtype=ActionSubtype(row["subtype"]) if row["subtype"] else None,
            transferring_party=row["transferring_party"],
            acquiring_party=row["acquiring_party"],
            oimp_purpose=row["oimp_purpose"],
            using_party=row["using_party"],
            use_year=row["use_year"],
        )
        for row in tx.actions()
    ]
    return aef_report(
        Submission(
            party=party,
            reported_year=year,
            submission_date=submission_date,
            ndc_period=accounting.ndc_period,
        ),
        authorisations,
        actions,
        HoldingsSnapshot(
            registry_id=registry,
            at=dt.date(year, 12, 31),
            blocks=tuple(block for _, block in snapshot[1]),
        ),
        (),
    )


def build_balance(
    tx: Tx, *, accounting: AccountingConfig, reported: dict[int, int]
) -> BalanceReport:
    """The adjusted emissions balance by year against the target."""
    return emissions_balance(accounting, reported, [r.entry for r in tx.adjustments()])
