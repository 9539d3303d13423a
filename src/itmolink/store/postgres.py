"""The PostgreSQL store (psycopg 3): several node processes of one registry share it.

The queries are those of :class:`~itmolink.store.tx.Tx` (written with ``?``,
sent as ``%s``) and the schema is made by the same migrations as SQLite's
(:data:`~itmolink.store.migrate.POSTGRES` dialect).

Concurrency (docs/DESIGN.md): every transaction runs at READ COMMITTED and first
takes a transaction-scoped advisory lock derived from the registry id. Ledger
writes of one registry are therefore serialised across every process and
connection, exactly like SQLite's single writer (``BEGIN IMMEDIATE``), and
because each statement after the lock sees everything committed before it, the
engine's read-then-write steps (reserve blocks, dedupe the inbox, bump counters
and the journal head) cannot interleave. The outbox claim is the one exception:
it runs without the registry lock and claims rows with ``FOR UPDATE SKIP
LOCKED`` (:meth:`Tx.outbox_due`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from itmolink.store.migrate import POSTGRES, Migration, migrations, refuse_newer, statements
from itmolink.store.sqlite import check_identity, reseal_listed_transfers
from itmolink.store.tx import Tx
from itmolink.store.url import LedgerUnavailable, is_postgres_url

# Advisory lock keys live in one 64-bit space per database; ours are derived from
# a fixed prefix so that they do not collide with another application's.
MIGRATION_LOCK_NAME = "itmolink:migrations"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def redact(url: str) -> str:
    """A connection URL fit for messages: any password is replaced by ``***``."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    if "password" not in params:
        return url
    params["password"] = "***"  # noqa: S105 (a mask, not a secret)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


# Unless the URL says otherwise: give up connecting after this long, and notice a
# dead server or network path (TCP keepalives, unacknowledged data) in about a minute
# instead of the kernel's hours. libpq ignores them on a unix socket.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}
# How long a transaction waits for a lock (the registry lock another process holds)
# before it fails, unless the URL sets lock_timeout (options=-c lock_timeout=...).
LOCK_TIMEOUT_SECONDS = 60


def connect_defaults(url: str) -> dict[str, str]:
    """The connection parameters of :data:`CONNECT_DEFAULTS` that ``url`` does not set."""
    given = conninfo_to_dict(url)
    return {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}


def with_defaults(url: str) -> str:
    """``url`` as a libpq connection string, completed with :func:`connect_defaults`."""
    return make_conninfo(url, **connect_defaults(url))


def apply_migration(conn: psycopg.Connection[Any], migration: Migration) -> None:
    """Apply ``migration`` in the connection's current transaction, unless recorded."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
        "KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    )
    done = conn.execute(
        "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
    ).fetchone()
    if done is not None:
        return
    for statement in statements(migration.sql_for(POSTGRES)):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
        (migration.version, migration.name, time.time_ns() // 1000),
    )


class PostgresStore:
    """A PostgreSQL database named by a libpq URL (``postgresql://...``).

    The password, if any, comes from libpq: ``passfile=`` in the URL or
    ``PGPASSFILE`` (or a client certificate); never from a default. One
    connection per store, used by one thread at a time (the node's database
    thread); a lock enforces it. A broken connection is replaced at the next
    transaction.
    """

    def __init__(self, url: str, *, party: str, registry: str) -> None:
        if not is_postgres_url(url):
            raise ValueError("a PostgreSQL database is named by a postgresql:// URL")
        self.url = url
        self.registry = registry
        # A test seam: called inside every transaction just before COMMIT (as on SQLite).
        self.before_commit: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._registry_key = advisory_key(f"itmolink:registry:{registry}")
        self._conn = self._connect()
        self._migrate()
        self._check_identity(party, registry)
        reseal_listed_transfers(self)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                with_defaults(self.url), autocommit=True, application_name="itmolink"
            )
        except psycopg.OperationalError as exc:
            raise LedgerUnavailable(f"cannot connect to {redact(self.url)}: {exc}") from None
        conn.execute("SET TIME ZONE 'UTC'")
        if "lock_timeout" not in self.url:  # else the URL's options=-c lock_timeout=... holds
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _migrate(self) -> None:
        """Apply missing migrations; concurrent starters wait on an advisory lock."""
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
                if exists is not None and exists[0] is not None:
                    rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
                    refuse_newer({int(r[0]) for r in rows}, "the PostgreSQL database")
            for migration in migrations():
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s)", (advisory_key(MIGRATION_LOCK_NAME),)
                    )
                    apply_migration(conn, migration)

    def _check_identity(self, party: str, registry: str) -> None:
        check_identity(self, party, registry, redact(self.url))

    def schema_version(self) -> int:
        with self._lock:
            row = self._connection().execute("SELECT MAX(version) FROM schema_migrations")
            found = row.fetchone()
        return int(found[0] or 0) if found else 0

    @contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Tx]:
        """One database transaction: committed when the block ends, else rolled back.

        ``exclusive`` (the default) first takes the registry's advisory lock, so
        the transaction runs alone among all processes sharing the database.
        Only the outbox claim passes ``exclusive=False``.
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            try:
                if exclusive:
                    try:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._registry_key,))
                    except psycopg.errors.LockNotAvailable:
                        raise LedgerUnavailable(
                            "another process sharing the database held the registry lock "
                            "longer than lock_timeout: nothing was applied (docs/POSTGRES.md)"
                        ) from None
                yield Tx(conn, "format")
                if self.before_commit is not None:
                    self.before_commit()
            except BaseException:
                if not conn.closed and not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@contextmanager
def read_only(url: str) -> Iterator[Tx]:
    """A read-only transaction on a PostgreSQL ledger (reports, ``audit verify``)."""
    try:
        conn = psycopg.connect(
            with_defaults(url), autocommit=True, application_name="itmolink-read"
        )
    except psycopg.OperationalError as exc:
        raise LedgerUnavailable(f"cannot connect to {redact(url)}: {exc}") from None
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield Tx(conn, "format")
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
