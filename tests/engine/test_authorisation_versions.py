"""Authorisation amendments and revocation, host and acquiring party together."""

from __future__ import annotations

import datetime as dt

import pytest

from itmolink.core.accounting import AccountingConfig, AccountingMethod, NdcPeriod
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.reports.build import build_aef

from .conftest import Pair

ACCOUNTING = AccountingConfig(
    party="LAO", method=AccountingMethod.BUDGET, ndc_period=NdcPeriod(1, 2021, 2030),
    target_emissions=600_000_000,
)  # fmt: skip


def issued(pair: Pair, quantity: int = 1_000) -> str:
    authorisation_id = pair.authorise(quantity_cap=5_000)
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=quantity, now=pair.now)
    pair.pump()
    return authorisation_id


def versions(pair: Pair, authorisation_id: str) -> dict[str, tuple[int, bool]]:
    found = {}
    for party, engine in (("LAO", pair.lao), ("KOR", pair.kor)):
        with engine.store.transaction() as tx:
            terms = tx.authorisation_get("LAO", authorisation_id)
            details = tx.authorisation_details("LAO", authorisation_id)
            assert tx.authorisation_latest("LAO", authorisation_id) == (terms, details)
        assert terms is not None
        found[party] = (terms.version, bool(details["revoked"]))
    return found


def test_an_amendment_is_the_next_version_on_both_sides(pair: Pair) -> None:
    authorisation_id = issued(pair)
    terms = pair.lao.amend_authorisation(
        authorisation_id, {"vintage_to": 2035, "quantity_cap": 10_000}, pair.now
    )
    assert terms.version == 2
    pair.pump()
    assert versions(pair, authorisation_id) == {"LAO": (2, False), "KOR": (2, False)}
    with pair.kor.store.transaction() as tx:
        kor_terms = tx.authorisation_get("LAO", authorisation_id)
    assert kor_terms is not None
    assert (kor_terms.vintage_to, kor_terms.quantity_cap) == (2035, 10_000)
    # Transfers go on under the acknowledged new version.
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.kor.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.COMPLETED


@pytest.mark.parametrize(
    "changes",
    [{"quantity_cap": 999}, {"vintage_from": 2026}, {"activity_id": "OTHER"}],
    ids=["cap-below-issued", "issued-vintage-out-of-range", "activity-changes"],
)
def test_an_amendment_that_would_undo_what_happened_is_refused(
    pair: Pair, changes: dict[str, object]
) -> None:
    authorisation_id = issued(pair)
    with pytest.raises(Rejected) as caught:
        pair.lao.amend_authorisation(authorisation_id, changes, pair.now)
    assert caught.value.code is RejectionCode.AMENDMENT_NOT_ALLOWED
    assert versions(pair, authorisation_id)["LAO"] == (1, False)


def test_revocation_spares_units_already_first_transferred(pair: Pair) -> None:
    authorisation_id = issued(pair)
    pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=300,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    revocation = pair.lao.revoke_authorisation(authorisation_id, pair.now)
    assert revocation.revoked_quantity == 700
    assert sum(b.quantity for b, _ in revocation.refused) == 300
    assert {code for _, code in revocation.refused} == {RejectionCode.ALREADY_FIRST_TRANSFERRED}
    assert revocation.unissued_revoked == 4_000
    pair.pump()
    assert versions(pair, authorisation_id) == {"LAO": (2, True), "KOR": (2, True)}
    with pair.lao.store.transaction() as tx:
        accounts = {h.account for h in tx.holdings()}
    assert accounts == {"revoked"}
    with pair.kor.store.transaction() as tx:
        assert sum(h.block.quantity for h in tx.holdings()) == 300  # KOR keeps its units

    with pytest.raises(Rejected) as caught:
        pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1, now=pair.now)
    assert caught.value.code in {RejectionCode.AUTHORISATION_REVOKED}
    with pytest.raises(Rejected) as caught:
        pair.lao.revoke_authorisation(authorisation_id, pair.now)
    assert caught.value.code is RejectionCode.AUTHORISATION_REVOKED


def test_versions_go_out_one_at_a_time_and_answers_land_on_their_version(pair: Pair) -> None:
    authorisation_id = pair.authorise()
    [(v1_id, _, v1)] = pair.lao.due_messages(pair.now)  # v1 is not answered yet
    with pytest.raises(Rejected) as caught:
        pair.lao.amend_authorisation(authorisation_id, {"vintage_to": 2035}, pair.now)
    assert caught.value.code is RejectionCode.AUTHORISATION_NOT_ACKNOWLEDGED
    pair.lao.handle_reply(v1_id, pair.kor.handle_delivery("LAO", v1, pair.now), pair.now)
    pair.lao.amend_authorisation(authorisation_id, {"vintage_to": 2035}, pair.now)
    [(v2_id, _, v2)] = pair.lao.due_messages(pair.now)
    pair.lao.handle_reply(v2_id, pair.kor.handle_delivery("LAO", v2, pair.now), pair.now)
    with pair.lao.store.transaction() as tx:
        v1_states = tx.authorisation_party_states("LAO", authorisation_id, 1)
        v2_states = tx.authorisation_party_states("LAO", authorisation_id, 2)
    assert v1_states == {"KOR": "acknowledged"}
    assert v2_states == {"KOR": "acknowledged"}


def test_the_aef_reports_every_version_in_the_year_it_was_issued(pair: Pair) -> None:
    authorisation_id = issued(pair)
    pair.lao.amend_authorisation(authorisation_id, {"quantity_cap": 8_000}, pair.now)
    pair.pump()
    pair.lao.revoke_authorisation(authorisation_id, pair.now)
    pair.pump()
    year = pair.now.year
    pair.lao.snapshot_holdings(year, pair.now)
    with pair.lao.store.transaction() as tx:
        report = build_aef(
            tx, party="LAO", registry="LAO-NR", year=year, accounting=ACCOUNTING,
            submission_date=dt.date(year + 1, 4, 15),
        )  # fmt: skip
    table = report.authorizations
    column = {name: i for i, name in enumerate(table.columns)}
    rows = [r for r in table.rows if r[column["Authorization ID"]] == authorisation_id]
    assert [r[column["Version of the authorization"]] for r in rows] == ["1", "2", "3"]
    assert [r[column["Authorized quantity"]] for r in rows] == ["5000", "8000", "8000"]
    information = [r[column["Additional explanatory information"]] for r in rows]
    assert [text.startswith("This version revokes") for text in information] == [
        False, False, True
    ]  # fmt: skip
    # A report of the following year has none of them: each was reported in its own year.
    pair.lao.snapshot_holdings(year + 1, pair.now)
    with pair.lao.store.transaction() as tx:
        later = build_aef(
            tx, party="LAO", registry="LAO-NR", year=year + 1, accounting=ACCOUNTING,
            submission_date=dt.date(year + 2, 4, 15),
        )  # fmt: skip
    assert later.authorizations.rows == ()
