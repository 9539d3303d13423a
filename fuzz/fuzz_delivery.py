"""atheris harness: the engine as a black box through Engine.handle_delivery (issue #5 item 6).

    .venv/bin/python fuzz/fuzz_delivery.py [libFuzzer flags] [corpus dirs]

KOR receives every input from its mTLS peer LAO. atheris.FuzzedDataProvider chooses a mode:

0. the bytes as they are (the seed corpus holds LAO's real envelopes);
1. a payload type (any request or reply type, or junk) and arbitrary payload bytes, sealed
   with LAO's real key;
2. a request type and a header (valid and fresh, or with fuzzer-chosen sequence, a reused
   real message id, or fuzzer-chosen version, sender and audience) followed by arbitrary
   bytes, sealed with LAO's key, so that the bytes after the header reach the handlers as
   fields of the request;
3. one of LAO's real envelopes, mutated one to three times (tests/fuzz/support.py ``mutate``).

After every input tests/fuzz/support.py ``deliver`` checks the properties of the hypothesis
tests (tests/fuzz/test_fuzz_delivery.py): handle_delivery returns; the reply verifies under
KOR's key and is addressed to LAO; a Rejection has known, non-UNSPECIFIED codes; input that
does not verify as LAO's, or that was tampered with after signing, changes nothing in KOR's
tables; KOR's ledger invariants hold. KOR's database is reset to the post-set-up snapshot
whenever an input changed it, so every input meets the same state.

KOR's and LAO's databases live in a temporary directory under $TMPDIR. libFuzzer ends the
process without running atexit handlers, so fuzz/run.py points TMPDIR at a directory it
removes afterwards; run directly, the harness leaves its small directory behind.
Without atheris installed the harness prints a notice and exits 0.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the platform
    atheris = None

_instrumented = (
    atheris.instrument_imports(include=["itmolink"])
    if atheris is not None and __name__ == "__main__"
    else contextlib.nullcontext()
)
with _instrumented:
    from tests.fuzz.support import (
        ALL_TYPE_NAMES,
        MUTATIONS,
        REQUEST_TYPE_NAMES,
        MutationArgs,
        World,
        build_world,
        deliver,
        fixed_key,
        header,
        length_delimited,
        mutate,
        open_request,
        real_request,
    )

    from itmolink.crypto.envelope import seal
    from itmolink.node.engine import REQUEST_TYPES
    from itmolink.v1 import common_pb2

RAW, SIGNED, HEADERED, MUTATED = range(4)
MODES = 4

_world: World | None = None
_counter = 0


def world() -> World:
    """The LAO/KOR world, built once per process in a temporary directory."""
    global _world
    if _world is None:
        directory = Path(tempfile.mkdtemp(prefix="itmolink-fuzz-", dir=os.environ.get("TMPDIR")))
        atexit.register(shutil.rmtree, directory, True)
        _world = build_world(directory)
    return _world


def _fresh() -> int:
    global _counter
    _counter += 1
    return _counter


def _header(fdp: atheris.FuzzedDataProvider, w: World) -> common_pb2.Header:
    """A header for mode 2: valid and fresh (variant 0), or with the fuzzer's sequence (1),
    a real message's id and sequence (2), or the fuzzer's version, sender and audience (3)."""
    n = _fresh()
    variant = fdp.ConsumeIntInRange(0, 3)
    fields: dict[str, Any] = {"message_id": f"atheris-{n}", "sequence": 1_000_000 + n}
    if variant == 1:
        fields["sequence"] = fdp.ConsumeIntInRange(0, 2**64 - 1)
    elif variant == 2:
        real = w.real[fdp.ConsumeIntInRange(0, len(w.real) - 1)]
        fields["message_id"] = real.message_id
        fields["sequence"] = real_request(w, real).header.sequence  # type: ignore[attr-defined]
    elif variant == 3:
        fields["protocol_version"] = fdp.ConsumeIntInRange(0, 2**32 - 1)
        fields["sender_party"] = fdp.ConsumeUnicodeNoSurrogates(8)
        fields["audience"] = fdp.ConsumeUnicodeNoSurrogates(8)
    return header(**fields)


def test_one_input(data: bytes) -> None:
    w = world()
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, MODES - 1)
    signed: set[tuple[str, bytes]] | None = None
    lao = w.pair.keys["LAO"]
    if mode == RAW:
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == SIGNED:
        payload_type = ALL_TYPE_NAMES[fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES) - 1)]
        raw = seal(payload_type, fdp.ConsumeBytes(fdp.remaining_bytes()), lao)
    elif mode == HEADERED:
        payload_type = REQUEST_TYPE_NAMES[fdp.ConsumeIntInRange(0, len(REQUEST_TYPE_NAMES) - 1)]
        prefix = _header(fdp, w).SerializeToString()
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        raw = seal(payload_type, length_delimited(1, prefix) + body, lao)
    else:
        base = w.real[fdp.ConsumeIntInRange(0, len(w.real) - 1)]
        raw = base.envelope
        signed = {(base.payload_type, base.payload)}
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            mutation = MUTATIONS[fdp.ConsumeIntInRange(0, len(MUTATIONS) - 1)]
            other = w.real[fdp.ConsumeIntInRange(0, len(w.real) - 1)]
            signed.add((other.payload_type, other.payload))
            args = MutationArgs(
                position=fdp.ConsumeIntInRange(0, 4096),
                length=fdp.ConsumeIntInRange(1, 64),
                bit=fdp.ConsumeIntInRange(0, 7),
                value=fdp.ConsumeIntInRange(0, 255),
                blob=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)),
                index=fdp.ConsumeIntInRange(0, 8),
                other_envelope=other.envelope,
                payload_type=ALL_TYPE_NAMES[fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES) - 1)],
                key=fixed_key("JPN"),
            )
            raw = mutate(raw, mutation, args)
    outcome = deliver(w, raw, signed=signed)
    if outcome.changed:
        w.reset()


def seeds() -> dict[str, bytes]:
    """Seed inputs from LAO's real envelopes, in modes 0, 1 and 2."""
    w = world()
    out: dict[str, bytes] = {}
    for n, message in enumerate(w.real):
        name = message.payload_type.rsplit(".", 1)[-1]
        _, request = open_request(w, message.envelope)
        assert request is not None
        request.ClearField("header")
        body = request.SerializeToString()
        type_index = ALL_TYPE_NAMES.index(message.payload_type)
        request_index = REQUEST_TYPE_NAMES.index(message.payload_type)
        plans = {
            "raw": (RAW, message.envelope, []),
            "signed": (SIGNED, message.payload, [type_index]),
            "headered": (HEADERED, body, [request_index, 0]),
        }
        for label, (mode, blob, choices) in plans.items():
            # ints are read from the end of the input, bytes from the front
            data = blob + bytes([*reversed(choices), mode])
            fdp = atheris.FuzzedDataProvider(data)
            assert fdp.ConsumeIntInRange(0, MODES - 1) == mode
            if mode == SIGNED:
                assert fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES) - 1) == type_index
            if mode == HEADERED:
                assert fdp.ConsumeIntInRange(0, len(REQUEST_TYPE_NAMES) - 1) == request_index
                assert fdp.ConsumeIntInRange(0, 3) == 0  # a valid, fresh header
            assert fdp.ConsumeBytes(fdp.remaining_bytes()) == blob, label
            out[f"{label}-{n}-{name}"] = data
    assert set(REQUEST_TYPE_NAMES) == set(REQUEST_TYPES)
    return out


def main() -> None:
    if atheris is None:
        print("fuzz_delivery: atheris is not installed; skipping (pip install atheris)")
        return
    # Every refused input is logged at WARNING or above: thousands per second.
    logging.disable(logging.CRITICAL)
    world()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
