"""Replay windows, misdirection, limits and field validation, each with its code."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import Any

import pytest

from itmolink.core.codes import RejectionCode
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.node.convert import timestamp, to_us
from itmolink.node.engine import Limits
from itmolink.v1 import common_pb2, reply_pb2, transfer_pb2

from ..conftest import Databases
from .conftest import Pair, make_engine

_numbers = itertools.count(1_000)


def header(pair: Pair, **overrides: Any) -> common_pb2.Header:
    number = next(_numbers)  # clear of the sequence numbers LAO's engine uses itself
    fields: dict[str, Any] = dict(
        protocol_version=1, message_id=f"hand-made-{number}", sender_party="LAO",
        sender_registry="LAO-NR", audience="KOR", sent_at=timestamp(to_us(pair.now)),
        sequence=number,
    )  # fmt: skip
    fields.update(overrides)
    return common_pb2.Header(**fields)


def proposal(pair: Pair, **overrides: Any) -> transfer_pb2.TransferProposal:
    fields: dict[str, Any] = dict(
        header=header(pair), transfer_id="LAO-T-1", authorisation_id="LAO-A-0001",
        quantity=10, first_transfer=True,
        blocks=[common_pb2.UnitBlock(
            originating_registry="LAO-NR", serial_start=1, serial_end=10,
            unit_type=common_pb2.UNIT_TYPE_ITMO, vintage=2025, activity_id="LAO-SOLAR-WIND-1GW",
            authorisation_id="LAO-A-0001",
            cooperative_approach_id="LAO-KOR-A6.2", first_transferring_party="LAO",
        )],
        expires_at=timestamp(to_us(pair.now + dt.timedelta(minutes=1))),
    )  # fmt: skip
    fields.update(overrides)
    return transfer_pb2.TransferProposal(**fields)


def deliver(pair: Pair, msg: Any, *, to: str = "KOR") -> reply_pb2.Rejection | None:
    return deliver_from(pair, "LAO", msg, to=to)


def deliver_from(
    pair: Pair, sender: str, msg: Any, *, to: str | None = None
) -> reply_pb2.Rejection | None:
    """Seal ``msg`` with ``sender``'s key, deliver it, and return the Rejection (if any)."""
    to = to or ("KOR" if sender == "LAO" else "LAO")
    payload = msg.SerializeToString()
    envelope = seal(msg.DESCRIPTOR.full_name, payload, pair.keys[sender])
    reply = pair.engine(to).handle_delivery(sender, envelope, pair.now)
    verified = open_envelope(reply, TrustStore([pair.keys[to].verifying_key()]))
    if verified.payload_type != "itmolink.v1.Rejection":
        return None
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    return rejection


def code(rejection: reply_pb2.Rejection | None) -> RejectionCode | None:
    return None if rejection is None else RejectionCode(rejection.reasons[0].code)


@pytest.fixture
def ready(pair: Pair) -> Pair:
    authorisation_id = pair.authorise()
    assert authorisation_id == "LAO-A-0001"
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=100, now=pair.now)
    pair.pump()
    return pair


def test_a_well_formed_proposal_is_accepted(ready: Pair) -> None:
    assert deliver(ready, proposal(ready)) is None


@pytest.mark.parametrize("offset", [dt.timedelta(minutes=6), -dt.timedelta(days=31)])
def test_sent_at_outside_the_window_is_refused(ready: Pair, offset: dt.timedelta) -> None:
    msg = proposal(ready, header=header(ready, sent_at=timestamp(to_us(ready.now + offset))))
    assert code(deliver(ready, msg)) is RejectionCode.SENT_AT_OUT_OF_WINDOW


def test_a_small_clock_skew_is_tolerated(ready: Pair) -> None:
    ahead = timestamp(to_us(ready.now + dt.timedelta(minutes=4)))
    assert deliver(ready, proposal(ready, header=header(ready, sent_at=ahead))) is None


def test_an_expired_proposal_is_refused(ready: Pair) -> None:
    expired = timestamp(to_us(ready.now - dt.timedelta(minutes=6)))
    assert code(deliver(ready, proposal(ready, expires_at=expired))) is (
        RejectionCode.PROPOSAL_EXPIRED
    )


def test_a_message_for_kor_replayed_to_another_party_is_refused(
    ready: Pair, databases: Databases
) -> None:
    jpn = make_engine(databases, "JPN", "LAO", {**ready.keys, "JPN": ready.keys["KOR"]},
                      ready.keys["LAO"])  # fmt: skip
    msg = proposal(ready)
    payload = msg.SerializeToString()
    envelope = seal(msg.DESCRIPTOR.full_name, payload, ready.keys["LAO"])
    assert ready.kor.handle_delivery("LAO", envelope, ready.now)  # valid for KOR...
    reply = jpn.handle_delivery("LAO", envelope, ready.now)  # ...replayed to JPN
    verified = open_envelope(reply, TrustStore([ready.keys["KOR"].verifying_key()]))
    rejection = reply_pb2.Rejection()
    rejection.ParseFromString(verified.payload)
    assert RejectionCode(rejection.reasons[0].code) is RejectionCode.WRONG_AUDIENCE
    jpn.store.close()


def _limited(pair: Pair, **limits: Any) -> None:
    pair.kor.limits = dataclasses.replace(Limits(), **limits)


def test_too_many_blocks_are_refused(ready: Pair) -> None:
    _limited(ready, max_blocks=1)
    msg = proposal(ready)
    msg.blocks.append(msg.blocks[0])
    assert code(deliver(ready, msg)) is RejectionCode.TOO_MANY_BLOCKS


def test_an_oversized_envelope_is_refused_before_it_is_read(ready: Pair) -> None:
    _limited(ready, max_message_bytes=200)
    assert code(deliver(ready, proposal(ready))) is RejectionCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    "overrides",
    [
        {"transfer_id": "LAO-T-\x00evil"},
        {"authorisation_id": "A" * 300},
        {"quantity": 2**64 - 1},
        {"header_audience": "kor"},
    ],
    ids=["control-character", "too-long", "above-int64", "lower-case-party"],
)
def test_out_of_bounds_fields_are_refused(ready: Pair, overrides: dict[str, Any]) -> None:
    msg = proposal(ready)
    for name, value in overrides.items():
        if name == "header_audience":
            msg.header.audience = value
        else:
            setattr(msg, name, value)
    rejection = deliver(ready, msg)
    expected = {RejectionCode.INVALID_FIELD, RejectionCode.WRONG_AUDIENCE}
    assert code(rejection) in expected
    if "header_audience" not in overrides:
        assert code(rejection) is RejectionCode.INVALID_FIELD


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: setattr(m.blocks[0], "vintage", 2101), RejectionCode.INVALID_FIELD),
        (lambda m: setattr(m.blocks[0], "serial_start", 0), RejectionCode.MISSING_FIELD),
        (lambda m: setattr(m.blocks[0], "originating_registry", "LAO NR"),
         RejectionCode.INVALID_FIELD),
        (lambda m: setattr(m.header, "sender_registry", ""), RejectionCode.MISSING_FIELD),
        (lambda m: setattr(m, "quantity", 0), RejectionCode.MISSING_FIELD),
    ],
    ids=["vintage-above-2100", "serial-zero", "registry-with-space", "no-registry",
         "zero-quantity"],
)  # fmt: skip
def test_the_field_rules_declared_in_the_proto_are_enforced(
    ready: Pair, change: Any, expected: RejectionCode
) -> None:
    msg = proposal(ready)
    change(msg)
    assert code(deliver(ready, msg)) is expected


def test_every_rule_pattern_in_the_proto_compiles_and_is_anchored_by_the_validator() -> None:
    import re

    from itmolink.node.validation import _rules
    from itmolink.v1 import authorisation_pb2, common_pb2, issuance_pb2

    descriptors = [
        *common_pb2.DESCRIPTOR.message_types_by_name.values(),
        *transfer_pb2.DESCRIPTOR.message_types_by_name.values(),
        *authorisation_pb2.DESCRIPTOR.message_types_by_name.values(),
        *issuance_pb2.DESCRIPTOR.message_types_by_name.values(),
    ]
    patterns = [r.pattern for d in descriptors for _, r in _rules(d) if r.pattern]
    assert len(patterns) >= 5
    for pattern in patterns:
        re.compile(pattern)


def test_a_partner_cannot_hand_over_serials_of_another_registry(ready: Pair) -> None:
    msg = proposal(ready)
    msg.blocks[0].originating_registry = "KOR-NR"  # KOR's own serial space
    assert code(deliver(ready, msg)) is RejectionCode.BLOCK_ATTRIBUTE_MISMATCH


def test_an_authorisation_id_must_carry_its_hosts_prefix(ready: Pair) -> None:
    from itmolink.v1 import authorisation_pb2

    statement = authorisation_pb2.AuthorisationStatement(
        header=header(ready), authorisation_id="KOR-A-0001", version=1, host_party="LAO",
        activity=authorisation_pb2.Activity(activity_id="X"), cooperative_approach_id="C",
        acquiring_parties=["KOR"], purposes=[common_pb2.PURPOSE_NDC], vintage_from=2021,
        vintage_to=2030, unit_type=common_pb2.UNIT_TYPE_ITMO,
    )  # fmt: skip
    assert code(deliver(ready, statement)) is RejectionCode.INVALID_IDENTIFIER
