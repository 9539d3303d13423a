"""A database written by an older schema is upgraded in place when the node opens it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from itmolink.core.journal import verify_chain
from itmolink.store import SqliteStore
from itmolink.store.migrate import SQLITE, latest_version, migrations, statements


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
