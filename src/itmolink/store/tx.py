"""Domain operations inside one database transaction.

Written in portable SQL with ``?`` placeholders, shared by SQLite and
PostgreSQL: on PostgreSQL (``paramstyle="format"``, psycopg) each ``?`` becomes
``%s``. Every method runs inside the transaction its :class:`Tx` belongs to and
never commits on its own.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from itmolink.core.adjustments import (
    AdjustmentEntry,
    books_adjustment,
    expected_adjustments,
    oimp_at_issuance,
)
from itmolink.core.blocks import Block
from itmolink.core.journal import (
    GENESIS_HASH,
    AuditEntry,
    JournalEntry,
    audit_hash,
    entry_hash,
)
from itmolink.core.reconcile import (
    Bucket,
    Total,
    TransferFacts,
    blocks_leaf,
    id_hash,
    journal_leaf,
    slices,
)
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.transfer import Role, TransferState
from itmolink.core.units import Purpose, UnitType

_BLOCK_COLUMNS = (
    "originating_registry, serial_start, serial_end, unit_type, vintage, activity_id, "
    "authorisation_id, cooperative_approach_id, first_transferring_party"
)


def _block(row: Sequence[Any]) -> Block:
    return Block(
        originating_registry=row[0],
        serial_start=int(row[1]),
        serial_end=int(row[2]),
        unit_type=UnitType(row[3]),
        vintage=int(row[4]),
        activity_id=row[5],
        authorisation_id=row[6],
        cooperative_approach_id=row[7],
        first_transferring_party=row[8],
    )


def _block_values(block: Block) -> tuple[Any, ...]:
    return (
        block.originating_registry,
        block.serial_start,
        block.serial_end,
        int(block.unit_type),
        block.vintage,
        block.activity_id,
        block.authorisation_id,
        block.cooperative_approach_id,
        block.first_transferring_party,
    )


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    message_id: str
    partner: str
    payload_type: str
    subject_id: str
    envelope: bytes
    state: str
    attempts: int
    next_attempt_at: int


@dataclass(frozen=True, slots=True)
class InboxEntry:
    message_id: str
    payload_digest: bytes
    reply: bytes


@dataclass(frozen=True, slots=True)
class TransferRecord:
    transfer_id: str
    direction: Role
    partner: str
    state: TransferState
    quantity: int
    authorisation_id: str
    first_transfer: bool
    proposal_message_id: str
    proposal_digest: bytes
    acceptance_digest: bytes
    expires_at: int
    rejection_code: int
    rejection_detail: str
    created_at: int
    updated_at: int
    # The batch it was proposed in (docs/PROTOCOL.md §5.15); empty if proposed alone.
    batch_id: str = ""
    # As read: the four slices its sealed leaves add to the reconciliation sums (the
    # row's blocks_h1, blocks_h2, journal_h1, journal_h2), or None if not sealed.
    sealed_sums: tuple[int, int, int, int] | None = None
    # Its proposal asked the receiver to complete on acceptance (one-round transfer).
    complete_on_acceptance: bool = False


@dataclass(frozen=True, slots=True)
class NewTransfer:
    """A transfer to record (:meth:`Tx.transfers_put`)."""

    transfer_id: str
    direction: Role
    partner: str
    state: TransferState
    quantity: int
    authorisation_id: str
    first_transfer: bool
    proposal_message_id: str
    proposal_digest: bytes
    expires_at: int
    acceptance_digest: bytes = b""
    rejection_code: int = 0
    rejection_detail: str = ""
    blocks: Sequence[Block] = ()
    proposed_at: int | None = None
    batch_id: str = ""
    complete_on_acceptance: bool = False


@dataclass(frozen=True, slots=True)
class NewAction:
    """An Article 6 action to record for the AEF (:meth:`Tx.actions_put`)."""

    action_type: str
    block: Block
    at: int
    subtype: str = ""
    transferring_party: str = ""
    acquiring_party: str = ""
    using_party: str = ""
    oimp_purpose: str = ""
    use_year: int | None = None
    transfer_id: str = ""


@dataclass(frozen=True, slots=True)
class HeldBlock:
    block: Block
    account: str
    status: str
    transfer_id: str | None


@dataclass(frozen=True, slots=True)
class AdjustmentRecord:
    entry: AdjustmentEntry
    evidence_message_id: str
    recorded_at: int


_TRANSFER_COLUMNS = (
    "transfer_id, direction, partner, state, quantity, authorisation_id, first_transfer, "
    "proposal_message_id, proposal_digest, acceptance_digest, expires_at, rejection_code, "
    "rejection_detail, created_at, updated_at, batch_id, complete_on_acceptance"
)
# What a transfer's record is read from: its columns, then its sums if sealed.
_TRANSFER_READ = (
    f"{_TRANSFER_COLUMNS}, blocks_h1, blocks_h2, journal_h1, journal_h2, blocks_leaf IS NOT NULL"
)

# A transfer's record (the columns of _TRANSFER_READ) and its blocks in serial order,
# one row per block (one row with no block for a transfer without blocks).
_TRANSFER_READ_WIDTH = len(_TRANSFER_READ.split(","))
_TRANSFER_WITH_BLOCKS = (
    "SELECT "
    + ", ".join("t." + c.strip() for c in _TRANSFER_COLUMNS.split(","))
    + ", t.blocks_h1, t.blocks_h2, t.journal_h1, t.journal_h2, t.blocks_leaf IS NOT NULL, "
    + ", ".join("b." + c.strip() for c in _BLOCK_COLUMNS.split(","))
    + " FROM transfers t LEFT JOIN transfer_blocks b ON b.transfer_id = t.transfer_id "
    "WHERE t.transfer_id = ? ORDER BY b.originating_registry, b.serial_start"
)

# The payload types of a sender's completion (PROTOCOL §5.9, §5.15).
_COMPLETION_TYPES = ("itmolink.v1.TransferCompletion", "itmolink.v1.TransferBatchCompletion")

# What node processes sharing one database cache in memory: a change to any of it
# bumps the counter _SHARED_STATE, and each process reloads when it sees it move.
_SHARED_STATE = "shared_state"
# The reconciliation id of the discrepancies the upgrade to schema version 7 records.
DOUBLE_BOOKING_FOUND_AT = "upgrade-schema-7"
_SHARED_META = frozenset({"signing_key_id", "pending_signing_key"})

_VIEW_COLUMNS = {"blocks": ("blocks_h1", "blocks_h2"), "journal": ("journal_h1", "journal_h2")}
# The running sums of the reconciliation tree (migration 0003) are kept per
# prefix of this many hex digits: buckets above that depth are read from them.
SUMMARY_PREFIX = 3


def _transfer(row: Sequence[Any]) -> TransferRecord:
    return TransferRecord(
        transfer_id=row[0],
        direction=Role(row[1]),
        partner=row[2],
        state=TransferState(row[3]),
        quantity=int(row[4]),
        authorisation_id=row[5],
        first_transfer=bool(row[6]),
        proposal_message_id=row[7],
        proposal_digest=bytes(row[8]),
        acceptance_digest=bytes(row[9]),
        expires_at=int(row[10]),
        rejection_code=int(row[11]),
        rejection_detail=row[12],
        created_at=int(row[13]),
        updated_at=int(row[14]),
        batch_id=row[15] or "",
        complete_on_acceptance=bool(row[16]),
        sealed_sums=(int(row[17]), int(row[18]), int(row[19]), int(row[20])) if row[21] else None,
    )


def _moved_to(
    record: TransferRecord,
    state: TransferState,
    acceptance_digest: bytes,
    rejection_code: int = 0,
    rejection_detail: str = "",
) -> TransferRecord:
    """``record`` in ``state`` (dataclasses.replace, spelt out: it is called for every
    transfer of a batch)."""
    r = record
    return TransferRecord(
        r.transfer_id, r.direction, r.partner, state, r.quantity, r.authorisation_id,
        r.first_transfer, r.proposal_message_id, r.proposal_digest, acceptance_digest,
        r.expires_at, rejection_code, rejection_detail, r.created_at, r.updated_at, r.batch_id,
        r.sealed_sums, r.complete_on_acceptance,
    )  # fmt: skip


class Cursor(Protocol):
    """The part of a DB-API cursor that :class:`Tx` uses (sqlite3 and psycopg)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection with ``execute`` returning a cursor (sqlite3 and psycopg both have it)."""

    def execute(self, sql: Any, params: Any = ...) -> Any: ...


Paramstyle = Literal["qmark", "format"]


_CHUNK = 500  # ids per IN (...) list: within the 999 parameters SQLite before 3.32 allows


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


@functools.lru_cache(maxsize=1024)
def to_format(sql: str) -> str:
    """``?`` placeholders as ``%s`` (psycopg); a literal ``%`` is doubled.

    The queries of this module hold no ``?`` inside string literals.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class TxMemory:
    """What a SQLite transaction remembers of the node_meta, counters and links rows
    it read or wrote, and which of its writes to them wait for the commit.

    Given by a store whose transaction nothing else can write (SQLite: BEGIN
    IMMEDIATE) and shared by the savepoints of a group commit. A row written
    several times in one transaction (the journal's head at every append, the
    transfer counter at every proposal, a link's sequence at every message sent)
    is written to the database once, by
    :meth:`Tx.write_deferred`, which the store calls just before COMMIT.

    It also keeps the latest version of each authorisation read
    (:meth:`Tx.authorisation_latest`) and the acquiring parties' states of each
    version read (:meth:`Tx.authorisation_party_states`), so that the calls of a
    group commit read them once, not once each; a write to the authorisations or
    their parties forgets them all.
    """

    __slots__ = ("authorisations", "dirty", "party_states", "sums", "values")

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Any] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.authorisations: dict[
            tuple[str, str], tuple[AuthorisationTerms, dict[str, Any]] | None
        ] = {}
        self.party_states: dict[tuple[str, str, int], dict[str, str]] = {}
        # What sealed transfers add to the reconciliation's running sums and not
        # written yet (Tx._add_sums), by row of reconcile_buckets ("bucket", partner,
        # prefix) or reconcile_totals ("total", partner, direction, unit type,
        # vintage, authorisation id).
        self.sums: dict[tuple[Any, ...], tuple[int, ...]] = {}

    def mark(self) -> _Mark:
        """The state to return to if a savepoint beginning now is rolled back."""
        return (
            dict(self.values), set(self.dirty), dict(self.authorisations),
            dict(self.party_states), dict(self.sums),
        )  # fmt: skip

    def restore(self, mark: _Mark) -> None:
        self.values.clear()
        self.values.update(mark[0])
        self.dirty.clear()
        self.dirty.update(mark[1])
        self.authorisations.clear()
        self.authorisations.update(mark[2])
        self.party_states.clear()
        self.party_states.update(mark[3])
        self.sums.clear()
        self.sums.update(mark[4])

    def clear(self) -> None:
        self.values.clear()
        self.dirty.clear()
        self.authorisations.clear()
        self.party_states.clear()
        self.sums.clear()


_Mark = tuple[
    dict[tuple[str, str], Any],
    set[tuple[str, str]],
    dict[tuple[str, str], "tuple[AuthorisationTerms, dict[str, Any]] | None"],
    dict[tuple[str, str, int], dict[str, str]],
    dict[tuple[Any, ...], tuple[int, ...]],
]


# The journal id of one of our transfers' first completion (alone, or in its batch;
# parameters: the two payload types): where the sender completed it, and so stated
# its leaves (docs/DESIGN.md decision 55).
_FIRST_COMPLETION = (
    "(SELECT MIN(j.id) FROM outbox f JOIN journal j ON j.direction = 'out' "
    "AND j.partner = f.partner AND j.message_id = f.message_id "
    "WHERE (f.payload_type = ? AND f.subject_id = t.transfer_id) "
    "OR (f.payload_type = ? AND t.batch_id <> '' AND f.subject_id = t.batch_id))"
)


class Tx:
    """Operations inside one open transaction.

    ``paramstyle`` is ``"qmark"`` for sqlite3 and ``"format"`` for psycopg
    (PostgreSQL), which also switches the few statements that differ.
    """

    def __init__(
        self,
        conn: Connection,
        paramstyle: Paramstyle = "qmark",
        *,
        cache: TxMemory | None = None,
    ) -> None:
        self._conn = conn
        self._savepoints = 0
        # The latest version of each authorisation read in this transaction (a
        # transfer's steps look at it several times), shared by a group commit's
        # transactions through ``cache``: forgotten when one is written or a
        # savepoint rolled back.
        self._authorisations: dict[
            tuple[str, str], tuple[AuthorisationTerms, dict[str, Any]] | None
        ] = {} if cache is None else cache.authorisations
        # The same for the acquiring parties' states of each version read.
        self._party_states: dict[tuple[str, str, int], dict[str, str]] = (
            {} if cache is None else cache.party_states
        )
        self.postgres = paramstyle == "format"
        # Rows of node_meta and counters read or written in this database
        # transaction, and the writes to them deferred until its commit
        # (:class:`TxMemory`); None (PostgreSQL, read-only use): every read and
        # write goes to the database at once.
        self._memory = cache

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self.postgres:
            return self._conn.execute(to_format(sql), params)  # type: ignore[no-any-return]
        return self._conn.execute(sql, params)  # type: ignore[no-any-return]

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._exec(sql, params).fetchone()

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement run for each row of parameters (one call into the driver)."""
        if not rows:
            return
        if len(rows) == 1:
            self._exec(sql, rows[0])
        elif self.postgres:
            self._conn.cursor().executemany(to_format(sql), rows)  # type: ignore[attr-defined]
        else:
            self._conn.executemany(sql, rows)  # type: ignore[attr-defined]

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested scope whose writes are undone if it raises."""
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        memory = self._memory
        mark = None if memory is None else memory.mark()
        self._exec(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if memory is not None and mark is not None:
                memory.restore(mark)
            self._forget_authorisations()
            self._exec(f"ROLLBACK TO SAVEPOINT {name}")
            self._exec(f"RELEASE SAVEPOINT {name}")
            raise
        self._exec(f"RELEASE SAVEPOINT {name}")

    def forget(self) -> None:
        """Drop what this transaction remembers of node_meta and counters, and the
        writes to them it deferred (the whole transaction is being rolled back)."""
        if self._memory is not None:
            self._memory.clear()

    def write_deferred(self) -> None:
        """Write the node_meta and counters rows whose writes wait for the commit
        (:class:`TxMemory`), and the reconciliation's running sums: called by the
        store just before COMMIT."""
        memory = self._memory
        if memory is None:
            return
        self._flush_sums()
        if not memory.dirty:
            return
        for kind, key in sorted(memory.dirty):
            value = memory.values[kind, key]
            if kind == "meta":
                self._exec(
                    "INSERT INTO node_meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            elif kind == "link":
                self._exec(
                    "INSERT INTO links (partner, next_out_sequence) VALUES (?, ?) "
                    "ON CONFLICT (partner) DO UPDATE SET "
                    "next_out_sequence = excluded.next_out_sequence",
                    (key, value),
                )
            else:
                self._exec(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        memory.dirty.clear()

    # -- node identity and counters ------------------------------------------------------

    def meta(self) -> dict[str, str]:
        self.write_deferred()
        return {k: v for k, v in self._exec("SELECT key, value FROM node_meta")}

    def meta_get(self, key: str) -> str | None:
        cache = None if self._memory is None else self._memory.values
        if cache is not None and ("meta", key) in cache:
            return cache["meta", key]  # type: ignore[no-any-return]
        row = self._one("SELECT value FROM node_meta WHERE key = ?", (key,))
        value = None if row is None else str(row[0])
        if cache is not None:
            cache["meta", key] = value
        return value

    def set_meta(self, key: str, value: str) -> None:
        if self._memory is not None:
            # Written before the commit (write_deferred), however often set.
            self._memory.values["meta", key] = value
            self._memory.dirty.add(("meta", key))
        else:
            self._exec(
                "INSERT INTO node_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        if key in _SHARED_META:
            self.shared_state_changed()

    def shared_state_changed(self) -> None:
        """Note a change that every node process of this registry must reload
        (signing keys, partner keys, revocations): see :meth:`shared_state`."""
        self.next_counter(_SHARED_STATE)

    def shared_state(self) -> int:
        """A number that changes whenever :meth:`shared_state_changed` was called."""
        value = self._counter(_SHARED_STATE)
        return 0 if value is None else value

    def _counter(self, name: str) -> int | None:
        cache = None if self._memory is None else self._memory.values
        if cache is not None and ("counter", name) in cache:
            return cache["counter", name]  # type: ignore[no-any-return]
        row = self._one("SELECT value FROM counters WHERE name = ?", (name,))
        value = None if row is None else int(row[0])
        if cache is not None:
            cache["counter", name] = value
        return value

    def next_counter(self, name: str, count: int = 1) -> int:
        """Reserve ``count`` values of a counter; returns the first (counters start at 1)."""
        value = self._counter(name)
        first = 1 if value is None else value
        if self._memory is not None:
            # Written before the commit (write_deferred), however often reserved.
            self._memory.values["counter", name] = first + count
            self._memory.dirty.add(("counter", name))
        elif value is None:
            self._exec("INSERT INTO counters (name, value) VALUES (?, ?)", (name, first + count))
        else:
            self._exec("UPDATE counters SET value = ? WHERE name = ?", (first + count, name))
        return first

    def raise_counters(
        self, floor: int, counters: Sequence[str], partners: Sequence[str]
    ) -> list[tuple[str, int, int]]:
        """Raise every counter (those named, and any other this ledger holds) and the next
        outgoing sequence of the link to every partner named (and any other it holds) to
        at least ``floor``, so that nothing handed out from now on is below it. For a
        ledger restored from an older backup (docs/OPERATIONS.md §7). Returns (what,
        before, after) for each one raised, ``before`` 1 if it was never used."""
        self.write_deferred()
        self.forget()
        raised: list[tuple[str, int, int]] = []
        held = {str(r[0]): int(r[1]) for r in self._exec("SELECT name, value FROM counters")}
        for name in sorted((set(counters) | set(held)) - {_SHARED_STATE}):
            before = held.get(name, 1)
            if before >= floor:
                continue
            self._exec(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, floor),
            )
            raised.append((f"counter {name}", before, floor))
        links = {
            str(r[0]): int(r[1]) for r in self._exec("SELECT partner, next_out_sequence FROM links")
        }
        for partner in sorted(set(partners) | set(links)):
            before = links.get(partner, 1)
            if before >= floor:
                continue
            self._exec(
                "INSERT INTO links (partner, next_out_sequence) VALUES (?, ?) "
                "ON CONFLICT (partner) DO UPDATE SET "
                "next_out_sequence = excluded.next_out_sequence",
                (partner, floor),
            )
            raised.append((f"sequence to {partner}", before, floor))
        return raised

    def link_sequence(self, partner: str) -> int:
        """The next outgoing sequence of the link to ``partner``, without taking it."""
        memory = self._memory
        if memory is not None and ("link", partner) in memory.values:
            return int(memory.values["link", partner])
        row = self._one("SELECT next_out_sequence FROM links WHERE partner = ?", (partner,))
        return 1 if row is None else int(row[0])

    def next_sequence(self, partner: str) -> int:
        memory = self._memory
        if memory is not None:
            # Every message sent takes one: remembered, written before the commit.
            if ("link", partner) in memory.values:
                sequence = int(memory.values["link", partner])
            else:
                row = self._one("SELECT next_out_sequence FROM links WHERE partner = ?", (partner,))
                sequence = 1 if row is None else int(row[0])
            memory.values["link", partner] = sequence + 1
            memory.dirty.add(("link", partner))
            return sequence
        row = self._one("SELECT next_out_sequence FROM links WHERE partner = ?", (partner,))
        if row is None:
            self._exec("INSERT INTO links (partner, next_out_sequence) VALUES (?, 2)", (partner,))
            return 1
        self._exec(
            "UPDATE links SET next_out_sequence = next_out_sequence + 1 WHERE partner = ?",
            (partner,),
        )
        return int(row[0])

    # -- journal ----------------------------------------------------------------------

    def journal(
        self,
        *,
        direction: str,
        partner: str,
        message_id: str,
        payload_type: str,
        envelope: bytes,
        now: int,
    ) -> int:
        """Append an envelope to the hash-chained journal; returns its entry id."""
        entry_id = self._journal_append(
            direction, partner, message_id, payload_type, envelope, now, new_only=False
        )
        assert entry_id is not None
        return entry_id

    def journal_new(
        self,
        *,
        direction: str,
        partner: str,
        message_id: str,
        payload_type: str,
        envelope: bytes,
        now: int,
    ) -> int | None:
        """:meth:`journal`, unless the journal already has ``message_id`` in this
        direction from or to ``partner`` (:meth:`journal_has`): then None, and nothing
        is written. One statement: the unique index on the message id answers."""
        return self._journal_append(
            direction, partner, message_id, payload_type, envelope, now, new_only=True
        )

    def _journal_append(
        self,
        direction: str,
        partner: str,
        message_id: str,
        payload_type: str,
        envelope: bytes,
        now: int,
        *,
        new_only: bool,
    ) -> int | None:
        head = self.meta_get("journal_head")
        if head is None:
            entry_id, prev_hash = 1, GENESIS_HASH
        else:
            last_id, last_hash = head.split(":")
            entry_id, prev_hash = int(last_id) + 1, bytes.fromhex(last_hash)
        new_hash = entry_hash(
            prev_hash,
            id=entry_id,
            direction=direction,
            partner=partner,
            message_id=message_id,
            payload_type=payload_type,
            recorded_at=now,
            envelope=envelope,
        )
        cursor = self._exec(
            "INSERT INTO journal (id, direction, partner, message_id, payload_type, envelope, "
            "recorded_at, prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            + (" ON CONFLICT (direction, partner, message_id) DO NOTHING" if new_only else ""),
            (entry_id, direction, partner, message_id, payload_type, envelope, now, prev_hash,
             new_hash),
        )  # fmt: skip
        if new_only and cursor.rowcount == 0:
            return None
        self.set_meta("journal_head", f"{entry_id}:{new_hash.hex()}")
        return entry_id

    def journal_has(self, direction: str, partner: str, message_id: str) -> bool:
        row = self._one(
            "SELECT 1 FROM journal WHERE direction = ? AND partner = ? AND message_id = ?",
            (direction, partner, message_id),
        )
        return row is not None

    def journal_envelope(self, direction: str, partner: str, message_id: str) -> bytes | None:
        """The envelope journaled for a message, byte for byte, or None."""
        row = self._one(
            "SELECT envelope FROM journal WHERE direction = ? AND partner = ? AND message_id = ?",
            (direction, partner, message_id),
        )
        return None if row is None else bytes(row[0])

    def journal_envelope_of(self, entry_id: int) -> bytes | None:
        row = self._one("SELECT envelope FROM journal WHERE id = ?", (entry_id,))
        return None if row is None else bytes(row[0])

    def journal_id_of(self, direction: str, partner: str, message_id: str) -> int | None:
        row = self._one(
            "SELECT id FROM journal WHERE direction = ? AND partner = ? AND message_id = ?",
            (direction, partner, message_id),
        )
        return None if row is None else int(row[0])

    def journal_entries(self) -> Iterator[JournalEntry]:
        rows = self._exec(
            "SELECT id, direction, partner, message_id, payload_type, recorded_at, envelope, "
            "prev_hash, entry_hash FROM journal ORDER BY id"
        )
        for r in rows:
            yield JournalEntry(
                int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), bytes(r[6]), bytes(r[7]),
                bytes(r[8]),
            )  # fmt: skip

    def journal_head(self) -> tuple[int, bytes] | None:
        """(id, hash) of the last journal entry, as recorded when it was appended."""
        return self._head("journal_head")

    # -- inbox and outbox ---------------------------------------------------------------

    def inbox_get(self, partner: str, message_id: str) -> InboxEntry | None:
        row = self._one(
            "SELECT message_id, payload_digest, reply FROM inbox "
            "WHERE partner = ? AND message_id = ?",
            (partner, message_id),
        )
        return None if row is None else InboxEntry(row[0], bytes(row[1]), bytes(row[2]))

    def inbox_sequence_owner(self, partner: str, sequence: int) -> str | None:
        row = self._one(
            "SELECT message_id FROM inbox WHERE partner = ? AND sequence = ?", (partner, sequence)
        )
        return None if row is None else str(row[0])

    def inbox_lookup(
        self, partner: str, message_id: str, sequence: int
    ) -> tuple[InboxEntry | None, str | None]:
        """:meth:`inbox_get` and :meth:`inbox_sequence_owner` in one query: the entry
        of ``message_id``, and the message id that holds ``sequence`` (each None when
        there is none)."""
        seen: InboxEntry | None = None
        owner: str | None = None
        for row in self._exec(
            "SELECT message_id, payload_digest, reply, sequence FROM inbox "
            "WHERE partner = ? AND (message_id = ? OR sequence = ?)",
            (partner, message_id, sequence),
        ):
            if row[0] == message_id:
                seen = InboxEntry(row[0], bytes(row[1]), bytes(row[2]))
            if int(row[3]) == sequence:
                owner = str(row[0])
        return seen, owner

    def inbox_put(
        self,
        *,
        partner: str,
        message_id: str,
        payload_digest: bytes,
        sequence: int,
        reply: bytes,
        journal_id: int,
    ) -> None:
        self._exec(
            "INSERT INTO inbox (partner, message_id, payload_digest, sequence, reply, journal_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (partner, message_id, payload_digest, sequence, reply, journal_id),
        )

    def outbox_put(
        self,
        *,
        message_id: str,
        partner: str,
        payload_type: str,
        subject_id: str,
        envelope: bytes,
        now: int,
        next_attempt_at: int | None = None,
    ) -> None:
        """A request to deliver: due at once, or (claimed for a delivery that starts
        as soon as this commits) at ``next_attempt_at``."""
        self._exec(
            "INSERT INTO outbox (message_id, partner, payload_type, subject_id, envelope, state, "
            "attempts, next_attempt_at, last_error, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, '', ?)",
            (message_id, partner, payload_type, subject_id, envelope,
             now if next_attempt_at is None else next_attempt_at, now),
        )  # fmt: skip

    def outbox_due(
        self, now: int, limit: int, *, lease_until: int | None = None
    ) -> list[OutboxMessage]:
        """Messages due for delivery; with ``lease_until``, each is claimed until then
        (its next attempt waits for the answer or the lease to run out)."""
        # On PostgreSQL several node processes claim from one outbox: FOR UPDATE SKIP
        # LOCKED hands each due message to one claimer only (one that another is
        # claiming right now is skipped, not waited for); the lease then keeps it.
        claim = " FOR UPDATE SKIP LOCKED" if self.postgres and lease_until is not None else ""
        rows = self._exec(
            "SELECT message_id, partner, payload_type, subject_id, envelope, state, attempts, "
            "next_attempt_at FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at, created_at LIMIT ?" + claim,
            (now, limit),
        ).fetchall()
        if lease_until is not None:
            for r in rows:
                self._exec(
                    "UPDATE outbox SET next_attempt_at = ? WHERE message_id = ?",
                    (lease_until, r[0]),
                )
        return [OutboxMessage(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7]) for r in rows]

    def outbox_next_due(self) -> int | None:
        row = self._one("SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'")
        return None if row is None or row[0] is None else int(row[0])

    def outbox_get(self, message_id: str) -> OutboxMessage | None:
        row = self._one(
            "SELECT message_id, partner, payload_type, subject_id, envelope, state, attempts, "
            "next_attempt_at FROM outbox WHERE message_id = ?",
            (message_id,),
        )
        if row is None:
            return None
        return OutboxMessage(row[0], row[1], row[2], row[3], bytes(row[4]), *row[5:])

    def outbox_put_answered(
        self,
        *,
        message_id: str,
        partner: str,
        payload_type: str,
        subject_id: str,
        envelope: bytes,
        answered_journal_id: int | None,
        now: int,
    ) -> None:
        """A request of ours delivered and answered before this ledger knew it (a
        transfer recovered from the partner's records, PROTOCOL §7.9); the answer's
        journal entry if this ledger has it."""
        self._exec(
            "INSERT INTO outbox (message_id, partner, payload_type, subject_id, envelope, state, "
            "attempts, next_attempt_at, last_error, created_at, answered_journal_id) "
            "VALUES (?, ?, ?, ?, ?, 'answered', 1, ?, '', ?, ?)",
            (message_id, partner, payload_type, subject_id, envelope, now, now,
             answered_journal_id),
        )  # fmt: skip

    def completions_put(self, completed: Sequence[tuple[str, int]]) -> None:
        """Record the journal entry of the completion each incoming transfer completed
        on: (transfer id, journal id)."""
        self._many(
            "INSERT INTO transfer_completions (transfer_id, journal_id) VALUES (?, ?)", completed
        )

    def completion_of(self, transfer_id: str) -> bytes | None:
        """The completion envelope an incoming transfer completed on, if known: from
        transfer_completions, or (a transfer completed before schema version 10) the
        completion an adjustment of it cites."""
        row = self._one(
            "SELECT j.envelope FROM transfer_completions c JOIN journal j ON j.id = c.journal_id "
            "WHERE c.transfer_id = ?",
            (transfer_id,),
        )
        if row is None:
            row = self._one(
                "SELECT j.envelope FROM adjustments a "
                "JOIN journal j ON j.id = a.evidence_journal_id "
                "WHERE a.transfer_id = ? AND j.direction = 'in' AND j.payload_type IN (?, ?) "
                "LIMIT 1",
                (transfer_id, *_COMPLETION_TYPES),
            )
        return None if row is None else bytes(row[0])

    def outbox_answer_of(self, message_id: str) -> int | None:
        """The journal entry of the reply that answered a request of ours, if any."""
        row = self._one(
            "SELECT answered_journal_id FROM outbox WHERE message_id = ?", (message_id,)
        )
        return None if row is None or row[0] is None else int(row[0])

    def outbox_retry_later(self, message_id: str, *, next_attempt_at: int, error: str) -> None:
        self._exec(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
            "WHERE message_id = ? AND state = 'pending'",
            (next_attempt_at, error[:500], message_id),
        )

    def outbox_answered(self, message_id: str, journal_id: int) -> None:
        self._exec(
            "UPDATE outbox SET state = 'answered', answered_journal_id = ?, "
            "attempts = attempts + 1 WHERE message_id = ?",
            (journal_id, message_id),
        )

    def outbox_cancel(self, *, payload_type: str, subject_id: str) -> None:
        self._exec(
            "UPDATE outbox SET state = 'cancelled' "
            "WHERE payload_type = ? AND subject_id = ? AND state = 'pending'",
            (payload_type, subject_id),
        )

    def outbox_answers_of(
        self, *, payload_type: str, subject_id: str
    ) -> list[tuple[str, str, str | None]]:
        """(partner, state, payload type of the answer or None) of each request of a
        type about a subject."""
        rows = self._exec(
            "SELECT o.partner, o.state, j.payload_type FROM outbox o "
            "LEFT JOIN journal j ON j.id = o.answered_journal_id "
            "WHERE o.payload_type = ? AND o.subject_id = ? ORDER BY o.partner, o.created_at",
            (payload_type, subject_id),
        )
        return [(str(p), str(state), None if t is None else str(t)) for p, state, t in rows]

    def outbox_requests_of(
        self, *, payload_type: str, subject_id: str
    ) -> list[tuple[str, str, str | None, bytes]]:
        """(partner, state, payload type of the answer or None, sealed envelope) of
        each request of a type about a subject."""
        rows = self._exec(
            "SELECT o.partner, o.state, j.payload_type, o.envelope FROM outbox o "
            "LEFT JOIN journal j ON j.id = o.answered_journal_id "
            "WHERE o.payload_type = ? AND o.subject_id = ? ORDER BY o.partner, o.created_at",
            (payload_type, subject_id),
        )
        return [
            (str(p), str(state), None if t is None else str(t), bytes(env))
            for p, state, t, env in rows
        ]

    def outbox_deliveries_of(
        self, *, payload_type: str
    ) -> list[tuple[str, str, str, bytes, int | None, bytes | None]]:
        """(subject, partner, state, sealed envelope, when its answer was recorded or
        None, the answer's sealed envelope or None) of each request of a type."""
        rows = self._exec(
            "SELECT o.subject_id, o.partner, o.state, o.envelope, j.recorded_at, j.envelope "
            "FROM outbox o LEFT JOIN journal j ON j.id = o.answered_journal_id "
            "WHERE o.payload_type = ? ORDER BY o.created_at",
            (payload_type,),
        )
        return [
            (
                str(subject), str(p), str(state), bytes(env), None if at is None else int(at),
                None if answer is None else bytes(answer),
            )
            for subject, p, state, env, at, answer in rows
        ]  # fmt: skip

    def outbox_last_created(self, *, payload_type: str, subject_id: str) -> tuple[str, int] | None:
        """(state, created_at) of the newest outbox message of a type about a subject."""
        row = self._one(
            "SELECT state, created_at FROM outbox WHERE payload_type = ? AND subject_id = ? "
            "ORDER BY created_at DESC LIMIT 1",
            (payload_type, subject_id),
        )
        return None if row is None else (str(row[0]), int(row[1]))

    def outbox_pending_of(self, *, payload_type: str, subject_id: str) -> int:
        row = self._one(
            "SELECT COUNT(*) FROM outbox WHERE payload_type = ? AND subject_id = ? "
            "AND state = 'pending'",
            (payload_type, subject_id),
        )
        return int(row[0])

    def outbox_count_of(self, *, payload_type: str, subject_id: str) -> int:
        """How many requests of this type about this subject were ever put in the outbox."""
        row = self._one(
            "SELECT COUNT(*) FROM outbox WHERE payload_type = ? AND subject_id = ?",
            (payload_type, subject_id),
        )
        return int(row[0])

    def outbox_pending_envelopes(self) -> Iterator[bytes]:
        """The sealed envelopes of every undelivered message."""
        for (raw,) in self._exec("SELECT envelope FROM outbox WHERE state = 'pending'"):
            yield bytes(raw)

    def outbox_last_envelope(self, *, payload_type: str, subject_id: str) -> bytes | None:
        row = self._one(
            "SELECT envelope FROM outbox WHERE payload_type = ? AND subject_id = ? "
            "ORDER BY created_at DESC LIMIT 1",
            (payload_type, subject_id),
        )
        return None if row is None else bytes(row[0])

    def outbox_pending_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")[0])

    # -- the order of a statement and the completions to the same partner ----------------
    # (docs/DESIGN.md decision 55). Read only while an amendment is undelivered: never on
    # the path of a transfer otherwise.

    def outbox_pending_of_type(
        self, payload_type: str, partner: str | None = None
    ) -> list[tuple[str, str, str, int]]:
        """(message id, partner, subject, journal id) of each undelivered request of a
        type (to one partner, or to any), in the order they were made."""
        where = "" if partner is None else " AND o.partner = ?"
        rows = self._exec(
            "SELECT o.message_id, o.partner, o.subject_id, j.id FROM outbox o "
            "JOIN journal j ON j.direction = 'out' AND j.partner = o.partner "
            "AND j.message_id = o.message_id "
            f"WHERE o.state = 'pending' AND o.payload_type = ?{where} ORDER BY j.id",
            (payload_type,) if partner is None else (payload_type, partner),
        )
        return [(str(m), str(p), str(s), int(j)) for m, p, s, j in rows]

    def outbox_pending_completions_under(
        self, partner: str, authorisation_id: str, *, single: str, batch: str
    ) -> list[tuple[str, int]]:
        """(transfer id, journal id of its first completion) of each of our transfers
        to ``partner`` under an authorisation, completed here, whose completion is
        undelivered, alone (payload type ``single``, subject the transfer) or in its
        batch (``batch``, subject the batch)."""
        first = _FIRST_COMPLETION
        completed = int(TransferState.COMPLETED)
        rows = self._exec(
            f"SELECT t.transfer_id, {first} FROM outbox o "
            "JOIN transfers t ON t.transfer_id = o.subject_id "
            "WHERE o.state = 'pending' AND o.payload_type = ? AND o.partner = ? "
            "AND t.direction = 'out' AND t.authorisation_id = ? AND t.state = ? "
            f"UNION SELECT t.transfer_id, {first} FROM outbox o "
            "JOIN transfers t ON t.batch_id = o.subject_id AND t.batch_id <> '' "
            "WHERE o.state = 'pending' AND o.payload_type = ? AND o.partner = ? "
            "AND t.direction = 'out' AND t.authorisation_id = ? AND t.state = ?",
            (single, batch, single, partner, authorisation_id, completed,
             single, batch, batch, partner, authorisation_id, completed),
        ).fetchall()  # fmt: skip
        return sorted((str(t), int(j)) for t, j in rows if j is not None)

    def completion_transfers(
        self, payload_type: str, subject_id: str, *, single: str, batch: str
    ) -> list[tuple[str, str, int]]:
        """(transfer id, authorisation id, journal id of its first completion) of each
        of our transfers a completion (``single``: of a transfer; ``batch``: of a batch)
        completes."""
        first = _FIRST_COMPLETION
        column = "batch_id" if payload_type == batch else "transfer_id"
        rows = self._exec(
            f"SELECT t.transfer_id, t.authorisation_id, {first} FROM transfers t "
            f"WHERE t.{column} = ? AND t.direction = 'out' AND t.state = ?",
            (single, batch, subject_id, int(TransferState.COMPLETED)),
        ).fetchall()
        return sorted((str(t), str(a), int(j)) for t, a, j in rows if j is not None)

    def outbox_hold(self, message_id: str, *, until: int, note: str) -> bool:
        """Keep an undelivered request back until ``until`` without counting an attempt,
        noting why in its ``last_error``; True if it was not held for that reason yet."""
        row = self._one(
            "SELECT last_error FROM outbox WHERE message_id = ? AND state = 'pending'",
            (message_id,),
        )
        if row is None:
            return False
        self._exec(
            "UPDATE outbox SET next_attempt_at = ?, last_error = ? WHERE message_id = ?",
            (until, note[:500], message_id),
        )
        return str(row[0]) != note[:500]

    def outbox_release_held(
        self, partner: str, now: int, *, note_prefix: str, held_until_at_most: int
    ) -> None:
        """Make due now the undelivered requests to a partner that :meth:`outbox_hold`
        held back with a note beginning ``note_prefix``, until no later than
        ``held_until_at_most``. A request claimed since (its lease runs further, and its
        note is still the hold's) is in flight: its lease stands."""
        self._exec(
            "UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending' AND partner = ? "
            "AND next_attempt_at > ? AND next_attempt_at <= ? AND last_error LIKE ?",
            (now, partner, now, held_until_at_most, note_prefix + "%"),
        )

    def transfers_one_round_in_flight(self, authorisation_id: str) -> list[str]:
        """Our one-round transfers under an authorisation not yet answered (PROPOSED)."""
        rows = self._exec(
            "SELECT transfer_id FROM transfers WHERE direction = 'out' AND state = ? "
            "AND complete_on_acceptance <> 0 AND authorisation_id = ? ORDER BY transfer_id",
            (int(TransferState.PROPOSED), authorisation_id),
        )
        return [str(r[0]) for r in rows]

    # -- metrics (read at scrape time) --------------------------------------------------

    def metrics_transfer_counts(self) -> list[tuple[str, str, int, int]]:
        """(direction, partner, state, count) over every transfer."""
        rows = self._exec(
            "SELECT direction, partner, state, COUNT(*) FROM transfers "
            "GROUP BY direction, partner, state ORDER BY direction, partner, state"
        ).fetchall()
        return [(str(d), str(p), int(s), int(c)) for d, p, s, c in rows]

    def metrics_transfer_durations(
        self, bounds_us: Sequence[int]
    ) -> list[tuple[str, list[int], int, int]]:
        """Per direction, how long finished transfers took (updated_at - created_at):
        (direction, cumulative count at or under each bound, count, sum in µs)."""
        final = ", ".join(str(int(s)) for s in TransferState if s.is_final)
        buckets = "".join(
            f", SUM(CASE WHEN updated_at - created_at <= {int(b)} THEN 1 ELSE 0 END)"
            for b in bounds_us
        )
        rows = self._exec(
            f"SELECT direction, COUNT(*), SUM(updated_at - created_at){buckets} FROM transfers "
            f"WHERE state IN ({final}) GROUP BY direction ORDER BY direction"
        ).fetchall()
        return [
            (str(row[0]), [int(c or 0) for c in row[3:]], int(row[1]), int(row[2] or 0))
            for row in rows
        ]

    def metrics_outbox(self) -> list[tuple[str, int, int]]:
        """(partner, pending messages, oldest created_at in µs) for the outbox."""
        rows = self._exec(
            "SELECT partner, COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending' "
            "GROUP BY partner ORDER BY partner"
        ).fetchall()
        return [(str(p), int(c), int(m)) for p, c, m in rows]

    # -- authorisations -----------------------------------------------------------------

    def authorisation_put(
        self,
        terms: AuthorisationTerms,
        *,
        activity_name: str,
        activity_description: str,
        oimp_detail: str,
        first_transfer_definition: int,
        now: int,
        buyer_share_bp: int = 0,
        voluntary_omge_bp: int = 0,
        revoked: bool = False,
        statement_journal_id: int | None = None,
    ) -> None:
        self._forget_authorisations()
        self._exec(
            "INSERT INTO authorisations (host_party, authorisation_id, version, activity_id, "
            "activity_name, activity_description, cooperative_approach_id, acquiring_parties, "
            "purposes, oimp_detail, first_transfer_definition, vintage_from, vintage_to, "
            "quantity_cap, unit_type, created_at, buyer_share_bp, voluntary_omge_bp, revoked, "
            "statement_journal_id) "
            f"VALUES ({', '.join('?' * 20)})",
            (
                terms.host_party,
                terms.authorisation_id,
                terms.version,
                terms.activity_id,
                activity_name,
                activity_description,
                terms.cooperative_approach_id,
                ",".join(sorted(terms.acquiring_parties)),
                ",".join(str(int(p)) for p in sorted(terms.purposes)),
                oimp_detail,
                first_transfer_definition,
                terms.vintage_from,
                terms.vintage_to,
                terms.quantity_cap,
                int(terms.unit_type),
                now,
                buyer_share_bp,
                voluntary_omge_bp,
                int(revoked),
                statement_journal_id,
            ),
        )

    _AUTHORISATION_COLUMNS = (
        "host_party, authorisation_id, version, activity_id, cooperative_approach_id, "
        "acquiring_parties, purposes, vintage_from, vintage_to, quantity_cap, unit_type"
    )
    _AUTHORISATION_DETAILS = (
        "oimp_detail", "first_transfer_definition", "buyer_share_bp", "voluntary_omge_bp",
        "activity_name", "created_at", "revoked", "activity_description",
    )  # fmt: skip

    @staticmethod
    def _terms(row: Sequence[Any]) -> AuthorisationTerms:
        return AuthorisationTerms(
            host_party=row[0],
            authorisation_id=row[1],
            version=int(row[2]),
            activity_id=row[3],
            cooperative_approach_id=row[4],
            acquiring_parties=frozenset(p for p in row[5].split(",") if p),
            purposes=frozenset(Purpose(int(p)) for p in row[6].split(",") if p),
            vintage_from=int(row[7]),
            vintage_to=int(row[8]),
            quantity_cap=int(row[9]),
            unit_type=UnitType(row[10]),
        )

    def authorisation_get(
        self, host_party: str, authorisation_id: str
    ) -> AuthorisationTerms | None:
        """The latest version of an authorisation."""
        latest = self.authorisation_latest(host_party, authorisation_id)
        return None if latest is None else latest[0]

    def authorisation_latest(
        self, host_party: str, authorisation_id: str
    ) -> tuple[AuthorisationTerms, dict[str, Any]] | None:
        """The latest version of an authorisation with its details, in one query
        (:meth:`authorisation_get` and :meth:`authorisation_details` together), read
        once per transaction."""
        key = (host_party, authorisation_id)
        if key in self._authorisations:
            found = self._authorisations[key]
            return None if found is None else (found[0], dict(found[1]))
        details = ", ".join(self._AUTHORISATION_DETAILS)
        row = self._one(
            f"SELECT {self._AUTHORISATION_COLUMNS}, {details} "
            "FROM authorisations WHERE host_party = ? AND authorisation_id = ? "
            "ORDER BY version DESC LIMIT 1",
            (host_party, authorisation_id),
        )
        if row is None:
            self._authorisations[key] = None
            return None
        terms = self._terms(row)
        values = dict(zip(self._AUTHORISATION_DETAILS, row[11:], strict=True))
        self._authorisations[key] = (terms, values)
        return terms, dict(values)

    def authorisation_versions(
        self, host_party: str, authorisation_id: str
    ) -> list[tuple[AuthorisationTerms, dict[str, Any]]]:
        """Every version of an authorisation, oldest first, each with its details."""
        details = ", ".join(self._AUTHORISATION_DETAILS)
        rows = self._exec(
            f"SELECT {self._AUTHORISATION_COLUMNS}, {details} "
            "FROM authorisations WHERE host_party = ? AND authorisation_id = ? ORDER BY version",
            (host_party, authorisation_id),
        ).fetchall()
        return [
            (self._terms(row), dict(zip(self._AUTHORISATION_DETAILS, row[11:], strict=True)))
            for row in rows
        ]

    def authorisation_details(self, host_party: str, authorisation_id: str) -> dict[str, Any]:
        """The parts of the latest version that AuthorisationTerms leaves out."""
        latest = self.authorisation_latest(host_party, authorisation_id)
        return {} if latest is None else latest[1]

    def authorisation_evidence(self, host_party: str, authorisation_id: str) -> bytes | None:
        """The host's signed statement of the latest version, as received here."""
        row = self._one(
            "SELECT j.envelope FROM authorisations a "
            "JOIN journal j ON j.id = a.statement_journal_id WHERE a.host_party = ? "
            "AND a.authorisation_id = ? AND a.revoked = 0 ORDER BY a.version DESC LIMIT 1",
            (host_party, authorisation_id),
        )
        return None if row is None else bytes(row[0])

    def issued_by_vintage(self, host_party: str, authorisation_id: str) -> dict[int, int]:
        rows = self._exec(
            "SELECT vintage, SUM(quantity) FROM issuances WHERE host_party = ? "
            "AND authorisation_id = ? GROUP BY vintage",
            (host_party, authorisation_id),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    def parties_that_received(self, authorisation_id: str) -> set[str]:
        """Partners to which units of an authorisation were transferred."""
        rows = self._exec(
            "SELECT DISTINCT partner FROM transfers WHERE direction = 'out' "
            "AND authorisation_id = ? AND state = ?",
            (authorisation_id, int(TransferState.COMPLETED)),
        )
        return {r[0] for r in rows}

    def transferred_block_containing(self, block: Block) -> Block | None:
        """The block this registry transferred out (completed) that contains ``block``."""
        row = self._one(
            f"SELECT {', '.join('b.' + c.strip() for c in _BLOCK_COLUMNS.split(','))} "
            "FROM transfer_blocks b JOIN transfers t ON t.transfer_id = b.transfer_id "
            "WHERE t.direction = 'out' AND t.state = ? AND b.originating_registry = ? "
            "AND b.serial_start <= ? AND b.serial_end >= ? LIMIT 1",
            (int(TransferState.COMPLETED), block.originating_registry, block.serial_start,
             block.serial_end),
        )  # fmt: skip
        return None if row is None else _block(row)

    def serials_first_transferred(self, block: Block) -> bool:
        """Whether any serial of ``block`` was first transferred other than by an
        international transfer (recorded as a first-transfer action without one)."""
        row = self._one(
            "SELECT 1 FROM actions WHERE action_type = 'first-transfer' AND transfer_id = '' "
            "AND originating_registry = ? AND serial_start <= ? AND serial_end >= ? LIMIT 1",
            (block.originating_registry, block.serial_end, block.serial_start),
        )
        return row is not None

    def acquired_with_adjustment(self, block: Block) -> bool:
        """Whether the latest completed transfer that brought serials of ``block`` to
        this registry carried an adjustment booked here (a −CA: the units may count
        toward its NDC)."""
        row = self._one(
            "SELECT t.transfer_id FROM transfer_blocks b "
            "JOIN transfers t ON t.transfer_id = b.transfer_id "
            "WHERE t.direction = 'in' AND t.state = ? AND b.originating_registry = ? "
            "AND b.serial_start <= ? AND b.serial_end >= ? "
            "ORDER BY t.updated_at DESC, t.transfer_id DESC LIMIT 1",
            (int(TransferState.COMPLETED), block.originating_registry, block.serial_end,
             block.serial_start),
        )  # fmt: skip
        if row is None:
            return False
        booked = self._one(
            "SELECT 1 FROM adjustments WHERE transfer_id = ? AND amount < 0 LIMIT 1", (row[0],)
        )
        return booked is not None

    def has_received(self, authorisation_id: str) -> bool:
        """Whether units of an authorisation were ever transferred to this registry."""
        row = self._one(
            "SELECT 1 FROM transfers WHERE direction = 'in' AND authorisation_id = ? "
            "AND state = ? LIMIT 1",
            (authorisation_id, int(TransferState.COMPLETED)),
        )
        return row is not None

    def blocks_of_authorisation(self, authorisation_id: str) -> list[HeldBlock]:
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS}, account, status, transfer_id FROM blocks "
            "WHERE authorisation_id = ? ORDER BY originating_registry, serial_start",
            (authorisation_id,),
        )
        return [HeldBlock(_block(r), r[9], r[10], r[11]) for r in rows]

    def transferred_blocks_of_authorisation(self, authorisation_id: str) -> list[Block]:
        rows = self._exec(
            f"SELECT {', '.join('b.' + c.strip() for c in _BLOCK_COLUMNS.split(','))} "
            "FROM transfer_blocks b JOIN transfers t ON t.transfer_id = b.transfer_id "
            "WHERE t.direction = 'out' AND t.state = ? AND b.authorisation_id = ?",
            (int(TransferState.COMPLETED), authorisation_id),
        )
        return [_block(r) for r in rows]

    def authorisations(self) -> list[AuthorisationTerms]:
        rows = self._exec(
            "SELECT DISTINCT host_party, authorisation_id FROM authorisations "
            "ORDER BY host_party, authorisation_id"
        ).fetchall()
        found = [self.authorisation_get(r[0], r[1]) for r in rows]
        return [terms for terms in found if terms is not None]

    def authorisation_party_put(
        self, terms: AuthorisationTerms, party: str, state: str, evidence_journal_id: int | None
    ) -> None:
        self._forget_authorisations()
        self._exec(
            "INSERT INTO authorisation_parties (host_party, authorisation_id, version, party, "
            "state, rejection_code, evidence_journal_id) VALUES (?, ?, ?, ?, ?, 0, ?)",
            (
                terms.host_party,
                terms.authorisation_id,
                terms.version,
                party,
                state,
                evidence_journal_id,
            ),
        )

    def authorisation_party_set(
        self,
        *,
        host_party: str,
        authorisation_id: str,
        version: int,
        party: str,
        state: str,
        rejection_code: int,
        evidence_journal_id: int,
        reference: str = "",
    ) -> None:
        self._forget_authorisations()
        self._exec(
            "UPDATE authorisation_parties SET state = ?, rejection_code = ?, "
            "evidence_journal_id = ?, reference = ? WHERE host_party = ? AND authorisation_id = ? "
            "AND version = ? AND party = ?",
            (
                state,
                rejection_code,
                evidence_journal_id,
                reference,
                host_party,
                authorisation_id,
                version,
                party,
            ),
        )

    def authorisation_party_states(
        self, host_party: str, authorisation_id: str, version: int
    ) -> dict[str, str]:
        """Each acquiring party's state of this version (read once per transaction,
        as :meth:`authorisation_latest`; a copy the caller may change)."""
        key = (host_party, authorisation_id, version)
        states = self._party_states.get(key)
        if states is None:
            rows = self._exec(
                "SELECT party, state FROM authorisation_parties WHERE host_party = ? "
                "AND authorisation_id = ? AND version = ?",
                key,
            )
            states = self._party_states[key] = {r[0]: r[1] for r in rows}
        return dict(states)

    def _forget_authorisations(self) -> None:
        """Forget the authorisations and party states read (one was written, or a
        savepoint rolled back)."""
        self._authorisations.clear()
        self._party_states.clear()

    # -- accounts, issuance and holdings ------------------------------------------------

    def account_put(self, account_id: str, kind: str, now: int) -> None:
        self._exec(
            "INSERT INTO accounts (account_id, kind, created_at) VALUES (?, ?, ?)",
            (account_id, kind, now),
        )

    def account_ensure(self, account_id: str, kind: str, now: int) -> None:
        self._exec(
            "INSERT INTO accounts (account_id, kind, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (account_id) DO NOTHING",
            (account_id, kind, now),
        )

    def blocks_move(self, blocks: Iterable[Block], *, account: str) -> None:
        """Move held blocks to another account of this registry."""
        for block in blocks:
            cursor = self._exec(
                "UPDATE blocks SET account = ? WHERE originating_registry = ? AND serial_start = ? "
                "AND serial_end = ? AND status = 'held'",
                (account, block.originating_registry, block.serial_start, block.serial_end),
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"block {block.label()} is not held and cannot be moved")

    def action_put(
        self,
        *,
        action_type: str,
        block: Block,
        at: int,
        subtype: str = "",
        transferring_party: str = "",
        acquiring_party: str = "",
        using_party: str = "",
        oimp_purpose: str = "",
        use_year: int | None = None,
        transfer_id: str = "",
    ) -> None:
        self.actions_put([
            NewAction(
                action_type=action_type, block=block, at=at, subtype=subtype,
                transferring_party=transferring_party, acquiring_party=acquiring_party,
                using_party=using_party, oimp_purpose=oimp_purpose, use_year=use_year,
                transfer_id=transfer_id,
            )
        ])  # fmt: skip

    def actions_put(self, actions: Sequence[NewAction]) -> None:
        self._many(
            f"INSERT INTO actions (action_type, subtype, at, {_BLOCK_COLUMNS}, transferring_party, "
            "acquiring_party, using_party, oimp_purpose, use_year, transfer_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (a.action_type, a.subtype, a.at, *_block_values(a.block), a.transferring_party,
                 a.acquiring_party, a.using_party, a.oimp_purpose, a.use_year, a.transfer_id)
                for a in actions
            ],
        )  # fmt: skip

    def actions(self) -> list[dict[str, Any]]:
        rows = self._exec(
            f"SELECT action_type, subtype, at, {_BLOCK_COLUMNS}, transferring_party, "
            "acquiring_party, using_party, oimp_purpose, use_year, transfer_id "
            "FROM actions ORDER BY id"
        )
        names = ("action_type", "subtype", "at")
        tail = ("transferring_party", "acquiring_party", "using_party", "oimp_purpose",
                "use_year", "transfer_id")  # fmt: skip
        return [
            {**dict(zip(names, r[:3], strict=True)), "block": _block(r[3:12]),
             **dict(zip(tail, r[12:], strict=True))}
            for r in rows
        ]  # fmt: skip

    def snapshot_take(self, year: int, now: int) -> bool:
        """Freeze this registry's holdings as its holdings of 31 December ``year``.

        Returns False, changing nothing, when that year's snapshot was taken before.
        """
        if self._one("SELECT 1 FROM snapshot_years WHERE year = ?", (year,)) is not None:
            return False
        self._exec("INSERT INTO snapshot_years (year, taken_at) VALUES (?, ?)", (year, now))
        self._exec(
            f"INSERT INTO holdings_snapshots (year, taken_at, account, {_BLOCK_COLUMNS}) "
            f"SELECT ?, ?, account, {_BLOCK_COLUMNS} FROM blocks",
            (year, now),
        )
        return True

    def snapshot(self, year: int) -> tuple[int, list[tuple[str, Block]]] | None:
        """(taken_at, [(account, block)]) of a year's frozen holdings, if taken."""
        row = self._one("SELECT taken_at FROM snapshot_years WHERE year = ?", (year,))
        if row is None:
            return None
        rows = self._exec(
            f"SELECT account, {_BLOCK_COLUMNS} FROM holdings_snapshots WHERE year = ? "
            "ORDER BY originating_registry, serial_start",
            (year,),
        )
        return int(row[0]), [(r[0], _block(r[1:])) for r in rows]

    def accounts(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._exec("SELECT account_id, kind FROM accounts")}

    def issuance_put(
        self,
        *,
        host_party: str,
        issuance_id: str,
        authorisation_id: str,
        vintage: int,
        blocks: Sequence[Block],
        now: int,
    ) -> None:
        for block in blocks:
            self._exec(
                "INSERT INTO issuances (host_party, issuance_id, authorisation_id, vintage, "
                "quantity, originating_registry, serial_start, serial_end, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    host_party,
                    issuance_id,
                    authorisation_id,
                    vintage,
                    block.quantity,
                    block.originating_registry,
                    block.serial_start,
                    block.serial_end,
                    now,
                ),
            )

    def issuance_exists(self, host_party: str, issuance_id: str) -> bool:
        row = self._one(
            "SELECT 1 FROM issuances WHERE host_party = ? AND issuance_id = ?",
            (host_party, issuance_id),
        )
        return row is not None

    def issued_total(self, host_party: str, authorisation_id: str) -> int:
        row = self._one(
            "SELECT COALESCE(SUM(quantity), 0) FROM issuances "
            "WHERE host_party = ? AND authorisation_id = ?",
            (host_party, authorisation_id),
        )
        return int(row[0])

    def blocks_insert(self, blocks: Iterable[Block], *, account: str) -> None:
        self._many(
            f"INSERT INTO blocks ({_BLOCK_COLUMNS}, account, status, transfer_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'held', NULL)",
            [(*_block_values(block), account) for block in blocks],
        )

    def blocks_held(self, *, account: str, authorisation_id: str, vintage: int) -> list[Block]:
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE account = ? AND status = 'held' "
            "AND authorisation_id = ? AND vintage = ? ORDER BY originating_registry, serial_start",
            (account, authorisation_id, vintage),
        )
        return [_block(r) for r in rows]

    def blocks_overlapping_each(self, blocks: Sequence[Block]) -> list[list[Block]]:
        """For each of ``blocks``, the blocks held here (in any account, held, reserved
        or frozen) that share a serial with it: :meth:`blocks_overlapping` without the
        expected ones, for many blocks in one query per 240 of them (4 parameters each:
        within the 999 that SQLite before 3.32 allows)."""
        found: list[list[Block]] = [[] for _ in blocks]
        columns = ", ".join("b." + c.strip() for c in _BLOCK_COLUMNS.split(","))
        for first in range(0, len(blocks), 240):
            chunk = blocks[first : first + 240]
            values = ", ".join("(?, ?, ?, ?)" for _ in chunk)
            params: list[Any] = []
            for i, block in enumerate(chunk, start=first):
                params += [i, block.originating_registry, block.serial_start, block.serial_end]
            # As blocks_overlapping: the blocks starting inside each range, and the one
            # starting last before it (held blocks never overlap one another).
            rows = self._exec(
                f"WITH q (i, reg, s, e) AS (VALUES {values}) "
                f"SELECT q.i, {columns} FROM q JOIN blocks b ON b.originating_registry = q.reg "
                "AND b.serial_start >= q.s AND b.serial_start <= q.e "
                f"UNION ALL SELECT q.i, {columns} FROM q JOIN blocks b "
                "ON b.originating_registry = q.reg AND b.serial_start = (SELECT "
                "MAX(x.serial_start) FROM blocks x WHERE x.originating_registry = q.reg "
                "AND x.serial_start < q.s) AND b.serial_end >= q.s",
                params,
            )
            for row in rows:
                found[int(row[0])].append(_block(row[1:]))
        return found

    def blocks_expected(self, *, within: dict[str, tuple[int, int]] | None = None) -> list[Block]:
        """The blocks of the transfers accepted here and not yet completed (expected);
        with ``within`` (registry -> first and last serial), only those that share a
        serial with that range of that registry."""
        columns = ", ".join("b." + c.strip() for c in _BLOCK_COLUMNS.split(","))
        query = (
            f"SELECT {columns} FROM transfers t CROSS JOIN transfer_blocks b "
            "WHERE b.transfer_id = t.transfer_id AND t.direction = 'in' AND t.state = ?"
        )
        if within is None:
            return [_block(r) for r in self._exec(query, (int(TransferState.ACCEPTED),))]
        found: list[Block] = []
        for registry, (first, last) in sorted(within.items()):
            rows = self._exec(
                query + " AND b.originating_registry = ? AND b.serial_start <= ? "
                "AND b.serial_end >= ?",
                (int(TransferState.ACCEPTED), registry, last, first),
            )
            found += [_block(r) for r in rows]
        return found

    def blocks_overlapping(self, block: Block, *, expected: bool = True) -> list[Block]:
        """Blocks held here, or moving in or out, that share a serial with ``block``;
        with ``expected`` False, not those of transfers accepted here (the caller
        checks them against :meth:`blocks_expected`)."""
        params = (block.originating_registry, block.serial_end, block.serial_start)
        # Blocks held here never overlap one another, so only those starting inside
        # the range and the one starting last before it can overlap: two index seeks,
        # however many blocks the registry holds.
        held = self._exec(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE originating_registry = ? "
            "AND serial_start >= ? AND serial_start <= ?",
            (block.originating_registry, block.serial_start, block.serial_end),
        ).fetchall()
        before = self._one(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE originating_registry = ? "
            "AND serial_start < ? ORDER BY serial_start DESC LIMIT 1",
            (block.originating_registry, block.serial_start),
        )
        if before is not None and int(before[2]) >= block.serial_start:
            held.append(before)
        if not expected:
            return [_block(r) for r in held]
        # From the few transfers accepted here and not yet completed (transfers_state),
        # not from the serials of every block ever transferred: CROSS JOIN keeps
        # SQLite from starting at transfer_blocks_serials, a scan of all serials below.
        pending = self._exec(
            f"SELECT {', '.join('b.' + c.strip() for c in _BLOCK_COLUMNS.split(','))} "
            "FROM transfers t CROSS JOIN transfer_blocks b "
            "WHERE b.transfer_id = t.transfer_id AND t.direction = 'in' AND t.state = ? "
            "AND b.originating_registry = ? AND b.serial_start <= ? AND b.serial_end >= ?",
            (int(TransferState.ACCEPTED), *params),
        ).fetchall()
        return [_block(r) for r in [*held, *pending]]

    def blocks_held_over(self, block: Block) -> list[HeldBlock]:
        """The rows of the blocks table that share a serial with ``block``, whatever
        their account or status, in serial order."""
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS}, account, status, transfer_id FROM blocks "
            "WHERE originating_registry = ? AND serial_start >= ? AND serial_start <= ?",
            (block.originating_registry, block.serial_start, block.serial_end),
        ).fetchall()
        before = self._one(
            f"SELECT {_BLOCK_COLUMNS}, account, status, transfer_id FROM blocks "
            "WHERE originating_registry = ? AND serial_start < ? "
            "ORDER BY serial_start DESC LIMIT 1",
            (block.originating_registry, block.serial_start),
        )
        if before is not None and int(before[2]) >= block.serial_start:
            rows.insert(0, before)
        return [HeldBlock(_block(r), r[9], r[10], r[11]) for r in rows]

    def block_split(self, tail: Block) -> None:
        """Split the held block that ends with ``tail`` so that ``tail`` is a block of its own."""
        row = self._one(
            "SELECT serial_start, serial_end, status, account FROM blocks "
            "WHERE originating_registry = ? AND serial_start < ? "
            "ORDER BY serial_start DESC LIMIT 1",
            (tail.originating_registry, tail.serial_start),
        )
        if row is None or int(row[1]) != tail.serial_end or row[2] != "held":
            raise RuntimeError(f"no held block ends with {tail.label()}; cannot split it")
        self._exec(
            "UPDATE blocks SET serial_end = ? WHERE originating_registry = ? AND serial_start = ?",
            (tail.serial_start - 1, tail.originating_registry, int(row[0])),
        )
        self.blocks_insert([tail], account=str(row[3]))

    def blocks_reserve(self, blocks: Iterable[Block], *, transfer_id: str) -> None:
        for block in blocks:
            cursor = self._exec(
                "UPDATE blocks SET status = 'reserved', transfer_id = ? "
                "WHERE originating_registry = ? AND serial_start = ? AND serial_end = ? "
                "AND status = 'held'",
                (transfer_id, block.originating_registry, block.serial_start, block.serial_end),
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"block {block.label()} is not held and cannot be reserved")

    def blocks_carve(
        self,
        sources: Sequence[Block],
        held: Sequence[Block],
        reserved: Sequence[tuple[Block, str]],
        *,
        account: str,
    ) -> None:
        """Replace held blocks of ``account`` (``sources``) by the pieces cut from them:
        ``held`` ones (what is left of them) and ``reserved`` ones, each reserved for
        its transfer. The pieces cover exactly the sources' serials.

        A source's row is shortened in place into the piece that starts where it
        starts and ends inside it (a proposal takes the first serials of a block), and
        only the other pieces are inserted: one statement fewer per source than
        deleting it and inserting every piece, with the same rows at the end. A piece
        over several sources (a recovered transfer's block across held rows,
        :mod:`itmolink.node.evidence`) is inserted whole, its sources deleted."""
        if sum(b.quantity for b in sources) != sum(b.quantity for b in held) + sum(
            b.quantity for b, _ in reserved
        ):
            raise RuntimeError("the pieces do not cover the blocks they are cut from")
        # The pieces by where they start; blocks of one registry never overlap.
        pieces: dict[tuple[str, int], tuple[Block, str | None]] = {
            (b.originating_registry, b.serial_start): (b, None) for b in held
        }
        for block, transfer_id in reserved:
            pieces[(block.originating_registry, block.serial_start)] = (block, transfer_id)
        for block in sources:
            key = (block.originating_registry, block.serial_start)
            found = pieces.pop(key, None)
            if found is not None and found[0].serial_end > block.serial_end:
                pieces[key] = found  # over several sources: they go, it is inserted
                found = None
            if found is None:
                cursor = self._exec(
                    "DELETE FROM blocks WHERE originating_registry = ? AND serial_start = ? "
                    "AND serial_end = ? AND status = 'held' AND account = ?",
                    (block.originating_registry, block.serial_start, block.serial_end, account),
                )
            elif found[0].attributes() != block.attributes():
                raise RuntimeError(f"block {found[0].label()} is not cut from {block.label()}")
            else:
                piece, owner = found
                cursor = self._exec(
                    "UPDATE blocks SET serial_end = ?, status = ?, transfer_id = ? "
                    "WHERE originating_registry = ? AND serial_start = ? AND serial_end = ? "
                    "AND status = 'held' AND account = ?",
                    (piece.serial_end, "held" if owner is None else "reserved", owner,
                     block.originating_registry, block.serial_start, block.serial_end,
                     account),
                )  # fmt: skip
            if cursor.rowcount != 1:
                raise RuntimeError(f"block {block.label()} is not held and cannot be reserved")
        self._many(
            f"INSERT INTO blocks ({_BLOCK_COLUMNS}, account, status, transfer_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*_block_values(block), account, "held" if owner is None else "reserved", owner)
                for block, owner in pieces.values()
            ],
        )  # fmt: skip

    def blocks_delete(self, blocks: Iterable[Block]) -> None:
        for block in blocks:
            self._exec(
                "DELETE FROM blocks WHERE originating_registry = ? AND serial_start = ?",
                (block.originating_registry, block.serial_start),
            )

    def blocks_of_transfer(self, transfer_id: str) -> list[Block]:
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS} FROM transfer_blocks WHERE transfer_id = ? "
            "ORDER BY originating_registry, serial_start",
            (transfer_id,),
        )
        return [_block(r) for r in rows]

    def blocks_release(self, transfer_id: str) -> int:
        cursor = self._exec(
            "UPDATE blocks SET status = 'held', transfer_id = NULL "
            "WHERE transfer_id = ? AND status = 'reserved'",
            (transfer_id,),
        )
        return int(cursor.rowcount)

    def blocks_debit_reserved(self, transfer_id: str) -> int:
        cursor = self._exec(
            "DELETE FROM blocks WHERE transfer_id = ? AND status = 'reserved'", (transfer_id,)
        )
        return int(cursor.rowcount)

    def holdings(self) -> list[HeldBlock]:
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS}, account, status, transfer_id FROM blocks "
            "ORDER BY originating_registry, serial_start"
        )
        return [HeldBlock(_block(r), r[9], r[10], r[11]) for r in rows]

    # -- transfers ----------------------------------------------------------------------

    def transfer_put(
        self,
        *,
        transfer_id: str,
        direction: Role,
        partner: str,
        state: TransferState,
        quantity: int,
        authorisation_id: str,
        first_transfer: bool,
        proposal_message_id: str,
        proposal_digest: bytes,
        acceptance_digest: bytes = b"",
        expires_at: int,
        rejection_code: int = 0,
        rejection_detail: str = "",
        blocks: Sequence[Block] = (),
        proposed_at: int | None = None,
        now: int,
    ) -> None:
        self.transfers_put(
            [
                NewTransfer(
                    transfer_id=transfer_id, direction=direction, partner=partner, state=state,
                    quantity=quantity, authorisation_id=authorisation_id,
                    first_transfer=first_transfer, proposal_message_id=proposal_message_id,
                    proposal_digest=proposal_digest, acceptance_digest=acceptance_digest,
                    expires_at=expires_at, rejection_code=rejection_code,
                    rejection_detail=rejection_detail, blocks=blocks, proposed_at=proposed_at,
                )
            ],
            now=now,
        )  # fmt: skip

    def transfers_put(self, transfers: Sequence[NewTransfer], *, now: int) -> None:
        """Record transfers and their blocks: one statement per table for all of them."""
        self._many(
            f"INSERT INTO transfers ({_TRANSFER_COLUMNS}, proposed_at, id_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (t.transfer_id, t.direction.value, t.partner, int(t.state), t.quantity,
                 t.authorisation_id, int(t.first_transfer), t.proposal_message_id,
                 t.proposal_digest, t.acceptance_digest, t.expires_at, t.rejection_code,
                 t.rejection_detail, now, now, t.batch_id, int(t.complete_on_acceptance),
                 now if t.proposed_at is None else t.proposed_at, id_hash(t.transfer_id))
                for t in transfers
            ],
        )  # fmt: skip
        self._many(
            f"INSERT INTO transfer_blocks (transfer_id, {_BLOCK_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(t.transfer_id, *_block_values(b)) for t in transfers for b in t.blocks],
        )
        self._seal_transfers([t.transfer_id for t in transfers if t.state.is_final])

    def transfers_of_batch(self, batch_id: str, partner: str) -> list[TransferRecord]:
        """The transfers of a batch exchanged with ``partner`` (either direction)."""
        rows = self._exec(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE batch_id = ? AND partner = ? "
            "ORDER BY transfer_id",
            (batch_id, partner),
        )
        return [_transfer(r) for r in rows]

    def batch_known(self, batch_id: str, partner: str) -> bool:
        row = self._one(
            "SELECT 1 FROM transfers WHERE batch_id = ? AND partner = ? LIMIT 1",
            (batch_id, partner),
        )
        return row is not None

    def transfer_get(self, transfer_id: str) -> TransferRecord | None:
        row = self._one(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE transfer_id = ?", (transfer_id,)
        )
        return None if row is None else _transfer(row)

    def transfer_with_blocks(self, transfer_id: str) -> tuple[TransferRecord, list[Block]] | None:
        """:meth:`transfer_get` and :meth:`blocks_of_transfer` in one query."""
        rows = self._exec(_TRANSFER_WITH_BLOCKS, (transfer_id,)).fetchall()
        if not rows:
            return None
        width = _TRANSFER_READ_WIDTH
        blocks = [_block(r[width:]) for r in rows if r[width] is not None]
        return _transfer(rows[0]), blocks

    def transfer_proposed_at(self, transfer_id: str) -> int | None:
        """The transfer's ``proposed_at`` (µs): the ``sent_at`` of its proposal, or for
        a void tombstone what the void gave (docs/PROTOCOL.md §11.1, §5.10 V3)."""
        row = self._one("SELECT proposed_at FROM transfers WHERE transfer_id = ?", (transfer_id,))
        return None if row is None else int(row[0])

    def transfer_set_state(
        self,
        transfer_id: str,
        state: TransferState,
        *,
        now: int,
        rejection_code: int = 0,
        rejection_detail: str = "",
        acceptance_digest: bytes | None = None,
        blocks: Sequence[Block] | None = None,
    ) -> None:
        """Move a transfer to ``state``; a final state also seals it (its
        reconciliation leaves). ``blocks``, when the caller has read them, are the
        transfer's blocks (else read again to seal a completed transfer)."""
        if state.is_final:
            self._seal_transfer(
                transfer_id,
                blocks=blocks,
                change=(state, rejection_code, rejection_detail, now, acceptance_digest),
            )
            return
        if acceptance_digest is not None:
            self._exec(
                "UPDATE transfers SET state = ?, rejection_code = ?, rejection_detail = ?, "
                "updated_at = ?, acceptance_digest = ? WHERE transfer_id = ?",
                (int(state), rejection_code, rejection_detail, now, acceptance_digest,
                 transfer_id),
            )  # fmt: skip
        else:
            self._exec(
                "UPDATE transfers SET state = ?, rejection_code = ?, rejection_detail = ?, "
                "updated_at = ? WHERE transfer_id = ?",
                (int(state), rejection_code, rejection_detail, now, transfer_id),
            )

    def transfers_set_state(
        self,
        transfer_ids: Sequence[str],
        state: TransferState,
        *,
        now: int,
        acceptance_digest: bytes | None = None,
        blocks: dict[str, list[Block]] | None = None,
        records: Mapping[str, TransferRecord] | None = None,
        adjustments: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> None:
        """Move several transfers to ``state`` (no rejection), in one statement; a final
        state seals them in that statement (``blocks``: each one's blocks, if the
        caller has them already; ``records``: each one's record as read in this
        transaction and not changed since, else read again; ``adjustments``: the
        (year, amount) of every adjustment this ledger holds for each of them, when
        the caller booked them all in this transaction, else read again)."""
        if state.is_final:
            if records is None:
                records = self.transfers_get(transfer_ids)
            self._seal_records(
                [
                    _moved_to(
                        records[t], state,
                        records[t].acceptance_digest if acceptance_digest is None
                        else acceptance_digest,
                    )
                    for t in transfer_ids
                ],
                blocks=blocks, now=now, adjustments=adjustments,
            )  # fmt: skip
        elif acceptance_digest is None:
            self._many(
                "UPDATE transfers SET state = ?, rejection_code = 0, rejection_detail = '', "
                "updated_at = ? WHERE transfer_id = ?",
                [(int(state), now, t) for t in transfer_ids],
            )
        else:
            self._many(
                "UPDATE transfers SET state = ?, rejection_code = 0, rejection_detail = '', "
                "updated_at = ?, acceptance_digest = ? WHERE transfer_id = ?",
                [(int(state), now, acceptance_digest, t) for t in transfer_ids],
            )

    def transfers_get(self, transfer_ids: Sequence[str]) -> dict[str, TransferRecord]:
        """The transfers with these ids that exist, by id (one query per 500 ids)."""
        found: dict[str, TransferRecord] = {}
        for chunk in _chunks(transfer_ids):
            rows = self._exec(
                f"SELECT {_TRANSFER_READ} FROM transfers "
                f"WHERE transfer_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for row in rows:
                record = _transfer(row)
                found[record.transfer_id] = record
        return found

    def blocks_of_transfers(self, transfer_ids: Sequence[str]) -> dict[str, list[Block]]:
        """The blocks of each of these transfers, in serial order (as
        :meth:`blocks_of_transfer`), by transfer id; every id has an entry."""
        found: dict[str, list[Block]] = {t: [] for t in transfer_ids}
        for chunk in _chunks(transfer_ids):
            rows = self._exec(
                f"SELECT transfer_id, {_BLOCK_COLUMNS} FROM transfer_blocks "
                f"WHERE transfer_id IN ({_marks(len(chunk))}) "
                "ORDER BY transfer_id, originating_registry, serial_start",
                chunk,
            )
            for row in rows:
                found[row[0]].append(_block(row[1:]))
        return found

    def blocks_debit_reserved_of(self, transfer_ids: Sequence[str]) -> int:
        """Delete the blocks reserved for these transfers; returns how many."""
        debited = 0
        for chunk in _chunks(transfer_ids):
            cursor = self._exec(
                f"DELETE FROM blocks WHERE status = 'reserved' "
                f"AND transfer_id IN ({_marks(len(chunk))})",
                chunk,
            )
            debited += int(cursor.rowcount)
        return debited

    def adjustment_amounts_of(
        self, transfer_ids: Sequence[str]
    ) -> dict[str, list[tuple[int, int]]]:
        found: dict[str, list[tuple[int, int]]] = {t: [] for t in transfer_ids}
        for chunk in _chunks(transfer_ids):
            rows = self._exec(
                "SELECT transfer_id, year, amount FROM adjustments "
                f"WHERE transfer_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for row in rows:
                found[row[0]].append((int(row[1]), int(row[2])))
        return found

    def _seal_transfer(
        self,
        transfer_id: str,
        *,
        blocks: Sequence[Block] | None = None,
        change: tuple[TransferState, int, str, int, bytes | None] | None = None,
    ) -> None:
        """Record a final transfer's reconciliation leaves (:meth:`_seal_records`).

        With ``change`` (state, rejection code and detail, time, acceptance digest
        or None), the transfer moves to that final state in the same statement.
        """
        record = self.transfers_get([transfer_id])[transfer_id]
        now = None
        if change is not None:
            state, code, detail, now, acceptance = change
            record = _moved_to(
                record, state,
                record.acceptance_digest if acceptance is None else acceptance, code, detail,
            )  # fmt: skip
        self._seal_records(
            [record], blocks=None if blocks is None else {transfer_id: list(blocks)}, now=now
        )

    def _seal_transfers(self, transfer_ids: Sequence[str]) -> None:
        """Record final transfers' reconciliation leaves (core/reconcile.py) and add
        them to the running sums (migration 0003), a few statements for all of them."""
        if transfer_ids:
            records = self.transfers_get(transfer_ids)
            self._seal_records([records[t] for t in transfer_ids])

    def _seal_records(
        self,
        records: Sequence[TransferRecord],
        *,
        blocks: dict[str, list[Block]] | None = None,
        now: int | None = None,
        retotal: bool = True,
        adjustments: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> None:
        """:meth:`_seal_transfers` of these records, as they are to be. With ``now``,
        their state, rejection and acceptance digest are written too, in the same
        statement (:meth:`transfers_set_state`). ``retotal`` false: the records were
        sealed already with the same blocks (a leaf defined anew, migration 0007), so
        the reconciliation totals stand; only the leaves and their sums change, and
        the partner's adjustment follows the authorisation as it stood when each
        became final (:meth:`_partner_adjustments`). ``adjustments``: this ledger's
        (year, amount) entries of each transfer, if the caller has every one of them
        (:meth:`transfers_set_state`), else read."""
        me = self.meta_get("party") or ""
        transfer_ids = [r.transfer_id for r in records]
        by_id = {r.transfer_id: r for r in records}
        moved_ids = [r.transfer_id for r in records if r.state is TransferState.COMPLETED]
        blocks_of = blocks if blocks is not None else (
            self.blocks_of_transfers(moved_ids) if moved_ids else {}
        )  # fmt: skip
        adjustments_of = (
            self.adjustment_amounts_of(transfer_ids) if adjustments is None else adjustments
        )
        # Records are read from the ledger in this transaction (_transfer): what an
        # earlier seal added to the sums is in each one's sealed_sums.
        before = {r.transfer_id: r.sealed_sums for r in records if r.sealed_sums is not None}
        # Sealing again what was sealed long ago (migration 0007): each transfer's rule
        # by the authorisation as it stood here when the transfer became final.
        versions: dict[tuple[str, str], list[tuple[AuthorisationTerms, dict[str, Any]]]] | None = (
            None if retotal else {}
        )
        leaves: list[tuple[Any, ...]] = []
        buckets: dict[tuple[str, str], list[int]] = {}
        totals: dict[tuple[str, str, int, int, str], list[int]] = {}
        repaired: set[str] = set()
        for transfer_id in transfer_ids:
            record = by_id[transfer_id]
            assert record.state.is_final
            sender, receiver = (
                (me, record.partner) if record.direction is Role.SENDER else (record.partner, me)
            )
            moved = record.state is TransferState.COMPLETED
            moved_blocks = tuple(blocks_of[transfer_id]) if moved else ()
            # This node's own entries, as booked; the partner's as the rule gives them.
            own = tuple(adjustments_of[transfer_id]) if moved else ()
            other = self._partner_adjustments(record, sender, moved_blocks, versions)
            facts = TransferFacts(
                transfer_id=transfer_id,
                sender=sender,
                receiver=receiver,
                moved=moved,
                blocks=moved_blocks,
                sender_adjustments=own if record.direction is Role.SENDER else other,
                receiver_adjustments=other if record.direction is Role.SENDER else own,
                proposal_digest=record.proposal_digest,
                acceptance_digest=record.acceptance_digest,
            )
            b_leaf, j_leaf = blocks_leaf(facts), journal_leaf(facts)
            (b1, b2), (j1, j2) = slices(b_leaf), slices(j_leaf)
            leaves.append(
                (b_leaf, j_leaf, b1, b2, j1, j2, transfer_id)
                if now is None
                else (int(record.state), record.rejection_code, record.rejection_detail, now,
                      record.acceptance_digest, b_leaf, j_leaf, b1, b2, j1, j2, transfer_id)
            )  # fmt: skip
            # A transfer sealed again (a final state recorded twice) replaces its
            # earlier leaves in the sums.
            bucket = buckets.setdefault(
                (record.partner, id_hash(transfer_id)[:SUMMARY_PREFIX]), [0, 0, 0, 0, 0]
            )
            old = before.get(transfer_id)
            for i, value in enumerate((1, b1, b2, j1, j2)):
                bucket[i] += value
            if old is not None:
                bucket[0] -= 1
                for i, value in enumerate(old, start=1):
                    bucket[i] -= value
            if not retotal:
                pass
            elif moved and old is not None:
                # Not a protocol step (a completed transfer is sealed once): a repair
                # of its record. The partner's totals are summed again from the ledger.
                repaired.add(record.partner)
            elif moved:
                for block in facts.blocks:
                    key = (record.partner, record.direction.value, int(block.unit_type),
                           block.vintage, block.authorisation_id)  # fmt: skip
                    total = totals.setdefault(key, [0, 0, -1])
                    total[0] += block.quantity
                    if total[2] != len(leaves):  # count each transfer once per key
                        total[1] += 1
                        total[2] = len(leaves)
        self._many(
            ("" if now is None else
             "UPDATE transfers SET state = ?, rejection_code = ?, rejection_detail = ?, "
             "updated_at = ?, acceptance_digest = ?, ")
            + ("UPDATE transfers SET " if now is None else "")
            + "blocks_leaf = ?, journal_leaf = ?, blocks_h1 = ?, "
            "blocks_h2 = ?, journal_h1 = ?, journal_h2 = ? WHERE transfer_id = ?",
            leaves,
        )  # fmt: skip
        self._add_sums(
            [("bucket", partner, prefix, *sums) for (partner, prefix), sums in buckets.items()]
        )
        if repaired:
            self._flush_sums()  # the partners' totals are summed again from the ledger
        for partner in sorted(repaired):
            self._exec("DELETE FROM reconcile_totals WHERE partner = ?", (partner,))
            self._exec(
                "INSERT INTO reconcile_totals (partner, direction, unit_type, vintage, "
                "authorisation_id, quantity, transfers) "
                "SELECT t.partner, t.direction, b.unit_type, b.vintage, b.authorisation_id, "
                "SUM(b.serial_end - b.serial_start + 1), COUNT(DISTINCT t.transfer_id) "
                "FROM transfers t JOIN transfer_blocks b ON b.transfer_id = t.transfer_id "
                "WHERE t.partner = ? AND t.state = ? AND t.blocks_leaf IS NOT NULL "
                "GROUP BY t.partner, t.direction, b.unit_type, b.vintage, b.authorisation_id",
                (partner, int(TransferState.COMPLETED)),
            )
        self._add_sums(
            [
                ("total", *key, quantity, count)
                for key, (quantity, count, _) in totals.items()
                if key[0] not in repaired
            ]
        )

    def _add_sums(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add to the reconciliation's running sums (rows of ("bucket", partner,
        prefix, leaves, blocks h1, h2, journal h1, h2) and ("total", partner,
        direction, unit type, vintage, authorisation id, quantity, transfers)). In a
        SQLite transaction they wait in its memory, summed, until it commits or
        something reads them (:meth:`_flush_sums`): the transfers completed by one
        group commit add to one totals row, and their buckets are written together."""
        memory = self._memory
        if memory is None:
            self._write_sums(rows)
            return
        sums = memory.sums
        for row in rows:
            width = 3 if row[0] == "bucket" else 6
            key, values = row[:width], row[width:]
            old = sums.get(key)
            sums[key] = values if old is None else tuple(map(operator.add, old, values))

    def _flush_sums(self) -> None:
        """Write the running sums waiting in this transaction's memory."""
        memory = self._memory
        if memory is not None and memory.sums:
            rows = [(*key, *values) for key, values in memory.sums.items()]
            memory.sums.clear()
            self._write_sums(rows)

    def _write_sums(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self._many(
            "INSERT INTO reconcile_buckets (partner, prefix, leaves, blocks_h1, blocks_h2, "
            "journal_h1, journal_h2) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (partner, prefix) DO UPDATE SET "
            "leaves = reconcile_buckets.leaves + excluded.leaves, "
            "blocks_h1 = reconcile_buckets.blocks_h1 + excluded.blocks_h1, "
            "blocks_h2 = reconcile_buckets.blocks_h2 + excluded.blocks_h2, "
            "journal_h1 = reconcile_buckets.journal_h1 + excluded.journal_h1, "
            "journal_h2 = reconcile_buckets.journal_h2 + excluded.journal_h2",
            [row[1:] for row in rows if row[0] == "bucket"],
        )
        self._many(
            "INSERT INTO reconcile_totals (partner, direction, unit_type, vintage, "
            "authorisation_id, quantity, transfers) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (partner, direction, unit_type, vintage, authorisation_id) "
            "DO UPDATE SET quantity = reconcile_totals.quantity + excluded.quantity, "
            "transfers = reconcile_totals.transfers + excluded.transfers",
            [row[1:] for row in rows if row[0] == "total"],
        )

    def reseal_listed_count(self) -> int:
        """How many transfers migration 0007 listed are still to be sealed again."""
        return int(self._one("SELECT COUNT(*) FROM leaves_to_reseal")[0])

    def reseal_listed_transfers(
        self, limit: int, double_booked: list[TransferRecord] | None = None, now: int = 0
    ) -> int:
        """Seal again up to ``limit`` of the transfers migration 0007 listed (their
        blocks leaves were computed by the previous definition), and take them off
        the list; returns how many were taken off (0: none is left).

        A transfer the previous reference booked twice (:meth:`double_booked_at_issuance`)
        is recorded as a discrepancy (phase ``double-booking``) in the same transaction,
        and added to ``double_booked`` for the caller's alarm (``now``: the time recorded
        with it): the new leaves of both sides agree on it, so no reconciliation would
        ever find it."""
        rows = self._exec(
            "SELECT transfer_id FROM leaves_to_reseal ORDER BY transfer_id LIMIT ?", (limit,)
        ).fetchall()
        ids = [str(row[0]) for row in rows]
        if not ids:
            return 0
        records = self.transfers_get(ids)
        listed = [records[t] for t in ids if t in records]
        for record, amount in self.double_booked_at_issuance(listed):
            self.discrepancy_put(
                reconciliation_id=DOUBLE_BOOKING_FOUND_AT, partner=record.partner,
                phase="double-booking", subject=record.transfer_id,
                detail=(
                    f"transfer {record.transfer_id} to {record.partner} booked adjustments of "
                    f"{amount} tCO2e for units whose adjustment was booked at their issuance "
                    "already (first transferred at issuance under OIMP, NDC added later): "
                    "they count twice in this ledger (docs/OPERATIONS.md section 8)"
                ),
                now=now,
            )  # fmt: skip
            if double_booked is not None:
                double_booked.append(record)
        self._seal_records(listed, retotal=False)
        for chunk in _chunks(ids):
            self._exec(
                f"DELETE FROM leaves_to_reseal WHERE transfer_id IN ({_marks(len(chunk))})", chunk
            )
        return len(ids)

    def double_booked_at_issuance(
        self, records: Sequence[TransferRecord]
    ) -> list[tuple[TransferRecord, int]]:
        """The completed transfers of this host's own units among ``records`` for which
        it booked adjustments although the units' adjustment was booked at their
        issuance (a first-transfer action without a transfer: OIMP first transferred at
        authorisation or issuance), each with the amount booked for the transfer.

        Only the reference before schema version 7 did that: it proposed such units as a
        first transfer once NDC was added to the authorisation, and booked them again
        (docs/DESIGN.md decision 46). Since then the flag is false for them and the host
        books nothing at the transfer, and one transfer never mixes the two kinds."""
        me = self.meta_get("party") or ""
        sent = [
            r for r in records
            if r.direction is Role.SENDER and r.state is TransferState.COMPLETED
            and r.first_transfer
        ]  # fmt: skip
        if not sent:
            return []
        ids = [r.transfer_id for r in sent]
        blocks_of = self.blocks_of_transfers(ids)
        amounts_of = self.adjustment_amounts_of(ids)
        found: list[tuple[TransferRecord, int]] = []
        for record in sent:
            blocks = blocks_of[record.transfer_id]
            amount = sum(a for _, a in amounts_of[record.transfer_id])
            if not (amount and blocks and all(b.first_transferring_party == me for b in blocks)):
                continue
            # Only the units booked at issuance were booked twice (a transfer of old could
            # mix them with units that were not).
            doubled = sum(b.quantity for b in blocks if self.serials_first_transferred(b))
            if doubled:
                found.append((record, min(amount, doubled)))
        return found

    def _partner_adjustments(
        self,
        record: TransferRecord,
        sender: str,
        blocks: Sequence[Block],
        versions: dict[tuple[str, str], list[tuple[AuthorisationTerms, dict[str, Any]]]]
        | None = None,
    ) -> tuple[tuple[int, int], ...]:
        """The (year, amount) pairs the partner books for a completed transfer by the
        rule of §6.6 (core.adjustments.books_adjustment), from facts both sides hold:
        the blocks, the proposal's ``first_transfer`` and the authorisation's purposes
        (the latest version recorded here, read once per transaction).

        ``versions`` (sealing again a transfer final for some time: migration 0007):
        the version that was the latest here when the transfer became final (its
        ``updated_at``), as a seal at that time read it; every version of each
        authorisation is read once into this cache."""
        if not blocks:
            return ()
        role = Role.RECEIVER if record.direction is Role.SENDER else Role.SENDER
        host = blocks[0].first_transferring_party
        key = (host, blocks[0].authorisation_id)
        latest: tuple[AuthorisationTerms, dict[str, Any]] | None
        if versions is None:
            latest = self.authorisation_latest(*key)
        else:
            if key not in versions:
                versions[key] = self.authorisation_versions(*key)
            known = versions[key]
            then = [v for v in known if int(v[1]["created_at"]) <= record.updated_at]
            latest = then[-1] if then else (known[0] if known else None)
        purposes = frozenset() if latest is None else latest[0].purposes
        definition = 0 if latest is None else int(latest[1]["first_transfer_definition"])
        books = books_adjustment(
            role,
            host_sends=host == sender,
            first_transfer=record.first_transfer,
            ndc=Purpose.NDC in purposes,
            oimp_at_issuance=oimp_at_issuance(purposes, definition),
        )
        return expected_adjustments(role, blocks) if books else ()

    # -- reconciliation -----------------------------------------------------------------

    def reconcile_buckets(
        self, partner: str, snapshot: int, view: str, prefix: str
    ) -> list[Bucket]:
        """The non-empty children of bucket ``prefix`` (16 at most)."""
        h1, h2 = _VIEW_COLUMNS[view]
        self._flush_sums()
        if len(prefix) >= SUMMARY_PREFIX:
            rows = self._exec(
                f"SELECT substr(id_hash, 1, ?) AS child, COUNT(*), SUM({h1}), SUM({h2}) "
                "FROM transfers WHERE partner = ? AND proposed_at < ? "
                "AND blocks_leaf IS NOT NULL AND id_hash >= ? AND id_hash < ? "
                "GROUP BY child ORDER BY child",
                (len(prefix) + 1, partner, snapshot, prefix, prefix + "g"),
            )
            return [Bucket(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]
        # Near the root: the running sums, less what was proposed at or after the
        # snapshot (only the most recent transfers).
        size = len(prefix) + 1
        sums: dict[str, list[int]] = {}
        for child, count, s1, s2 in self._exec(
            f"SELECT prefix, leaves, {h1}, {h2} FROM reconcile_buckets "
            "WHERE partner = ? AND prefix >= ? AND prefix < ?",
            (partner, prefix, prefix + "g"),
        ):
            totals = sums.setdefault(child[:size], [0, 0, 0])
            totals[0] += int(count)
            totals[1] += int(s1)
            totals[2] += int(s2)
        for hashed, s1, s2 in self._exec(
            f"SELECT id_hash, {h1}, {h2} FROM transfers WHERE partner = ? AND proposed_at >= ? "
            "AND blocks_leaf IS NOT NULL",  # by transfers_proposed: no condition on id_hash
            (partner, snapshot),
        ):
            if not hashed.startswith(prefix):
                continue
            totals = sums[hashed[:size]]
            totals[0] -= 1
            totals[1] -= int(s1)
            totals[2] -= int(s2)
        return [Bucket(child, *sums[child]) for child in sorted(sums) if sums[child][0]]

    def reconcile_leaves(
        self, partner: str, snapshot: int, view: str, prefix: str
    ) -> dict[str, bytes]:
        column = "blocks_leaf" if view == "blocks" else "journal_leaf"
        rows = self._exec(
            f"SELECT transfer_id, {column} FROM transfers WHERE partner = ? AND proposed_at < ? "
            "AND blocks_leaf IS NOT NULL AND id_hash >= ? AND id_hash < ?",
            (partner, snapshot, prefix, prefix + "g"),
        )
        return {r[0]: bytes(r[1]) for r in rows}

    def reconcile_totals(self, partner: str, snapshot: int) -> list[Total]:
        """Per sender and (unit type, vintage, authorisation): the tCO2e moved by
        completed transfers proposed before ``snapshot``, and how many moved them.
        The running sums, less the completed transfers proposed since."""
        self._flush_sums()
        me = self.meta_get("party") or ""
        sums: dict[tuple[str, int, int, str], list[int]] = {}
        for direction, unit_type, vintage, authorisation_id, quantity, transfers in self._exec(
            "SELECT direction, unit_type, vintage, authorisation_id, quantity, transfers "
            "FROM reconcile_totals WHERE partner = ?",
            (partner,),
        ):
            key = (direction, int(unit_type), int(vintage), authorisation_id)
            sums[key] = [int(quantity), int(transfers)]
        for direction, unit_type, vintage, authorisation_id, quantity, transfers in self._exec(
            "SELECT t.direction, b.unit_type, b.vintage, b.authorisation_id, "
            "SUM(b.serial_end - b.serial_start + 1), COUNT(DISTINCT t.transfer_id) "
            "FROM transfers t JOIN transfer_blocks b ON b.transfer_id = t.transfer_id "
            "WHERE t.partner = ? AND t.proposed_at >= ? AND t.state = ? "
            "AND t.blocks_leaf IS NOT NULL "
            "GROUP BY t.direction, b.unit_type, b.vintage, b.authorisation_id",
            (partner, snapshot, int(TransferState.COMPLETED)),
        ):
            key = (direction, int(unit_type), int(vintage), authorisation_id)
            sums[key][0] -= int(quantity)
            sums[key][1] -= int(transfers)
        return [
            Total(me if key[0] == "out" else partner, key[1], key[2], key[3], *values)
            for key, values in sorted(sums.items())
            if values[1]
        ]

    def freeze_blocks_of(self, transfer_id: str, partner: str) -> int:
        """Freeze the held blocks that share a serial with the blocks of a transfer
        with ``partner`` (nothing if the transfer is of another link)."""
        record = self.transfer_get(transfer_id)
        if record is None or record.partner != partner:
            return 0
        frozen = 0
        for block in self.blocks_of_transfer(transfer_id):
            cursor = self._exec(
                "UPDATE blocks SET status = 'frozen', transfer_id = ? "
                "WHERE originating_registry = ? AND serial_start <= ? AND serial_end >= ? "
                "AND status = 'held'",
                (transfer_id, block.originating_registry, block.serial_end, block.serial_start),
            )
            frozen += int(cursor.rowcount)
        return frozen

    def unfreeze_blocks_of(self, transfer_id: str) -> list[HeldBlock]:
        """Make the blocks frozen for ``transfer_id`` held again; the blocks released."""
        rows = self._exec(
            f"SELECT {_BLOCK_COLUMNS}, account, status, transfer_id FROM blocks "
            "WHERE status = 'frozen' AND transfer_id = ? ORDER BY originating_registry, "
            "serial_start",
            (transfer_id,),
        ).fetchall()
        self._exec(
            "UPDATE blocks SET status = 'held', transfer_id = NULL "
            "WHERE status = 'frozen' AND transfer_id = ?",
            (transfer_id,),
        )
        return [HeldBlock(_block(r), r[9], "held", None) for r in rows]

    def admin_audit_put(
        self, *, operator: str, method: str, request: str, outcome: str, now: int
    ) -> None:
        """Append to the operators' audit trail, a hash chain like the journal."""
        head = self.admin_audit_head()
        if head is None:
            # The first chained row (rows from before the chain have no hash).
            row = self._one("SELECT MAX(id) FROM admin_audit")
            entry_id, prev_hash = int(row[0] or 0) + 1, GENESIS_HASH
        else:
            entry_id, prev_hash = head[0] + 1, head[1]
        new_hash = audit_hash(
            prev_hash, id=entry_id, operator=operator, method=method, request=request,
            outcome=outcome, recorded_at=now,
        )  # fmt: skip
        self._exec(
            "INSERT INTO admin_audit (id, operator, method, request, outcome, recorded_at, "
            "prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry_id, operator, method, request, outcome, now, prev_hash, new_hash),
        )
        self.set_meta("admin_audit_head", f"{entry_id}:{new_hash.hex()}")

    def admin_audit(self) -> list[tuple[str, str, str, str, int]]:
        rows = self._exec(
            "SELECT operator, method, request, outcome, recorded_at FROM admin_audit ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    def admin_audit_entries(self) -> tuple[int, list[AuditEntry]]:
        """(rows written before the chain existed, the chained rows in id order).

        Unchained rows after the first chained one are returned as entries with
        empty hashes, so that verification reports them.
        """
        rows = self._exec(
            "SELECT id, operator, method, request, outcome, recorded_at, prev_hash, entry_hash "
            "FROM admin_audit ORDER BY id"
        ).fetchall()
        legacy = 0
        entries: list[AuditEntry] = []
        for r in rows:
            if r[7] is None and not entries:
                legacy += 1
                continue
            prev_hash, own_hash = bytes(r[6] or b""), bytes(r[7] or b"")
            operator, method, request, outcome = r[1], r[2], r[3], r[4]
            entries.append(
                AuditEntry(
                    int(r[0]), operator, method, request, outcome, int(r[5]), prev_hash, own_hash
                )
            )
        return legacy, entries

    def admin_audit_head(self) -> tuple[int, bytes] | None:
        """(id, hash) of the last audit row, as recorded when it was appended."""
        return self._head("admin_audit_head")

    def _head(self, key: str) -> tuple[int, bytes] | None:
        head = self.meta_get(key)
        if head is None:
            return None
        entry_id, hash_hex = head.split(":")
        return int(entry_id), bytes.fromhex(hash_hex)

    def partner_key_put(
        self,
        *,
        key_id: str,
        party: str,
        public_key: bytes,
        not_before: int | None,
        not_after: int | None,
        now: int,
        announced_by: str | None = None,
    ) -> None:
        """Pin an announced key; ``announced_by`` names the key ids (space-separated)
        that signed the announcement. A key id pinned already is left as it is."""
        self._exec(
            "INSERT INTO partner_keys "
            "(key_id, party, public_key, not_before, not_after, added_at, announced_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO NOTHING",
            (key_id, party, public_key, not_before, not_after, now, announced_by),
        )
        self.shared_state_changed()

    def partner_keys(self) -> list[tuple[str, str, bytes, int | None, int | None]]:
        rows = self._exec(
            "SELECT key_id, party, public_key, not_before, not_after FROM partner_keys "
            "ORDER BY added_at"
        )
        return [(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def partner_key_announcers(self) -> list[tuple[str, str, int]]:
        """(key id, the key ids that signed its announcement, when it was recorded) of
        each announced key whose announcer is known (schema version 6 and later)."""
        rows = self._exec(
            "SELECT key_id, announced_by, added_at FROM partner_keys "
            "WHERE announced_by IS NOT NULL ORDER BY added_at"
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    def revoked_key_put(
        self,
        *,
        key_id: str,
        party: str,
        source: str,
        now: int,
        compromised_since: int | None = None,
        signed_by: str | None = None,
    ) -> None:
        """Record a revocation. A key revoked already stays revoked; a compromise
        instant given now (or an earlier one than recorded) widens its cascade.
        ``signed_by``: the key ids (space-separated) that signed the revocation giving
        the instant, kept with the instant in force (they do not fall with the key)."""
        signed_by = signed_by if compromised_since is not None else None
        self._exec(
            "INSERT INTO revoked_keys (key_id, party, source, revoked_at, compromised_since, "
            "compromise_signed_by) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO NOTHING",
            (key_id, party, source, now, compromised_since, signed_by),
        )
        if compromised_since is not None:
            self._exec(
                "UPDATE revoked_keys SET compromised_since = ?, compromise_signed_by = ? "
                "WHERE key_id = ? AND (compromised_since IS NULL OR compromised_since > ?)",
                (compromised_since, signed_by, key_id, compromised_since),
            )
        self.shared_state_changed()

    def revoked_keys(self) -> dict[str, str]:
        """Revoked key id -> its party."""
        return {r[0]: r[1] for r in self._exec("SELECT key_id, party FROM revoked_keys")}

    def revocation_signers(self) -> dict[str, str]:
        """Revoked key id -> the key ids (space-separated) that signed the revocation
        giving its compromise instant in force, where known (schema version 8)."""
        rows = self._exec(
            "SELECT key_id, compromise_signed_by FROM revoked_keys "
            "WHERE compromise_signed_by IS NOT NULL"
        )
        return {str(r[0]): str(r[1]) for r in rows}

    def revocations(self) -> list[tuple[str, str, str, int, int | None]]:
        """(key id, party, source, revoked at, compromised since or None) of every
        revocation recorded here, oldest first."""
        rows = self._exec(
            "SELECT key_id, party, source, revoked_at, compromised_since FROM revoked_keys "
            "ORDER BY revoked_at, key_id"
        )
        return [
            (str(r[0]), str(r[1]), str(r[2]), int(r[3]), None if r[4] is None else int(r[4]))
            for r in rows
        ]

    def discrepancy_put(
        self, *, reconciliation_id: str, partner: str, phase: str, subject: str, detail: str,
        now: int,
    ) -> None:  # fmt: skip
        self._exec(
            "INSERT INTO discrepancies (reconciliation_id, partner, phase, subject, detail, "
            "recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
            (reconciliation_id, partner, phase, subject, detail, now),
        )

    def transfers(self) -> list[TransferRecord]:
        rows = self._exec(f"SELECT {_TRANSFER_READ} FROM transfers ORDER BY created_at DESC")
        return [_transfer(r) for r in rows]

    def transfers_expired(self, now: int) -> list[TransferRecord]:
        """Our proposals past their time-out, but not those that asked the receiver to
        complete on acceptance: they are never voided on our clock (one-round)."""
        rows = self._exec(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE direction = 'out' "
            "AND state = ? AND expires_at <= ? AND complete_on_acceptance = 0",
            (int(TransferState.PROPOSED), now),
        )
        return [_transfer(r) for r in rows]

    def transfers_awaiting_completion(self, expired_before: int) -> list[TransferRecord]:
        """Incoming transfers accepted here whose proposal expired before the given time."""
        rows = self._exec(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE direction = 'in' "
            "AND state = ? AND expires_at <= ?",
            (int(TransferState.ACCEPTED), expired_before),
        )
        return [_transfer(r) for r in rows]

    def transfers_one_round_unanswered(self, expired_before: int) -> list[TransferRecord]:
        """Our one-round proposals (they asked the receiver to complete on acceptance)
        still unanswered, whose expires_at is at or before the given time: the sender
        withdraws their proposals (PROTOCOL §6.11 S7)."""
        rows = self._exec(
            f"SELECT {_TRANSFER_READ} FROM transfers WHERE direction = 'out' "
            "AND state = ? AND expires_at <= ? AND complete_on_acceptance <> 0",
            (int(TransferState.PROPOSED), expired_before),
        )
        return [_transfer(r) for r in rows]

    # -- corresponding adjustments ------------------------------------------------------

    def adjustments_put(
        self,
        entries: Iterable[AdjustmentEntry],
        *,
        evidence_journal_id: int | None,
        now: int,
        reference: str = "",
    ) -> None:
        """Record entries. Entries of a transfer need the partner's evidence; others
        (``transfer_id`` empty) name their issuance or action in ``reference``."""
        self._many(
            "INSERT INTO adjustments (party, partner, transfer_id, year, amount, unit_type, "
            "method, evidence_journal_id, recorded_at, reference) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (entry.party, entry.partner, entry.transfer_id or None, entry.year, entry.amount,
                 int(entry.unit_type), entry.method, evidence_journal_id, now, reference)
                for entry in entries
            ],
        )  # fmt: skip

    def first_transferred_by_year(self) -> dict[int, int]:
        """tCO2e first-transferred abroad per booking year: adjustments this party
        booked as sender, plus first transfers still waiting for an answer. An acquiring
        party's give-back at its use for OIMP (reference ``return:...``) is no first
        transfer of its own."""
        found: dict[int, int] = {}
        for year, amount in self._exec(
            "SELECT a.year, SUM(a.amount) FROM adjustments a "
            "LEFT JOIN transfers t ON t.transfer_id = a.transfer_id WHERE a.amount > 0 "
            "AND ((a.transfer_id IS NULL AND a.reference NOT LIKE 'return:%') "
            "OR (t.direction = 'out' AND t.first_transfer = 1)) "
            "GROUP BY a.year"
        ):
            found[int(year)] = int(amount)
        for vintage, amount in self._exec(
            "SELECT b.vintage, SUM(b.serial_end - b.serial_start + 1) FROM transfer_blocks b "
            "JOIN transfers t ON t.transfer_id = b.transfer_id "
            "WHERE t.direction = 'out' AND t.state = ? AND t.first_transfer = 1 "
            "AND b.unit_type IN (?, ?) GROUP BY b.vintage",
            (int(TransferState.PROPOSED), int(UnitType.ITMO), int(UnitType.A6_4ER_AUTHORISED)),
        ):
            found[int(vintage)] = found.get(int(vintage), 0) + int(amount)
        return found

    def adjustment_amounts(self, transfer_id: str) -> list[tuple[int, int]]:
        rows = self._exec(
            "SELECT year, amount FROM adjustments WHERE transfer_id = ?", (transfer_id,)
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    def adjustments(self) -> list[AdjustmentRecord]:
        rows = self._exec(
            "SELECT a.party, a.partner, COALESCE(a.transfer_id, a.reference), a.year, a.amount, "
            "a.unit_type, a.method, COALESCE(j.message_id, ''), a.recorded_at FROM adjustments a "
            "LEFT JOIN journal j ON j.id = a.evidence_journal_id ORDER BY a.id"
        )
        return [
            AdjustmentRecord(
                AdjustmentEntry(r[0], r[1], r[2], int(r[3]), int(r[4]), UnitType(r[5]), r[6]),
                r[7],
                int(r[8]),
            )
            for r in rows
        ]
