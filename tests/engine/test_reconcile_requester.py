"""The requester of a reconciliation trusts the partner's answers only as far as
it asked (PROTOCOL §11.7, §11.8): a dishonest partner cannot have it freeze the
blocks of transfers outside the buckets that differ."""

from __future__ import annotations

import datetime as dt
from typing import Any

from itmolink.core import reconcile
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.node.reconciliation import Reconciliation
from itmolink.store.tx import Tx
from itmolink.v1 import partner_service_pb2, reconcile_pb2

from .conftest import Pair
from .test_reconcile import LinkedNode, frozen, transfers


class DishonestLao(LinkedNode):
    """KOR's link to LAO, where LAO adds a leaf to each answer that lists leaves:
    a transfer id of the link, hashed outside the prefixes asked for, with a digest
    that matches nothing."""

    def __init__(self, pair: Pair, named: list[str]) -> None:
        super().__init__(pair, "KOR")
        self.named = named  # the transfer ids it names, in order of preference
        self.added: list[str] = []

    def partner_stub(self, partner: str) -> Any:
        pair, node = self.pair, self

        class Stub:
            async def Deliver(self, request: Any, **_: Any) -> Any:
                reply = pair.lao.handle_delivery("KOR", request.envelope, pair.now)
                asked = reconcile_pb2.ReconciliationQuery()
                asked.ParseFromString(
                    open_envelope(request.envelope, TrustStore([pair.keys["KOR"].verifying_key()]))
                    .payload
                )  # fmt: skip
                if not asked.leaf_prefixes:
                    return partner_service_pb2.DeliverResponse(envelope=reply)
                answer = reconcile_pb2.ReconciliationAnswer()
                answer.ParseFromString(
                    open_envelope(reply, TrustStore([pair.keys["LAO"].verifying_key()])).payload
                )
                outside = [
                    t for t in node.named
                    if not reconcile.id_hash(t).startswith(tuple(asked.leaf_prefixes))
                ]  # fmt: skip
                assert outside, "every transfer id lies under the prefixes asked for"
                answer.leaves.add(transfer_id=outside[0], digest=b"\x00" * 32)
                node.added.append(outside[0])
                forged = seal(
                    "itmolink.v1.ReconciliationAnswer", answer.SerializeToString(),
                    pair.keys["LAO"],
                )  # fmt: skip
                return partner_service_pb2.DeliverResponse(envelope=forged)

        return Stub()


async def test_leaves_outside_the_prefixes_asked_for_are_ignored(pair: Pair) -> None:
    ids = transfers(pair, 6)
    victim, honest = ids[2], [t for t in ids if t != ids[2]]

    def lose_the_adjustment(tx: Tx) -> None:
        tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (victim,))
        tx._seal_transfer(victim)

    with pair.kor.store.transaction() as tx:
        lose_the_adjustment(tx)
        victim_blocks = [b.label() for b in tx.blocks_of_transfer(victim)]
    pair.advance(1)
    node = DishonestLao(pair, honest)
    snapshot = pair.now + dt.timedelta(seconds=1)
    report = await Reconciliation(node, "LAO", snapshot).run()  # type: ignore[arg-type]
    assert node.added  # LAO did name a transfer outside the prefixes
    assert [(d.phase, d.subject) for d in report.discrepancies] == [("blocks", victim)]
    assert frozen(pair.kor) == victim_blocks
