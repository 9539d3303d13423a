"""Group commit (DESIGN.md decision 31): several transactions, one durable commit."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from itmolink.core.rules import AuthorisationTerms
from itmolink.core.units import Purpose, UnitType
from itmolink.store import SqliteStore
from itmolink.store.tx import Tx


class Boom(Exception):
    pass


def _store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "lao.db", party="LAO", registry="LAO-NR")


def _meta(path: Path | str) -> dict[str, str]:
    """What another connection sees: only what was committed."""
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, value FROM node_meta"))


def test_a_failing_transaction_in_a_group_is_undone_alone(tmp_path: Path) -> None:
    store = _store(tmp_path)

    def failing() -> None:
        with store.transaction() as tx:
            tx.set_meta("second", "2")
            raise Boom

    with store.group():
        with store.transaction() as tx:
            tx.set_meta("first", "1")
        with pytest.raises(Boom):
            failing()
        with store.transaction() as tx:
            tx.set_meta("third", "3")
            assert tx.meta_get("first") == "1"  # the group's own writes are visible in it
        assert "first" not in _meta(store.path)  # nothing is committed before the group ends
    committed = _meta(store.path)
    assert (committed.get("first"), committed.get("second"), committed.get("third")) == (
        "1",
        None,
        "3",
    )


def test_a_group_whose_commit_fails_keeps_nothing_and_runs_no_follow_up(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ran: list[str] = []

    def crash() -> None:
        raise Boom("the disk refused")

    def group() -> None:
        with store.group():
            with store.transaction() as tx:
                tx.set_meta("first", "1")
            store.after_commit(lambda: ran.append("first"))

    store.before_commit = crash
    with pytest.raises(Boom):
        group()
    store.before_commit = None
    assert "first" not in _meta(store.path)
    assert ran == []
    with store.transaction() as tx:  # the store is usable again
        tx.set_meta("after", "1")
    assert _meta(store.path)["after"] == "1"


def test_follow_ups_wait_for_the_group_commit(tmp_path: Path) -> None:
    store = _store(tmp_path)
    seen: list[str | None] = []
    with store.group():
        with store.transaction() as tx:
            tx.set_meta("key", "value")
        store.after_commit(lambda: seen.append(_meta(store.path).get("key")))
        assert seen == []
    assert seen == ["value"]  # it ran after the commit, and saw the committed value
    store.after_commit(lambda: seen.append("now"))  # outside a group: at once
    assert seen == ["value", "now"]


def test_a_rolled_back_transaction_in_a_group_leaves_no_remembered_meta_or_counter(
    tmp_path: Path,
) -> None:
    """The transactions of a group share what they read of node_meta and counters
    (Tx._cache): one rolled back must not leave its writes there."""
    store = _store(tmp_path)

    def failing() -> None:
        with store.transaction() as tx:
            assert tx.next_counter("transfer") == 2
            tx.set_meta("journal_head", "rolled back")
            tx.shared_state_changed()
            raise Boom

    with store.group():
        with store.transaction() as tx:
            assert tx.next_counter("transfer") == 1
            tx.set_meta("journal_head", "kept")
            seen = tx.shared_state()
        with pytest.raises(Boom):
            failing()
        with store.transaction() as tx:
            assert tx.meta_get("journal_head") == "kept"
            assert tx.shared_state() == seen
            assert tx.next_counter("transfer") == 2
    with store.transaction() as tx:
        assert tx.next_counter("transfer") == 3
        assert tx.meta_get("journal_head") == "kept"


def _open_temporary_files() -> list[str]:
    """SQLite's temporary files this process holds open (created, then unlinked)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if "etilqs_" in target.name:
            found.append(str(target))
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_savepoints_keep_their_journal_in_memory(tmp_path: Path) -> None:
    """Each call of a group commit is a savepoint, and so is a request's handler:
    undoing one needs the pages it changed, kept in a statement journal. A protocol
    step changes some twenty pages, more than SQLite keeps in memory by default: the
    journal must not become a temporary file created, written and deleted in every
    transaction (PRAGMA temp_store)."""
    store = _store(tmp_path)
    messages = [f"m-{number}" for number in range(40)]
    with store.transaction() as tx:  # forty pages, each changed again below
        for message_id in messages:
            tx.outbox_put(
                message_id=message_id, partner="KOR", payload_type="t", subject_id="s",
                envelope=b"x" * 3000, now=0,
            )  # fmt: skip
    with store.group(), store.transaction() as tx, tx.savepoint():
        for message_id in messages:
            tx.outbox_retry_later(message_id, next_attempt_at=1, error="e")
        assert _open_temporary_files() == []


def _append(tx: Tx, message_id: str) -> int:
    return tx.journal(
        direction="in", partner="KOR", message_id=message_id, payload_type="t",
        envelope=b"x", now=1,
    )  # fmt: skip


def test_the_journal_head_and_counters_are_written_once_per_transaction(tmp_path: Path) -> None:
    """Every journal append moves the chain's head, every proposal the transfer
    counter and every message sent its link's sequence: their rows are written
    once, just before the commit, not at each step."""
    store = _store(tmp_path)
    written: list[str] = []
    store._conn.set_trace_callback(written.append)
    with store.group():
        for first, counted in ((1, 1), (4, 3)):
            with store.transaction() as tx:
                appended = [_append(tx, f"m-{first + i}") for i in range(3)]
                assert appended == [first, first + 1, first + 2]
                assert tx.next_counter("transfer") == counted
                assert tx.next_counter("transfer") == counted + 1
                assert [tx.next_sequence("KOR") for _ in range(3)] == appended
    store._conn.set_trace_callback(None)
    upserts = [
        s for s in written if s.startswith(("INSERT INTO node_meta", "INSERT INTO counters"))
    ]
    assert len(upserts) == 2  # the head and the counter, once each for the group
    with sqlite3.connect(store.path) as conn:
        head = dict(conn.execute("SELECT key, value FROM node_meta"))["journal_head"]
        last = conn.execute(
            "SELECT id, entry_hash FROM journal ORDER BY id DESC LIMIT 1"
        ).fetchone()
        counter = conn.execute("SELECT value FROM counters WHERE name = 'transfer'").fetchone()
        link = conn.execute("SELECT next_out_sequence FROM links WHERE partner = 'KOR'").fetchone()
    assert head == f"{last[0]}:{last[1].hex()}"
    assert last[0] == 6
    assert counter == (5,)
    assert link == (7,)


def test_a_rolled_back_transaction_keeps_the_deferred_writes_of_the_group_before_it(
    tmp_path: Path,
) -> None:
    """The head written by the group's first transaction waits for the commit; the
    second transaction, rolled back, must leave the third the first one's head."""
    store = _store(tmp_path)

    def undone(tx: Tx) -> None:
        with tx.savepoint():
            _append(tx, "undone")
            tx.next_counter("transfer")
            tx.next_sequence("KOR")
            raise Boom

    def failing() -> None:
        with store.transaction() as tx:
            _append(tx, "rolled-back")
            tx.next_counter("transfer")
            tx.next_sequence("KOR")
            raise Boom

    with store.group():
        with store.transaction() as tx:
            assert _append(tx, "first") == 1
            assert tx.next_counter("transfer") == 1
            assert tx.next_sequence("KOR") == 1
        with pytest.raises(Boom):
            failing()
        with store.transaction() as tx:
            with pytest.raises(Boom):
                undone(tx)
            assert _append(tx, "second") == 2
            assert tx.next_counter("transfer") == 2
            assert tx.next_sequence("KOR") == 2
    with store.transaction() as tx:
        entries = list(tx.journal_entries())
        assert [e.message_id for e in entries] == ["first", "second"]
        assert entries[1].prev_hash == entries[0].entry_hash
        assert tx.journal_head() == (2, entries[1].entry_hash)
        assert tx.next_counter("transfer") == 3
        assert tx.next_sequence("KOR") == 3


def test_a_failing_follow_up_does_not_fail_its_committed_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    seen: list[str] = []

    def fails() -> None:
        raise Boom("a follow-up that fails")

    with caplog.at_level("ERROR"), store.group():  # does not raise: the group is durable
        with store.transaction() as tx:
            tx.set_meta("key", "value")
        store.after_commit(fails)
        store.after_commit(lambda: seen.append("ran"))
    assert _meta(store.path)["key"] == "value"
    assert seen == ["ran"]  # the later follow-ups still run
    assert any("follow-up of a committed group failed" in r.getMessage() for r in caplog.records)


def test_a_group_reads_an_authorisation_once_and_forgets_it_on_a_write_or_a_rollback(
    tmp_path: Path,
) -> None:
    """The transactions of a group share the authorisations they read (TxMemory):
    one query for the group; a version written in the group is what the next
    transaction sees; a transaction rolled back takes its version with it."""
    store = _store(tmp_path)
    terms = AuthorisationTerms(
        authorisation_id="LAO-A-1", version=1, host_party="LAO", activity_id="LAO-ACT",
        cooperative_approach_id="LAO-KOR", acquiring_parties=frozenset({"KOR"}),
        purposes=frozenset({Purpose.NDC}), vintage_from=2021, vintage_to=2030,
        quantity_cap=0, unit_type=UnitType.ITMO,
    )  # fmt: skip

    def put(tx: Tx, version: AuthorisationTerms) -> None:
        tx.authorisation_put(
            version, activity_name="", activity_description="", oimp_detail="",
            first_transfer_definition=0, now=1,
        )  # fmt: skip

    with store.transaction() as tx:
        put(tx, terms)
    reads: list[str] = []
    original = Tx._exec

    def counting(self: Tx, sql: str, params: Any = ()) -> Any:
        if sql.startswith("SELECT") and "FROM authorisations" in sql:
            reads.append(sql)
        return original(self, sql, params)

    amended = dataclasses.replace(terms, version=2, quantity_cap=10)
    rolled_back = dataclasses.replace(terms, version=3, quantity_cap=20)

    def failing() -> None:
        with store.transaction() as tx:
            put(tx, rolled_back)
            assert tx.authorisation_get("LAO", "LAO-A-1") == rolled_back
            raise Boom

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tx, "_exec", counting)
        with store.group():
            for _ in range(3):
                with store.transaction() as tx:
                    assert tx.authorisation_get("LAO", "LAO-A-1") == terms
            assert len(reads) == 1
            with store.transaction() as tx:
                put(tx, amended)
            with store.transaction() as tx:
                assert tx.authorisation_get("LAO", "LAO-A-1") == amended
            assert len(reads) == 2
            with pytest.raises(Boom):
                failing()
            with store.transaction() as tx:
                assert tx.authorisation_get("LAO", "LAO-A-1") == amended
    with store.transaction() as tx:
        assert tx.authorisation_get("LAO", "LAO-A-1") == amended


def test_running_sums_wait_for_the_commit_and_are_read_in_the_group(tmp_path: Path) -> None:
    """What sealed transfers add to the reconciliation's running sums waits in the
    group's memory, summed, and is written once before the commit; a later
    transaction of the group reads it, and one rolled back takes its part with it."""
    store = _store(tmp_path)
    bucket = ("bucket", "KOR", "abc", 1, 10, 20, 30, 40)
    total = ("total", "KOR", "out", int(UnitType.ITMO), 2025, "LAO-A-1", 7, 1)
    written: list[str] = []
    original = Tx._many

    def counting(self: Tx, sql: str, rows: Any) -> None:
        if "reconcile_" in sql and rows:
            written.append(sql.split()[2])
        original(self, sql, rows)

    def failing() -> None:
        with store.transaction() as tx:
            tx._add_sums([bucket, total])
            raise Boom

    def sums(connection: Any) -> list[Any]:
        return [
            *connection.execute("SELECT * FROM reconcile_buckets"),
            *connection.execute("SELECT * FROM reconcile_totals"),
        ]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tx, "_many", counting)
        with store.group():
            for _ in range(2):
                with store.transaction() as tx:
                    tx._add_sums([bucket, total])
            assert written == []
            with pytest.raises(Boom):
                failing()
            with sqlite3.connect(store.path) as other:
                assert sums(other) == []  # nothing before the commit
            with store.transaction() as tx:
                [child] = tx.reconcile_buckets("KOR", 2**62, "blocks", "")
                assert (child.prefix, child.count, child.h1, child.h2) == ("a", 2, 20, 40)
                [moved] = tx.reconcile_totals("KOR", 2**62)
                assert (moved.quantity, moved.transfers) == (14, 1 * 2)
                tx._add_sums([bucket])
    assert written == ["reconcile_buckets", "reconcile_totals", "reconcile_buckets"]
    with sqlite3.connect(store.path) as other:
        assert sorted(sums(other), key=str) == sorted(
            [("KOR", "abc", 3, 30, 60, 90, 120), ("KOR", "out", 1, 2025, "LAO-A-1", 14, 2)],
            key=str,
        )
