"""Minimal reproductions of the bugs the fuzzers found in src/, kept as regression tests.

All three were found by tests/fuzz and were fixed in src/ by its owners while this suite
was being written (the suite itself changes nothing in src/):

KB-1  (present at a9bdc4d; gone from cb20a64, whose field validation bounds unsigned
      integers, and 5b45009, which bounds timestamps.) Integers from the wire that SQLite's
      signed 64-bit INTEGER cannot hold reached the database: handle_delivery raised
      OverflowError instead of answering with a signed, coded Rejection (the gRPC runtime
      turns that into a bare UNKNOWN status, and the sender redelivers for ever).
KB-2  (present at a9bdc4d; gone at HEAD, where 9fcf085's party-code pattern [A-Z]{3}
      refuses such codes.) acquiring_parties is stored comma-joined: a party code that is
      empty or contains ',' did not survive the round trip, so KOR acknowledged terms other
      than the ones it stored, and refused the identical statement the next time
      (AUTHORISATION_CONFLICT).
KB-3  (present at 2253507, from the key rotation of 12f374e; fixed by fbe2d6a, where an
      in-band announcement replaces the card's copy of a key.) A KeyRotation whose new_key
      has the id of a key KOR already pins, with another validity window (LAO's card key
      has none), was recorded and acknowledged, then the after-commit reload_trust raised
      ValueError("... pinned twice ..."): handle_delivery raised instead of replying, and
      every later reload_trust raised too, Engine() included, so the node could not start
      again on that database: a lasting denial of service from one signed partner message.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from itmolink.v1 import authorisation_pb2, common_pb2, keys_pb2, transfer_pb2
from tests.engine.conftest import make_engine

from .support import REJECTION_TYPE, Outcome, World, deliver, header, sign

INT64_MAX = 2**63 - 1


def send(world: World, msg: Message, sequence: int = 1_000_001) -> Outcome:
    """Deliver ``msg`` from LAO to KOR with a valid header, checking every fuzz property."""
    msg.header.CopyFrom(header(message_id=f"kb-{sequence}", sequence=sequence))  # type: ignore[attr-defined]
    return deliver(world, sign(msg, world.pair.keys["LAO"]))


def block(world: World, registry: str, start: int, end: int) -> common_pb2.UnitBlock:
    """A block with the attributes of LAO's authorisation."""
    return common_pb2.UnitBlock(
        originating_registry=registry,
        serial_start=start,
        serial_end=end,
        unit_type=common_pb2.UNIT_TYPE_ITMO,
        vintage=2025,
        activity_id="LAO-SOLAR-WIND-1GW",
        authorisation_id=world.authorisation_id,
        cooperative_approach_id="LAO-KOR-A6.2",
        first_transferring_party="LAO",
    )


def proposal(world: World, **overrides: object) -> transfer_pb2.TransferProposal:
    fields: dict[str, object] = dict(
        transfer_id="LAO-T-900001",
        authorisation_id=world.authorisation_id,
        quantity=10,
        blocks=[block(world, "LAO-NR", 5000, 5009)],
        expires_at=Timestamp(seconds=1_767_225_660),
    )
    fields.update(overrides)
    return transfer_pb2.TransferProposal(**fields)  # type: ignore[arg-type]


def statement(**overrides: object) -> authorisation_pb2.AuthorisationStatement:
    fields: dict[str, object] = dict(
        authorisation_id="LAO-A-0002",
        version=1,
        host_party="LAO",
        activity=authorisation_pb2.Activity(activity_id="LAO-SOLAR-WIND-1GW"),
        cooperative_approach_id="LAO-KOR-A6.2",
        acquiring_parties=["KOR"],
        purposes=[common_pb2.PURPOSE_NDC],
        vintage_from=2021,
        vintage_to=2030,
        unit_type=common_pb2.UNIT_TYPE_ITMO,
    )
    fields.update(overrides)
    return authorisation_pb2.AuthorisationStatement(**fields)  # type: ignore[arg-type]


def test_the_reproductions_are_otherwise_valid(world: World) -> None:
    """The same messages with ordinary values are answered normally."""
    status = send(world, transfer_pb2.TransferStatusQuery(transfer_id="LAO-T-000001"), 7)
    assert status.reply_type == "itmolink.v1.TransferStatusReport"
    assert send(world, proposal(world), 8).reply_type == "itmolink.v1.TransferAcceptance"
    acknowledged = send(world, statement(), 9)
    assert acknowledged.reply_type == "itmolink.v1.AuthorisationAcknowledgement"


# -- KB-1 ---------------------------------------------------------------------------------------


def test_kb1_header_sequence_beyond_int64(world: World) -> None:
    query = transfer_pb2.TransferStatusQuery(transfer_id="LAO-T-000001")
    assert send(world, query, sequence=2**63).reply_type == REJECTION_TYPE


def test_kb1_rejected_proposal_with_quantity_beyond_int64(world: World) -> None:
    # Refused (no blocks); the refusal used to be recorded with the proposal's quantity.
    refused = transfer_pb2.TransferProposal(transfer_id="LAO-T-900000", quantity=2**63)
    assert send(world, refused).reply_type == REJECTION_TYPE


def test_kb1_valid_blocks_whose_total_exceeds_int64(world: World) -> None:
    # Every block is valid (serials <= 2**63-1); quantity is their sum, which only a uint64
    # holds.
    blocks = [block(world, "LAO-NR", 5000, INT64_MAX), block(world, "JPN-NR", 1, 2**62)]
    quantity = sum(b.serial_end - b.serial_start + 1 for b in blocks)
    assert INT64_MAX < quantity < 2**64
    assert send(world, proposal(world, quantity=quantity, blocks=blocks)).reply_type
    # (any coded answer will do; deliver checked the codes and the ledger)


def test_kb1_proposal_expiring_beyond_int64_microseconds(world: World) -> None:
    assert send(world, proposal(world, expires_at=Timestamp(seconds=2**62))).reply_type


def test_kb1_authorisation_cap_beyond_int64(world: World) -> None:
    assert send(world, statement(quantity_cap=2**63)).reply_type == REJECTION_TYPE


# -- KB-2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("odd_party", ["JPN,LAO", ""])
def test_kb2_acquiring_party_code_survives_storage_or_is_refused(
    world: World, odd_party: str
) -> None:
    # "JPN,LAO", stored comma-joined, came back as JPN and LAO: KOR's record said the host
    # LAO acquires under its own authorisation.
    parties = ["KOR", odd_party]
    first = send(world, statement(acquiring_parties=parties), sequence=1_000_001)
    if first.reply_type == REJECTION_TYPE:
        return  # refused as a malformed party code: fine
    # deliver() checked that the stored terms are the signed ones; the same statement
    # delivered again is acknowledged again, not an AUTHORISATION_CONFLICT.
    again = send(world, statement(acquiring_parties=parties), sequence=1_000_002)
    assert again.codes == ()


# -- KB-3 ---------------------------------------------------------------------------------------


def rotation(world: World, **window: Timestamp) -> keys_pb2.KeyRotation:
    """LAO announces its current (card) key again, with a validity window."""
    card = world.pair.keys["LAO"].verifying_key()
    return keys_pb2.KeyRotation(
        rotation_id="rotation-1",
        new_key=keys_pb2.SigningKeyRecord(
            key_id=card.key_id, public_key=card.public_bytes, **window
        ),
    )


def test_kb3_key_rotation_re_announcing_a_pinned_key(world: World) -> None:
    outcome = send(world, rotation(world, not_after=Timestamp(seconds=2**33)))
    assert outcome.reply_type  # answered, whether acknowledged or refused


def test_kb3_the_node_starts_again_after_such_a_rotation(world: World) -> None:
    send(world, rotation(world, not_after=Timestamp(seconds=2**33)))
    keys = world.pair.keys
    restarted = make_engine(world.directory, "KOR", "LAO", keys, keys["LAO"])
    restarted.store.close()
