"""A database written by an older schema is upgraded in place when the node opens it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from itmolink.core.journal import verify_chain
from itmolink.store import SqliteStore, Store, open_store
from itmolink.store import postgres as postgres_module
from itmolink.store import sqlite as sqlite_module
from itmolink.store.migrate import SQLITE, latest_version, migrations, statements

from ..conftest import Databases


def version_1_database(path: Path) -> None:
    """What a node of schema version 1 left behind, with two unchained audit rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    )
    first = migrations()[0]
    for statement in statements(SQLITE.render(first.sql)):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (first.name,))
    conn.execute(
        "INSERT INTO node_meta (key, value) VALUES ('party', 'LAO'), ('registry', 'LAO-NR')"
    )
    conn.executemany(
        "INSERT INTO admin_audit (operator, method, request, outcome, recorded_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [("admin", "Issue", "q=5", "started", 1), ("admin", "Issue", "q=5", "ok", 2)],
    )
    conn.close()


def test_the_audit_trail_chain_starts_after_the_rows_of_the_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "lao.db"
    version_1_database(path)
    store = SqliteStore(path, party="LAO", registry="LAO-NR")
    assert store.schema_version() == latest_version() >= 2
    with store.transaction() as tx:
        tx.admin_audit_put(operator="admin", method="Info", request="", outcome="started", now=3)
        tx.admin_audit_put(operator="admin", method="Info", request="", outcome="ok", now=4)
    with store.transaction() as tx:
        legacy, entries = tx.admin_audit_entries()
        head = tx.admin_audit_head()
        assert [row[3] for row in tx.admin_audit()] == ["started", "ok", "started", "ok"]
    store.close()
    assert legacy == 2
    assert [e.id for e in entries] == [3, 4]
    assert verify_chain(entries, recorded_head=head, first_id=legacy + 1) == []
    # Reopening applies nothing twice.
    again = SqliteStore(path, party="LAO", registry="LAO-NR")
    assert again.schema_version() == latest_version()
    again.close()


def _journal_rows(store: Store) -> list[tuple[object, ...]]:
    with store.transaction() as tx:
        rows = tx._exec(
            "SELECT id, direction, partner, message_id, payload_type, envelope, recorded_at, "
            "prev_hash, entry_hash FROM journal ORDER BY id"
        ).fetchall()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def test_version_4_journal_is_rebuilt_with_its_rows_chain_and_references(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0005 on a ledger written by schema version 4, on both stores."""
    database = databases.new("lao")
    with monkeypatch.context() as patch:  # a node of schema version 4
        patch.setattr(sqlite_module, "migrations", lambda: migrations()[:4])
        patch.setattr(postgres_module, "migrations", lambda: migrations()[:4])
        old = open_store(database, party="LAO", registry="LAO-NR")
        assert old.schema_version() == 4
        with old.transaction() as tx:
            ids = [
                tx.journal(
                    direction=direction, partner="KOR", message_id=f"m{n}",
                    payload_type="itmolink.v1.TransferProposal", envelope=bytes([n]) * 40,
                    now=1_000 + n,
                )
                for n, direction in enumerate(("in", "out", "in"))
            ]  # fmt: skip
            tx.inbox_put(
                partner="KOR", message_id="m0", payload_digest=b"d" * 32, sequence=1,
                reply=b"reply", journal_id=ids[0],
            )  # fmt: skip
        before = _journal_rows(old)
        old.close()
    store = open_store(database, party="LAO", registry="LAO-NR")
    try:
        assert store.schema_version() == latest_version() >= 5
        assert _journal_rows(store) == before
        with store.transaction() as tx:
            head = tx.journal_head()
            entries = list(tx.journal_entries())
            assert tx.inbox_get("KOR", "m0") is not None
            assert tx.journal_has("in", "KOR", "m2")
            # The chain goes on from the migrated head.
            tx.journal(
                direction="out", partner="KOR", message_id="m3",
                payload_type="itmolink.v1.TransferAcceptance", envelope=b"x", now=2_000,
            )  # fmt: skip
            chain = list(tx.journal_entries())
            new_head = tx.journal_head()
        assert verify_chain(entries, recorded_head=head) == []
        assert verify_chain(chain, recorded_head=new_head) == []
        assert [e.id for e in chain] == [*ids, ids[-1] + 1]
        # Message ids stay unique; entry hashes are no longer indexed; the tables that
        # refer to the journal still do.
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"), store.transaction() as tx:
            tx._exec(
                "INSERT INTO journal (id, direction, partner, message_id, payload_type, "
                "envelope, recorded_at, prev_hash, entry_hash) "
                "VALUES (99, 'in', 'KOR', 'm0', 't', ?, 1, ?, ?)",
                (b"e", b"p", b"h"),
            )
        with pytest.raises(Exception, match=r"(?i)foreign key"), store.transaction() as tx:
            tx.inbox_put(
                partner="KOR", message_id="m9", payload_digest=b"d" * 32, sequence=9,
                reply=b"r", journal_id=12345,
            )  # fmt: skip
        with store.transaction() as tx:
            if databases.postgres:
                indexes = [
                    str(row[0])
                    for row in tx._exec(
                        "SELECT indexdef FROM pg_indexes WHERE tablename = 'journal'"
                    ).fetchall()
                ]
                assert not [i for i in indexes if "entry_hash" in i]
                assert len(indexes) == 2  # the primary key and journal_message
            else:
                names = [row[1] for row in tx._exec("PRAGMA index_list(journal)").fetchall()]
                assert names == ["journal_message"]
                table = tx._one("SELECT sql FROM sqlite_master WHERE name = 'journal'")[0]
                assert "id INTEGER PRIMARY KEY" in table
                assert tx._exec("PRAGMA foreign_key_check").fetchall() == []
                assert tx._one("PRAGMA foreign_keys")[0] == 1
    finally:
        store.close()
