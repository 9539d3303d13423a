"""The embedded SQLite store: WAL mode, durable commits, one writer."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol

from itmolink.store.migrate import SQLITE, Migration, migrations, refuse_newer, statements
from itmolink.store.tx import TransferRecord, Tx, TxMemory

HOLDING_ACCOUNT = "holding"
log = logging.getLogger(__name__)


class Store(Protocol):
    """What the node needs from a database: transactions and a version."""

    def transaction(self, *, exclusive: bool = True) -> AbstractContextManager[Tx]:
        """One transaction. ``exclusive=False`` is allowed only for one that
        touches nothing but outbox rows it claims (PostgreSQL then skips the
        registry lock and relies on row locks); SQLite ignores it."""
        ...

    @property
    def before_commit(self) -> Callable[[], None] | None:
        """A test seam: called inside each transaction just before COMMIT."""
        ...

    @before_commit.setter
    def before_commit(self, hook: Callable[[], None] | None) -> None: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...


def read_only_uri(path: Path | str) -> str:
    """The URI that opens a SQLite file read-only (for ``sqlite3.connect(..., uri=True)``),
    whatever characters its path holds."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def check_identity(store: Store, party: str, registry: str, name: str) -> None:
    """A database belongs to one party's registry: claim a new one (``name`` says which,
    for the message), refuse to open another's."""
    with store.transaction() as tx:
        stored = tx.meta()
        if "party" not in stored:
            tx.set_meta("party", party)
            tx.set_meta("registry", registry)
            tx.account_put(HOLDING_ACCOUNT, "holding", time.time_ns() // 1000)
            return
    if (stored.get("party"), stored.get("registry")) != (party, registry):
        raise RuntimeError(
            f"database {name} belongs to {stored.get('party')}/{stored.get('registry')}, "
            f"not {party}/{registry}: check 'database' in the node configuration"
        )


# The migration that lists transfers to seal again (0007_blocks_leaf_roles.sql).
RESEAL_SCHEMA = 7


def reseal_listed_transfers(store: Store, chunk: int = 2_000) -> int:
    """After the migrations: seal again the transfers whose leaves a migration listed
    (0007), a chunk per transaction, so an interrupted upgrade resumes; returns how
    many were sealed again. Nothing before schema version 7 (an older schema, as
    tests of earlier migrations build, has no such list)."""
    if store.schema_version() < RESEAL_SCHEMA:
        return 0
    with store.transaction() as tx:
        listed = tx.reseal_listed_count()
    if not listed:
        return 0
    log.info("sealing again the reconciliation leaves of %d transfers (schema 7)", listed)
    done = 0
    while True:
        double_booked: list[TransferRecord] = []
        with store.transaction() as tx:
            count = tx.reseal_listed_transfers(chunk, double_booked, now=time.time_ns() // 1_000)
        for record in double_booked:
            log.error(
                "ALARM: transfer %s to %s booked again adjustments booked at issuance "
                "(the reference before schema 7): recorded as a discrepancy, see "
                "docs/OPERATIONS.md section 8",
                record.transfer_id, record.partner,
                extra={"transfer_id": record.transfer_id, "partner": record.partner},
            )  # fmt: skip
        done += count
        if count:
            log.info("sealed again %d of %d transfers", done, listed)
        if count < chunk:
            return done


# Prepared statements kept per connection (sqlite3's default is 128).
STATEMENT_CACHE = 1024


class _GroupedTransaction:
    """One transaction of a group commit (:meth:`SqliteStore.transaction` inside
    :meth:`SqliteStore.group`): a savepoint of the group's transaction, undone alone
    if its block raises."""

    __slots__ = ("_mark", "_memory", "_name", "_store")

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def __enter__(self) -> Tx:
        store = self._store
        conn = store._conn
        if not conn.in_transaction:
            # SQLite rolled the group back itself (an I/O error, a full disk):
            # nothing more may run in it, or it would commit statement by statement.
            raise sqlite3.OperationalError("the group's transaction was rolled back")
        store._group_size += 1
        self._name = f"g{store._group_size}"
        memory = self._memory = store._group_memory
        self._mark = memory.mark()
        conn.execute(f"SAVEPOINT {self._name}")
        return Tx(conn, cache=memory)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn = self._store._conn
        if exc_type is not None:
            # Back to what the group's earlier transactions left (their deferred
            # writes included), as the database is; the exception goes on.
            self._memory.restore(self._mark)
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO SAVEPOINT {self._name}")
                conn.execute(f"RELEASE SAVEPOINT {self._name}")
            return
        conn.execute(f"RELEASE SAVEPOINT {self._name}")


class SqliteStore:
    """SQLite in WAL mode with ``synchronous=FULL``: a commit survives power loss.

    Write transactions start with ``BEGIN IMMEDIATE`` so two writers never
    deadlock on a lock upgrade. The connection is used by one thread at a time
    (the node runs every transaction on a single database thread); a lock
    enforces it.
    """

    def __init__(self, path: Path | str, *, party: str, registry: str) -> None:
        self.path = str(path)
        # A test seam: called inside every transaction just before COMMIT, so a
        # simulator can crash a node there (the transaction then rolls back).
        self.before_commit: Callable[[], None] | None = None
        self._lock = threading.Lock()
        # While a group (group commit) is open: the thread that holds it, how many
        # of its transactions have begun, the follow-ups awaiting its commit, and what
        # its transactions read and deferred of node_meta and counters (TxMemory).
        self._group_owner: int | None = None
        self._group_size = 0
        self._group_followups: list[Callable[[], None]] = []
        self._group_memory = TxMemory()
        # sqlite3 keeps the last 128 statements prepared. Each call of a group commit
        # is a savepoint with a name of its own (two statement texts a call), so a group
        # of 64 calls alone pushed out every other statement, and each was prepared again
        # every time (bench/engine.py --group 64: 6% of the engines' CPU). Room for groups
        # of several hundred calls and the ledger's statements besides.
        self._conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=STATEMENT_CACHE,
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=10000")
        # A savepoint (one per call of a group commit, one around each request's
        # handler) keeps the pages it changes in a statement journal, which SQLite
        # moves to a temporary file past 64 KiB: a protocol step changes about
        # twenty pages, so every transaction created, wrote and deleted one. In
        # memory instead: it only undoes a savepoint; crash safety rests on the WAL.
        self._conn.execute("PRAGMA temp_store=MEMORY")
        self._migrate()
        self._check_identity(party, registry)
        reseal_listed_transfers(self)

    def _migrate(self) -> None:
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
            )
            applied = {
                row[0] for row in self._conn.execute("SELECT version FROM schema_migrations")
            }
            refuse_newer(applied, f"database {self.path}")
            upgraded = False
            for migration in migrations():
                if migration.version in applied:
                    continue
                # SQLite's procedure for rebuilding a table that others refer to
                # (migration 0005, the journal): foreign keys off outside the
                # transaction, checked before the commit, on again after it.
                self._conn.execute("PRAGMA foreign_keys=OFF")
                try:
                    self._apply(migration)
                finally:
                    self._conn.execute("PRAGMA foreign_keys=ON")
                upgraded = True
            if upgraded:
                # A rebuilt table passed through the WAL whole: move it into the
                # database and give the WAL's space back now, not at some later
                # checkpoint that would leave the file at its largest.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _apply(self, migration: Migration) -> None:
        """One migration in its own transaction, foreign keys checked before the commit."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(migration.sql_for(SQLITE)):
                self._conn.execute(statement)
            broken = self._conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(
                    f"migration {migration.version:04d} would break foreign keys: {broken[:5]}"
                )
            self._conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time_ns() // 1000),
            )
        except BaseException:
            # SQLite may have rolled back itself (a full disk, an I/O error).
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _check_identity(self, party: str, registry: str) -> None:
        check_identity(self, party, registry, str(self.path))

    def schema_version(self) -> int:
        with self.transaction() as tx:
            row = tx._one("SELECT MAX(version) FROM schema_migrations")
        return int(row[0] or 0)

    def transaction(self, *, exclusive: bool = True) -> AbstractContextManager[Tx]:
        """One database transaction: committed when the block ends, else rolled back.

        Always ``BEGIN IMMEDIATE`` (one writer at a time), whatever ``exclusive``.
        Inside :meth:`group` (on the thread that opened it) it is a savepoint of
        the group's transaction instead: undone alone if it raises, made durable
        with the whole group.
        """
        if self._group_owner == threading.get_ident():
            # Not one generator inside another: a call of a group commit pays for
            # one context manager here, not three (one per protocol step).
            return _GroupedTransaction(self)
        return self._own_transaction()

    @contextmanager
    def _own_transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # BEGIN IMMEDIATE: no other connection writes until this commits,
                # so what the transaction read of node_meta and counters holds.
                tx = Tx(self._conn, cache=TxMemory())
                yield tx
                tx.write_deferred()
                if self.before_commit is not None:
                    self.before_commit()
                self._conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed may leave the transaction open (SQLITE_BUSY):
                # end it, or every later BEGIN would fail.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: the transactions begun inside this block, on this thread,
        are committed together, with one durable write, when the block ends; if
        the block raises (or the commit fails) none of them is.

        The caller must let no result of a transaction in the group out of the
        process (a reply, a delivery) before the group has committed.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._group_owner = threading.get_ident()
            self._group_size = 0
            self._group_followups = []
            self._group_memory = TxMemory()
            try:
                try:
                    yield
                    if not self._conn.in_transaction:
                        # SQLite rolled the group back itself: the deferred writes
                        # must not run (each would commit alone), nor the COMMIT.
                        raise sqlite3.OperationalError("the group's transaction was rolled back")
                    Tx(self._conn, cache=self._group_memory).write_deferred()
                    if self.before_commit is not None:
                        self.before_commit()
                finally:
                    self._group_owner = None
                self._conn.execute("COMMIT")
            except BaseException:
                self._group_followups = []
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            followups, self._group_followups = self._group_followups, []
        for followup in followups:
            # The group is durable: a follow-up that fails must not make its calls
            # look failed, nor keep the other follow-ups from running.
            try:
                followup()
            except Exception:
                log.exception("an in-memory follow-up of a committed group failed")

    def after_commit(self, followup: Callable[[], None]) -> None:
        """Run ``followup`` (an in-memory consequence of a committed transaction)
        now, or inside a group once the group has committed."""
        if self._group_owner == threading.get_ident():
            self._group_followups.append(followup)
        else:
            followup()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
