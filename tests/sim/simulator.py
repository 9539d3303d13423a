"""A deterministic simulator: protocol engines under a seeded fault scheduler.

One host (LAO) and two acquiring parties (KOR, JPN) run the real protocol
engine over in-memory SQLite ledgers; the host's transfers to KOR are one-round
(complete_on_acceptance), those to JPN two-phase. A seeded scheduler picks every step:
operator requests, outbox ticks, deliveries in any order, drops, duplicates,
replays of old envelopes, partitions, clock skew, crashes of either node at any
point, including inside a transaction just before it commits, and trust churn (a
buyer's operator unpins the host's keys for a while, so that buyer refuses the
host's messages before looking them up, unrecorded). The engines allow a clock
skew of 10 s (SIM_LIMITS), so proposals expire within a run: a one-round
proposal is settled by the buyer's recorded 3011 or by its stored answer. After
every step an auditor checks the invariants of the design; at the end the
network heals and the queues drain, and both sides must agree on every
transfer. Everything that varies comes from ``random.Random(seed)``, so a
failing seed replays exactly::

    python -m tests.sim --seed 1234 --verbose
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import Role, TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Limits, Partner, ReplyError
from itmolink.store import SqliteStore

HOST = "LAO"
BUYERS = ("KOR", "JPN")
# The host proposes one-round transfers to this buyer (complete_on_acceptance), and
# two-phase ones to the other.
ONE_ROUND_BUYER = "KOR"
PARTIES = (HOST, *BUYERS)
EPOCH = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
# Clocks differ by less than 10 s (each node's skew is within ±5 s), and proposals
# expire 5 to 120 s after they are made: with this skew they expire at the
# receiver within a run, so its refusal of an expired proposal (3011) and the
# sender's rule for unrecorded refusals of a one-round proposal (S5) are reached.
SIM_LIMITS = Limits(max_clock_skew=dt.timedelta(seconds=10))
ISSUED = 10_000

T = TypeVar("T")

# Signing keys are expensive to make and carry no randomness that matters to
# the protocol's decisions: one set serves every seed.
_KEYS = {party: SigningKey.generate(party) for party in PARTIES}


# The refusals of a buyer that does not pin the host's key (PROTOCOL §5.2 D2): the
# only ones that settle a two-phase proposal the buyer keeps no record of.
KEY_REFUSALS = {
    RejectionCode.UNKNOWN_SIGNING_KEY,
    RejectionCode.SIGNING_KEY_NOT_YET_VALID,
    RejectionCode.SIGNING_KEY_EXPIRED,
    RejectionCode.SIGNING_KEY_REVOKED,
}


class Crash(Exception):
    """A node died: whatever its current transaction wrote is rolled back."""


class InvariantViolation(AssertionError):
    pass


@dataclass
class Packet:
    """A request on its way to a receiver, or the reply on its way back."""

    kind: str  # "request" or "reply"
    sender: str  # the party that sent the request
    receiver: str
    message_id: str  # the request's outbox message id
    envelope: bytes
    # When the sender sent this attempt, on its clock (handle_reply's sent_at).
    sent_at: dt.datetime = EPOCH


@dataclass
class SimNode:
    party: str
    store: SqliteStore
    engine: Engine
    skew: dt.timedelta
    crash_armed: bool = False
    up: bool = True
    # Its operator has unpinned the host's keys (trust churn): what the host
    # signs fails verification here until they are pinned again.
    distrusts_host: bool = False


@dataclass
class Simulation:
    seed: int
    steps: int = 150
    verbose: bool = False
    rng: random.Random = field(init=False)
    now: dt.datetime = EPOCH
    nodes: dict[str, SimNode] = field(default_factory=dict)
    network: list[Packet] = field(default_factory=list)
    history: list[Packet] = field(default_factory=list)
    partitioned: set[frozenset[str]] = field(default_factory=set)
    authorisations: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    incarnations: Counter[str] = field(default_factory=Counter)
    # The buyers that unpinned the host's keys at some time during the run.
    unpinned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for party in PARTIES:
            store = SqliteStore(":memory:", party=party, registry=f"{party}-NR")
            store.before_commit = self._crash_point(party)
            skew = dt.timedelta(seconds=self.rng.uniform(-5, 5))
            self.nodes[party] = SimNode(party, store, self._engine(party, store), skew)

    # -- set-up --------------------------------------------------------------------------

    def _engine(self, party: str, store: SqliteStore) -> Engine:
        counter = itertools.count(1)
        partners = [HOST] if party != HOST else list(BUYERS)
        # Message ids stay unique across restarts (as UUIDs would) and are
        # deterministic for the seed: incarnation number and a counter.
        self.incarnations[party] += 1
        incarnation = self.incarnations[party]
        return Engine(
            party=party,
            registry=f"{party}-NR",
            signing_key=_KEYS[party],
            trust=TrustStore(_KEYS[p].verifying_key() for p in partners),
            partners=[
                Partner(p, f"{p}-NR", "sim", (party, p) == (HOST, ONE_ROUND_BUYER))
                for p in partners
            ],
            store=store,
            default_timeout=dt.timedelta(seconds=30),
            new_id=lambda: f"{party}-{incarnation}-{next(counter)}",
            limits=SIM_LIMITS,
        )

    def _crash_point(self, party: str) -> Callable[[], None]:
        def maybe_crash() -> None:
            node = self.nodes.get(party)  # None while the node is being created
            if node is not None and node.crash_armed:
                node.crash_armed = False
                raise Crash(f"{party} crashed before commit")

        return maybe_crash

    def clock(self, party: str) -> dt.datetime:
        return self.now + self.nodes[party].skew

    def note(self, text: str) -> None:
        if self.verbose:
            print(f"[{(self.now - EPOCH).total_seconds():8.2f}s] {text}")
        self.log.append(text)

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        # The engines log every time-out and refusal, and the faults raise ALARMs
        # (a partner that cannot read a proposal, a refused completion); thousands
        # of seeds would drown the output (and slow the sweep), so quiet them while
        # running: the auditor is what judges a run.
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            self._run()
        except InvariantViolation:
            raise
        except Exception as error:  # a step that fails for good is a stuck node
            raise InvariantViolation(
                f"seed {self.seed}: unexpected {type(error).__name__}: {error}"
            ) from error
        finally:
            logging.disable(previous)

    def _run(self) -> None:
        for buyer in BUYERS:
            self._operator(HOST, "authorise", buyer)
        for step in range(self.steps):
            self._step(step)
            self.audit()
        self.heal_and_drain()
        self.audit(final=True)

    def _step(self, step: int) -> None:
        r = self.rng.random()
        if r < 0.12:
            self._operator(HOST, self.rng.choice(["transfer", "transfer", "issue"]),
                           self.rng.choice(BUYERS))  # fmt: skip
        elif r < 0.30:
            self._tick(self.rng.choice(PARTIES))
        elif r < 0.62:
            self._deliver()
        elif r < 0.67:
            self._drop()
        elif r < 0.71:
            self._duplicate()
        elif r < 0.74:
            self._replay()
        elif r < 0.79:
            self._crash(self.rng.choice(PARTIES))
        elif r < 0.82:
            self._arm_crash(self.rng.choice(PARTIES))
        elif r < 0.85:
            self._partition()
        elif r < 0.88:
            self._trust_churn(self.rng.choice(BUYERS))
        else:
            self.now += dt.timedelta(seconds=self.rng.choice([0.1, 0.5, 1, 2, 5, 15, 40, 60]))

    def _alive(self, party: str) -> bool:
        return self.nodes[party].up

    def _call(self, party: str, fn: Callable[[], T]) -> T | None:
        """Run an engine step; a crash inside it takes the node down."""
        try:
            return fn()
        except Crash as crash:
            self.faults["crash before commit"] += 1
            self.note(str(crash))
            self._crash(party)
            return None

    def _operator(self, party: str, action: str, buyer: str) -> None:
        if not self._alive(party):
            return
        engine = self.nodes[party].engine
        now = self.clock(party)
        try:
            if action == "authorise":
                terms = self._call(party, lambda: engine.authorise(
                    activity_id=f"ACT-{buyer}", activity_name="", activity_description="",
                    cooperative_approach_id=f"{HOST}-{buyer}", acquiring_parties=[buyer],
                    purposes=[Purpose.NDC], oimp_detail="",
                    first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
                    vintage_from=2021, vintage_to=2030, quantity_cap=0,
                    unit_type=UnitType.ITMO, now=now,
                ))  # fmt: skip
                if terms is not None:
                    self.authorisations[buyer] = terms.authorisation_id
            elif action == "issue" and buyer in self.authorisations:
                quantity = self.rng.choice([1, 7, 100, ISSUED])
                self._call(party, lambda: engine.issue(
                    authorisation_id=self.authorisations[buyer], vintage=2025,
                    quantity=quantity, now=now,
                ))  # fmt: skip
            elif action == "transfer" and buyer in self.authorisations:
                quantity = self.rng.choice([1, 3, 50, 999, 2_500])
                timeout = dt.timedelta(seconds=self.rng.choice([5, 30, 120]))
                transfer_id = self._call(party, lambda: engine.start_transfer(
                    to_party=buyer, authorisation_id=self.authorisations[buyer], vintage=2025,
                    quantity=quantity, now=now, timeout=timeout,
                ))  # fmt: skip
                if transfer_id:
                    self.note(f"{party} proposes {transfer_id}: {quantity} to {buyer}")
        except Rejected as refused:
            self.note(f"{party} operator {action} refused: {refused.code.name}")

    def _tick(self, party: str) -> None:
        """The node's outbox worker: time-outs, status queries, sends."""
        if not self._alive(party):
            return
        engine = self.nodes[party].engine
        now = self.clock(party)
        self._call(party, lambda: engine.expire_transfers(now))
        self._call(party, lambda: engine.query_pending_transfers(now))
        due = self._call(party, lambda: engine.due_messages(now)) or []
        for message_id, partner, envelope in due:
            packet = Packet("request", party, partner, message_id, envelope, now)
            self.network.append(packet)
            self.history.append(packet)
            # Until an answer arrives, the next attempt waits for the backoff.
            self._call(party, partial(engine.delivery_failed, message_id, "in flight", now))

    def _deliver(self) -> None:
        if not self.network:
            return
        packet = self.network.pop(self.rng.randrange(len(self.network)))
        if frozenset((packet.sender, packet.receiver)) in self.partitioned:
            self.faults["lost to partition"] += 1
            return
        if packet.kind == "request":
            if not self._alive(packet.receiver):
                return
            engine = self.nodes[packet.receiver].engine
            now = self.clock(packet.receiver)
            reply = self._call(
                packet.receiver,
                lambda: engine.handle_delivery(packet.sender, packet.envelope, now),
            )
            if isinstance(reply, bytes):
                back = Packet(
                    "reply", packet.sender, packet.receiver, packet.message_id, reply,
                    packet.sent_at,
                )  # fmt: skip
                self.network.append(back)
                self.history.append(back)
        else:
            if not self._alive(packet.sender):
                return
            engine = self.nodes[packet.sender].engine
            now = self.clock(packet.sender)
            try:
                applied = self._call(
                    packet.sender,
                    lambda: engine.handle_reply(
                        packet.message_id, packet.envelope, now, sent_at=packet.sent_at
                    ),
                )
                if applied is False:  # an unrecorded refusal that settles nothing (S5)
                    self.faults["refusal kept as a failed attempt"] += 1
            except ReplyError as error:
                self.note(f"{packet.sender} refused a reply: {error}")

    def _drop(self) -> None:
        if self.network:
            self.network.pop(self.rng.randrange(len(self.network)))
            self.faults["drop"] += 1

    def _duplicate(self) -> None:
        if self.network:
            self.network.append(self.rng.choice(self.network))
            self.faults["duplicate"] += 1

    def _replay(self) -> None:
        if self.history:
            self.network.append(self.rng.choice(self.history))
            self.faults["replay"] += 1

    def _crash(self, party: str) -> None:
        """Kill a node and bring it back: only what it committed survives."""
        node = self.nodes[party]
        self.faults["crash and restart"] += 1
        node.crash_armed = False
        node.engine = self._engine(party, node.store)
        if node.distrusts_host:  # its trust store is configuration: it stays so
            _unpin(node.engine, HOST)

    def _trust_churn(self, buyer: str) -> None:
        """The buyer's operator unpins the host's keys, or pins them again."""
        node = self.nodes[buyer]
        node.distrusts_host = not node.distrusts_host
        if node.distrusts_host:
            self.faults["trust dropped"] += 1
            self.unpinned.add(buyer)
            _unpin(node.engine, HOST)
            self.note(f"{buyer} unpins {HOST}'s keys")
        else:
            self.note(f"{buyer} pins {HOST}'s keys again")
            self._call(buyer, node.engine.reload_trust)

    def _arm_crash(self, party: str) -> None:
        self.nodes[party].crash_armed = True

    def _partition(self) -> None:
        link = frozenset((HOST, self.rng.choice(BUYERS)))
        if link in self.partitioned:
            self.partitioned.discard(link)
        else:
            self.partitioned.add(link)
            self.faults["partition"] += 1

    def heal_and_drain(self) -> None:
        """No more faults: deliver everything until every queue is empty."""
        self.partitioned.clear()
        for node in self.nodes.values():
            node.crash_armed = False
            if node.distrusts_host:
                node.distrusts_host = False
                node.engine.reload_trust()
        for _ in range(400):
            self.now += dt.timedelta(seconds=31)
            for party in PARTIES:
                self._tick(party)
            while self.network:
                self._deliver()
            if not any(self._pending(p) for p in PARTIES) and not self._awaiting():
                return
        raise InvariantViolation(f"seed {self.seed}: queues did not drain after healing")

    def _pending(self, party: str) -> int:
        with self.nodes[party].store.transaction() as tx:
            return tx.outbox_pending_count()

    def _awaiting(self) -> bool:
        for buyer in BUYERS:
            with self.nodes[buyer].store.transaction() as tx:
                if any(t.state is TransferState.ACCEPTED for t in tx.transfers()):
                    return True
        return False

    # -- the auditor ---------------------------------------------------------------------

    def audit(self, *, final: bool = False) -> None:
        views = {}
        for party, node in self.nodes.items():
            store = node.store
            store.before_commit = None  # the auditor never crashes a node
            try:
                with store.transaction() as tx:
                    views[party] = (
                        {t.transfer_id: t for t in tx.transfers()},
                        {
                            t: tx.blocks_of_transfer(t)
                            for t in [r.transfer_id for r in tx.transfers()]
                        },
                        tx.holdings(),
                        [a.entry for a in tx.adjustments()],
                        tx.issued_total(HOST, self.authorisations.get("KOR", ""))
                        + tx.issued_total(HOST, self.authorisations.get("JPN", "")),
                    )
            finally:
                store.before_commit = self._crash_point(party)
        check_invariants(self.seed, views, final=final, unpinned=frozenset(self.unpinned))


def _unpin(engine: Engine, party: str) -> None:
    """Drop ``party``'s keys from ``engine``'s trust store (until ``reload_trust``)."""
    trust = TrustStore(k for k in engine.trust.all() if k.party != party)
    for key_id, since in engine.trust.revocations().items():
        trust.revoke(key_id, since)
    engine.trust = trust


def check_invariants(
    seed: int,
    views: dict[str, tuple],  # type: ignore[type-arg]
    *,
    final: bool,
    unpinned: frozenset[str] = frozenset(),
) -> None:
    """``unpinned``: the buyers that unpinned the host's keys at some time (trust churn)."""

    def fail(text: str) -> None:
        raise InvariantViolation(f"seed {seed}: {text}")

    host_transfers, host_blocks, host_holdings, host_ca, issued = views[HOST]
    # One-round transfers the buyer completed on acceptance while the host has not
    # recorded that acceptance yet: the units are the buyer's, still reserved at the
    # host until it does (its reservation is never released meanwhile).
    one_round = set()
    for buyer in BUYERS:
        for transfer_id, mine in views[buyer][0].items():
            theirs = host_transfers.get(transfer_id)
            if (
                mine.state is TransferState.COMPLETED
                and theirs is not None
                and theirs.state is TransferState.PROPOSED
                and theirs.complete_on_acceptance
            ):
                if final:
                    fail(f"{transfer_id} completed at {buyer}, PROPOSED at {HOST} after healing")
                one_round.add(transfer_id)
    host_held = [
        h.block
        for h in host_holdings
        if not (h.status == "reserved" and h.transfer_id in one_round)
    ]
    # Reserved units belong to a proposal still waiting for its answer; a
    # transfer that ended must have debited or released its blocks.
    for holding in host_holdings:
        if holding.status == "reserved":
            owner = host_transfers.get(holding.transfer_id or "")
            if owner is None or owner.state is not TransferState.PROPOSED:
                state = owner.state.name if owner else "no"
                fail(f"{holding.block.label()} stays reserved for {state} transfer "
                     f"{holding.transfer_id}")  # fmt: skip
    in_transit = []
    for buyer in BUYERS:
        transfers, _, _, ca, _ = views[buyer]
        for transfer_id, mine in transfers.items():
            theirs = host_transfers.get(transfer_id)
            if (
                mine.state is TransferState.COMPLETED
                and transfer_id not in one_round
                and (theirs is None or theirs.state is not TransferState.COMPLETED)
            ):
                fail(f"{buyer} completed {transfer_id} which {HOST} has not completed")
        for transfer_id, ours in host_transfers.items():
            if ours.partner != buyer or ours.state is not TransferState.COMPLETED:
                continue
            theirs = transfers.get(transfer_id)
            if theirs is None or theirs.state is not TransferState.COMPLETED:
                in_transit.extend(host_blocks[transfer_id])

        # Corresponding adjustments: exactly one pair per completed transfer,
        # equal and opposite; none for anything else.
        host_amounts = {(e.transfer_id, e.year): e.amount for e in host_ca if e.partner == buyer}
        buyer_amounts = {(e.transfer_id, e.year): e.amount for e in ca}
        for (transfer_id, year), amount in buyer_amounts.items():
            if transfer_id in one_round:
                if any(key[0] == transfer_id for key in host_amounts):
                    fail(f"{HOST} has a CA for {transfer_id} that it has not completed")
                continue
            if host_amounts.get((transfer_id, year)) != -amount:
                fail(f"{buyer} CA {amount} for {transfer_id} has no opposite at {HOST}")
            if transfers[transfer_id].state is not TransferState.COMPLETED:
                fail(f"{buyer} has a CA for {transfer_id} in state {transfers[transfer_id].state}")
        for (transfer_id, _), _amount in host_amounts.items():
            if host_transfers[transfer_id].state is not TransferState.COMPLETED:
                fail(f"{HOST} has a CA for {transfer_id} that is not completed")
        for transfer_id, record in transfers.items():
            if record.state is TransferState.COMPLETED and not any(
                e.transfer_id == transfer_id for e in ca
            ):
                fail(f"{buyer} completed {transfer_id} without a CA")
        if final:
            for transfer_id, ours in host_transfers.items():
                if ours.partner != buyer:
                    continue
                theirs = transfers.get(transfer_id)
                moved = ours.state is TransferState.COMPLETED
                if moved != (theirs is not None and theirs.state is TransferState.COMPLETED):
                    fail(f"{transfer_id}: {HOST} {ours.state.name}, {buyer} "
                         f"{theirs.state.name if theirs else 'unknown'} after healing")  # fmt: skip
                if theirs is None and not (
                    buyer in unpinned
                    and not ours.complete_on_acceptance
                    and (
                        ours.state is TransferState.VOIDED
                        or (
                            ours.state is TransferState.REJECTED
                            and ours.rejection_code in KEY_REFUSALS
                        )
                    )
                ):
                    # (A buyer that unpinned the host's keys for a while refused a
                    # two-phase proposal, or its void, before recording it: such a
                    # refusal settles it at the host, and the buyer keeps no record.)
                    fail(f"{buyer} never heard of {transfer_id} after healing")
                if ours.state is TransferState.PROPOSED:
                    fail(f"{transfer_id} still PROPOSED at {HOST} after healing")
        for record in transfers.values():
            if record.direction is not Role.RECEIVER:
                fail(f"{buyer} has an outgoing transfer {record.transfer_id}")

    # Conservation and uniqueness of serials: every issued serial is in exactly
    # one place: held by the host, held by a buyer, or in transit.
    everywhere = list(host_held) + in_transit
    for buyer in BUYERS:
        everywhere += [h.block for h in views[buyer][2]]
    total = sum(b.quantity for b in everywhere)
    if total != issued:
        fail(f"units not conserved: issued {issued}, accounted for {total}")
    ordered = sorted(everywhere, key=lambda b: (b.originating_registry, b.serial_start))
    for before, after in itertools.pairwise(ordered):
        if before.overlaps(after):
            fail(f"serials {before.label()} and {after.label()} are in two places at once")
