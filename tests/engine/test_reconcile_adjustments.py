"""The blocks leaf states each party's corresponding adjustments for a transfer
(docs/PROTOCOL.md §11.4): every first-transfer path of §6.6 reconciles clean
between two honest registries, and a booking that departs from the rule differs."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

import pytest

from itmolink.core import reconcile as reconcile_module
from itmolink.core.reconcile import TransferFacts, blocks_leaf
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.store import open_store
from itmolink.store import postgres as postgres_module
from itmolink.store import sqlite as sqlite_module
from itmolink.store import tx as tx_module
from itmolink.store.migrate import latest_version, migrations
from itmolink.store.tx import Tx

from ..conftest import Databases
from .conftest import Pair
from .test_oimp import authorise, issue_and_transfer, ledger
from .test_reconcile import _summed_afresh, frozen, reconcile

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


async def test_a_host_that_calls_a_first_transfer_of_ndc_units_no_first_transfer_is_found(
    pair: Pair,
) -> None:
    """The proposal's first_transfer decides the host's booking only where units may
    have been adjusted at issuance (OIMP at authorisation or issuance). For NDC-only
    units the host books its transfer whatever the flag: a host that sends false and
    books nothing is found by the receiver, which holds the same proposal."""
    authorisation_id = authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
    _, transfer_id = issue_and_transfer(pair, authorisation_id)

    def not_a_first_transfer(books: bool) -> Callable[[Tx], None]:
        def change(tx: Tx) -> None:
            tx._exec(
                "UPDATE transfers SET first_transfer = 0 WHERE transfer_id = ?", (transfer_id,)
            )
            if not books:
                tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (transfer_id,))
            tx._seal_transfer(transfer_id)

        return change

    rewrite(pair.lao, not_a_first_transfer(books=False))
    rewrite(pair.kor, not_a_first_transfer(books=True))  # the flag as the receiver got it
    pair.advance(1)
    report = await reconcile(pair, "KOR", "LAO")
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", transfer_id)]
    assert report.discrepancies[0].frozen_blocks == 1


def _schema_6_blocks_leaf(facts: TransferFacts) -> bytes:
    """The blocks leaf of schema version 6 and before: the adjustments this node
    booked, with the sender's sign, and no word of the partner's."""
    parts: list[bytes | str | int] = [facts.transfer_id, facts.sender, facts.receiver]
    if not facts.moved:
        return blocks_leaf(facts)
    parts.append("moved")
    for block in sorted(facts.blocks):
        parts += [
            block.originating_registry, block.serial_start, block.serial_end,
            int(block.unit_type), block.vintage, block.authorisation_id,
            block.activity_id, block.cooperative_approach_id, block.first_transferring_party,
        ]  # fmt: skip
    own = facts.sender_adjustments + tuple((y, -a) for y, a in facts.receiver_adjustments)
    for year, amount in sorted(own):
        parts += [year, amount]
    return hashlib.sha256(reconcile_module._encode(*parts)).digest()


def _engine(database: str, party: str, partner: str, keys: dict[str, SigningKey]) -> Engine:
    return Engine(
        party=party,
        registry=f"{party}-NR",
        signing_key=keys[party],
        trust=TrustStore([keys[partner].verifying_key()]),
        partners=[Partner(partner, f"{partner}-NR", "in-memory")],
        store=open_store(database, party=party, registry=f"{party}-NR"),
        default_timeout=dt.timedelta(seconds=60),
    )


async def test_a_ledger_of_schema_6_is_sealed_again_and_reconciles_clean(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0007 on two ledgers written by schema version 6 (its leaf), on both
    stores: the false discrepancy of units adjusted at issuance goes, the sums follow."""
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    urls = {party: databases.new(party.lower()) for party in ("LAO", "KOR")}
    with monkeypatch.context() as patch:  # two nodes of schema version 6
        for module in (sqlite_module, postgres_module):
            patch.setattr(module, "migrations", lambda: migrations()[:6])
        patch.setattr(tx_module, "blocks_leaf", _schema_6_blocks_leaf)
        patch.setattr(
            Tx, "_partner_adjustments", lambda self, record, sender, blocks, versions=None: ()
        )
        patch.setattr(Tx, "revocation_signers", lambda self: {})  # a column of version 8
        old = Pair(
            lao=_engine(urls["LAO"], "LAO", "KOR", keys),
            kor=_engine(urls["KOR"], "KOR", "LAO", keys),
            keys=keys,
        )
        assert old.lao.store.schema_version() == 6
        _, plain = issue_and_transfer(
            old, authorise(old, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
        )
        authorisation_id = authorise(old, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
        old.pump()
        old.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=old.now)
        old.pump()
        before_ndc = old.lao.start_transfer(  # OIMP only then: neither side books
            to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
            now=old.now,
        )  # fmt: skip
        old.pump()
        old.advance(1)
        old.lao.amend_authorisation(
            authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, old.now
        )
        old.pump()
        at_issuance = old.lao.start_transfer(
            to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
            now=old.now,
        )  # fmt: skip
        old.pump()
        old.advance(1)
        report = await reconcile(old, "LAO", "KOR")  # the old leaf's false discrepancy
        assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", at_issuance)]
        now = old.now
        old.lao.store.close()
        old.kor.store.close()
    pair = Pair(
        lao=_engine(urls["LAO"], "LAO", "KOR", keys),
        kor=_engine(urls["KOR"], "KOR", "LAO", keys),
        keys=keys,
        now=now,
    )
    try:
        for engine, partner in ((pair.lao, "KOR"), (pair.kor, "LAO")):
            assert engine.store.schema_version() == latest_version() >= 6
            with engine.store.transaction() as tx:
                assert tx._one("SELECT COUNT(*) FROM leaves_to_reseal")[0] == 0
                snapshot = 2**62
                for view in ("blocks", "journal"):
                    root = tx.reconcile_buckets(partner, snapshot, view, "")
                    assert [(b.prefix, b.count, b.h1, b.h2) for b in root] == _summed_afresh(
                        tx, partner, snapshot, view, ""
                    )
                assert sum(t.transfers for t in tx.reconcile_totals(partner, snapshot)) == 3
                records = tx.transfers_get([plain, before_ndc, at_issuance])
                assert {r.state for r in records.values()} == {TransferState.COMPLETED}
        await assert_clean(pair)
    finally:
        pair.lao.store.close()
        pair.kor.store.close()
