"""Run a reconciliation with a partner: three phases over the partner link.

Phase 1 compares totals; phases 2 and 3 walk the partner's tree of transfer
leaves (core/reconcile.py) one level per round trip, opening only the buckets
that differ, then compare leaves of the small buckets left. Every difference
is recorded and the blocks involved are frozen.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from itmolink.core import reconcile
from itmolink.core.codes import Rejected
from itmolink.node.base import ReplyError, check_leaf_definition
from itmolink.node.convert import timestamp, to_us
from itmolink.v1 import partner_service_pb2, reconcile_pb2

if TYPE_CHECKING:
    from itmolink.node.runtime import Node

DEFAULT_SNAPSHOT_AGE = dt.timedelta(minutes=5)
# The detail of a transfer whose leaf only the partner has (PROTOCOL.md §11.8).
FINAL_AT_PARTNER = "final at the partner but not final (or unknown) here"
_VIEWS = {
    "blocks": reconcile_pb2.RECONCILIATION_VIEW_BLOCKS,
    "journal": reconcile_pb2.RECONCILIATION_VIEW_JOURNAL,
}


@dataclass
class Found:
    phase: str
    subject: str
    detail: str
    frozen_blocks: int = 0


@dataclass
class Report:
    reconciliation_id: str
    snapshot_at: dt.datetime
    discrepancies: list[Found] = field(default_factory=list)
    queries: int = 0
    buckets_compared: int = 0
    leaves_compared: int = 0
    transfers_here: int = 0


class Reconciliation:
    def __init__(self, node: Node, partner: str, snapshot_at: dt.datetime) -> None:
        self.node = node
        self.engine = node.engine
        self.partner = partner
        self.snapshot_us = to_us(snapshot_at)
        self.report = Report(str(uuid.uuid4()), snapshot_at)

    async def _ask(self, **fields: object) -> reconcile_pb2.ReconciliationAnswer:
        query = reconcile_pb2.ReconciliationQuery(
            reconciliation_id=self.report.reconciliation_id,
            snapshot_at=timestamp(self.snapshot_us),
            **fields,  # type: ignore[arg-type]
        )
        if query.view == reconcile_pb2.RECONCILIATION_VIEW_BLOCKS:
            query.leaf_definition = reconcile.BLOCKS_LEAF_DEFINITION
        message_id, envelope = await self.node.db(
            self.engine.reconciliation_query, self.partner, query, self.node.clock()
        )
        response = await self.node.partner_stub(self.partner).Deliver(
            partner_service_pb2.DeliverRequest(envelope=envelope), timeout=30
        )
        self.report.queries += 1
        answer: reconcile_pb2.ReconciliationAnswer = await self.node.db(
            self.engine.reconciliation_answer,
            self.partner,
            message_id,
            envelope,
            response.envelope,
            self.node.clock(),
        )
        try:  # §11.7: blocks leaves of another definition are not compared
            check_leaf_definition(query.view, answer.leaf_definition, "answer")
        except Rejected as rejected:
            raise ReplyError(rejected.code, f"{self.partner}: {rejected.detail}") from None
        return answer

    async def run(self) -> Report:
        await self._totals()
        for view in ("blocks", "journal"):
            await self._walk(view)
        return self.report

    async def _totals(self) -> None:
        answer = await self._ask(view=reconcile_pb2.RECONCILIATION_VIEW_TOTALS)
        theirs = [
            reconcile.Total(t.sender_party, t.unit_type, t.vintage, t.authorisation_id,
                            t.quantity, t.transfers)
            for t in answer.totals
        ]  # fmt: skip
        ours = await self.node.db(self.engine.local_totals, self.partner, self.snapshot_us)
        for difference in reconcile.compare_totals(ours, theirs):
            await self._found("totals", "totals", difference, freeze=False)

    async def _walk(self, view: str) -> None:
        frontier, leaf_prefixes = [""], []
        while frontier:
            theirs = []
            for start in range(0, len(frontier), 256):  # the responder's limit per query
                chunk = frontier[start : start + 256]
                answer = await self._ask(view=_VIEWS[view], prefixes=chunk)
                theirs += [reconcile.Bucket(b.prefix, b.count, b.h1, b.h2) for b in answer.buckets]
            self.report.buckets_compared += len(theirs)
            ours: list[reconcile.Bucket] = []
            for prefix in frontier:
                ours += await self.node.db(
                    self.engine.local_buckets, self.partner, self.snapshot_us, view, prefix
                )
            if view == "blocks" and frontier == [""]:
                self.report.transfers_here = sum(b.count for b in ours)
            frontier, compare = reconcile.differing_children(ours, theirs)
            leaf_prefixes += compare
        if not leaf_prefixes:
            return
        for start in range(0, len(leaf_prefixes), 256):
            chunk = leaf_prefixes[start : start + 256]
            answer = await self._ask(view=_VIEWS[view], leaf_prefixes=chunk)
            # Only leaves under the prefixes asked for: a partner cannot name
            # transfers of other links to have their blocks frozen here.
            theirs_leaves = {
                leaf.transfer_id: leaf.digest
                for leaf in answer.leaves
                if reconcile.id_hash(leaf.transfer_id).startswith(tuple(chunk))
            }
            ours_leaves: dict[str, bytes] = {}
            for prefix in chunk:
                ours_leaves.update(
                    await self.node.db(
                        self.engine.local_leaves, self.partner, self.snapshot_us, view, prefix
                    )
                )
            self.report.leaves_compared += len(theirs_leaves)
            for transfer_id in reconcile.differing_leaves(ours_leaves, theirs_leaves):
                if transfer_id not in ours_leaves:
                    detail = FINAL_AT_PARTNER
                elif transfer_id not in theirs_leaves:
                    detail = "final here but not final (or unknown) at the partner"
                else:
                    detail = f"the two registries record different {view} for it"
                await self._found(view, transfer_id, detail, freeze=True)

    async def _found(self, phase: str, subject: str, detail: str, *, freeze: bool) -> None:
        frozen = await self.node.db(
            self.engine.record_discrepancy,
            reconciliation_id=self.report.reconciliation_id,
            partner=self.partner,
            phase=phase,
            subject=subject,
            detail=detail,
            freeze=freeze,
            now=self.node.clock(),
        )
        self.report.discrepancies.append(Found(phase, subject, detail, frozen))
