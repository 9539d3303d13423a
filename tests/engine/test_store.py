"""The storage interface behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from itmolink.core.rules import AuthorisationTerms
from itmolink.core.units import Purpose, UnitType
from itmolink.store import open_store, read_only
from itmolink.store.migrate import latest_version
from itmolink.store.tx import Tx

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


def test_a_rolled_back_savepoint_leaves_no_remembered_meta_or_counter(
    databases: Databases,
) -> None:
    """Within a transaction the store may remember node_meta and counters (SQLite);
    a savepoint rolled back must take its writes out of that too, and the journal
    chains on from the head that stayed."""
    store = databases.open("LAO")

    def append(tx: Tx, message_id: str) -> int:
        return tx.journal(
            direction="out", partner="KOR", message_id=message_id, payload_type="t",
            envelope=b"e", now=1,
        )  # fmt: skip

    with store.transaction() as tx:
        first = append(tx, "m1")
        assert tx.next_counter("transfer") == 1

        def undone() -> None:
            with tx.savepoint():
                append(tx, "m2")
                tx.next_counter("transfer")
                tx.set_meta("note", "rolled back")
                raise RuntimeError

        with pytest.raises(RuntimeError):
            undone()
        assert tx.meta_get("note") is None
        assert tx.next_counter("transfer") == 2
        assert append(tx, "m3") == first + 1
    with store.transaction() as tx:
        entries = list(tx.journal_entries())
        assert [e.message_id for e in entries][-2:] == ["m1", "m3"]
        assert tx.journal_head() == (entries[-1].id, entries[-1].entry_hash)


def test_an_authorisation_is_read_once_per_transaction_and_again_once_written(
    databases: Databases,
) -> None:
    """A transfer's steps look at its authorisation several times: one query per
    transaction, and a version recorded in it is what the next look sees."""
    store = databases.open("LAO")
    terms = AuthorisationTerms(
        authorisation_id="LAO-A-1", version=1, host_party="LAO", activity_id="LAO-ACT",
        cooperative_approach_id="LAO-KOR", acquiring_parties=frozenset({"KOR"}),
        purposes=frozenset({Purpose.NDC}), vintage_from=2021, vintage_to=2030,
        quantity_cap=0, unit_type=UnitType.ITMO,
    )  # fmt: skip

    def put(tx: Tx, version: AuthorisationTerms, revoked: bool) -> None:
        tx.authorisation_put(
            version, activity_name="", activity_description="", oimp_detail="",
            first_transfer_definition=0, now=1, revoked=revoked,
        )  # fmt: skip

    queries: list[str] = []
    with store.transaction() as tx:
        put(tx, terms, revoked=False)
        original = tx._exec

        def recording(sql: str, params: Sequence[Any] = ()) -> Any:
            queries.append(sql)
            return original(sql, params)

        tx._exec = recording  # type: ignore[method-assign]
        assert tx.authorisation_get("LAO", "LAO-A-1") == terms
        assert tx.authorisation_details("LAO", "LAO-A-1")["revoked"] == 0
        latest = tx.authorisation_latest("LAO", "LAO-A-1")
        assert latest is not None
        assert latest[0] == terms
        assert tx.authorisation_get("LAO", "LAO-A-2") is None
        assert tx.authorisation_get("LAO", "LAO-A-2") is None
        reads = [q for q in queries if q.startswith("SELECT")]
        assert len(reads) == 2  # LAO-A-1 once, LAO-A-2 (absent) once
        amended = dataclasses.replace(terms, version=2, quantity_cap=10)
        put(tx, amended, revoked=True)
        assert tx.authorisation_get("LAO", "LAO-A-1") == amended
        assert tx.authorisation_details("LAO", "LAO-A-1")["revoked"] == 1
