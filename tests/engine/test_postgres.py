"""What several processes sharing one PostgreSQL database rely on (docs/DESIGN.md):
the registry lock serialises ledger transactions, the outbox claim hands each
message to one claimer, and what a process caches follows the ledger."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.config import ConfigError, _database
from itmolink.node.engine import Engine, Partner
from itmolink.store import open_store
from itmolink.store.migrate import POSTGRES, SQLITE
from itmolink.store.postgres import PostgresStore, redact
from itmolink.v1 import envelope_pb2

from ..conftest import postgres_cluster
from .conftest import Pair


@pytest.fixture
def url() -> str:
    return postgres_cluster().new_database("shared")


def two_stores(url: str) -> tuple[PostgresStore, PostgresStore]:
    """Two connections to one registry's database, as two node processes have."""
    a = open_store(url, party="LAO", registry="LAO-NR")
    b = open_store(url, party="LAO", registry="LAO-NR")
    assert isinstance(a, PostgresStore)
    assert isinstance(b, PostgresStore)
    return a, b


def test_ledger_transactions_of_two_processes_never_interleave(url: str) -> None:
    # Each increment reads the counter, waits, then writes it back: without the
    # registry lock two processes would read the same value and lose updates.
    stores = two_stores(url)
    taken: list[int] = []

    def work(store: PostgresStore) -> None:
        for _ in range(25):
            with store.transaction() as tx:
                first = tx.next_counter("race")
                time.sleep(0.001)
                taken.append(first)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(1, 51))
    for store in stores:
        store.close()


def test_a_claimed_outbox_message_is_skipped_by_the_other_claimer(url: str) -> None:
    a, b = two_stores(url)
    with a.transaction() as tx:
        for n in range(6):
            tx.outbox_put(
                message_id=f"m{n}", partner="KOR", payload_type="t", subject_id=f"s{n}",
                envelope=b"e", now=n,
            )  # fmt: skip
    with a.transaction(exclusive=False) as claimer:
        mine = claimer.outbox_due(100, 3, lease_until=10_000)
        # Before A commits its claim, B claims too: it skips A's rows instead of
        # waiting for them or taking them.
        with b.transaction(exclusive=False) as other:
            theirs = other.outbox_due(100, 10, lease_until=10_000)
    assert [m.message_id for m in mine] == ["m0", "m1", "m2"]
    assert [m.message_id for m in theirs] == ["m3", "m4", "m5"]
    with b.transaction(exclusive=False) as tx:  # both leases hold: nothing is due
        assert tx.outbox_due(100, 10, lease_until=20_000) == []
        assert tx.outbox_due(10_000, 10) != []
    a.close()
    b.close()


def test_an_exclusive_transaction_waits_and_then_sees_the_other_commit(url: str) -> None:
    a, b = two_stores(url)
    seen: list[str | None] = []
    entered = threading.Event()

    def later() -> None:
        entered.wait()
        with b.transaction() as tx:  # blocks on the registry lock until A commits
            seen.append(tx.meta_get("marker"))

    thread = threading.Thread(target=later)
    thread.start()
    with a.transaction() as tx:
        tx.set_meta("marker", "written by A")
        entered.set()
        time.sleep(0.3)
    thread.join()
    assert seen == ["written by A"]
    a.close()
    b.close()


def test_a_change_of_keys_moves_the_shared_state_counter(url: str) -> None:
    a, b = two_stores(url)
    with b.transaction() as tx:
        before = tx.shared_state()
    with a.transaction() as tx:
        tx.revoked_key_put(key_id="k1", party="KOR", source="test", now=1)
    with b.transaction() as tx:
        assert tx.shared_state() != before
        assert tx.revoked_keys() == {"k1": "KOR"}
    a.close()
    b.close()


def test_another_registrys_database_is_refused(url: str) -> None:
    open_store(url, party="LAO", registry="LAO-NR").close()
    with pytest.raises(RuntimeError, match="belongs to LAO/LAO-NR, not KOR/KOR-NR"):
        open_store(url, party="KOR", registry="KOR-NR")


def test_text_compares_bytewise_on_postgres_as_on_sqlite() -> None:
    assert 'TEXT COLLATE "C"' in POSTGRES.render("a TEXT NOT NULL")
    assert POSTGRES.render("x BYTEA_OR_BLOB") == "x BYTEA"
    assert SQLITE.render("a TEXT NOT NULL") == "a TEXT NOT NULL"


def test_a_password_never_shows_and_never_sits_in_the_configuration(tmp_path: Path) -> None:
    assert "s3cret" not in redact("postgresql://u:s3cret@db.example/lao")
    with pytest.raises(ConfigError, match="holds a password"):
        _database("postgresql://u:s3cret@db.example/lao", tmp_path, tmp_path / "node.toml")
    url = "postgresql://u@db.example/lao?passfile=/run/secrets/pgpass"
    assert _database(url, tmp_path, tmp_path / "node.toml") == url
    assert _database("lao.db", tmp_path, tmp_path / "node.toml") == tmp_path / "lao.db"
    with pytest.raises(ConfigError, match="only postgresql://"):
        _database("mysql://x/y", tmp_path, tmp_path / "node.toml")


def test_a_key_rotated_through_one_process_is_used_by_the_other(tmp_path: Path) -> None:
    # LAO runs as two engines over one database (two processes); KOR is its partner.
    cluster = postgres_cluster()
    lao_url = cluster.new_database("lao")
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    new = SigningKey.generate("LAO")
    files = {keys["LAO"].key_id: keys["LAO"], new.key_id: new}

    def lao_process(name: str) -> Engine:
        counter = itertools.count(1)
        return Engine(
            party="LAO", registry="LAO-NR", signing_key=keys["LAO"],
            trust=TrustStore([keys["KOR"].verifying_key()]),
            partners=[Partner("KOR", "KOR-NR", "x")],
            store=open_store(lao_url, party="LAO", registry="LAO-NR"),
            new_id=lambda: f"LAO-{name}-{next(counter)}", key_loader=files.__getitem__,
        )  # fmt: skip

    a, b = lao_process("a"), lao_process("b")
    kor = Engine(
        party="KOR", registry="KOR-NR", signing_key=keys["KOR"],
        trust=TrustStore([keys["LAO"].verifying_key()]), partners=[Partner("LAO", "LAO-NR", "x")],
        store=open_store(postgres_cluster().new_database("kor"), party="KOR", registry="KOR-NR"),
    )  # fmt: skip
    pair = Pair(lao=a, kor=kor, keys=keys)
    a.rotate_signing_key(new, pair.now)
    pair.pump()  # KOR acknowledges; A switches to the new key
    assert a.signing_key is new

    # B never saw the rotation in memory: it signs its next message with the key
    # the ledger names, which KOR accepts.
    pair.lao = b
    authorisation_id = pair.authorise()
    with b.store.transaction() as tx:
        envelope = tx.outbox_last_envelope(
            payload_type="itmolink.v1.AuthorisationStatement",
            subject_id=f"{authorisation_id}#1",
        )
    assert envelope is not None
    signed = envelope_pb2.Envelope.FromString(envelope)
    assert [s.key_id for s in signed.signatures] == [new.key_id]
    assert b.signing_key.key_id == new.key_id
    pair.pump()
    with b.store.transaction() as tx:
        assert tx.authorisation_party_states("LAO", authorisation_id, 1) == {"KOR": "acknowledged"}
    for engine in (a, b, kor):
        engine.store.close()
