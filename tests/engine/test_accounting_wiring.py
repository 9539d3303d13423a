"""The node books adjustments by each party's accounting method and enforces the
host threshold and the NDC period, before anything is promised."""

from __future__ import annotations

import datetime as dt

import pytest

from itmolink.core.accounting import AccountingConfig, AccountingMethod, HostThreshold, NdcPeriod
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.crypto.keys import SigningKey

from ..conftest import Databases
from .conftest import Pair, make_engine


def averaging(party: str, first: int = 2021, last: int = 2030) -> AccountingConfig:
    return AccountingConfig(
        party=party, method=AccountingMethod.AVERAGING, ndc_period=NdcPeriod(1, first, last),
        target_emissions=62_000_000, target_year=last,
    )  # fmt: skip


@pytest.fixture
def accounted(databases: Databases) -> Pair:
    keys = {p: SigningKey.generate(p) for p in ("LAO", "KOR")}
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"], accounting=averaging("LAO"),
                      threshold=HostThreshold(per_year=150, per_period=1_000))  # fmt: skip
    kor = make_engine(databases, "KOR", "LAO", keys, keys["LAO"],
                      accounting=averaging("KOR", 2021, 2025))  # fmt: skip
    return Pair(lao=lao, kor=kor, keys=keys)


def ready(pair: Pair, vintage: int = 2025) -> str:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=vintage, quantity=1_000, now=pair.now)
    pair.pump()
    return authorisation_id


def start(pair: Pair, authorisation_id: str, quantity: int, vintage: int = 2025) -> str:
    return pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=vintage, quantity=quantity,
        now=pair.now, timeout=dt.timedelta(seconds=60),
    )  # fmt: skip


def test_entries_carry_each_partys_method(accounted: Pair) -> None:
    transfer_id = start(accounted, ready(accounted), 100)
    accounted.pump()
    for engine, amount in ((accounted.lao, 100), (accounted.kor, -100)):
        with engine.store.transaction() as tx:
            [record] = tx.adjustments()
        assert (record.entry.transfer_id, record.entry.year, record.entry.amount) == (
            transfer_id,
            2025,
            amount,
        )
        assert record.entry.method == "averaging"


def test_the_host_threshold_refuses_a_first_transfer_that_passes_it(accounted: Pair) -> None:
    authorisation_id = ready(accounted)
    start(accounted, authorisation_id, 100)  # pending first transfers count too
    with pytest.raises(Rejected) as caught:
        start(accounted, authorisation_id, 60)
    assert caught.value.code is RejectionCode.HOST_THRESHOLD_EXCEEDED
    accounted.pump()
    start(accounted, authorisation_id, 50)  # 150 a year is allowed


def test_a_buyer_refuses_units_it_could_not_book_in_its_ndc_period(accounted: Pair) -> None:
    authorisation_id = ready(accounted, vintage=2026)  # KOR's period ends in 2025
    transfer_id = start(accounted, authorisation_id, 10, vintage=2026)
    accounted.pump()
    with accounted.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert record.state is TransferState.REJECTED
    assert record.rejection_code == RejectionCode.VINTAGE_OUTSIDE_NDC_PERIOD
