"""The committed envelope test vectors are current, and this node reaches every verdict."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest

from itmolink.conformance import vectors
from itmolink.crypto.envelope import TrustStore, open_envelope
from itmolink.crypto.keys import VerifyingKey
from itmolink.node.base import Limits
from itmolink.node.engine import Engine, Partner
from itmolink.v1 import codes_pb2, reply_pb2

from ..conftest import Databases

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = json.loads((ROOT / vectors.PATH).read_text())


def test_the_committed_vectors_are_what_the_generator_makes() -> None:
    assert (ROOT / vectors.PATH).read_text() == vectors.render(), (
        "conformance vectors are stale: run 'python -m itmolink.conformance.vectors'"
    )


def receiver(databases: Databases) -> Engine:
    keys = []
    for entry in DOCUMENT["pinned_keys"]:
        not_before, not_after = entry.get("not_before"), entry.get("not_after")
        keys.append(
            VerifyingKey.from_raw(
                entry["party"], entry["key_id"], base64.b64decode(entry["public_key"]),
                not_before=dt.datetime.fromisoformat(not_before) if not_before else None,
                not_after=dt.datetime.fromisoformat(not_after) if not_after else None,
            )
        )  # fmt: skip
    trust = TrustStore(keys)
    for key_id in DOCUMENT["revoked_key_ids"]:
        trust.revoke(key_id)
    engine = Engine(
        party="KOR", registry="KOR-NR", signing_key=vectors.test_key("KOR-1", "KOR"),
        trust=trust, partners=[Partner("LAO", "LAO-NR", "x"), Partner("JPN", "JPN-NR", "x")],
        store=databases.open("KOR"),
        limits=Limits(
            max_clock_skew=dt.timedelta(seconds=DOCUMENT["receiver"]["max_clock_skew_seconds"]),
            max_message_age=dt.timedelta(days=DOCUMENT["receiver"]["max_message_age_days"]),
        ),
    )  # fmt: skip
    engine.trust = trust  # the revocations above are the vector's, not the ledger's
    return engine


@pytest.mark.parametrize("vector", DOCUMENT["vectors"], ids=lambda v: v["name"])
def test_vector(vector: dict[str, object], databases: Databases) -> None:
    engine = receiver(databases)
    now = dt.datetime.fromisoformat(DOCUMENT["receiver"]["now"])
    kor = TrustStore([vectors.test_key("KOR-1", "KOR").verifying_key()])
    for delivery in vector["deliveries"]:  # type: ignore[attr-defined]
        raw = base64.b64decode(delivery["envelope"])
        reply = open_envelope(engine.handle_delivery(vector["peer"], raw, now), kor)  # type: ignore[arg-type]
        if reply.payload_type == "itmolink.v1.Rejection":
            rejection = reply_pb2.Rejection()
            rejection.ParseFromString(reply.payload)
            seen = codes_pb2.RejectionCode.Name(rejection.reasons[0].code)
        else:
            seen = "accepted"
        assert seen == delivery["verdict"], vector["name"]
    engine.store.close()
