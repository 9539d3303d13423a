"""atheris harness: envelope verification (issue #5 item 6).

    .venv/bin/python fuzz/fuzz_envelope.py [libFuzzer flags] [corpus dirs]

The input is read with atheris.FuzzedDataProvider. Mode 0 hands the bytes to open_envelope
as they are (the seed corpus holds real sealed envelopes, so libFuzzer's own mutations act
on valid framing). Mode 1 seals a fuzzer-chosen payload type and payload with LAO's key and
applies one to three structured mutations (tests/fuzz/support.py ``mutate``).

Property: open_envelope either raises Rejected with a known code other than UNSPECIFIED
(and nothing else), or it verifies, and then every signature in the envelope is exactly the
signature the pinned key's holder makes over PAE(payload_type, payload): Ed25519 signing is
deterministic, so this says the verified content is content that key really signed, and
that no other encoding of a signature is accepted.

Without atheris installed the harness prints a notice and exits 0.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

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
        KNOWN_CODES,
        MUTATIONS,
        MutationArgs,
        fixed_key,
        mutate,
    )

    from itmolink.core.codes import Rejected
    from itmolink.crypto.envelope import TrustStore, open_envelope, pae, seal
    from itmolink.v1 import envelope_pb2

KEYS = {party: fixed_key(party) for party in ("LAO", "KOR", "JPN")}
PINNED = {KEYS[p].key_id: KEYS[p] for p in ("LAO", "KOR")}
TRUST = TrustStore([key.verifying_key() for key in PINNED.values()])
MODES = 2


class PropertyViolation(AssertionError):
    pass


def check(raw: bytes) -> str:
    """Apply the property to one input; returns "rejected" or "verified"."""
    try:
        verified = open_envelope(raw, TRUST)
    except Rejected as exc:
        if int(exc.code) not in KNOWN_CODES:
            raise PropertyViolation(f"rejected with {exc.code!r}: {exc}") from None
        return "rejected"
    envelope = envelope_pb2.Envelope()
    envelope.ParseFromString(raw)
    message = pae(verified.payload_type, verified.payload)
    for signature in envelope.signatures:
        expected = PINNED[signature.key_id].sign(message)
        if signature.sig != expected:
            raise PropertyViolation(
                f"verified with a signature {signature.key_id} never made: {raw!r}"
            )
    return "verified"


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """Seal fuzzer-chosen content with LAO's key and mutate it."""
    type_index = fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES))
    payload_type = (
        ALL_TYPE_NAMES[type_index]
        if type_index < len(ALL_TYPE_NAMES)
        else fdp.ConsumeUnicodeNoSurrogates(24)
    )
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    raw = seal(payload_type, payload, KEYS["LAO"])
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        mutation = MUTATIONS[fdp.ConsumeIntInRange(0, len(MUTATIONS) - 1)]
        other_key = KEYS[("LAO", "KOR", "JPN")[fdp.ConsumeIntInRange(0, 2)]]
        args = MutationArgs(
            position=fdp.ConsumeIntInRange(0, 4096),
            length=fdp.ConsumeIntInRange(1, 64),
            bit=fdp.ConsumeIntInRange(0, 7),
            value=fdp.ConsumeIntInRange(0, 255),
            blob=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)),
            index=fdp.ConsumeIntInRange(0, 8),
            other_envelope=seal(
                ALL_TYPE_NAMES[fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES) - 1)],
                fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)),
                other_key,
            ),
            payload_type=ALL_TYPE_NAMES[fdp.ConsumeIntInRange(0, len(ALL_TYPE_NAMES) - 1)],
            key=KEYS["JPN"],
        )
        raw = mutate(raw, mutation, args)
    return raw


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, MODES - 1)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes()) if mode == 0 else structured(fdp)
    check(raw)


def seeds() -> dict[str, bytes]:
    """Seed inputs: real envelopes of a LAO/KOR exchange, in mode 0."""
    import tempfile

    from tests.fuzz.support import build_world

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="itmolink-fuzz-seeds-") as tmp:
        world = build_world(Path(tmp))
        try:
            for n, message in enumerate(world.real):
                out[f"real-{n}-{message.payload_type.rsplit('.', 1)[-1]}"] = (
                    message.envelope + bytes([0])
                )
        finally:
            world.close()
    for name, data in out.items():  # the seeds must decode as meant
        fdp = atheris.FuzzedDataProvider(data)
        assert fdp.ConsumeIntInRange(0, MODES - 1) == 0, name
        assert fdp.ConsumeBytes(fdp.remaining_bytes()) == data[:-1], name
    return out


def main() -> None:
    if atheris is None:
        print("fuzz_envelope: atheris is not installed; skipping (pip install atheris)")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
