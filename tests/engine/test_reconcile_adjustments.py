"""The blocks leaf states each party's corresponding adjustments for a transfer
(docs/PROTOCOL.md §11.4): every first-transfer path of §6.6 reconciles clean
between two honest registries, and a booking that departs from the rule differs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.node.engine import Engine
from itmolink.store.tx import Tx

from .conftest import Pair
from .test_oimp import authorise, issue_and_transfer, ledger
from .test_reconcile import frozen, reconcile

PATHS = [
    ([Purpose.NDC], FirstTransferDefinition.UNSPECIFIED),
    ([Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_AUTHORISATION),
    ([Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE),
    ([Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION),
    ([Purpose.OIMP], FirstTransferDefinition.AT_AUTHORISATION),
    ([Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE),
    ([Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION),
]


async def assert_clean(pair: Pair) -> None:
    """Both registries reconcile with each other: nothing differs, nothing frozen."""
    pair.advance(1)
    for party, partner in (("KOR", "LAO"), ("LAO", "KOR")):
        report = await reconcile(pair, party, partner)
        assert [(d.phase, d.subject, d.detail) for d in report.discrepancies] == []
        assert frozen(pair.engine(party)) == []


def rewrite(engine: Engine, change: Callable[[Tx], None]) -> None:
    with engine.store.transaction() as tx:
        change(tx)


@pytest.mark.parametrize(("purposes", "definition"), PATHS)
async def test_every_first_transfer_path_reconciles_clean(
    pair: Pair, purposes: list[Purpose], definition: FirstTransferDefinition
) -> None:
    issue_and_transfer(pair, authorise(pair, purposes, definition))
    await assert_clean(pair)


@pytest.mark.parametrize(
    "definition",
    [FirstTransferDefinition.AT_ISSUANCE, FirstTransferDefinition.AT_AUTHORISATION],
)
async def test_units_adjusted_at_issuance_then_authorised_for_ndc_reconcile_clean(
    pair: Pair, definition: FirstTransferDefinition
) -> None:
    """The host books +CA at issuance and nothing for its transfer; the receiver, the
    units now authorised for NDC use too, books -CA at the transfer (§6.6). The two
    sides book differently for the transfer, as the rule says, and agree."""
    authorisation_id = authorise(pair, [Purpose.OIMP], definition)
    pair.pump()
    issuance_id, _ = pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now
    )
    pair.pump()
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert not record.first_transfer  # first transferred at issuance
    assert ledger(pair.lao) == [(issuance_id, 1_000)]  # not booked a second time
    assert ledger(pair.kor) == [(transfer_id, -400)]
    await assert_clean(pair)


async def test_an_amendment_adding_ndc_while_a_transfer_is_in_flight_reconciles_clean(
    pair: Pair,
) -> None:
    """The host proposed before the amendment (not a first transfer) and books by its
    proposal; the receiver completes under the amended version and books -CA."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    pair.pump()
    issuance_id, _ = pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now
    )
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
        now=pair.now,
    )  # fmt: skip
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    assert ledger(pair.lao) == [(issuance_id, 1_000)]
    assert ledger(pair.kor) == [(transfer_id, -400)]
    await assert_clean(pair)


async def test_a_host_that_books_its_at_issuance_units_again_at_the_transfer_is_found(
    pair: Pair,
) -> None:
    """The double booking the reference made before this rule: +CA at issuance and
    again at the transfer. The receiver's leaf states the host's booking as the rule
    gives it (none), so the host's differs."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now)
    pair.pump()
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
        now=pair.now,
    )  # fmt: skip
    pair.pump()

    def book_again(tx: Tx) -> None:
        tx._exec(
            "INSERT INTO adjustments (party, partner, transfer_id, year, amount, unit_type, "
            "method, evidence_journal_id, reference, recorded_at) "
            "VALUES ('LAO', 'KOR', ?, 2025, 400, 1, 'vintage-year', "
            "(SELECT MAX(id) FROM journal), '', 0)",
            (transfer_id,),
        )
        tx._seal_transfer(transfer_id)

    rewrite(pair.lao, book_again)
    pair.advance(1)
    report = await reconcile(pair, "KOR", "LAO")
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", transfer_id)]
    assert report.discrepancies[0].frozen_blocks == 1


def _set_amount(transfer_id: str, amount: int) -> Callable[[Tx], None]:
    def change(tx: Tx) -> None:
        tx._exec("UPDATE adjustments SET amount = ? WHERE transfer_id = ?", (amount, transfer_id))
        tx._seal_transfer(transfer_id)

    return change


def _set_year(transfer_id: str, year: int) -> Callable[[Tx], None]:
    def change(tx: Tx) -> None:
        tx._exec("UPDATE adjustments SET year = ? WHERE transfer_id = ?", (year, transfer_id))
        tx._seal_transfer(transfer_id)

    return change


def _drop(transfer_id: str) -> Callable[[Tx], None]:
    def change(tx: Tx) -> None:
        tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (transfer_id,))
        tx._seal_transfer(transfer_id)

    return change


@pytest.mark.parametrize(
    ("who", "how"),
    [
        ("KOR", "amount"),  # the receiver booked -300 for 400 tCO2e
        ("KOR", "year"),  # the receiver booked to 2026, not the vintage
        ("LAO", "amount"),
        ("LAO", "year"),
        ("LAO", "none"),  # the host booked nothing for its first transfer
        ("KOR", "none"),
        ("both", "none"),  # neither booked: two ledgers that agree, both against the rule
    ],
)
async def test_an_adjustment_booked_otherwise_than_the_rule_is_found(
    pair: Pair, who: str, how: str
) -> None:
    authorisation_id = authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    for party in ("LAO", "KOR") if who == "both" else (who,):
        sign = 1 if party == "LAO" else -1
        change = {
            "amount": _set_amount(transfer_id, sign * 300),
            "year": _set_year(transfer_id, 2026),
            "none": _drop(transfer_id),
        }[how]
        rewrite(pair.engine(party), change)
    pair.advance(1)
    for party, partner in (("KOR", "LAO"), ("LAO", "KOR")):
        report = await reconcile(pair, party, partner)
        assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", transfer_id)]
    assert len(frozen(pair.kor)) == 1  # the receiver holds the units: frozen


async def test_an_adjustment_booked_where_the_rule_books_none_is_found(pair: Pair) -> None:
    """OIMP-only units first transferred at issuance: neither side books for the
    transfer. A receiver that subtracts them anyway differs."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    assert ledger(pair.kor) == []

    def subtract(tx: Tx) -> None:
        tx._exec(
            "INSERT INTO adjustments (party, partner, transfer_id, year, amount, unit_type, "
            "method, evidence_journal_id, reference, recorded_at) "
            "VALUES ('KOR', 'LAO', ?, 2025, -400, 1, 'vintage-year', "
            "(SELECT MAX(id) FROM journal), '', 0)",
            (transfer_id,),
        )
        tx._seal_transfer(transfer_id)

    rewrite(pair.kor, subtract)
    pair.advance(1)
    report = await reconcile(pair, "KOR", "LAO")
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", transfer_id)]
    assert report.discrepancies[0].frozen_blocks == 1
