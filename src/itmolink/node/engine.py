"""The protocol engine: one registry's protocol logic over its store.

It is synchronous and clock-free: callers pass ``now``, and the node runs it on
its single database thread. Its parts:

* :mod:`itmolink.node.base`: messages, limits, sealing, transactions, and the
  steps both sides take (the adjustment rules, proposals, statements);
* :mod:`itmolink.node.requests`: requests from partners (the receiver's side);
* :mod:`itmolink.node.replies`: replies to our requests (the requester's side);
* :mod:`itmolink.node.evidence`: recovering a lost transfer from the partner's records;
* :mod:`itmolink.node.operations`: operator requests, time-outs, the outbox.
"""

from itmolink import PROTOCOL_VERSION
from itmolink.node.base import (
    EXPECTED_REPLY,
    REQUEST_TYPES,
    Limits,
    Partner,
    ReplyError,
    digest,
    retry_delay_us,
    type_name,
)
from itmolink.node.evidence import Evidence
from itmolink.node.operations import Operations


class Engine(Evidence, Operations):
    """One registry's protocol engine."""


__all__ = [
    "EXPECTED_REPLY",
    "PROTOCOL_VERSION",
    "REQUEST_TYPES",
    "Engine",
    "Limits",
    "Partner",
    "ReplyError",
    "digest",
    "retry_delay_us",
    "type_name",
]
