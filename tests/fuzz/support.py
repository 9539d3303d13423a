"""Machinery shared by the hypothesis fuzz tests (tests/fuzz) and the atheris harnesses (fuzz/).

Nothing here depends on hypothesis or atheris, so both can import it.

* :class:`World` is a LAO/KOR :class:`~tests.engine.conftest.Pair` over SQLite with an
  authorisation acknowledged, units issued, one transfer completed, one accepted by KOR whose
  completion LAO has not delivered yet, and one proposal LAO has not delivered yet. Both
  databases can be reset to that state in about a millisecond (SQLite backup API).
* :func:`deliver` feeds one input to ``kor.handle_delivery("LAO", ...)`` and checks every
  property of issue #5 item 6 (see its docstring).
* Wire helpers and envelope mutators for structured tampering.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from itmolink import PROTOCOL_VERSION
from itmolink.core.adjustments import adjustments_for
from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Role, TransferState
from itmolink.core.units import UnitType
from itmolink.crypto.envelope import TrustStore, VerifiedEnvelope, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.node.convert import terms_from_statement
from itmolink.node.engine import EXPECTED_REPLY, REQUEST_TYPES, type_name
from itmolink.v1 import (
    authorisation_pb2,
    common_pb2,
    envelope_pb2,
    reply_pb2,
    transfer_pb2,
)
from tests.engine.conftest import START, Pair, make_engine

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

REJECTION_TYPE = type_name(reply_pb2.Rejection)
REQUEST_TYPE_NAMES: tuple[str, ...] = tuple(sorted(REQUEST_TYPES))
# Payload types that are not requests: replies, the envelope itself, near misses, junk.
OTHER_TYPE_NAMES: tuple[str, ...] = (
    REJECTION_TYPE,
    type_name(transfer_pb2.TransferAcceptance),
    type_name(transfer_pb2.TransferCompletionReceipt),
    type_name(authorisation_pb2.AuthorisationAcknowledgement),
    "itmolink.v1.Envelope",
    "itmolink.v1.Header",
    "itmolink.v1.TransferProposal ",
    "itmolink.v2.TransferProposal",
    "ITMOLINK.V1.TRANSFERPROPOSAL",
    "x",
)
ALL_TYPE_NAMES = REQUEST_TYPE_NAMES + OTHER_TYPE_NAMES

# Codes whose Rejection is sent without recording anything (docs/DESIGN.md decision 4).
NOT_RECORDED_SEQUENCE = 0


def fixed_key(party: str) -> SigningKey:
    """A deterministic key, so that seed corpora signed in one process verify in another."""
    seed = hashlib.sha256(f"itmolink-fuzz-key:{party}".encode()).digest()
    return SigningKey.from_private(party, Ed25519PrivateKey.from_private_bytes(seed))


def second_key(party: str) -> SigningKey:
    """Another deterministic key of ``party`` (announced in key rotations, never used to sign
    in the tests, so that "verifies under LAO's card key" stays the test's notion of LAO's)."""
    seed = hashlib.sha256(f"itmolink-fuzz-key:{party}#2".encode()).digest()
    return SigningKey.from_private(party, Ed25519PrivateKey.from_private_bytes(seed))


# -- protobuf wire format (just enough for structured envelope mutations) -------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


@dataclass(frozen=True)
class WireField:
    number: int
    wire_type: int
    raw: bytes  # the whole field: key and value

    def value(self) -> bytes:
        """The payload of a length-delimited field."""
        _, pos = read_varint(self.raw, 0)
        length, pos = read_varint(self.raw, pos)
        return self.raw[pos : pos + length]


def split_fields(data: bytes) -> list[WireField]:
    """The top-level fields of a serialised message, in order (raises ValueError)."""
    fields = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated field")
        fields.append(WireField(number, wire_type, data[start:pos]))
    return fields


def length_delimited(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


# -- envelope mutations ------------------------------------------------------------------

MUTATIONS = (
    "bit_flip",
    "byte_set",
    "truncate",
    "extend",
    "insert",
    "delete_range",
    "duplicate_field",
    "duplicate_field_changed",
    "drop_field",
    "reorder_fields",
    "swap_signature",
    "add_signature",
    "swap_payload_type",
    "swap_payload",
    "resign_other_key",
)


@dataclass(frozen=True)
class MutationArgs:
    """The fuzzer's choices for one mutation; each mutator reads what it needs."""

    position: int = 0
    length: int = 1
    bit: int = 0
    value: int = 0
    blob: bytes = b""
    index: int = 0
    other_envelope: bytes = b""
    payload_type: str = ""
    key: SigningKey | None = None


def mutate(raw: bytes, mutation: str, args: MutationArgs) -> bytes:
    """Apply one structured mutation to a serialised envelope (never raises)."""
    size = max(len(raw), 1)
    pos = args.position % size
    if mutation == "bit_flip":
        if not raw:
            return raw
        return raw[:pos] + bytes([raw[pos] ^ (1 << (args.bit % 8))]) + raw[pos + 1 :]
    if mutation == "byte_set":
        if not raw:
            return raw
        return raw[:pos] + bytes([args.value % 256]) + raw[pos + 1 :]
    if mutation == "truncate":
        return raw[: args.position % size]
    if mutation == "extend":
        return raw + args.blob
    if mutation == "insert":
        return raw[:pos] + args.blob + raw[pos:]
    if mutation == "delete_range":
        return raw[:pos] + raw[pos + max(args.length, 1) :]
    try:
        fields = split_fields(raw)
    except ValueError:
        return raw + args.blob
    if not fields:
        return raw + args.blob
    chosen = fields[args.index % len(fields)]
    where = args.position % (len(fields) + 1)
    if mutation == "duplicate_field":
        copy = [*fields[:where], chosen, *fields[where:]]
        return b"".join(f.raw for f in copy)
    if mutation == "duplicate_field_changed":
        if chosen.wire_type != 2:
            return raw + chosen.raw
        value = chosen.value()
        changed = value + args.blob if args.blob else value[:-1]
        twin = WireField(chosen.number, 2, length_delimited(chosen.number, changed))
        copy = [*fields[:where], twin, *fields[where:]]
        return b"".join(f.raw for f in copy)
    if mutation == "drop_field":
        return b"".join(f.raw for f in fields if f is not chosen)
    if mutation == "reorder_fields":
        rotated = fields[where % len(fields) :] + fields[: where % len(fields)]
        return b"".join(f.raw for f in reversed(rotated))
    envelope = _parse_envelope(raw)
    other = _parse_envelope(args.other_envelope)
    if envelope is None:
        return raw + args.blob
    if mutation == "swap_signature" and other is not None and other.signatures:
        del envelope.signatures[:]
        envelope.signatures.extend(other.signatures)
    elif mutation == "add_signature" and other is not None and other.signatures:
        envelope.signatures.append(other.signatures[args.index % len(other.signatures)])
    elif mutation == "swap_payload_type":
        envelope.payload_type = args.payload_type
    elif mutation == "swap_payload" and other is not None:
        envelope.payload = other.payload
    elif mutation == "resign_other_key" and args.key is not None:
        return seal(envelope.payload_type, envelope.payload, args.key)
    return envelope.SerializeToString()


def _parse_envelope(raw: bytes) -> envelope_pb2.Envelope | None:
    envelope = envelope_pb2.Envelope()
    try:
        envelope.ParseFromString(raw)
    except DecodeError:
        return None
    return envelope


# -- the world -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RealMessage:
    """An envelope LAO really sent (journal direction 'out')."""

    message_id: str
    payload_type: str
    envelope: bytes
    payload: bytes
    delivered: bool


@dataclass(frozen=True)
class Snapshot:
    digest: bytes
    counts: tuple[tuple[str, int], ...]


def _reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


class World:
    """A Pair past its set-up, with cheap resets and read access to both databases.

    A plain class, not a dataclass, so that hypothesis prints it as one short line.
    """

    def __init__(
        self,
        *,
        pair: Pair,
        directory: Path,
        authorisation_id: str,
        completed_id: str,
        accepted_id: str,
        proposed_id: str,
        issuance_id: str,
    ) -> None:
        self.pair = pair
        self.directory = directory
        self.authorisation_id = authorisation_id
        self.completed_id = completed_id  # completed on both sides
        self.accepted_id = accepted_id  # accepted by KOR; LAO's completion not delivered
        self.proposed_id = proposed_id  # LAO's proposal not delivered
        self.issuance_id = issuance_id
        self.real: list[RealMessage] = []
        self.lao_trust = TrustStore([pair.keys["LAO"].verifying_key()])
        self.kor_trust = TrustStore([pair.keys["KOR"].verifying_key()])
        # Keys KOR does not pin for LAO: KOR's own and JPN's.
        self.others = {"KOR": pair.keys["KOR"], "JPN": fixed_key("JPN")}
        self._readers: dict[str, sqlite3.Connection] = {}
        self._templates: dict[str, sqlite3.Connection] = {}
        self._baseline: Snapshot | None = None

    def __repr__(self) -> str:
        return f"World({self.directory})"

    @property
    def kor_path(self) -> Path:
        return self.directory / "kor.db"

    @property
    def lao_path(self) -> Path:
        return self.directory / "lao.db"

    def reader(self, party: str) -> sqlite3.Connection:
        if party not in self._readers:
            path = self.kor_path if party == "KOR" else self.lao_path
            self._readers[party] = _reader(path)
        return self._readers[party]

    def save_template(self) -> None:
        for party in ("LAO", "KOR"):
            template = sqlite3.connect(":memory:", check_same_thread=False)
            self.reader(party).backup(template)
            self._templates[party] = template
        self._baseline = self.snapshot()

    def reset(self) -> None:
        """Put both databases back to the state after set-up (the engines keep running, and
        reload the signing keys they pin from the restored tables)."""
        for party, template in self._templates.items():
            template.backup(self.reader(party))
        for engine in (self.pair.lao, self.pair.kor):
            reload_trust = getattr(engine, "reload_trust", None)
            if reload_trust is not None:
                reload_trust()

    @property
    def baseline(self) -> Snapshot:
        assert self._baseline is not None
        return self._baseline

    def snapshot(self) -> Snapshot:
        """A digest of every row of every table of KOR's database."""
        conn = self.reader("KOR")
        digest = hashlib.sha256()
        counts = []
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for table in tables:
            rows = conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall()
            digest.update(f"{table}:{len(rows)}:".encode())
            digest.update(repr(rows).encode())
            counts.append((table, len(rows)))
        return Snapshot(digest.digest(), tuple(counts))

    def acceptance_digest(self, transfer_id: str) -> bytes:
        row = (
            self.reader("KOR")
            .execute(
                "SELECT acceptance_digest FROM transfers WHERE transfer_id = ?", (transfer_id,)
            )
            .fetchone()
        )
        return b"" if row is None else bytes(row[0])

    def close(self) -> None:
        for conn in [*self._readers.values(), *self._templates.values()]:
            conn.close()
        self.pair.lao.store.close()
        self.pair.kor.store.close()


def build_world(directory: Path, keys: dict[str, SigningKey] | None = None) -> World:
    """LAO and KOR over SQLite in ``directory``, past the set-up described in the module doc."""
    keys = keys or {party: fixed_key(party) for party in ("LAO", "KOR")}
    lao = make_engine(directory, "LAO", "KOR", keys, keys["KOR"])
    kor = make_engine(directory, "KOR", "LAO", keys, keys["LAO"])
    pair = Pair(lao=lao, kor=kor, keys=keys)
    authorisation_id = pair.authorise()
    issuance_id, _ = lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=1000, now=pair.now
    )
    pair.pump()
    completed = lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=300, now=pair.now
    )
    pair.pump()
    accepted = lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=200, now=pair.now
    )
    [(message_id, _, proposal)] = lao.due_messages(pair.now)
    lao.handle_reply(message_id, kor.handle_delivery("LAO", proposal, pair.now), pair.now)
    proposed = lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now
    )
    undelivered = {m[0] for m in lao.due_messages(pair.now)}
    world = World(
        pair=pair,
        directory=directory,
        authorisation_id=authorisation_id,
        completed_id=completed,
        accepted_id=accepted,
        proposed_id=proposed,
        issuance_id=issuance_id,
    )
    rows = world.reader("LAO").execute(
        "SELECT message_id, payload_type, envelope FROM journal "
        "WHERE direction = 'out' AND partner = 'KOR' ORDER BY id"
    )
    for message_id, payload_type, envelope in rows:
        if payload_type not in REQUEST_TYPES:
            continue
        verified = open_envelope(bytes(envelope), world.lao_trust)
        world.real.append(
            RealMessage(
                message_id,
                payload_type,
                bytes(envelope),
                verified.payload,
                message_id not in undelivered,
            )
        )
    world.save_template()
    return world


def real_message(world: World, payload_type: str, transfer_id: str = "") -> RealMessage:
    for message in world.real:
        if message.payload_type == payload_type and (
            not transfer_id or transfer_id.encode() in message.payload
        ):
            return message
    raise LookupError(payload_type)


def real_request(world: World, message: RealMessage) -> Message:
    msg = REQUEST_TYPES[message.payload_type]()
    msg.ParseFromString(message.payload)
    return msg


# -- building signed requests ----------------------------------------------------------------


def header(
    *,
    message_id: str,
    sequence: int,
    sender_party: str = "LAO",
    sender_registry: str = "LAO-NR",
    audience: str = "KOR",
    protocol_version: int = PROTOCOL_VERSION,
    sent_at: Timestamp | None = None,
    in_reply_to: str = "",
) -> common_pb2.Header:
    return common_pb2.Header(
        protocol_version=protocol_version,
        message_id=message_id,
        sender_party=sender_party,
        sender_registry=sender_registry,
        audience=audience,
        sent_at=sent_at if sent_at is not None else Timestamp(seconds=int(START.timestamp())),
        sequence=sequence,
        in_reply_to=in_reply_to,
    )


def sign(msg: Message, key: SigningKey, payload_type: str | None = None) -> bytes:
    name = payload_type if payload_type is not None else type_name(type(msg))
    return seal(name, msg.SerializeToString(), key)


# -- properties ----------------------------------------------------------------------------


class PropertyViolation(AssertionError):
    """A fuzz property does not hold; the message says which and why."""


def check(condition: object, message: str | Callable[[], str]) -> None:
    if not condition:
        raise PropertyViolation(message() if callable(message) else message)


KNOWN_CODES = frozenset(int(code) for code in RejectionCode) - {int(RejectionCode.UNSPECIFIED)}


@dataclass
class Outcome:
    """What one delivery did."""

    reply: bytes = b""
    reply_type: str = ""
    codes: tuple[int, ...] = ()
    reply_sequence: int = -1
    changed: bool = False
    request: Message | None = None
    verified: VerifiedEnvelope | None = None


def open_request(world: World, raw: bytes) -> tuple[VerifiedEnvelope | None, Message | None]:
    """What KOR would see in ``raw``: the verified envelope and the parsed request, if any."""
    try:
        verified = open_envelope(raw, world.lao_trust)
    except Rejected:
        return None, None
    cls = REQUEST_TYPES.get(verified.payload_type)
    if cls is None:
        return verified, None
    msg = cls()
    try:
        msg.ParseFromString(verified.payload)
    except DecodeError:
        return verified, None
    return verified, msg


def deliver(
    world: World,
    raw: bytes,
    *,
    signed: Collection[tuple[str, bytes]] | None = None,
) -> Outcome:
    """Feed ``raw`` to ``kor.handle_delivery("LAO", raw, now)`` and check the properties.

    * handle_delivery returns (any exception propagates: the caller's test fails);
    * the reply verifies under KOR's key, names KOR as sender and LAO as audience;
    * a Rejection has at least one reason, every reason with a known code other than
      UNSPECIFIED; any other reply is the one ``EXPECTED_REPLY`` names for a request that
      verified under LAO's key;
    * a reply with sequence 0 (docs/DESIGN.md decision 4: not recorded) changed nothing, and
      so did anything that does not verify under LAO's key;
    * ``signed``: ``raw`` was tampered with after signing, and these are the (payload_type,
      payload) pairs LAO really signed (the original and any envelope a mutation borrowed
      from). Unless ``raw`` still verifies as exactly one of them (a re-encoding of signed
      bytes), KOR's tables must not change at all;
    * the ledger invariants (:func:`check_ledger`) hold afterwards;
    * an acknowledged AuthorisationStatement is stored with the terms that were signed.
    """
    verified, request = open_request(world, raw)
    before = world.snapshot()
    outcome = Outcome(request=request, verified=verified)
    reply = world.pair.kor.handle_delivery("LAO", raw, world.pair.now)

    # The reply: signed by KOR, addressed to LAO, coded.
    outcome.reply = reply
    try:
        opened = open_envelope(reply, world.kor_trust)
    except Rejected as exc:
        raise PropertyViolation(f"the reply does not verify under KOR's key: {exc}") from None
    check(opened.signer_party == "KOR", f"reply signed by {opened.signer_party}")
    outcome.reply_type = opened.payload_type
    if opened.payload_type == REJECTION_TYPE:
        rejection = reply_pb2.Rejection()
        rejection.ParseFromString(opened.payload)
        codes = tuple(int(r.code) for r in rejection.reasons)
        check(codes, "a Rejection without a reason")
        check(
            all(code in KNOWN_CODES for code in codes),
            lambda: f"a Rejection with an unknown or UNSPECIFIED code: {codes} {rejection}",
        )
        outcome.codes = codes
        reply_header = rejection.header
    else:
        check(
            verified is not None and request is not None,
            lambda: f"{opened.payload_type} answers input that does not verify as a request",
        )
        assert verified is not None
        expected = type_name(EXPECTED_REPLY[verified.payload_type])
        check(
            opened.payload_type == expected,
            lambda: f"{verified.payload_type} answered with {opened.payload_type}",
        )
        reply_msg = EXPECTED_REPLY[verified.payload_type]()
        reply_msg.ParseFromString(opened.payload)
        reply_header = reply_msg.header  # type: ignore[attr-defined]
    check(
        reply_header.audience == "LAO",
        lambda: f"reply addressed to {reply_header.audience!r}",
    )
    check(reply_header.sender_party == "KOR", f"reply names sender {reply_header.sender_party!r}")
    check(reply_header.protocol_version == PROTOCOL_VERSION, "reply protocol_version")
    outcome.reply_sequence = reply_header.sequence

    after = world.snapshot()
    outcome.changed = after != before
    if outcome.changed:
        check(
            verified is not None and request is not None,
            "input that does not verify under LAO's key as a request changed KOR's tables",
        )
        check(
            outcome.reply_sequence != NOT_RECORDED_SEQUENCE,
            lambda: (
                f"a reply with sequence 0 ({outcome.codes}) but KOR's tables changed: "
                f"{before.counts} -> {after.counts}"
            ),
        )
    if signed is not None and outcome.changed:
        same = verified is not None and (verified.payload_type, verified.payload) in signed
        check(
            same,
            lambda: (
                "tampered input changed KOR's tables: "
                f"{before.counts} -> {after.counts}; reply {outcome.reply_type} {outcome.codes}"
            ),
        )
    check_ledger(world)
    if isinstance(request, authorisation_pb2.AuthorisationStatement) and (
        opened.payload_type == type_name(authorisation_pb2.AuthorisationAcknowledgement)
    ):
        check_stored_authorisation(world, request)
    return outcome


def check_stored_authorisation(
    world: World, statement: authorisation_pb2.AuthorisationStatement
) -> None:
    """KOR keeps the terms it acknowledged exactly as LAO signed them (found broken: KB-2)."""
    signed = terms_from_statement(statement)
    with world.pair.kor.store.transaction() as tx:
        stored = tx.authorisation_get("LAO", signed.authorisation_id)
    if stored is None or stored.version != signed.version:
        return  # an older version was re-acknowledged; a newer one is recorded
    if stored != signed:
        raise PropertyViolation(f"KOR stored {stored} for the signed terms {signed}")


def check_ledger(world: World) -> None:
    """KOR's ledger invariants (KOR never sends units in these tests).

    1. every block KOR has is held (none reserved) and no two of them overlap;
    2. the blocks KOR has add up to the quantities of its completed incoming transfers;
    3. each completed incoming transfer's blocks are exactly blocks KOR holds, and add up to
       its quantity;
    4. corresponding adjustments exist only for completed incoming transfers, are exactly
       what core.adjustments_for gives for their blocks, and point at the journal entry of
       the TransferCompletion LAO sent.
    """
    conn = world.reader("KOR")
    conn.execute("BEGIN")
    try:
        blocks = conn.execute(
            "SELECT originating_registry, serial_start, serial_end, status, transfer_id "
            "FROM blocks ORDER BY originating_registry, serial_start"
        ).fetchall()
        transfers = {
            r[0]: (r[1], r[2], int(r[3]), int(r[4]))
            for r in conn.execute(
                "SELECT transfer_id, direction, partner, state, quantity FROM transfers"
            )
        }
        transfer_blocks: dict[str, list[Block]] = {}
        for r in conn.execute(
            "SELECT transfer_id, originating_registry, serial_start, serial_end, unit_type, "
            "vintage FROM transfer_blocks"
        ):
            transfer_blocks.setdefault(r[0], []).append(
                Block(r[1], int(r[2]), int(r[3]), UnitType(r[4]), int(r[5]), "", "", "", "")
            )
        adjustments = conn.execute(
            "SELECT a.transfer_id, a.year, a.amount, a.unit_type, a.party, a.partner, "
            "j.direction, j.partner, j.payload_type FROM adjustments a "
            "LEFT JOIN journal j ON j.id = a.evidence_journal_id"
        ).fetchall()
    finally:
        conn.execute("COMMIT")

    for registry, start, _end, status, transfer_id in blocks:
        if status != "held" or transfer_id is not None:
            raise PropertyViolation(f"KOR block {registry}:{start} is {status} ({transfer_id})")
    for before, after in itertools.pairwise(blocks):
        if before[0] == after[0] and after[1] <= before[2]:
            raise PropertyViolation(f"KOR holds overlapping blocks {before} and {after}")
    completed = {
        tid: t
        for tid, t in transfers.items()
        if t[0] == "in" and t[2] == int(TransferState.COMPLETED)
    }
    held_total = sum(end - start + 1 for _, start, end, _, _ in blocks)
    completed_total = sum(t[3] for t in completed.values())
    if held_total != completed_total:
        raise PropertyViolation(
            f"KOR holds {held_total} but its completed incoming transfers add up to "
            f"{completed_total}"
        )
    held = {(b[0], b[1], b[2]) for b in blocks}
    for tid, (_, _, _, quantity) in completed.items():
        mine = transfer_blocks.get(tid, [])
        if sum(b.quantity for b in mine) != quantity:
            raise PropertyViolation(
                f"completed transfer {tid}: blocks add up to {sum(b.quantity for b in mine)}, "
                f"its quantity is {quantity}"
            )
        for b in mine:
            if (b.originating_registry, b.serial_start, b.serial_end) not in held:
                raise PropertyViolation(f"completed transfer {tid}: KOR does not hold {b.label()}")
    evidence_ok = ("in", "LAO", type_name(transfer_pb2.TransferCompletion))
    found: Counter[tuple[str, int, int, int]] = Counter()
    for tid, year, amount, unit_type, party, partner, *evidence in adjustments:
        if tid not in completed:
            raise PropertyViolation(
                f"a corresponding adjustment for {tid!r}, which is not a completed incoming "
                f"transfer: {transfers.get(tid)}"
            )
        if (party, partner) != ("KOR", "LAO") or tuple(evidence) != evidence_ok:
            raise PropertyViolation(f"adjustment of {tid}: {party}/{partner}, evidence {evidence}")
        found[(tid, int(year), int(amount), int(unit_type))] += 1
    expected: Counter[tuple[str, int, int, int]] = Counter()
    for tid in completed:
        blocks_of = transfer_blocks.get(tid, [])
        for entry in adjustments_for(Role.RECEIVER, "KOR", "LAO", tid, blocks_of):
            expected[(tid, entry.year, entry.amount, int(entry.unit_type))] += 1
    if found != expected:
        raise PropertyViolation(f"adjustments {dict(found)} != expected {dict(expected)}")
