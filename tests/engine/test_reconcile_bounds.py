"""The bounds on a reconciliation query (PROTOCOL §11.3, R1 to R5): the responder
answers at most 256 prefixes and 256 leaf prefixes of lower-case hex, each at most
64 digits, and at most 4,096 leaves, so one query costs it a bounded amount."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from itmolink.core.codes import RejectionCode
from itmolink.core.reconcile import BLOCKS_LEAF_DEFINITION
from itmolink.node import requests
from itmolink.node.convert import timestamp, to_us
from itmolink.v1 import reconcile_pb2

from .conftest import Pair
from .test_limits import code, deliver, header
from .test_reconcile import transfers

BLOCKS = reconcile_pb2.RECONCILIATION_VIEW_BLOCKS


def query(pair: Pair, **fields: Any) -> reconcile_pb2.ReconciliationQuery:
    values: dict[str, Any] = dict(
        header=header(pair), reconciliation_id="R-1",
        snapshot_at=timestamp(to_us(pair.now + dt.timedelta(seconds=1))), view=BLOCKS,
        leaf_definition=BLOCKS_LEAF_DEFINITION,
    )  # fmt: skip
    values.update(fields)
    return reconcile_pb2.ReconciliationQuery(**values)


HEX_256 = [f"{n:02x}" for n in range(256)]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prefixes": HEX_256}, None),
        ({"leaf_prefixes": HEX_256}, None),
        ({"prefixes": [*HEX_256, "abc"]}, RejectionCode.INVALID_FIELD),
        ({"leaf_prefixes": [*HEX_256, "abc"]}, RejectionCode.INVALID_FIELD),
        ({"prefixes": ["0" * 64]}, None),
        ({"prefixes": ["0" * 65]}, RejectionCode.INVALID_FIELD),
        ({"leaf_prefixes": ["0" * 65]}, RejectionCode.INVALID_FIELD),
        ({"prefixes": ["ABC"]}, RejectionCode.INVALID_FIELD),
        ({"prefixes": ["a-b"]}, RejectionCode.INVALID_FIELD),
        ({"leaf_prefixes": ["g"]}, RejectionCode.INVALID_FIELD),
        ({"view": 99}, RejectionCode.INVALID_FIELD),
        ({"reconciliation_id": ""}, RejectionCode.MISSING_FIELD),
    ],
    ids=["256 prefixes", "256 leaf prefixes", "257 prefixes", "257 leaf prefixes",
         "64 digits", "65 digits", "65-digit leaf prefix", "upper case", "a hyphen",
         "not hex", "unknown view", "no id"],
)  # fmt: skip
def test_a_query_outside_the_bounds_is_refused(
    pair: Pair, fields: dict[str, Any], expected: RejectionCode | None
) -> None:
    transfers(pair, 3)
    assert code(deliver(pair, query(pair, **fields))) is expected


def test_a_query_for_more_leaves_than_an_answer_holds_is_refused(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R5, with the bound lowered from 4,096 to 2 and 3 for three transfers."""
    transfers(pair, 3)
    monkeypatch.setattr(requests, "MAX_LEAVES", 2)
    assert code(deliver(pair, query(pair, leaf_prefixes=[""]))) is RejectionCode.INVALID_FIELD
    monkeypatch.setattr(requests, "MAX_LEAVES", 3)  # exactly as many as there are
    assert code(deliver(pair, query(pair, leaf_prefixes=[""]))) is None
