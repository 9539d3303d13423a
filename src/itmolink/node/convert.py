"""Conversions between generated protobuf messages and core values."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from itmolink.core.blocks import Block
from itmolink.core.rules import AuthorisationTerms
from itmolink.core.units import Purpose, UnitType
from itmolink.v1 import authorisation_pb2, common_pb2

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_us(moment: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass an aware UTC datetime")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


def describe_us(micros: int) -> str:
    """A time for a message to a person, whatever a partner sent."""
    try:
        return f"{from_us(micros):%Y-%m-%dT%H:%M:%SZ}"
    except OverflowError:
        return f"{micros} microseconds after 1970-01-01"


def timestamp(micros: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, remainder = divmod(micros, 1_000_000)
    ts.nanos = remainder * 1000
    return ts


def timestamp_us(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def block_to_pb(block: Block) -> common_pb2.UnitBlock:
    return common_pb2.UnitBlock(
        originating_registry=block.originating_registry,
        serial_start=block.serial_start,
        serial_end=block.serial_end,
        unit_type=int(block.unit_type),  # type: ignore[arg-type]
        vintage=block.vintage,
        activity_id=block.activity_id,
        authorisation_id=block.authorisation_id,
        cooperative_approach_id=block.cooperative_approach_id,
        first_transferring_party=block.first_transferring_party,
    )


def block_from_pb(pb: common_pb2.UnitBlock) -> Block:
    try:
        unit_type = UnitType(pb.unit_type)
    except ValueError:
        unit_type = UnitType.UNSPECIFIED
    return Block(
        originating_registry=pb.originating_registry,
        serial_start=pb.serial_start,
        serial_end=pb.serial_end,
        unit_type=unit_type,
        vintage=pb.vintage,
        activity_id=pb.activity_id,
        authorisation_id=pb.authorisation_id,
        cooperative_approach_id=pb.cooperative_approach_id,
        first_transferring_party=pb.first_transferring_party,
    )


def _purpose(value: int) -> Purpose:
    try:
        return Purpose(value)
    except ValueError:
        return Purpose.UNSPECIFIED


def terms_from_statement(msg: authorisation_pb2.AuthorisationStatement) -> AuthorisationTerms:
    try:
        unit_type = UnitType(msg.unit_type)
    except ValueError:
        unit_type = UnitType.UNSPECIFIED
    return AuthorisationTerms(
        authorisation_id=msg.authorisation_id,
        version=msg.version,
        host_party=msg.host_party,
        activity_id=msg.activity.activity_id,
        cooperative_approach_id=msg.cooperative_approach_id,
        acquiring_parties=frozenset(msg.acquiring_parties),
        purposes=frozenset(_purpose(p) for p in msg.purposes),
        vintage_from=msg.vintage_from,
        vintage_to=msg.vintage_to,
        quantity_cap=msg.quantity_cap,
        unit_type=unit_type,
    )
