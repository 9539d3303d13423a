"""Storage: one interface over SQLite (embedded default) and PostgreSQL.

Every protocol step is one database transaction (:meth:`Store.transaction`).
The schema is versioned: ``migrations/NNNN_*.sql`` are applied in order and
recorded in ``schema_migrations``, on both databases.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from itmolink.store.sqlite import SqliteStore, Store, read_only_uri
from itmolink.store.tx import Tx
from itmolink.store.url import LedgerUnavailable, is_postgres_url

__all__ = [
    "LedgerUnavailable",
    "SqliteStore",
    "Store",
    "Tx",
    "is_postgres_url",
    "open_store",
    "read_only",
]


def open_store(database: str | Path, *, party: str, registry: str) -> Store:
    """The store a configured ``database`` names.

    A ``postgresql://`` or ``postgres://`` URL (libpq syntax; a password comes from
    ``passfile=`` or ``PGPASSFILE``) opens PostgreSQL; anything else is the path of
    a SQLite file (``:memory:`` included).
    """
    if is_postgres_url(database):
        from itmolink.store.postgres import PostgresStore

        return PostgresStore(str(database), party=party, registry=registry)
    return SqliteStore(database, party=party, registry=registry)


@contextmanager
def read_only(database: str | Path) -> Iterator[Tx]:
    """A read-only view of an existing ledger, for reports and offline checks.

    Raises FileNotFoundError for a SQLite file that does not exist,
    LedgerUnavailable for a PostgreSQL database that cannot be reached.
    """
    if is_postgres_url(database):
        from itmolink.store.postgres import read_only as pg_read_only

        with pg_read_only(str(database)) as tx:
            yield tx
        return
    import sqlite3

    path = Path(database)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such database")
    conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    try:
        # One read transaction: every query sees the same snapshot, even while the
        # node keeps appending (the journal and its recorded head must agree).
        conn.execute("BEGIN")
        try:
            yield Tx(conn)
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
