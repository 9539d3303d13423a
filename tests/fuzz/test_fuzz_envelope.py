"""Fuzzing envelope verification (issue #5 item 6a).

open_envelope is the first thing every partner message meets. Properties:

* any bytes at all: open_envelope raises Rejected, with a known code other than
  UNSPECIFIED, and nothing else;
* a validly sealed envelope after structured mutations (bit flips, truncation, extension,
  insertion, field duplication with and without a changed value, dropped and reordered fields,
  signatures swapped in from other envelopes, swapped payload types and payloads): either
  rejected with a code, or it verifies as exactly the payload_type and payload that were
  signed (protobuf tolerates re-encodings such as unknown fields or a repeated signature,
  which change no signed byte), or as another envelope that a mutation borrowed whole
  (its payload type, payload and signature together).
"""

from __future__ import annotations

from hypothesis import event, given
from hypothesis import strategies as st

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import TrustStore, VerifiedEnvelope, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.v1 import envelope_pb2

from .strategies import fuzz_settings, text
from .support import (
    ALL_TYPE_NAMES,
    KNOWN_CODES,
    MUTATIONS,
    MutationArgs,
    fixed_key,
    length_delimited,
    mutate,
)

LAO, KOR, JPN = fixed_key("LAO"), fixed_key("KOR"), fixed_key("JPN")
# KOR's point of view would pin LAO only; pinning two parties also exercises the
# "signed by keys of several parties" check.
TRUST = TrustStore([LAO.verifying_key(), KOR.verifying_key()])
KEY_IDS = [LAO.key_id, KOR.key_id, JPN.key_id]


def opened_or_code(raw: bytes) -> VerifiedEnvelope | RejectionCode:
    """open_envelope's verdict; any exception other than Rejected fails the test."""
    try:
        verified = open_envelope(raw, TRUST)
    except Rejected as exc:
        rejected = exc
    else:
        event("verified")
        return verified
    assert int(rejected.code) in KNOWN_CODES, f"rejected with {rejected.code!r}: {rejected}"
    assert rejected.detail, "a rejection without detail"
    event(f"rejected: {rejected.code.name}")
    return rejected.code


# -- arbitrary bytes ---------------------------------------------------------------------------


@fuzz_settings(ci=1500, long=50_000)
@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected_with_a_code(raw: bytes) -> None:
    assert isinstance(opened_or_code(raw), RejectionCode)


signatures = st.builds(
    envelope_pb2.Signature,
    key_id=st.one_of(st.sampled_from(KEY_IDS), text()),
    sig=st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=80)),
)


@fuzz_settings(ci=1000, long=30_000)
@given(
    payload_type=st.one_of(st.sampled_from(ALL_TYPE_NAMES), text()),
    payload=st.binary(max_size=512),
    sigs=st.lists(signatures, max_size=4),
    junk=st.binary(max_size=16),
)
def test_well_framed_envelopes_with_forged_signatures_are_rejected(
    payload_type: str, payload: bytes, sigs: list[envelope_pb2.Signature], junk: bytes
) -> None:
    envelope = envelope_pb2.Envelope(payload_type=payload_type, payload=payload, signatures=sigs)
    raw = envelope.SerializeToString()
    assert isinstance(opened_or_code(raw), RejectionCode)
    # Unknown fields after a forged envelope change nothing.
    assert isinstance(opened_or_code(raw + length_delimited(9, junk)), RejectionCode)


# -- mutations of a validly sealed envelope ------------------------------------------------------


@st.composite
def mutation_args(draw: st.DrawFn, foreign: tuple[SigningKey, ...] = (JPN,)) -> MutationArgs:
    """Arguments for :func:`mutate`. ``foreign`` are the keys "resign_other_key" may use:
    keys the verifier does not pin (a pinned key's signature is a signature, not tampering).
    """
    other_type = draw(st.one_of(st.sampled_from(ALL_TYPE_NAMES), text()))
    other_payload = draw(st.binary(max_size=64))
    other_key = draw(st.sampled_from([LAO, KOR, JPN]))
    return MutationArgs(
        position=draw(st.integers(0, 4096)),
        length=draw(st.integers(1, 64)),
        bit=draw(st.integers(0, 7)),
        value=draw(st.integers(0, 255)),
        blob=draw(st.binary(max_size=32)),
        index=draw(st.integers(0, 8)),
        other_envelope=seal(other_type, other_payload, other_key),
        payload_type=draw(st.one_of(st.sampled_from(ALL_TYPE_NAMES), text())),
        key=draw(st.sampled_from(foreign)),
    )


def signed_contents(raw: bytes, trust: TrustStore) -> set[tuple[str, bytes]]:
    """{(payload_type, payload)} of ``raw`` if it verifies under ``trust``, else {}."""
    try:
        verified = open_envelope(raw, trust)
    except Rejected:
        return set()
    return {(verified.payload_type, verified.payload)}


@fuzz_settings(ci=1500, long=50_000)
@given(
    payload_type=st.one_of(st.sampled_from(ALL_TYPE_NAMES), st.text(min_size=1, max_size=24)),
    payload=st.binary(max_size=256),
    steps=st.lists(st.tuples(st.sampled_from(MUTATIONS), mutation_args()), min_size=1, max_size=3),
)
def test_mutated_envelope_is_rejected_or_verifies_as_signed(
    payload_type: str, payload: bytes, steps: list[tuple[str, MutationArgs]]
) -> None:
    raw = seal(payload_type, payload, LAO)
    mutated = raw
    # What LAO and KOR really signed: the original, and envelopes a mutation borrows from.
    signed = {(payload_type, payload)}
    for mutation, args in steps:
        mutated = mutate(mutated, mutation, args)
        signed |= signed_contents(args.other_envelope, TRUST)
    result = opened_or_code(mutated)
    if isinstance(result, RejectionCode):
        return
    assert (result.payload_type, result.payload) in signed, (
        f"{[m for m, _ in steps]} turned a sealed envelope into one that verifies as "
        f"{result.payload_type!r} {result.payload!r}, which no pinned key signed"
    )
    if mutated != raw:
        event("re-encoded envelope verified as the signed content")


@fuzz_settings(ci=300, long=10_000)
@given(
    payload=st.binary(max_size=128),
    types=st.lists(st.sampled_from(ALL_TYPE_NAMES), min_size=2, max_size=2, unique=True),
)
def test_every_request_type_swap_is_rejected(payload: bytes, types: list[str]) -> None:
    """A signature made for one payload type never verifies under another."""
    original, other = types
    raw = seal(original, payload, LAO)
    swapped = mutate(raw, "swap_payload_type", MutationArgs(payload_type=other))
    assert opened_or_code(swapped) is RejectionCode.BAD_SIGNATURE
