"""Fuzzing the engine as a black box through handle_delivery (issue #5 item 6b).

KOR receives, from the mTLS peer LAO, (i) arbitrary bytes, (ii) envelopes validly signed by
LAO whose payloads are arbitrary bytes under every payload type, (iii) validly signed,
well-formed requests with hostile field values, in short sequences that reuse ids and
sequence numbers, and tampered copies of signed requests. tests/fuzz/support.py ``deliver``
checks the properties after every single delivery: handle_delivery returns, its reply
verifies under KOR's key and is addressed to LAO, a Rejection carries known non-UNSPECIFIED
codes, unauthenticated or tampered input changes nothing in KOR's tables, and KOR's ledger
invariants hold.

State. Each test function gets its own world (a Pair over SQLite in tmp_path, built once
per function: about 20 ms). Examples that can change KOR's state first call
``world.reset()``, which restores both databases from the snapshot taken after set-up
(SQLite backup API, about 1 ms). Without the reset, an example's outcome would depend on
every earlier example: hypothesis could neither replay nor shrink a failure (it would
report it as flaky), and the accumulated sequence numbers and ids would steer later
examples into SEQUENCE_REUSED instead of the checks behind it. Interactions between
messages are still explored: the examples of test (iii) are sequences of up to five
deliveries against the same state. Test (i) skips the reset because unsigned bytes can
never change anything, which it asserts.
"""

from __future__ import annotations

from hypothesis import event, given, note
from hypothesis import strategies as st

from itmolink.core.codes import RejectionCode
from itmolink.crypto.envelope import seal
from itmolink.node.engine import type_name
from itmolink.v1 import keys_pb2

from .strategies import Context, fuzz_settings, headers, requests
from .support import (
    ALL_TYPE_NAMES,
    MUTATIONS,
    REJECTION_TYPE,
    REQUEST_TYPE_NAMES,
    Outcome,
    World,
    deliver,
    length_delimited,
    mutate,
    sign,
)
from .test_fuzz_envelope import JPN, KOR, mutation_args, signed_contents


def describe(outcome: Outcome) -> str:
    if outcome.reply_type == REJECTION_TYPE:
        return "Rejection " + ",".join(RejectionCode(c).name for c in outcome.codes)
    return outcome.reply_type.rsplit(".", 1)[-1]


# -- (i) arbitrary bytes -----------------------------------------------------------------------


@fuzz_settings(ci=400, long=20_000)
@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes(world: World, raw: bytes) -> None:
    outcome = deliver(world, raw, signed=())
    assert outcome.reply_type == REJECTION_TYPE
    assert outcome.reply_sequence == 0
    assert not outcome.changed
    event(describe(outcome))


# -- (ii) validly signed envelopes, arbitrary payloads -------------------------------------------


@fuzz_settings(ci=400, long=20_000)
@given(
    payload_type=st.one_of(st.sampled_from(REQUEST_TYPE_NAMES), st.sampled_from(ALL_TYPE_NAMES)),
    with_header=st.booleans(),
    payload=st.binary(max_size=1024),
    data=st.data(),
)
def test_signed_arbitrary_payloads(
    world: World, payload_type: str, with_header: bool, payload: bytes, data: st.DataObject
) -> None:
    """Arbitrary payload bytes, optionally behind a valid header (field 1 of every request),
    so that the bytes after it reach the handlers as fields of the request."""
    world.reset()
    if with_header:
        header = data.draw(headers(Context(world)), label="header")
        payload = length_delimited(1, header.SerializeToString()) + payload
    raw = seal(payload_type, payload, world.pair.keys["LAO"])
    outcome = deliver(world, raw)
    event(describe(outcome))


# -- (iii) well-formed requests with hostile field values ----------------------------------------

ACTIONS = ["generated"] * 6 + ["real", "resend", "same_header_other_body", "wrong_key"]


@fuzz_settings(ci=300, long=10_000)
@given(data=st.data())
def test_well_formed_requests(world: World, data: st.DataObject) -> None:
    world.reset()
    ctx = Context(world)
    sent: list[tuple[bytes, object]] = []
    for _ in range(data.draw(st.integers(1, 5), label="steps")):
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        if action == "real":
            real = data.draw(st.sampled_from(world.real), label="real message")
            raw, msg = real.envelope, None
        elif action == "resend" and sent:
            raw, msg = data.draw(st.sampled_from(sent), label="resent")
        elif action == "same_header_other_body" and sent:
            _, previous = data.draw(st.sampled_from(sent), label="header of")
            msg = data.draw(requests(ctx), label="request")
            if previous is not None:
                msg.header.CopyFrom(previous.header)  # type: ignore[attr-defined]
            raw = sign(msg, world.pair.keys["LAO"])
        else:
            msg = data.draw(requests(ctx), label="request")
            key = world.pair.keys["LAO"]
            if action == "wrong_key":
                key = data.draw(st.sampled_from(sorted(world.others.items())))[1]
            raw = sign(msg, key)
        note(f"{action}: {msg}")
        outcome = deliver(world, raw)
        sent.append((raw, msg))
        event(describe(outcome))


# -- tampering -----------------------------------------------------------------------------------


@fuzz_settings(ci=300, long=10_000)
@given(data=st.data())
def test_tampered_requests_change_nothing(world: World, data: st.DataObject) -> None:
    """A signed request mutated after signing is refused without a trace, and does not use
    up its message id or sequence: the untampered original, delivered afterwards, gets the
    answer it gets when it comes first."""
    world.reset()
    ctx = Context(world)
    if data.draw(st.booleans(), label="real"):
        real = data.draw(st.sampled_from(world.real), label="real message")
        raw, payload_type, payload = real.envelope, real.payload_type, real.payload
    else:
        msg = data.draw(requests(ctx), label="request")
        raw = sign(msg, world.pair.keys["LAO"])
        payload_type, payload = type(msg).DESCRIPTOR.full_name, msg.SerializeToString()
    steps = data.draw(
        st.lists(
            st.tuples(st.sampled_from(MUTATIONS), mutation_args(foreign=(KOR, JPN))),
            min_size=1,
            max_size=3,
        ),
        label="mutations",
    )
    tampered = raw
    signed = {(payload_type, payload)}
    for mutation, args in steps:
        tampered = mutate(tampered, mutation, args)
        signed |= signed_contents(args.other_envelope, world.lao_trust)
    note(f"tampered: {tampered!r}")
    first = deliver(world, raw)  # the original alone: the answer to expect
    world.reset()
    outcome = deliver(world, tampered, signed=signed)
    event(describe(outcome))
    if outcome.changed:
        return  # a re-encoding of signed content, treated as that content itself
    after = deliver(world, raw)
    assert (after.reply_type, after.codes) == (first.reply_type, first.codes)
    event(f"original afterwards: {describe(after)}")


# -- reuse of ids and sequence numbers across otherwise valid requests ---------------------------


@fuzz_settings(ci=100, long=5_000)
@given(data=st.data())
def test_replays_are_answered_identically(world: World, data: st.DataObject) -> None:
    """A request delivered twice gets the same reply bytes and changes nothing the second time
    (docs/DESIGN.md decision 5), whatever the first answer was."""
    world.reset()
    ctx = Context(world)
    msg = data.draw(requests(ctx), label="request")
    raw = sign(msg, world.pair.keys["LAO"])
    first = deliver(world, raw)
    again = deliver(world, raw)
    assert not again.changed
    event(describe(first))
    if rotates_its_own_key(msg, first, world) and again.reply_type == REJECTION_TYPE:
        # Authentication comes before the inbox (decision 4): once KOR has revoked the key
        # that signed a rotation, or moved its validity window, a retry of that rotation may
        # no longer verify and is refused instead of getting the stored acknowledgement.
        # A conforming node never revokes the key it signs with (revoke_signing_key
        # refuses), so only a partner acting against itself meets this.
        assert again.reply_sequence == 0
        event("replay of a rotation of its own signing key refused")
        return
    if first.reply_sequence > 0:
        # A recorded request: the stored reply comes back byte for byte.
        assert again.reply == first.reply
    else:
        assert (again.reply_type, again.codes) == (first.reply_type, first.codes)


def rotates_its_own_key(msg: object, first: Outcome, world: World) -> bool:
    """An acknowledged KeyRotation that revokes or re-announces LAO's signing key."""
    own = world.pair.keys["LAO"].key_id
    return (
        isinstance(msg, keys_pb2.KeyRotation)
        and first.reply_type == type_name(keys_pb2.KeyRotationAcknowledgement)
        and (own in msg.revoked_key_ids or msg.new_key.key_id == own)
    )
