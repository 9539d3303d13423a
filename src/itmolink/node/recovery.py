"""Recover the transfers a restored ledger lost, from a partner's records.

Reconcile with the partner; for every transfer final at the partner and not
final (or unknown) here, ask the partner for its records and apply them
(:mod:`itmolink.node.evidence`); reconcile again if anything was recovered
(docs/PROTOCOL.md §7.9, docs/OPERATIONS.md §7).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from itmolink.node.evidence import RECOVERED, Recovered
from itmolink.node.reconciliation import FINAL_AT_PARTNER, Reconciliation, Report
from itmolink.v1 import partner_service_pb2

if TYPE_CHECKING:
    from itmolink.node.runtime import Node


@dataclass
class RecoveryReport:
    before: Report
    transfers: list[Recovered] = field(default_factory=list)
    after: Report | None = None


async def recover(node: Node, partner: str, snapshot_at: dt.datetime) -> RecoveryReport:
    engine = node.engine
    report = RecoveryReport(await Reconciliation(node, partner, snapshot_at).run())
    lost = sorted({d.subject for d in report.before.discrepancies if d.detail == FINAL_AT_PARTNER})
    for transfer_id in lost:
        message_id, envelope = await node.db(
            engine.records_query, partner, transfer_id, node.clock()
        )
        response = await node.partner_stub(partner).Deliver(
            partner_service_pb2.DeliverRequest(envelope=envelope), timeout=30
        )
        outcome = await node.db(
            engine.records_answer, partner, transfer_id, message_id, envelope,
            response.envelope, node.clock(),
        )  # fmt: skip
        report.transfers.append(outcome)
    if any(t.outcome == RECOVERED for t in report.transfers):
        report.after = await Reconciliation(node, partner, snapshot_at).run()
    return report
