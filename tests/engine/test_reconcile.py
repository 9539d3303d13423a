"""Reconciliation between two engines: totals, then blocks, then journal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from itmolink.core.blocks import Block
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Role, TransferState
from itmolink.core.units import Purpose, UnitType
from itmolink.node.engine import Engine
from itmolink.node.reconciliation import Reconciliation, Report
from itmolink.store.tx import Tx
from itmolink.v1 import partner_service_pb2

from .conftest import Pair


class LinkedNode:
    """What Reconciliation needs of a node, wired straight to the partner's engine."""

    def __init__(self, pair: Pair, party: str) -> None:
        self.pair = pair
        self.engine = pair.engine(party)
        self.party = party

    def clock(self) -> dt.datetime:
        return self.pair.now

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def partner_stub(self, partner: str) -> Any:
        pair, party = self.pair, self.party

        class Stub:
            async def Deliver(self, request: Any, **_: Any) -> Any:
                reply = pair.engine(partner).handle_delivery(party, request.envelope, pair.now)
                return partner_service_pb2.DeliverResponse(envelope=reply)

        return Stub()


async def reconcile(pair: Pair, party: str, partner: str) -> Report:
    node = LinkedNode(pair, party)
    snapshot = pair.now + dt.timedelta(seconds=1)
    return await Reconciliation(node, partner, snapshot).run()  # type: ignore[arg-type]


def transfers(pair: Pair, count: int, quantity: int = 10) -> list[str]:
    authorisation_id = pair.authorise()
    pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=count * quantity, now=pair.now
    )
    pair.pump()
    ids = [
        pair.lao.start_transfer(to_party="KOR", authorisation_id=authorisation_id, vintage=2025,
                                quantity=quantity, now=pair.now)
        for _ in range(count)
    ]  # fmt: skip
    pair.pump()
    return ids


def frozen(engine: Engine) -> list[str]:
    with engine.store.transaction() as tx:
        return [h.block.label() for h in tx.holdings() if h.status == "frozen"]


async def test_identical_ledgers_reconcile_clean(pair: Pair) -> None:
    transfers(pair, 5)
    pair.advance(1)
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        report = await reconcile(pair, party, partner)
        assert report.discrepancies == []
        assert report.transfers_here == 5


def _rewrite(engine: Engine, change: Callable[[Tx], None]) -> None:
    with engine.store.transaction() as tx:
        change(tx)


async def test_a_transfer_recorded_differently_is_found_and_its_blocks_frozen(pair: Pair) -> None:
    ids = transfers(pair, 5)
    victim = ids[2]

    def lose_the_adjustment(tx: Tx) -> None:  # e.g. a bad restore, or an insider's edit
        tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (victim,))
        tx._seal_transfer(victim)

    _rewrite(pair.kor, lose_the_adjustment)
    pair.advance(1)
    report = await reconcile(pair, "KOR", "LAO")
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", victim)]
    assert report.discrepancies[0].frozen_blocks == 1
    with pair.kor.store.transaction() as tx:
        blocks = tx.blocks_of_transfer(victim)
    assert frozen(pair.kor) == [b.label() for b in blocks]

    report = await reconcile(pair, "LAO", "KOR")  # LAO sees it too (it holds none of them)
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", victim)]


async def test_totals_that_differ_are_reported(pair: Pair) -> None:
    ids = transfers(pair, 3)

    def shrink(tx: Tx) -> None:
        tx._exec(
            "UPDATE transfer_blocks SET serial_end = serial_end - 1 WHERE transfer_id = ?",
            (ids[0],),
        )
        tx._seal_transfer(ids[0])

    _rewrite(pair.kor, shrink)
    report = await reconcile(pair, "LAO", "KOR")
    phases = [(d.phase, d.subject) for d in report.discrepancies]
    assert phases[0][0] == "totals"
    assert ("blocks", ids[0]) in phases


async def test_a_transfer_decided_by_other_messages_differs_in_the_journal_phase(
    pair: Pair,
) -> None:
    ids = transfers(pair, 3)

    def other_acceptance(tx: Tx) -> None:
        tx._exec(
            "UPDATE transfers SET acceptance_digest = ? WHERE transfer_id = ?",
            (b"\x01" * 32, ids[1]),
        )
        tx._seal_transfer(ids[1])

    _rewrite(pair.kor, other_acceptance)
    report = await reconcile(pair, "LAO", "KOR")
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("journal", ids[1])]


def _synthetic(pair: Pair, count: int) -> list[str]:
    """``count`` completed transfers written straight into both ledgers, as if
    they had run, so a large reconciliation needs no protocol traffic."""
    ids = []
    for engine, direction, sign in ((pair.lao, Role.SENDER, 1), (pair.kor, Role.RECEIVER, -1)):
        with engine.store.transaction() as tx:
            evidence = tx.journal(direction="in", partner="x", message_id=f"e-{direction.value}",
                                  payload_type="t", envelope=b"", now=0)  # fmt: skip
            # Both ledgers know the authorisation: the leaves state the partner's
            # adjustment by its purposes (§11.4).
            tx.authorisation_put(
                AuthorisationTerms(
                    authorisation_id="AUTH", version=1, host_party="LAO", activity_id="A",
                    cooperative_approach_id="CA", acquiring_parties=frozenset({"KOR"}),
                    purposes=frozenset({Purpose.NDC}), vintage_from=2021, vintage_to=2030,
                    quantity_cap=0, unit_type=UnitType.ITMO,
                ),
                activity_name="", activity_description="", oimp_detail="",
                first_transfer_definition=0, now=0,
            )  # fmt: skip
            for i in range(count):
                transfer_id = f"LAO-T-S{i:07d}"
                block = Block("LAO-NR", 10 * i + 1, 10 * i + 10, UnitType.ITMO, 2025, "A", "AUTH",
                              "CA", "LAO")  # fmt: skip
                tx.transfer_put(
                    transfer_id=transfer_id, direction=direction,
                    partner="KOR" if direction is Role.SENDER else "LAO",
                    state=TransferState.ACCEPTED if direction is Role.RECEIVER
                    else TransferState.PROPOSED,
                    quantity=10, authorisation_id="AUTH", first_transfer=True,
                    proposal_message_id="m", proposal_digest=b"p" * 32,
                    acceptance_digest=b"a" * 32, expires_at=0, blocks=[block], proposed_at=0,
                    now=0,
                )  # fmt: skip
                from itmolink.core.adjustments import AdjustmentEntry

                tx.adjustments_put(
                    [AdjustmentEntry(engine.party, "x", transfer_id, 2025, sign * 10,
                                     UnitType.ITMO, "vintage-year")],
                    evidence_journal_id=evidence, now=0,
                )  # fmt: skip
                tx.transfer_set_state(transfer_id, TransferState.COMPLETED, now=0)
                ids.append(transfer_id)
    return ids[:count]


@pytest.mark.parametrize("count", [2_000])
async def test_work_grows_with_the_difference_not_the_ledger(pair: Pair, count: int) -> None:
    ids = _synthetic(pair, count)
    clean = await reconcile(pair, "LAO", "KOR")
    assert clean.discrepancies == []
    assert clean.transfers_here == count
    # Blocks and journal views: each compares the root's 16 children and opens none.
    assert clean.buckets_compared <= 2 * 16

    def differ(tx: Tx) -> None:
        tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (ids[1234],))
        tx._seal_transfer(ids[1234])

    _rewrite(pair.kor, differ)
    report = await reconcile(pair, "LAO", "KOR")
    assert [d.subject for d in report.discrepancies] == [ids[1234]]
    # One path down the blocks tree (16 buckets a level, a few levels, then one
    # small leaf bucket) and the journal view's root, which agrees.
    assert report.buckets_compared <= 16 * 4 + 16
    assert report.leaves_compared <= 16
    assert report.queries <= 1 + (4 + 1) + 1


async def test_transfers_that_moved_nothing_agree_whichever_way_they_ended(pair: Pair) -> None:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    # One the receiver rejects (it arrives expired)...
    rejected = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    [(message_id, _, envelope)] = pair.lao.due_messages(pair.now)
    pair.advance(600)
    pair.lao.handle_reply(message_id, pair.kor.handle_delivery("LAO", envelope, pair.now), pair.now)
    # ...and one the sender voids before the receiver ever sees it.
    voided = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=10,
        now=pair.now, timeout=dt.timedelta(seconds=30),
    )  # fmt: skip
    with pair.lao.store.transaction() as tx:
        tx.outbox_cancel(payload_type="itmolink.v1.TransferProposal", subject_id=voided)
    pair.advance(60)
    pair.pump()
    with pair.kor.store.transaction() as tx:
        states = {t.transfer_id: t.state for t in tx.transfers()}
    assert states == {rejected: TransferState.REJECTED, voided: TransferState.VOIDED}
    pair.advance(1)
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        assert (await reconcile(pair, party, partner)).discrepancies == []


def _summed_afresh(tx: Tx, partner: str, snapshot: int, view: str, prefix: str) -> list[Any]:
    """The children of ``prefix`` summed over every final transfer (no running sums)."""
    h1, h2 = ("blocks_h1", "blocks_h2") if view == "blocks" else ("journal_h1", "journal_h2")
    rows = tx._exec(
        f"SELECT substr(id_hash, 1, ?) AS child, COUNT(*), SUM({h1}), SUM({h2}) FROM transfers "
        "WHERE partner = ? AND proposed_at < ? AND blocks_leaf IS NOT NULL AND id_hash >= ? "
        "AND id_hash < ? GROUP BY child ORDER BY child",
        (len(prefix) + 1, partner, snapshot, prefix, prefix + "g"),
    )
    return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]


def _totals_afresh(tx: Tx, partner: str, snapshot: int) -> list[Any]:
    rows = tx._exec(
        "SELECT t.direction, b.unit_type, b.vintage, b.authorisation_id, "
        "SUM(b.serial_end - b.serial_start + 1), COUNT(DISTINCT t.transfer_id) "
        "FROM transfers t JOIN transfer_blocks b ON b.transfer_id = t.transfer_id "
        "WHERE t.partner = ? AND t.proposed_at < ? AND t.state = 3 "
        "GROUP BY t.direction, b.unit_type, b.vintage, b.authorisation_id",
        (partner, snapshot),
    )
    return sorted((int(r[1]), int(r[2]), r[3], int(r[4]), int(r[5])) for r in rows)


async def test_the_running_sums_match_the_ledger_at_any_snapshot(pair: Pair) -> None:
    """Buckets near the root and the totals come from sums kept as transfers become
    final, less what was proposed after the snapshot: the same as summing afresh."""
    early = pair.now
    transfers(pair, 40)
    pair.advance(60)
    transfers(pair, 25, quantity=7)
    pair.advance(60)
    # A proposal that timed out is final too: a leaf that moved nothing.
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=5, now=pair.now)
    pair.pump()
    pair.network = lambda sender, receiver, envelope: None
    pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=5,
        now=pair.now, timeout=dt.timedelta(seconds=10),
    )  # fmt: skip
    pair.advance(20)
    pair.pump()
    with pair.lao.store.transaction() as tx:
        assert [t.state for t in tx.transfers()].count(TransferState.VOIDED) == 1
    for engine, partner in ((pair.lao, "KOR"), (pair.kor, "LAO")):
        with engine.store.transaction() as tx:
            for moment in (early, early + dt.timedelta(seconds=30), pair.now):
                snapshot = int(moment.timestamp() * 1_000_000) + 1
                for view in ("blocks", "journal"):
                    root = tx.reconcile_buckets(partner, snapshot, view, "")
                    assert [(b.prefix, b.count, b.h1, b.h2) for b in root] == _summed_afresh(
                        tx, partner, snapshot, view, ""
                    )
                    for bucket in root:
                        children = tx.reconcile_buckets(partner, snapshot, view, bucket.prefix)
                        assert [
                            (b.prefix, b.count, b.h1, b.h2) for b in children
                        ] == _summed_afresh(tx, partner, snapshot, view, bucket.prefix)
                totals = tx.reconcile_totals(partner, snapshot)
                assert sorted(
                    (t.unit_type, t.vintage, t.authorisation_id, t.quantity, t.transfers)
                    for t in totals
                ) == _totals_afresh(tx, partner, snapshot)
            assert sum(t.transfers for t in tx.reconcile_totals(partner, 2**62)) == 65
