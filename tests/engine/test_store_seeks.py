"""The store's overlap checks (T4, issuance) find exactly the blocks that share a
serial, by index seeks rather than scans of the blocks table; and the leased
outbox hands a message out once per lease."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from itmolink.core.blocks import Block
from itmolink.core.units import UnitType
from itmolink.store import SqliteStore, Store
from itmolink.store.tx import Tx

from ..conftest import Databases
from .conftest import Pair
from .test_limits import deliver, proposal


def _block(registry: str, start: int, end: int) -> Block:
    return Block(
        originating_registry=registry, serial_start=start, serial_end=end,
        unit_type=UnitType.ITMO, vintage=2025, activity_id="A", authorisation_id="LAO-A-1",
        cooperative_approach_id="CA", first_transferring_party="LAO",
    )  # fmt: skip


HELD = [
    _block("LAO-NR", 1, 10), _block("LAO-NR", 20, 29), _block("LAO-NR", 30, 30),
    _block("LAO-NR", 50, 100), _block("LAO-NR", 1_000, 2_000),
    _block("LAO-NR", 2**63 - 10, 2**63 - 1), _block("KOR-NR", 5, 15),
]  # fmt: skip
# Every range between the interesting serials (block ends, just inside and outside).
POINTS = sorted({1, 2, 9, 10, 11, 19, 20, 25, 29, 30, 31, 49, 50, 75, 101, 999, 2_001, 2**63 - 1})
QUERIES = [
    _block(registry, start, end)
    for registry in ("LAO-NR", "KOR-NR", "JPN-NR")
    for start, end in itertools.combinations_with_replacement(POINTS, 2)
]


def _shares_a_serial(a: Block, b: Block) -> bool:
    return (
        a.originating_registry == b.originating_registry
        and a.serial_start <= b.serial_end
        and b.serial_start <= a.serial_end
    )


@pytest.fixture
def store(databases: Databases) -> Store:
    store = databases.open("LAO")
    with store.transaction() as tx:
        tx.blocks_insert(HELD, account="holding")
    return store


def test_the_overlap_checks_find_exactly_the_blocks_sharing_a_serial(store: Store) -> None:
    assert len(QUERIES) > 240  # blocks_overlapping_each takes them in several chunks
    with store.transaction() as tx:
        each = tx.blocks_overlapping_each(QUERIES)
        for query, found in zip(QUERIES, each, strict=True):
            expected = sorted(
                (b for b in HELD if _shares_a_serial(b, query)), key=lambda b: b.label()
            )
            assert sorted(found, key=lambda b: b.label()) == expected, query.label()
            one = tx.blocks_overlapping(query, expected=False)
            assert sorted(one, key=lambda b: b.label()) == expected, query.label()


def test_blocks_of_accepted_transfers_count_as_expected(ready: Pair) -> None:
    """blocks_overlapping also finds the blocks of incoming transfers accepted and
    not completed (expected here), unless asked not to."""
    assert deliver(ready, proposal(ready)) is None  # KOR accepts LAO-NR 1-10
    with ready.kor.store.transaction() as tx:
        query = _block("LAO-NR", 10, 12)
        assert [(b.serial_start, b.serial_end) for b in tx.blocks_overlapping(query)] == [(1, 10)]
        assert tx.blocks_overlapping(query, expected=False) == []
        assert tx.blocks_overlapping(_block("LAO-NR", 11, 12)) == []


@pytest.fixture
def ready(pair: Pair) -> Pair:
    authorisation_id = pair.authorise()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    return pair


def _statements(tx: Tx, call: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """The SELECT statements ``call`` runs on ``tx`` (with their parameters)."""
    seen: list[tuple[str, tuple[Any, ...]]] = []
    original = tx._exec

    def recording(sql: str, params: Any = ()) -> Any:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((sql, tuple(params)))
        return original(sql, params)

    tx._exec = recording  # type: ignore[method-assign]
    try:
        call()
    finally:
        tx._exec = original  # type: ignore[method-assign]
    return seen


def _plan(tx: Tx, sql: str, params: tuple[Any, ...]) -> list[str]:
    if tx.postgres:
        # With sequential scans priced out, any scan of blocks left has no index.
        tx._exec("SET LOCAL enable_seqscan = off")
        return [str(r[0]) for r in tx._exec("EXPLAIN " + sql, params)]
    return [str(r[-1]) for r in tx._exec("EXPLAIN QUERY PLAN " + sql, params)]


def _scans_of_blocks(plan: list[str], postgres: bool) -> list[str]:
    if postgres:
        return [line for line in plan if re.search(r"Seq Scan on blocks\b", line)]
    # SQLite names a full scan "SCAN <table or alias>"; a seek is "SEARCH ...".
    return [line for line in plan if re.match(r"\s*SCAN (blocks|b|x)\b", line)]


def test_the_overlap_checks_seek_the_index(store: Store) -> None:
    """Two seeks per block (those starting inside the range, the last one starting
    before it), however many blocks the registry holds: no scan of blocks."""
    with store.transaction() as tx:
        queries = QUERIES[:3]
        statements = _statements(tx, lambda: tx.blocks_overlapping(queries[0], expected=False))
        statements += _statements(tx, lambda: tx.blocks_overlapping_each(queries))
        assert len(statements) == 3
        for sql, params in statements:
            plan = _plan(tx, sql, params)
            assert any(("SEARCH" in line or "Index" in line) for line in plan), plan
            assert _scans_of_blocks(plan, tx.postgres) == [], (sql, plan)


def test_a_scan_would_be_seen(store: Store) -> None:
    """The check above can fail: a query on a column with no index shows a scan."""
    with store.transaction() as tx:
        sql = "SELECT serial_start FROM blocks WHERE vintage = ?"
        assert _scans_of_blocks(_plan(tx, sql, (2025,)), tx.postgres) != []


def _vm_steps(tx: Tx, call: Any) -> int:
    """SQLite virtual-machine instructions ``call`` runs: the work done, counted
    exactly (not timed)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn = tx._conn
    conn.set_progress_handler(count, 1)  # type: ignore[attr-defined]
    try:
        call()
    finally:
        conn.set_progress_handler(None, 1)  # type: ignore[attr-defined]
    return steps


def test_the_overlap_checks_do_not_grow_with_the_blocks_held(tmp_path: Path) -> None:
    """Adding 10,000 blocks on either side of the ranges checked adds a level or two
    of B-tree to the seeks, not a visit of each block (SQLite). One range overlaps
    the block starting before it, the other overlaps nothing."""
    store = SqliteStore(tmp_path / "lao.db", party="LAO", registry="LAO-NR")
    queries = [_block("LAO-NR", 1_000_000, 1_000_010), _block("LAO-NR", 1_500_000, 1_500_010)]
    naive = (
        "SELECT serial_start FROM blocks WHERE originating_registry = ? "
        "AND serial_start <= ? AND serial_end >= ?"
    )

    def work(tx: Tx) -> list[int]:
        steps = []
        for query in queries:
            steps += [
                _vm_steps(tx, partial(tx.blocks_overlapping, query, expected=False)),
                _vm_steps(tx, partial(tx.blocks_overlapping_each, [query])),
            ]
        return steps

    def naive_work(tx: Tx) -> int:
        return _vm_steps(tx, lambda: tx._exec(naive, ("LAO-NR", 1_000_010, 1_000_000)).fetchall())

    with store.transaction() as tx:
        tx.blocks_insert([*HELD[:5], _block("LAO-NR", 999_990, 1_000_001)], account="holding")
        few, naive_few = work(tx), naive_work(tx)
        tx.blocks_insert(
            [_block("LAO-NR", 3_000 + 10 * i, 3_005 + 10 * i) for i in range(5_000)]
            + [_block("LAO-NR", 2_000_000 + 10 * i, 2_000_005 + 10 * i) for i in range(5_000)],
            account="holding",
        )
        many, naive_many = work(tx), naive_work(tx)
        found = [tx.blocks_overlapping(q, expected=False) for q in queries]
        assert [[b.serial_start for b in blocks] for blocks in found] == [[999_990], []]
    store.close()
    for before, after in zip(few, many, strict=True):
        assert after - before < 200, (few, many)
    # The measure can fail: a range condition on serial_end visits every block before.
    assert naive_many - naive_few > 5_000, (naive_few, naive_many)


# -- the leased outbox ------------------------------------------------------------------


def test_a_leased_message_is_not_handed_out_again_until_the_lease_ends(pair: Pair) -> None:
    pair.authorise()
    lease = dt.timedelta(seconds=30)
    [(message_id, partner, envelope)] = pair.lao.due_messages(pair.now, lease=lease)
    assert partner == "KOR"
    # Claimed: not due to another caller while its delivery is in flight...
    assert pair.lao.due_messages(pair.now) == []
    assert pair.lao.due_messages(pair.now + lease - dt.timedelta(microseconds=1)) == []
    # ... and due again, the same envelope, once the lease runs out unanswered.
    assert pair.lao.due_messages(pair.now + lease, lease=lease) == [(message_id, "KOR", envelope)]
    # Answered during its second lease: never due again.
    pair.lao.handle_reply(message_id, pair.kor.handle_delivery("LAO", envelope, pair.now), pair.now)
    assert pair.lao.due_messages(pair.now + 10 * lease) == []
    with pair.lao.store.transaction() as tx:
        assert tx.outbox_pending_count() == 0


def test_without_a_lease_a_due_message_stays_due(pair: Pair) -> None:
    pair.authorise()
    first = pair.lao.due_messages(pair.now)
    assert len(first) == 1
    assert pair.lao.due_messages(pair.now) == first


def test_a_failed_delivery_waits_for_its_retry_not_for_the_lease(pair: Pair) -> None:
    pair.authorise()
    lease = dt.timedelta(seconds=30)
    [(message_id, _, _)] = pair.lao.due_messages(pair.now, lease=lease)
    pair.lao.delivery_failed(message_id, "unreachable", pair.now)
    with pair.lao.store.transaction() as tx:
        message = tx.outbox_get(message_id)
        assert message is not None
        assert message.attempts == 1
        retry_at = message.next_attempt_at
    assert retry_at < (pair.now + lease).timestamp() * 1_000_000
    assert pair.lao.due_messages(pair.now + dt.timedelta(seconds=1)) != []


def test_a_message_sent_by_the_runtime_is_claimed_from_the_start(databases: Databases) -> None:
    """With claim_sent_us (what the node sets), a new request is handed to the runtime
    in ``sent`` and leased in the outbox already: the outbox loop does not send it a
    second time while that first delivery is in flight."""
    from itmolink.crypto.keys import SigningKey

    from .conftest import make_engine

    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"])
    lao.claim_sent_us = 31_000_000
    pair = Pair(lao=lao, kor=make_engine(databases, "KOR", "LAO", keys, keys["LAO"]), keys=keys)
    pair.authorise()
    assert [m[1] for m in lao.sent] == ["KOR"]
    assert lao.due_messages(pair.now) == []
    assert lao.due_messages(pair.now + dt.timedelta(seconds=30)) == []
    assert [m[0] for m in lao.due_messages(pair.now + dt.timedelta(seconds=31))] == [lao.sent[0][0]]
    lao.store.close()
    pair.kor.store.close()


def test_two_processes_claim_each_message_once_without_waiting() -> None:
    """PostgreSQL, several node processes on one outbox (FOR UPDATE SKIP LOCKED): a
    claimer skips the messages another is claiming right now instead of waiting for
    it, and after that claim commits finds them leased. Runs on PostgreSQL only:
    SQLite has one writer at a time and no second process claims there."""
    import threading

    from itmolink.store import open_store

    from ..conftest import postgres_cluster

    url = postgres_cluster().new_database("lease")
    first = open_store(url, party="LAO", registry="LAO-NR")
    second = open_store(url, party="LAO", registry="LAO-NR")
    now, lease = 1_000_000, 11_000_000
    with first.transaction() as tx:
        for n in (1, 2):
            tx.outbox_put(
                message_id=f"m-{n}", partner="KOR", payload_type="itmolink.v1.TransferVoid",
                subject_id=f"LAO-T-{n}", envelope=b"e", now=now,
            )  # fmt: skip
    seen: list[list[str]] = []

    def claim_in_second() -> None:
        with second.transaction(exclusive=False) as tx:
            seen.append([m.message_id for m in tx.outbox_due(now, 10, lease_until=now + lease)])

    try:
        with first.transaction(exclusive=False) as tx:
            claimed = [m.message_id for m in tx.outbox_due(now, 1, lease_until=now + lease)]
            other = threading.Thread(target=claim_in_second)
            other.start()
            other.join(timeout=30)  # a liveness bound, not a speed target
            assert not other.is_alive(), "the second claimer waited for the first"
        assert claimed == ["m-1"]
        assert seen == [["m-2"]]  # m-1, locked by the first claim, was skipped
        with second.transaction(exclusive=False) as tx:
            assert tx.outbox_due(now + lease - 1, 10, lease_until=now + 2 * lease) == []
            assert [m.message_id for m in tx.outbox_due(now + lease, 10)] == ["m-1", "m-2"]
    finally:
        first.close()
        second.close()
