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
from itmolink.store.postgres import PostgresStore, connect_defaults, redact
from itmolink.store.url import LedgerUnavailable
from itmolink.v1 import envelope_pb2

from ..conftest import postgres_cluster
from .conftest import Pair, process_engine


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
    # Were A's rows waited for, B's claim would wait forever for A (on this same
    # thread): a short lock timeout makes it fail instead.
    b._conn.execute("SET lock_timeout = '2s'")
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


def test_a_key_rotated_through_one_process_is_used_by_the_other() -> None:
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


def test_a_version_1_database_is_upgraded_in_place(url: str) -> None:
    import psycopg

    from itmolink.core.journal import verify_chain
    from itmolink.store.migrate import latest_version, migrations, statements

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        first = migrations()[0]
        for statement in statements(POSTGRES.render(first.sql)):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, %s, 0)", (first.name,))
        conn.execute(
            "INSERT INTO node_meta (key, value) VALUES ('party', 'LAO'), ('registry', 'LAO-NR')"
        )
        for outcome, at in (("started", 1), ("ok", 2)):  # ids from the identity column
            conn.execute(
                "INSERT INTO admin_audit (operator, method, request, outcome, recorded_at) "
                "VALUES ('admin', 'Issue', 'q=5', %s, %s)",
                (outcome, at),
            )
    store = open_store(url, party="LAO", registry="LAO-NR")
    assert store.schema_version() == latest_version() >= 2
    with store.transaction() as tx:
        tx.admin_audit_put(operator="admin", method="Info", request="", outcome="started", now=3)
        tx.admin_audit_put(operator="admin", method="Info", request="", outcome="ok", now=4)
    with store.transaction() as tx:
        legacy, entries = tx.admin_audit_entries()
        head = tx.admin_audit_head()
    store.close()
    assert legacy == 2
    assert [e.id for e in entries] == [3, 4]
    assert verify_chain(entries, recorded_head=head, first_id=legacy + 1) == []
    again = open_store(url, party="LAO", registry="LAO-NR")  # applies nothing twice
    assert again.schema_version() == latest_version()
    again.close()


def _kor_processes_and_lao(
    keys: dict[str, SigningKey], files: dict[str, SigningKey]
) -> tuple[Engine, Engine, Engine]:
    """KOR as two engines over one database (two processes), and LAO its partner."""
    cluster = postgres_cluster()
    kor_url = cluster.new_database("kor")
    lao = process_engine(
        cluster.new_database("lao"), "LAO", "KOR", keys, key_loader=files.__getitem__
    )
    a, b = (process_engine(kor_url, "KOR", "LAO", keys, name) for name in ("a", "b"))
    return a, b, lao


def test_a_partner_key_learned_by_one_process_is_accepted_by_the_other() -> None:
    # KOR's process A records LAO's new key; LAO then signs with it, and its next
    # request reaches process B, which must not refuse the key as unknown.
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    new = SigningKey.generate("LAO")
    a, b, lao = _kor_processes_and_lao(keys, {keys["LAO"].key_id: keys["LAO"], new.key_id: new})
    pair = Pair(lao=lao, kor=a, keys=keys)
    lao.rotate_signing_key(new, pair.now)
    pair.pump()
    assert lao.signing_key is new
    pair.kor = b
    authorisation_id = pair.authorise()
    pair.pump()
    with lao.store.transaction() as tx:
        assert tx.authorisation_party_states("LAO", authorisation_id, 1) == {"KOR": "acknowledged"}
    for engine in (a, b, lao):
        engine.store.close()


def test_a_partner_key_revoked_through_one_process_is_refused_by_the_other() -> None:
    # LAO rotates and then revokes its old key; process A records both. A message
    # signed with the revoked key that reaches process B must be refused.
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    old, new = keys["LAO"], SigningKey.generate("LAO")
    a, b, lao = _kor_processes_and_lao(keys, {old.key_id: old, new.key_id: new})
    pair = Pair(lao=lao, kor=a, keys=keys)
    lao.rotate_signing_key(new, pair.now)
    pair.pump()
    lao.revoke_signing_key(old.key_id, pair.now)
    pair.pump()
    with a.store.transaction() as tx:
        assert old.key_id in tx.revoked_keys()
    # A stolen old key signs LAO's next request; B receives it.
    lao.signing_key = old
    pair.kor = b
    authorisation_id = pair.authorise()
    pair.pump()
    with lao.store.transaction() as tx:
        assert tx.authorisation_party_states("LAO", authorisation_id, 1) == {"KOR": "rejected"}
    with b.store.transaction() as tx:
        assert tx.authorisation_party_states("LAO", authorisation_id, 1) == {}
    for engine in (a, b, lao):
        engine.store.close()


def test_the_test_cluster_is_reachable_only_by_its_user() -> None:
    # The cluster trusts every local connection that reaches its socket: only its
    # own user (and root) may reach it.
    cluster = postgres_cluster()
    for directory in (cluster.root, cluster.socket_dir):
        assert directory.stat().st_mode & 0o777 == 0o700


def test_connections_bound_their_waits_unless_the_url_says_otherwise() -> None:
    defaults = connect_defaults("postgresql://db.example/lao?connect_timeout=3")
    assert "connect_timeout" not in defaults
    assert defaults["keepalives"] == "1"
    assert defaults["tcp_user_timeout"] == "60000"


def test_a_registry_lock_held_too_long_fails_the_transaction_cleanly(url: str) -> None:
    a, b = two_stores(url)
    b._conn.execute("SET lock_timeout = '200ms'")
    with a.transaction() as tx:
        tx.next_counter("x")
        with pytest.raises(LedgerUnavailable, match="registry lock"), b.transaction() as other:
            other.next_counter("x")  # never reached
    with b.transaction() as tx:  # B's connection still works; nothing of B was applied
        assert tx.next_counter("x") == 2
    a.close()
    b.close()
