"""Copy a node's SQLite ledger into an empty PostgreSQL database.

``itmolink node copy-store`` moves a registry from the embedded default to
PostgreSQL: stop the node, copy, point ``database`` at the URL, start the node.
Everything is copied, the journal and the operators' audit trail included, so
the hash chains, message ids and sequence numbers carry over and partners see
the same node.

The copy reads the SQLite file in one snapshot and writes a new PostgreSQL
database in one transaction, which first makes the schema with the same
migrations as a node: it happens entirely or not at all. Before committing it
compares, table by table, the number of rows and a digest of their contents
read back from PostgreSQL with the source's, after checking the source's hash
chains; any difference rolls it back.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from itmolink.core.journal import verify_chain
from itmolink.store.migrate import latest_version, migrations
from itmolink.store.postgres import (
    MIGRATION_LOCK_NAME,
    advisory_key,
    apply_migration,
    redact,
    with_defaults,
)
from itmolink.store.sqlite import read_only_uri
from itmolink.store.tx import Tx

BATCH = 5_000
_CREATE = re.compile(r"^CREATE TABLE (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE | re.MULTILINE)


class CopyError(RuntimeError):
    """The copy was refused or did not verify; nothing was written."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    party: str
    registry: str
    schema_version: int
    rows: dict[str, int]  # table -> rows copied
    journal_entries: int
    audit_rows: int


def tables() -> list[str]:
    """The ledger's tables in the order the migrations create them (so a table comes
    after the tables it refers to)."""
    found: list[str] = []
    for migration in migrations():
        for name in _CREATE.findall(migration.sql):
            if name not in found:
                found.append(name)
    return found


def _source_tables(src: sqlite3.Connection) -> set[str]:
    rows = src.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {str(r[0]) for r in rows if not str(r[0]).startswith("sqlite_")}


def _target_tables(dst: psycopg.Connection[Any]) -> set[str]:
    rows = dst.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
    ).fetchall()
    return {str(r[0]) for r in rows}


def _identity_columns(dst: psycopg.Connection[Any], table: str) -> list[str]:
    rows = dst.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = %s AND is_identity = 'YES'",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")]


def _normal(value: Any) -> Any:
    return bytes(value) if isinstance(value, (memoryview, bytearray)) else value


def _row_digest(row: Sequence[Any]) -> int:
    text = repr(tuple(_normal(v) for v in row)).encode()
    return int.from_bytes(hashlib.sha256(text).digest(), "big")


def _multiset_digest(rows: Iterable[Sequence[Any]]) -> tuple[int, int]:
    """(rows, digest): the digest is a sum of row hashes, so the order does not matter."""
    count, total = 0, 0
    for row in rows:
        count += 1
        total = (total + _row_digest(row)) % (1 << 256)
    return count, total


def copy_sqlite_to_postgres(
    source: Path,
    url: str,
    *,
    party: str,
    registry: str,
    progress: Callable[[str, int], None] | None = None,
) -> CopyReport:
    """Copy the ledger in ``source`` into the empty database at ``url``."""
    if not source.exists():
        raise CopyError(f"{source}: no such database")
    src = sqlite3.connect(read_only_uri(source), uri=True, isolation_level=None)
    try:
        src.execute("BEGIN")  # one snapshot of the source for the whole copy
        meta = dict(src.execute("SELECT key, value FROM node_meta").fetchall())
        if (meta.get("party"), meta.get("registry")) != (party, registry):
            raise CopyError(
                f"{source} belongs to {meta.get('party')}/{meta.get('registry')}, "
                f"not {party}/{registry}"
            )
        version = int(src.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])
        if version != latest_version():
            raise CopyError(
                f"{source} has schema version {version}, this itmolink {latest_version()}: "
                "start the node once with this itmolink (it upgrades the file), stop it, "
                "then copy"
            )
        _refuse_unless_new(url)
        return _copy(src, url, party, registry, version, progress)
    except sqlite3.Error as exc:
        raise CopyError(f"{source}: {exc}: nothing was written") from None
    except psycopg.Error as exc:
        raise CopyError(f"{redact(url)}: {exc}: nothing was written") from None
    finally:
        src.close()


def _refuse_unless_new(url: str) -> None:
    try:
        with psycopg.connect(with_defaults(url), autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    except psycopg.OperationalError as exc:
        raise CopyError(f"cannot connect to {redact(url)}: {exc}") from None
    if found is not None and found[0] is not None:
        raise CopyError(
            f"{redact(url)} already holds an itmolink ledger (or its schema): copy into a new, "
            "empty database"
        )


def _copy(
    src: sqlite3.Connection,
    url: str,
    party: str,
    registry: str,
    version: int,
    progress: Callable[[str, int], None] | None,
) -> CopyReport:
    rows: dict[str, int] = {}
    journal, audit = _check_chains(Tx(src))  # the source's chains, read as they are copied
    with psycopg.connect(with_defaults(url)) as dst, dst.transaction():
        # The schema, made by the same migrations as a node's, in the copy's transaction,
        # under the lock that node start-ups take to migrate: no schema may appear meanwhile.
        dst.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(MIGRATION_LOCK_NAME),))
        found = dst.execute("SELECT to_regclass('schema_migrations')").fetchone()
        if found is not None and found[0] is not None:
            raise CopyError(f"{redact(url)} got an itmolink schema meanwhile: nothing was written")
        for migration in migrations():
            apply_migration(dst, migration)
        expected = _target_tables(dst) - {"schema_migrations"}
        present = _source_tables(src) - {"schema_migrations"}
        if present != expected or set(tables()) != expected:
            raise CopyError(
                f"the source's tables {sorted(present - expected)} are not in the schema, or the "
                f"schema's {sorted(expected - present)} are not in the source: nothing was written"
            )
        for table in tables():
            columns = _columns(src, table)
            names = ", ".join(columns)
            insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
            cursor = src.execute(f"SELECT {names} FROM {table}")
            copied = 0
            with dst.cursor() as out:
                while batch := cursor.fetchmany(BATCH):
                    try:
                        out.executemany(insert, batch)
                    except psycopg.Error as exc:
                        raise CopyError(
                            f"table {table}, rows {copied + 1} to {copied + len(batch)}: "
                            f"{exc}: nothing was written"
                        ) from None
                    copied += len(batch)
                    if progress is not None:
                        progress(table, copied)
            rows[table] = copied
            for column in _identity_columns(dst, table):  # new ids follow the copied ones
                dst.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                    f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
                )
            source_sum = _multiset_digest(src.execute(f"SELECT {names} FROM {table}"))
            with dst.cursor(name=f"read_back_{table}") as back:  # server-side: streamed
                back.execute(f"SELECT {names} FROM {table}")
                target_sum = _multiset_digest(back)
            if source_sum != target_sum:
                raise CopyError(
                    f"table {table}: {source_sum[0]} rows in the source, {target_sum[0]} read "
                    "back, or their contents differ: nothing was written"
                )
    return CopyReport(party, registry, version, rows, journal, audit)


def _check_chains(tx: Tx) -> tuple[int, int]:
    """The source's journal and audit trail, checked entry by entry (not held in
    memory); the copy is then compared with the source table by table."""
    counted = 0

    def counting(entries: Iterable[Any]) -> Iterator[Any]:
        nonlocal counted
        for entry in entries:
            counted += 1
            yield entry

    problems = verify_chain(counting(tx.journal_entries()), recorded_head=tx.journal_head())
    journal = counted
    legacy, audit = tx.admin_audit_entries()
    problems += verify_chain(audit, recorded_head=tx.admin_audit_head(), first_id=legacy + 1)
    if problems:
        raise CopyError(
            f"hash chain check failed ({problems[0].entry_id}: {problems[0].problem}): "
            "nothing was written; run 'itmolink audit verify' on the source"
        )
    return journal, len(audit)
