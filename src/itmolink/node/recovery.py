"""Recover the transfers a restored ledger lost, from a partner's records.

Reconcile with the partner; for every transfer final at the partner and unknown
here, ask the partner for its records and apply them
(:mod:`itmolink.node.evidence`), again while a pass recovers something (a lost
onward transfer needs the lost incoming one before it); reconcile again if
anything was recovered (docs/PROTOCOL.md §7.9, docs/OPERATIONS.md §7).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from itmolink.node.base import ReplyError
from itmolink.node.evidence import KNOWN, NOT_RECOVERED, RECOVERED, Recovered
from itmolink.node.reconciliation import FINAL_AT_PARTNER, Reconciliation, Report
from itmolink.v1 import partner_service_pb2

if TYPE_CHECKING:
    from itmolink.node.runtime import Node

log = logging.getLogger("itmolink.engine")


@dataclass
class RecoveryReport:
    before: Report
    transfers: list[Recovered] = field(default_factory=list)
    after: Report | None = None


async def recover(node: Node, partner: str, snapshot_at: dt.datetime) -> RecoveryReport:
    report = RecoveryReport(await Reconciliation(node, partner, snapshot_at).run())
    lost = sorted({d.subject for d in report.before.discrepancies if d.detail == FINAL_AT_PARTNER})
    outcomes: dict[str, Recovered] = {}
    pending = lost
    while pending:
        for transfer_id in pending:
            outcomes[transfer_id] = await _recover_one(node, partner, transfer_id)
        left = [t for t in pending if outcomes[t].outcome == NOT_RECOVERED]
        if len(left) == len(pending):
            break  # nothing more came back: the rest does not depend on what did
        pending = left
    report.transfers = [outcomes[t] for t in lost]
    if any(t.outcome == RECOVERED for t in report.transfers):
        report.after = await Reconciliation(node, partner, snapshot_at).run()
    return report


async def _recover_one(node: Node, partner: str, transfer_id: str) -> Recovered:
    """Ask ``partner`` for one transfer's records and apply them; every failure is an
    outcome of its own, so that one transfer does not stop the others."""
    engine = node.engine
    state = await node.db(engine.recorded_state, transfer_id)
    if state is not None:
        # Recorded here (not final): the flows settle it; nothing is asked.
        return Recovered(transfer_id, KNOWN, "", f"recorded here as {state.name}: not changed")
    try:
        message_id, envelope = await node.db(
            engine.records_query, partner, transfer_id, node.clock()
        )
        response = await node.partner_stub(partner).Deliver(
            partner_service_pb2.DeliverRequest(envelope=envelope), timeout=30
        )
        outcome: Recovered = await node.db(
            engine.records_answer, partner, transfer_id, message_id, envelope,
            response.envelope, node.clock(),
        )  # fmt: skip
        return outcome
    except ReplyError as error:
        detail = str(error)
    except grpc.aio.AioRpcError as error:
        detail = f"{partner} did not answer: {error.code().name} {error.details()}"
    except Exception as error:  # a bug here must not stop the other transfers
        log.exception("recovering transfer %s from %s failed", transfer_id, partner)
        detail = f"failed here ({type(error).__name__}: {error}); see the node's log"
    log.warning(
        "transfer %s not recovered from %s: %s", transfer_id, partner, detail,
        extra={"transfer_id": transfer_id, "partner": partner},
    )  # fmt: skip
    return Recovered(transfer_id, NOT_RECOVERED, "", detail)
