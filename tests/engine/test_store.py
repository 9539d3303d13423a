"""The storage interface behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from itmolink.store import open_store, read_only
from itmolink.store.migrate import latest_version

from ..conftest import Databases


class Crash(Exception):
    pass


def test_a_crash_just_before_commit_leaves_nothing(databases: Databases) -> None:
    store = databases.open("LAO")
    assert store.schema_version() == latest_version()

    def crash() -> None:
        raise Crash

    store.before_commit = crash

    def write() -> None:
        with store.transaction() as tx:
            tx.set_meta("marker", "lost")
            tx.account_put("retirement", "retirement", 1)

    with pytest.raises(Crash):
        write()
    store.before_commit = None
    with store.transaction() as tx:
        assert tx.meta_get("marker") is None
        assert "retirement" not in tx.accounts()
        tx.set_meta("marker", "kept")
    with store.transaction() as tx:
        assert tx.meta_get("marker") == "kept"


def test_a_ledger_opens_again_and_only_for_its_own_registry(databases: Databases) -> None:
    database = databases.new("lao")
    first = open_store(database, party="LAO", registry="LAO-NR")
    with first.transaction() as tx:
        tx.set_meta("marker", "here")
    first.close()
    again = open_store(database, party="LAO", registry="LAO-NR")
    with again.transaction() as tx:
        assert tx.meta_get("marker") == "here"
    again.close()
    with read_only(database) as tx:  # what reports and audit verify read through
        assert tx.meta_get("marker") == "here"
    with pytest.raises(RuntimeError, match="belongs to LAO/LAO-NR, not KOR/KOR-NR"):
        open_store(database, party="KOR", registry="KOR-NR")
