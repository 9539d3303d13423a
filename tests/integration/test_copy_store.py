"""`itmolink node copy-store`: a registry moves from SQLite to PostgreSQL and goes on
as the same node: its partner accepts its next messages, the hash chains hold, and ids
continue after the copied ones. A copy happens entirely or not at all."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from itmolink.cli.main import main
from itmolink.crypto.pki import init_party
from itmolink.store.copy import tables

from ..conftest import postgres_cluster
from .conftest import NOW, final_state, link, start_registry, stop_registry, write_node
from .test_operations import _issued, _transfer

COMPLETED = 3


def _pki(tmp_path: Path) -> dict[str, Path]:
    configs = {}
    for party, partner in (("LAO", "KOR"), ("KOR", "LAO")):
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
        configs[party] = write_node(tmp_path, party, [partner])
    return configs


def run_sql(database: Path, *statements: str) -> None:
    conn = sqlite3.connect(database)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def _value(conn: psycopg.Connection[Any], sql: str) -> Any:
    """The one value of a query that returns one row."""
    row = conn.execute(sql).fetchone()
    assert row is not None, sql
    return row[0]


def _rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        if _value(conn, "SELECT to_regclass('journal')") is None:
            return 0  # not even the schema
        return sum(_value(conn, f"SELECT COUNT(*) FROM {t}") for t in tables())


def _has_schema(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return _value(conn, "SELECT to_regclass('schema_migrations')") is not None


async def test_a_registry_moves_to_postgresql_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = _pki(tmp_path)
    lao = await start_registry(configs["LAO"])
    kor = await start_registry(configs["KOR"])
    link(lao, kor)
    try:
        authorisation = await _issued(lao, 10_000)
        first = await _transfer(lao, authorisation, 1_000)
        assert (await final_state(lao, first)).state == COMPLETED
        assert (await final_state(kor, first)).state == COMPLETED
        await stop_registry(lao)

        url = postgres_cluster().new_database("copy")
        code = await asyncio.to_thread(
            main, ["node", "copy-store", "--config", str(configs["LAO"]), "--to", url]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "hash chains intact" in out
        assert "journal" in out

        # The node runs on PostgreSQL now, as the same node.
        text = configs["LAO"].read_text().replace('database = "lao.db"', f'database = "{url}"')
        configs["LAO"].write_text(text)
        lao = await start_registry(configs["LAO"])
        link(lao, kor)
        assert first in await lao.transfers()
        second = await _transfer(lao, authorisation, 2_000)  # KOR takes its next sequence
        assert (await final_state(lao, second)).state == COMPLETED
        assert (await final_state(kor, second)).state == COMPLETED
        assert await lao.held() == 10_000 - 3_000
        assert sorted(a.amount for a in await lao.adjustments()) == [1_000, 2_000]
    finally:
        await stop_registry(lao)
        await stop_registry(kor)
    assert main(["audit", "verify", "--config", str(configs["LAO"])]) == 0
    assert "hash chain intact" in capsys.readouterr().out

    # Into a database that is not empty: refused, nothing changes.
    before = _rows(url)
    configs["LAO"].write_text(text.replace(f'database = "{url}"', 'database = "lao.db"'))
    assert main(["node", "copy-store", "--config", str(configs["LAO"]), "--to", url]) == 1
    assert "already holds an itmolink ledger" in capsys.readouterr().err
    assert _rows(url) == before


def test_a_source_that_does_not_verify_is_not_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = _pki(tmp_path)

    async def run() -> None:
        lao = await start_registry(configs["LAO"])
        kor = await start_registry(configs["KOR"])
        link(lao, kor)
        try:
            await _issued(lao, 10_000)
        finally:
            await stop_registry(lao)
            await stop_registry(kor)

    asyncio.run(run())
    database = configs["LAO"].parent / "lao.db"
    run_sql(database, "PRAGMA wal_checkpoint(TRUNCATE)")  # the whole ledger in the main file
    shutil.copy2(database, tmp_path / "pristine.db")

    def restore_pristine() -> None:
        for suffix in ("-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        shutil.copy2(tmp_path / "pristine.db", database)

    run_sql(database, "UPDATE journal SET envelope = X'00' WHERE id = 1")  # an edited entry
    url = postgres_cluster().new_database("copy")
    assert main(["node", "copy-store", "--config", str(configs["LAO"]), "--to", url]) == 1
    assert "hash chain check failed" in capsys.readouterr().err
    assert not _has_schema(url)  # the copy's transaction made the schema: rolled back too

    # A table the schema does not have, or a value PostgreSQL refuses: refused, named.
    restore_pristine()
    run_sql(database, "CREATE TABLE notes (text TEXT)", "INSERT INTO notes VALUES ('by hand')")
    url = postgres_cluster().new_database("copy")
    assert main(["node", "copy-store", "--config", str(configs["LAO"]), "--to", url]) == 1
    assert "['notes'] are not in the schema" in capsys.readouterr().err
    assert not _has_schema(url)
    restore_pristine()
    # SQLite keeps text in an integer column; PostgreSQL refuses it.
    run_sql(database, "UPDATE accounts SET created_at = 'yesterday'")
    assert main(["node", "copy-store", "--config", str(configs["LAO"]), "--to", url]) == 1
    err = capsys.readouterr().err
    assert "table accounts, rows 1 to" in err
    assert "nothing was written" in err
    assert not _has_schema(url)

    # A password in the URL is refused before anything is read.
    assert main(["node", "copy-store", "--config", str(configs["LAO"]),
                 "--to", f"{url}&password=secret"]) == 2  # fmt: skip
    assert "no password in the URL" in capsys.readouterr().err
