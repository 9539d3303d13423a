"""The blocks leaf states each party's corresponding adjustments for a transfer
(docs/PROTOCOL.md §11.4): every first-transfer path of §6.6 reconciles clean
between two honest registries, and a booking that departs from the rule differs."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Sequence

import pytest

from itmolink.core import reconcile as reconcile_module
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.reconcile import TransferFacts, blocks_leaf
from itmolink.core.transfer import Role, TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node import base as base_module
from itmolink.node import requests as requests_module
from itmolink.node.base import EngineBase, ReplyError
from itmolink.node.engine import Engine, Partner
from itmolink.node.operations import BatchItemRequest
from itmolink.store import open_store
from itmolink.store import postgres as postgres_module
from itmolink.store import sqlite as sqlite_module
from itmolink.store import tx as tx_module
from itmolink.store.migrate import latest_version, migrations
from itmolink.store.sqlite import HOLDING_ACCOUNT
from itmolink.store.tx import DOUBLE_BOOKING_FOUND_AT, TransferRecord, Tx

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


def _issue_both_kinds(pair: Pair) -> tuple[str, str, str]:
    """100 of 2025 issued under OIMP first transferred at issuance (booked then), NDC
    added, 100 more issued (booked at their transfer): (authorisation, issuances)."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    pair.pump()
    booked, _ = pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now
    )
    pair.pump()
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    not_booked, _ = pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now
    )
    pair.pump()
    return authorisation_id, booked, not_booked


async def test_a_transfer_never_mixes_units_booked_at_issuance_with_units_not(
    pair: Pair,
) -> None:
    """One proposal has one first_transfer flag: a selection taking units booked at
    issuance and units not is refused (4013, nothing reserved); taken one kind at a
    time, each is booked as the rule says and both sides agree."""
    authorisation_id, booked, _ = _issue_both_kinds(pair)
    with pytest.raises(Rejected) as refused:
        pair.lao.start_transfer(
            to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=200,
            now=pair.now,
        )  # fmt: skip
    assert refused.value.code is RejectionCode.ALREADY_FIRST_TRANSFERRED
    assert "transfer at most 100 now" in refused.value.detail
    with pytest.raises(Rejected) as refused:  # a batch too, naming the item
        pair.lao.start_transfer_batch(
            to_party="KOR",
            items=[
                BatchItemRequest(authorisation_id, 2025, 50),
                BatchItemRequest(authorisation_id, 2025, 100),
            ],
            now=pair.now,
        )
    assert refused.value.code is RejectionCode.ALREADY_FIRST_TRANSFERRED
    assert refused.value.detail.startswith("item 2 of the batch")
    assert "transfer at most 50 now" in refused.value.detail
    with pair.lao.store.transaction() as tx:
        held = tx.blocks_held(
            account=HOLDING_ACCOUNT, authorisation_id=authorisation_id, vintage=2025
        )
    assert sum(b.quantity for b in held) == 200  # nothing reserved
    first = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    _, [second] = pair.lao.start_transfer_batch(
        to_party="KOR", items=[BatchItemRequest(authorisation_id, 2025, 100)], now=pair.now
    )
    pair.pump()
    with pair.lao.store.transaction() as tx:
        records = tx.transfers_get([first, second])
    assert not records[first].first_transfer
    assert records[second].first_transfer
    assert {r.state for r in records.values()} == {TransferState.COMPLETED}
    assert ledger(pair.lao) == [(booked, 100), (second, 100)]
    assert sorted(ledger(pair.kor)) == sorted([(first, -100), (second, -100)])
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


async def test_a_blocks_query_of_another_leaf_definition_is_refused(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requester that states no leaf definition (a node before schema 7) is refused
    with 2010 before any blocks are compared (§11.3 R6): no discrepancy, nothing frozen."""
    issue_and_transfer(pair, authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED))
    pair.advance(1)
    monkeypatch.setattr(reconcile_module, "BLOCKS_LEAF_DEFINITION", 0)  # the requester's only
    with pytest.raises(ReplyError) as refused:
        await reconcile(pair, "KOR", "LAO")
    assert refused.value.code is RejectionCode.INVALID_FIELD
    assert "no definition (before schema 7)" in str(refused.value)
    assert "this node computes definition 2" in str(refused.value)
    assert frozen(pair.kor) == []
    with pair.kor.store.transaction() as tx:
        assert tx._one("SELECT COUNT(*) FROM discrepancies")[0] == 0


async def test_a_blocks_answer_of_another_leaf_definition_is_not_compared(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A responder that answers without the field (a node before schema 7, whose leaves
    differ on every transfer with an adjustment) ends the requester's reconciliation
    with an error naming both definitions (§11.7), not with discrepancies and frozen
    blocks."""
    issue_and_transfer(pair, authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED))
    pair.advance(1)
    monkeypatch.setattr(base_module, "check_leaf_definition", lambda *args: None)
    monkeypatch.setattr(requests_module, "BLOCKS_LEAF_DEFINITION", 0)  # the responder's
    with pytest.raises(ReplyError) as refused:
        await reconcile(pair, "KOR", "LAO")
    assert refused.value.code is RejectionCode.INVALID_FIELD
    assert "LAO: the answer states no definition" in str(refused.value)
    assert frozen(pair.kor) == []
    with pair.kor.store.transaction() as tx:
        assert tx._one("SELECT COUNT(*) FROM discrepancies")[0] == 0


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


def _schema_6_first_transfer(
    self: EngineBase, tx: Tx, authorisation_id: str, blocks: Sequence[Block]
) -> bool:
    """The flag as the reference of schema version 6 set it (114374d^1): every
    transfer of the host's own units where the adjustment point is the transfer."""
    return all(b.first_transferring_party == self.party for b in blocks) and (
        self._ca_point(self._authorisation(tx, self.party, authorisation_id)) == "transfer"
    )


def _schema_6_transfer_counts(
    self: EngineBase, tx: Tx, role: Role, blocks: Sequence[Block], first_transfer: object = None
) -> bool:
    """The booking of the reference of schema version 6: the host books whenever the
    adjustment point is the transfer (units booked at issuance a second time)."""
    if not blocks:
        return False
    host = blocks[0].first_transferring_party
    authorisation = self._authorisation(tx, host, blocks[0].authorisation_id)
    if role is Role.SENDER and host == self.party:
        return self._ca_point(authorisation) == "transfer"
    return Purpose.NDC in authorisation.terms.purposes


async def test_a_ledger_of_schema_6_is_sealed_again_and_its_double_booking_is_found(
    databases: Databases, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Migration 0007 on two ledgers written by the reference of schema version 6 (its
    leaf, its flag and its booking), on both stores. That reference booked units
    adjusted at issuance a second time at their transfer once NDC was added, and its
    leaves agreed on it (the double booking reconciled clean); the new leaves agree
    too, so the upgrade records the transfer as a discrepancy and raises an alarm at
    the host. The other transfers are sealed again without a word."""
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    urls = {party: databases.new(party.lower()) for party in ("LAO", "KOR")}
    with monkeypatch.context() as patch:  # two nodes of schema version 6
        for module in (sqlite_module, postgres_module):
            patch.setattr(module, "migrations", lambda: migrations()[:6])
        patch.setattr(tx_module, "blocks_leaf", _schema_6_blocks_leaf)
        patch.setattr(
            Tx, "_partner_adjustments", lambda self, record, sender, blocks, versions=None: ()
        )
        patch.setattr(EngineBase, "_first_transfer", _schema_6_first_transfer)
        patch.setattr(EngineBase, "_transfer_counts", _schema_6_transfer_counts)
        patch.setattr(Tx, "revocation_signers", lambda self: {})  # a column of version 8
        patch.setattr(Tx, "completions_put", lambda self, completed: None)  # a table of 10
        old = Pair(
            lao=_engine(urls["LAO"], "LAO", "KOR", keys),
            kor=_engine(urls["KOR"], "KOR", "LAO", keys),
            keys=keys,
        )
        assert old.lao.store.schema_version() == 6
        # The code running them writes a column of version 9 (the one-round flag): it
        # is added here and dropped below, before the upgrade, as version 6 had none.
        for engine in (old.lao, old.kor):
            with engine.store.transaction() as tx:
                tx._exec(
                    "ALTER TABLE transfers ADD COLUMN complete_on_acceptance "
                    "INTEGER NOT NULL DEFAULT 0"
                )
        _, plain = issue_and_transfer(
            old, authorise(old, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
        )
        authorisation_id = authorise(old, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
        old.pump()
        issuance_id, _ = old.lao.issue(
            authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=old.now
        )
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
        # The old reference's double booking: at issuance and again at the transfer.
        assert (issuance_id, 1_000) in ledger(old.lao)
        assert (at_issuance, 400) in ledger(old.lao)
        assert (at_issuance, -400) in ledger(old.kor)
        report = await reconcile(old, "LAO", "KOR")  # and its leaves agreed on it
        assert report.discrepancies == []
        now = old.now
        for engine in (old.lao, old.kor):
            with engine.store.transaction() as tx:
                tx._exec("ALTER TABLE transfers DROP COLUMN complete_on_acceptance")
        old.lao.store.close()
        old.kor.store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=sqlite_module.log.name):
        pair = Pair(
            lao=_engine(urls["LAO"], "LAO", "KOR", keys),
            kor=_engine(urls["KOR"], "KOR", "LAO", keys),
            keys=keys,
            now=now,
        )
    try:
        alarms = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALARM")]
        assert len(alarms) == 1
        assert f"transfer {at_issuance} to KOR" in alarms[0]
        assert any("sealing again the reconciliation leaves of 3 transfers" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
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
                found = tx._exec(
                    "SELECT reconciliation_id, partner, phase, subject, detail FROM discrepancies"
                ).fetchall()
            if engine is pair.lao:  # the host, which booked twice
                assert [tuple(row[:4]) for row in found] == [
                    (DOUBLE_BOOKING_FOUND_AT, "KOR", "double-booking", at_issuance)
                ]
                assert "400 tCO2e" in found[0][4]
            else:
                assert found == []
        # The ledger is not rewritten: the operator corrects it (OPERATIONS.md §8).
        assert (at_issuance, 400) in ledger(pair.lao)
        # The new leaves agree on the double booking too: only the upgrade finds it.
        await assert_clean(pair)
        pair.lao.store.close()
        pair.kor.store.close()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=sqlite_module.log.name):
            again = _engine(urls["LAO"], "LAO", "KOR", keys)  # found once, not at every start
        again.store.close()
        assert not [r for r in caplog.records if r.getMessage().startswith("ALARM")]
    finally:
        pair.lao.store.close()
        pair.kor.store.close()


async def test_an_interrupted_reseal_resumes_where_it_stopped(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-seal of migration 0007 takes each chunk off the list in the transaction
    that seals it: a crash after the first chunk leaves the rest listed, and the next
    start seals only those, to the sums a seal from scratch gives."""
    authorisation_id = authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
    for _ in range(3):
        issue_and_transfer(pair, authorisation_id)
    store = pair.lao.store
    with store.transaction() as tx:  # as migration 0007 lists them, the leaves spoilt
        tx._exec("INSERT INTO leaves_to_reseal SELECT transfer_id FROM transfers WHERE state = 3")
        listed = tx.reseal_listed_count()
        tx._exec("UPDATE transfers SET blocks_leaf = ? WHERE state = 3", (b"x" * 32,))
    assert listed == 3
    original = Tx.reseal_listed_transfers
    calls = []

    def crash_on_the_second(
        self: Tx, limit: int, double_booked: list[TransferRecord] | None = None, now: int = 0
    ) -> int:
        calls.append(limit)
        if len(calls) == 2:
            raise RuntimeError("the process died")
        return original(self, limit, double_booked, now)

    with monkeypatch.context() as patch:
        patch.setattr(Tx, "reseal_listed_transfers", crash_on_the_second)
        with pytest.raises(RuntimeError):
            sqlite_module.reseal_listed_transfers(store, chunk=1)
    with store.transaction() as tx:
        assert tx.reseal_listed_count() == listed - 1
    assert sqlite_module.reseal_listed_transfers(store, chunk=1) == listed - 1
    with store.transaction() as tx:
        assert tx.reseal_listed_count() == 0
        for view in ("blocks", "journal"):
            root = tx.reconcile_buckets("KOR", 2**62, view, "")
            assert [(b.prefix, b.count, b.h1, b.h2) for b in root] == _summed_afresh(
                tx, "KOR", 2**62, view, ""
            )
    await assert_clean(pair)
