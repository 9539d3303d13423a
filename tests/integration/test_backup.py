"""Back up a node and restore it, as docs/OPERATIONS.md describes: SQLite with
``itmolink node backup`` (online), PostgreSQL with pg_dump/pg_restore."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.cli.main import main
from itmolink.node.config import load_config
from itmolink.store import is_postgres_url

from ..conftest import Databases, postgres_cluster
from ..pgcluster import find_bindir
from .conftest import Registry, final_state, link, start_registry, stop_registry
from .test_operations import _issued, _transfer

COMPLETED = 3
REJECTED = 4
SERIALS_ALREADY_HELD = 3005


def _backup(config: Path, out: Path) -> None:
    database = load_config(config).database
    if is_postgres_url(database):
        subprocess.run(
            [str(find_bindir() / "pg_dump"), "--format=custom", f"--file={out}",
             f"--dbname={database}"], check=True, capture_output=True,
        )  # fmt: skip
    else:
        assert main(["node", "backup", "--config", str(config), "--out", str(out)]) == 0
        assert out.stat().st_mode & 0o777 == 0o600


def _restore(config: Path, backup: Path, databases: Databases) -> None:
    database = load_config(config).database
    if is_postgres_url(database):
        fresh = databases.new("restored")
        subprocess.run(
            [str(find_bindir() / "pg_restore"), "--no-owner", f"--dbname={fresh}", str(backup)],
            check=True, capture_output=True,
        )  # fmt: skip
        config.write_text(config.read_text().replace(str(database), fresh))
    else:
        path = Path(database)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        shutil.copy(backup, path)


async def test_a_backup_of_a_stopped_node_restores_it_and_the_link_goes_on(
    pki: Callable[..., Path], databases: Databases, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The supported restore: a backup as recent as the node's last transaction
    (taken after it stopped; on PostgreSQL, equally, point-in-time recovery to the
    end of the WAL), e.g. to move a node or rebuild its disk."""
    if databases.postgres:
        postgres_cluster()  # pg_dump and pg_restore come with the server binaries
    lao_config = pki("LAO", ["KOR"])
    lao = await start_registry(lao_config)
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    restored: Registry | None = None
    try:
        authorisation_id = await _issued(lao, quantity=1_000)
        first = await final_state(lao, await _transfer(lao, authorisation_id, 100))
        await final_state(kor, first.transfer_id)
        await stop_registry(lao)
        backup = tmp_path / "lao.backup"
        await asyncio.to_thread(_backup, lao_config, backup)
        _restore(lao_config, backup, databases)  # e.g. onto a new disk or server
        assert main(["node", "check-config", str(lao_config)]) == 0
        capsys.readouterr()
        restored = await start_registry(lao_config)
        link(restored, kor)
        assert await restored.held() == 900
        second = await final_state(restored, await _transfer(restored, authorisation_id, 50))
        assert second.state == COMPLETED
        request = admin_pb2.ReconcileRequest(partner="KOR")
        request.snapshot_at.FromDatetime(dt.datetime.now(dt.UTC))  # both transfers included
        report = await restored.call("Reconcile", request)
        assert report.transfers_here == 2
        assert list(report.discrepancies) == []
    finally:
        await stop_registry(restored if restored is not None else lao)
        await stop_registry(kor)


async def test_an_older_backup_is_taken_back_by_the_partner_once_the_node_is_marked_restored(
    pki: Callable[..., Path], databases: Databases, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """docs/OPERATIONS.md §7, "Restoring an older backup": a backup taken while the node
    ran misses what came after it. Restored as it is, the node hands out again message
    sequence numbers the partner has seen, which it refuses (SEQUENCE_REUSED), and the
    refusal says what to do. `itmolink node restored` moves every id counter and link
    sequence past them: the link goes on, reconciliation lists the transfer the ledger
    lost (final at the partner only), and a new transfer does not take the lost one's
    id. What it cannot give back: the units the lost transfer moved are held here
    again, and the partner refuses them (SERIALS_ALREADY_HELD), which is why the
    operators settle such transfers before moving units."""
    if databases.postgres:
        postgres_cluster()
    lao_config = pki("LAO", ["KOR"])
    lao = await start_registry(lao_config)
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    restored: Registry | None = None
    try:
        authorisation_id = await _issued(lao, quantity=1_000)
        first = await final_state(lao, await _transfer(lao, authorisation_id, 100))
        backup = tmp_path / "lao.backup"
        await asyncio.to_thread(_backup, lao_config, backup)  # online, while LAO runs
        second = await final_state(lao, await _transfer(lao, authorisation_id, 50))
        await final_state(kor, second.transfer_id)
        await stop_registry(lao)

        _restore(lao_config, backup, databases)
        assert main(["node", "check-config", str(lao_config)]) == 0
        assert main(["audit", "verify", "--config", str(lao_config)]) == 0
        capsys.readouterr()
        restored = await start_registry(lao_config)
        link(restored, kor)
        transfers = await restored.transfers()
        assert first.transfer_id in transfers
        assert second.transfer_id not in transfers  # after the backup: lost here
        assert await restored.held() == 900  # as of the backup
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await restored.call("Reconcile", admin_pb2.ReconcileRequest(partner="KOR"))
        assert "SEQUENCE_REUSED" in str(refused.value.details())
        assert "itmolink node restored" in str(refused.value.details())
        await stop_registry(restored)
        restored = None

        assert main(["node", "restored", "--config", str(lao_config)]) == 0
        out = capsys.readouterr().out
        assert "sequence to KOR" in out
        assert "counter transfer" in out
        assert main(["audit", "verify", "--config", str(lao_config)]) == 0
        restored = await start_registry(lao_config)
        link(restored, kor)
        request = admin_pb2.ReconcileRequest(partner="KOR")
        request.snapshot_at.FromDatetime(dt.datetime.now(dt.UTC))
        report = await restored.call("Reconcile", request)
        found = {(d.phase, d.subject) for d in report.discrepancies}
        assert found == {("totals", "totals"), ("blocks", second.transfer_id),
                         ("journal", second.transfer_id)}, list(report.discrepancies)  # fmt: skip
        assert report.transfers_here == 1
        third = await final_state(restored, await _transfer(restored, authorisation_id, 10))
        assert third.transfer_id not in (first.transfer_id, second.transfer_id)
        # Its serials are among those the lost transfer moved: KOR holds them.
        assert third.state == REJECTED
        assert third.rejection_code == SERIALS_ALREADY_HELD
    finally:
        await stop_registry(restored if restored is not None else lao)
        await stop_registry(kor)


def test_node_restored_raises_every_id_counter_and_link_sequence(
    pki: Callable[..., Path], databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """Counters never used before the backup are raised too (the lost tail may have
    used them), and so is the link to a partner the node never wrote to; a counter of
    the ledger's own (the shared-state version) is left alone."""
    from itmolink.node.base import ID_COUNTERS, serial_counter
    from itmolink.store import open_store

    config_path = pki("LAO", ["KOR"])
    config = load_config(config_path)
    open_store(config.database, party="LAO", registry=config.registry).close()
    capsys.readouterr()
    before = dt.datetime.now(dt.UTC)
    assert main(["node", "restored", "--config", str(config_path)]) == 0
    store = open_store(config.database, party="LAO", registry=config.registry)
    try:
        with store.transaction() as tx:
            counters = {n: tx._counter(n) for n in (*ID_COUNTERS, serial_counter(config.registry))}
            sequence = tx.next_sequence("KOR")
            shared = tx.shared_state()
            audit = tx.admin_audit()
    finally:
        store.close()
    floor = int(before.timestamp() * 1_000_000)
    assert all(value is not None and value >= floor for value in counters.values()), counters
    assert sequence >= floor
    assert shared < floor
    operator, method = audit[-1][:2]
    assert method == "node restored"
    assert operator.startswith("local:")


@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
def test_node_restored_refuses_a_database_that_is_not_there(
    pki: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong path is not a restored ledger: nothing is created."""
    config_path = pki("LAO", ["KOR"])
    database = Path(load_config(config_path).database)
    assert not database.exists()
    assert main(["node", "restored", "--config", str(config_path)]) == 2
    assert "no such database" in capsys.readouterr().err
    assert not database.exists()


def test_every_id_counter_the_node_hands_out_is_one_node_restored_raises() -> None:
    """A counter added to the code but not to ID_COUNTERS would be handed out again
    after an older backup is restored."""
    import re

    from itmolink.node.base import ID_COUNTERS

    root = Path(__file__).resolve().parents[2] / "src" / "itmolink"
    named = set()
    for path in root.rglob("*.py"):
        named |= set(re.findall(r"next_counter\(\s*['\"]([^'\"]+)['\"]", path.read_text()))
    assert named, "no counter found: the pattern no longer matches the code"
    assert named <= set(ID_COUNTERS), named - set(ID_COUNTERS)


@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)
def test_a_backup_is_private_from_its_creation_and_a_failed_copy_is_removed(
    pki: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import sqlite3

    from itmolink.store import open_store

    config = pki("LAO", ["KOR"])
    open_store(load_config(config).database, party="LAO", registry="LAO-NR").close()
    out = tmp_path / "lao.backup"
    real_connect = sqlite3.connect
    modes: list[int] = []

    class Copy:  # the backup file's connection: its integrity check fails
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str) -> sqlite3.Cursor:
            if "integrity_check" in sql:
                return real_connect(":memory:").execute("SELECT 'page 2: btree corrupt'")
            return self.conn.execute(sql)

        def close(self) -> None:
            self.conn.close()

    class Source:  # notes the copy's mode while the ledger is being copied into it
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def backup(self, target: Copy) -> None:
            modes.append(out.stat().st_mode & 0o777)
            self.conn.backup(target.conn)

        def close(self) -> None:
            self.conn.close()

    def connect(name: object, *args: object, **kwargs: object) -> object:
        conn = real_connect(name, *args, **kwargs)  # type: ignore[call-overload]
        return Copy(conn) if Path(str(name)) == out else Source(conn)

    monkeypatch.setattr(sqlite3, "connect", connect)
    umask = os.umask(0o022)
    try:
        code = main(["node", "backup", "--config", str(config), "--out", str(out)])
    finally:
        os.umask(umask)
    assert code == 1
    assert modes == [0o600]
    assert not out.exists()
