"""Hypothesis strategies for hostile but well-formed protocol messages.

Every strategy mixes plausible values (those that reach the engine's deeper checks, and
sometimes pass them) with hostile ones: integer edges up to 2**64-1, serial 0, reversed
ranges, empty and unicode strings, unknown enum values, ids of other parties.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from itmolink.v1 import (
    authorisation_pb2,
    common_pb2,
    issuance_pb2,
    keys_pb2,
    reconcile_pb2,
    transfer_pb2,
)
from tests.engine.conftest import START

from .support import UINT64_MAX, World, second_key

START_SECONDS = int(START.timestamp())

U64_EDGES = [0, 1, 2, 299, 300, 1000, 2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1,
             2**63 - 2, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]  # fmt: skip
U32_EDGES = [0, 1, 2, 2020, 2021, 2025, 2030, 2031, 2**31 - 1, 2**31, 2**32 - 1]
I64_EDGES = [-(2**63), -1, 0, 1, START_SECONDS, START_SECONDS + 60, 2**33, 2**62, 2**63 - 1]
I32_EDGES = [-(2**31), -1, 0, 1, 999_999_999, 10**9, 2**31 - 1]
TEXT_EDGES = ["", " ", "LAO", "KOR", "JPN", "lao", "LAO-", "KOR-", "LAO-T-", "KOR-T-000001",
              "LAO,KOR", "JPN,LAO", ",", "\x00", "LAO\x00", "LAO\n", "é", "Ελλάδα", "日本",
              "🦜", "\u202e", "A" * 300]  # fmt: skip


def mostly(
    plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any], weight: int = 3
) -> st.SearchStrategy[Any]:
    """``plausible`` about weight/(weight+1) of the time, else ``hostile``."""
    return st.one_of(*([plausible] * weight), hostile)


def u64() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 3000), st.integers(0, UINT64_MAX))


def u32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))


def int32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(I32_EDGES), st.integers(-(2**31), 2**31 - 1))


def text(*known: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*known, *TEXT_EDGES]), st.text(max_size=24))


def timestamps() -> st.SearchStrategy[Timestamp]:
    return st.builds(
        Timestamp,
        seconds=st.one_of(st.sampled_from(I64_EDGES), st.integers(-(2**63), 2**63 - 1)),
        nanos=int32(),
    )


def plausible_timestamp() -> st.SearchStrategy[Timestamp]:
    return mostly(
        st.integers(START_SECONDS - 60, START_SECONDS + 3600).map(lambda s: Timestamp(seconds=s)),
        timestamps(),
    )


def enum_value(valid: list[int]) -> st.SearchStrategy[int]:
    """A proto3 (open) enum: known values mostly, and anything an int32 holds."""
    return mostly(st.sampled_from(valid), st.one_of(st.sampled_from([0, 99, -1]), int32()))


SERIAL_EDGES = [0, 1, 2, 300, 301, 500, 501, 1000, 1001, 5000, 2**62, 2**63 - 2, 2**63 - 1,
                2**63, 2**64 - 1]  # fmt: skip


@st.composite
def unit_blocks(draw: st.DrawFn, world: World) -> common_pb2.UnitBlock:
    """A block, usually with the attributes of LAO's authorisation and a sane range.

    LAO issued serials 1-1000 (LAO-NR); KOR holds 1-300 and has accepted 301-500.
    """
    start = draw(
        st.one_of(st.sampled_from(SERIAL_EDGES), st.integers(0, 6000), st.integers(0, UINT64_MAX))
    )
    end = draw(
        mostly(
            st.integers(-2, 400).map(lambda n: max(0, min(UINT64_MAX, start + n))),
            st.one_of(st.sampled_from(SERIAL_EDGES), st.integers(0, UINT64_MAX)),
        )
    )
    return common_pb2.UnitBlock(
        originating_registry=draw(mostly(st.just("LAO-NR"), text("KOR-NR", "JPN-NR"), 4)),
        serial_start=start,
        serial_end=end,
        unit_type=common_pb2.UnitType.ValueType(draw(enum_value([1, 1, 1, 2, 3, 4]))),
        vintage=draw(mostly(st.sampled_from([2025, 2021, 2030]), u32())),
        activity_id=draw(mostly(st.just("LAO-SOLAR-WIND-1GW"), text(), 6)),
        authorisation_id=draw(mostly(st.just(world.authorisation_id), text("LAO-A-0002"), 6)),
        cooperative_approach_id=draw(mostly(st.just("LAO-KOR-A6.2"), text(), 6)),
        first_transferring_party=draw(mostly(st.just("LAO"), text(), 6)),
    )


def block_lists(world: World) -> st.SearchStrategy[list[common_pb2.UnitBlock]]:
    return st.lists(unit_blocks(world), min_size=0, max_size=4)


def quantity_for(blocks: list[common_pb2.UnitBlock]) -> st.SearchStrategy[int]:
    """Usually the sum of the blocks (when a uint64 holds it), else anything."""
    total = sum(b.serial_end - b.serial_start + 1 for b in blocks)
    if 0 <= total <= UINT64_MAX:
        return mostly(st.just(total), u64())
    return u64()


class Context:
    """What one example has done so far: ids and sequences it can reuse."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.message_ids: list[str] = [m.message_id for m in world.real]
        self.sequences: list[int] = []
        self.transfer_ids: list[str] = [world.completed_id, world.accepted_id, world.proposed_id]
        self.counter = 0

    def fresh(self) -> int:
        self.counter += 1
        return self.counter


@st.composite
def headers(draw: st.DrawFn, ctx: Context) -> common_pb2.Header:
    """A header that is usually valid; otherwise some fields are hostile."""
    n = ctx.fresh()
    fresh_id = f"fuzz-{n}"
    fresh_sequence = 1_000_000 + n
    hostile = draw(st.integers(0, 2)) == 0
    if not hostile:
        message_id, sequence = fresh_id, fresh_sequence
        protocol_version, sender, registry, audience = 1, "LAO", "LAO-NR", "KOR"
        sent_at = Timestamp(seconds=START_SECONDS)
        in_reply_to = ""
    else:
        message_id = draw(
            mostly(st.just(fresh_id), st.one_of(st.sampled_from(ctx.message_ids), text()), 2)
        )
        reused = st.sampled_from(ctx.sequences) if ctx.sequences else st.just(1)
        sequence = draw(
            mostly(st.just(fresh_sequence), st.one_of(st.sampled_from([0, 1, 2]), reused, u64()), 2)
        )
        protocol_version = draw(mostly(st.just(1), u32(), 2))
        sender = draw(mostly(st.just("LAO"), text("KOR", "JPN"), 2))
        registry = draw(mostly(st.just("LAO-NR"), text("KOR-NR"), 2))
        audience = draw(mostly(st.just("KOR"), text("LAO", "JPN", "kor", "KOR "), 2))
        sent_at = draw(plausible_timestamp())
        in_reply_to = draw(text(*ctx.message_ids))
    ctx.message_ids.append(message_id)
    ctx.sequences.append(sequence)
    return common_pb2.Header(
        protocol_version=protocol_version,
        message_id=message_id,
        sender_party=sender,
        sender_registry=registry,
        audience=audience,
        sent_at=sent_at,
        sequence=sequence,
        in_reply_to=in_reply_to,
    )


def transfer_ids(ctx: Context) -> st.SearchStrategy[str]:
    fresh = st.integers(0, 99).map(lambda n: f"LAO-T-9{n:05d}")
    known = st.sampled_from(ctx.transfer_ids)
    hostile = text("KOR-T-000001", "LAO-T-000002 ", "LAO-T-00000", "JPN-T-000001")
    return st.one_of(fresh, known, known, hostile)


@st.composite
def proposals(draw: st.DrawFn, ctx: Context) -> transfer_pb2.TransferProposal:
    blocks = draw(block_lists(ctx.world))
    transfer_id = draw(transfer_ids(ctx))
    msg = transfer_pb2.TransferProposal(
        header=draw(headers(ctx)),
        transfer_id=transfer_id,
        authorisation_id=draw(mostly(st.just(ctx.world.authorisation_id), text(), 6)),
        quantity=draw(quantity_for(blocks)),
        blocks=blocks,
        first_transfer=draw(st.booleans()),
        expires_at=draw(plausible_timestamp()),
    )
    ctx.transfer_ids.append(transfer_id)
    return msg


@st.composite
def completions(draw: st.DrawFn, ctx: Context) -> transfer_pb2.TransferCompletion:
    transfer_id = draw(transfer_ids(ctx))
    real = ctx.world.acceptance_digest(transfer_id)
    acceptance_digest = draw(
        mostly(
            st.just(real),
            st.one_of(st.just(b""), st.binary(min_size=32, max_size=32), st.binary(max_size=40)),
        )
    )
    return transfer_pb2.TransferCompletion(
        header=draw(headers(ctx)),
        transfer_id=transfer_id,
        acceptance_digest=acceptance_digest,
        adjustment_year=draw(mostly(st.just(2025), u32())),
    )


@st.composite
def voids(draw: st.DrawFn, ctx: Context) -> transfer_pb2.TransferVoid:
    return transfer_pb2.TransferVoid(
        header=draw(headers(ctx)), transfer_id=draw(transfer_ids(ctx)), reason=draw(text())
    )


@st.composite
def status_queries(draw: st.DrawFn, ctx: Context) -> transfer_pb2.TransferStatusQuery:
    return transfer_pb2.TransferStatusQuery(
        header=draw(headers(ctx)), transfer_id=draw(transfer_ids(ctx))
    )


@st.composite
def authorisation_statements(
    draw: st.DrawFn, ctx: Context
) -> authorisation_pb2.AuthorisationStatement:
    """Usually LAO's real statement with a few fields changed."""
    party = st.sampled_from(["KOR", "KOR", "LAO", "JPN", "", "KOR,JPN", "JPN,LAO", "kor"])
    return authorisation_pb2.AuthorisationStatement(
        header=draw(headers(ctx)),
        authorisation_id=draw(
            mostly(st.sampled_from([ctx.world.authorisation_id, "LAO-A-0002"]), text(), 2)
        ),
        version=draw(mostly(st.sampled_from([1, 2]), u32())),
        host_party=draw(mostly(st.just("LAO"), text("KOR", "JPN"))),
        activity=authorisation_pb2.Activity(
            activity_id=draw(mostly(st.just("LAO-SOLAR-WIND-1GW"), text())),
            name=draw(text()),
            description=draw(text()),
        ),
        cooperative_approach_id=draw(mostly(st.just("LAO-KOR-A6.2"), text())),
        acquiring_parties=draw(
            mostly(st.just(["KOR"]), st.lists(st.one_of(party, text()), max_size=4))
        ),
        purposes=draw(
            mostly(st.sampled_from([[1], [2], [1, 2]]), st.lists(enum_value([1, 2]), max_size=3))
        ),
        oimp_detail=draw(text()),
        first_transfer_definition=common_pb2.FirstTransferDefinition.ValueType(
            draw(enum_value([0, 1, 2, 3]))
        ),
        vintage_from=draw(mostly(st.just(2021), u32())),
        vintage_to=draw(mostly(st.just(2030), u32())),
        quantity_cap=draw(mostly(st.just(0), u64())),
        unit_type=common_pb2.UnitType.ValueType(draw(enum_value([1, 2, 3, 4]))),
    )


@st.composite
def issuance_notices(draw: st.DrawFn, ctx: Context) -> issuance_pb2.IssuanceNotice:
    blocks = draw(block_lists(ctx.world))
    return issuance_pb2.IssuanceNotice(
        header=draw(headers(ctx)),
        issuance_id=draw(
            mostly(st.sampled_from([ctx.world.issuance_id, "LAO-I-000002"]), text(), 2)
        ),
        authorisation_id=draw(mostly(st.just(ctx.world.authorisation_id), text(), 6)),
        blocks=blocks,
        quantity=draw(quantity_for(blocks)),
    )


@st.composite
def key_records(draw: st.DrawFn, world: World) -> keys_pb2.SigningKeyRecord:
    """A key to pin: LAO's current key (already pinned from its card), a new LAO key, or
    another party's; sometimes with an id that does not match, or a validity window."""
    candidates = [world.pair.keys["LAO"], second_key("LAO"), world.pair.keys["KOR"]]
    key = draw(st.sampled_from(candidates)).verifying_key()
    record = keys_pb2.SigningKeyRecord(
        key_id=draw(mostly(st.just(key.key_id), text(world.pair.keys["LAO"].key_id), 4)),
        public_key=draw(mostly(st.just(key.public_bytes), st.binary(max_size=40), 4)),
    )
    if draw(st.booleans()):
        record.not_before.CopyFrom(draw(plausible_timestamp()))
    if draw(st.booleans()):
        record.not_after.CopyFrom(draw(plausible_timestamp()))
    return record


@st.composite
def key_rotations(draw: st.DrawFn, ctx: Context) -> keys_pb2.KeyRotation:
    lao = ctx.world.pair.keys["LAO"].key_id
    msg = keys_pb2.KeyRotation(
        header=draw(headers(ctx)),
        rotation_id=draw(mostly(st.just(f"rotation-{ctx.fresh()}"), text(), 4)),
        revoked_key_ids=draw(
            st.lists(
                st.sampled_from([lao, second_key("LAO").key_id, ctx.world.pair.keys["KOR"].key_id])
                | text(),
                max_size=2,
            )
        ),
    )
    if draw(st.booleans()):
        msg.new_key.CopyFrom(draw(key_records(ctx.world)))
    return msg


@st.composite
def reconciliation_queries(draw: st.DrawFn, ctx: Context) -> reconcile_pb2.ReconciliationQuery:
    hex_prefix = st.text(alphabet="0123456789abcdef", max_size=4)
    return reconcile_pb2.ReconciliationQuery(
        header=draw(headers(ctx)),
        reconciliation_id=draw(mostly(st.just("rec-1"), text(), 4)),
        snapshot_at=draw(plausible_timestamp()),
        view=reconcile_pb2.ReconciliationView.ValueType(draw(enum_value([1, 2, 3]))),
        prefixes=draw(st.lists(mostly(hex_prefix, text()), max_size=3)),
        leaf_prefixes=draw(st.lists(mostly(hex_prefix, text()), max_size=3)),
        leaf_definition=draw(mostly(st.just(2), st.integers(0, 2**32 - 1))),
    )


def requests(ctx: Context) -> st.SearchStrategy[Any]:
    """Any request message, header and body generated: the six of the transfer protocol,
    and the key rotations and reconciliation queries of issues #4 and #5."""
    return st.one_of(
        proposals(ctx),
        completions(ctx),
        voids(ctx),
        status_queries(ctx),
        authorisation_statements(ctx),
        issuance_notices(ctx),
        key_rotations(ctx),
        reconciliation_queries(ctx),
    )


# -- settings --------------------------------------------------------------------------------

LONG = os.environ.get("HYPOTHESIS_PROFILE", "") == "long"


def fuzz_settings(ci: int, long: int) -> settings:
    """Settings for a fuzz test: ``ci`` examples in ``make test``, ``long`` under
    ``HYPOTHESIS_PROFILE=long`` (``make fuzz``). No deadline: the engine writes to SQLite
    with synchronous=FULL, so an example's time depends on the disk."""
    return settings(
        max_examples=long if LONG else ci,
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            # The world fixture is per test function on purpose (see test_fuzz_delivery.py).
            HealthCheck.function_scoped_fixture,
        ],
    )
