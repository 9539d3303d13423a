"""The running node: gRPC servers, the outbox worker and the database thread.

A thin asyncio adapter around :class:`~itmolink.node.engine.Engine`: it reads
the clock, runs every engine call on one database thread, serves the partner
port over mutual TLS and the admin interface locally, and delivers the outbox.

Both gRPC servers also carry the standard health service (``grpc.health.v1``)
and server reflection, so ``grpcurl`` can list and call them: on the partner
port only with a client certificate of a pinned partner CA, on the admin
interface without a token (neither reveals anything an operator's token
guards). Health is SERVING once the store is open and both servers started,
and NOT_SERVING from the first moment of :meth:`Node.stop`, after
STORE_FAILURES_UNHEALTHY outbox passes in a row failed (SERVING again once one
works) and once the outbox worker ended. Metrics are served
over HTTP when ``[metrics] listen`` is set (:mod:`itmolink.node.metrics`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from itmolink.admin.v1 import admin_pb2
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey, write_private_file
from itmolink.crypto.operators import load_operators, operator_for, operators_file
from itmolink.crypto.pki import PartnerCard, issuing_party
from itmolink.node.config import NodeConfig, check_admin_socket
from itmolink.node.engine import Engine, Limits, Partner, ReplyError
from itmolink.node.metrics import NodeMetrics
from itmolink.node.ratelimit import RateLimited, TokenBucket
from itmolink.node.tls import NodeTls
from itmolink.store import open_store
from itmolink.v1 import partner_service_pb2, partner_service_pb2_grpc

if TYPE_CHECKING:
    from itmolink.v1.partner_service_pb2_grpc import PartnerServiceAsyncStub

log = logging.getLogger("itmolink.node")

T = TypeVar("T")
Clock = Callable[[], dt.datetime]

RPC_TIMEOUT_SECONDS = 10.0
PARTNER_SERVICE = partner_service_pb2.DESCRIPTOR.services_by_name["PartnerService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# At most this many queued database calls, begun within this many seconds, share
# one group commit. Small enough that, under load, a group's replies leave while the
# next group runs, so the two nodes of a transfer work at the same time instead of
# in turn (64 transfers in flight: 1,180 transfers/s with 32 against 705/s with 128,
# the same CPU per transfer; docs/PERFORMANCE.md, round 4); large enough that one
# fsync serves many calls.
MAX_GROUP = 32
GROUP_SECONDS = 0.02
# A DeliverBatch call carries at most this many envelopes (PROTOCOL.md §2.6).
MAX_BATCH = 128
# After a partner answered DeliverBatch with UNIMPLEMENTED, use Deliver alone for
# this long before trying DeliverBatch again (it may have been upgraded).
BATCH_RETRY_SECONDS = 600.0
# After a DeliverBatch call refused as too large (or by an overloaded partner), use
# Deliver alone towards that partner for this long.
BATCH_BACKOFF_SECONDS = 30.0
# A message being delivered is claimed in the outbox for this long (not due again).
LEASE = dt.timedelta(seconds=RPC_TIMEOUT_SECONDS + 1)
MAX_IDLE_WAIT_SECONDS = 1.0
# Health says NOT_SERVING after this many outbox passes in a row failed (the store
# unreachable), and SERVING again after the next one that works.
STORE_FAILURES_UNHEALTHY = 3


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# The cyclic garbage collector's youngest generation is collected after this many
# allocations (Python's default is 700): a protocol step allocates thousands of
# short-lived objects (protobuf messages, rows, tuples) and frees them by reference
# counting, so the default collected several times a step for nothing (3 to 5% of
# a node's CPU with 64 transfers in flight).
GC_THRESHOLD = (20_000, 20, 20)


def _collect_less_often() -> None:
    """Once started, collect young objects less often (the setting is the process's:
    a process that runs several nodes, as tests do, gets it from the first)."""
    if gc.get_threshold()[0] < GC_THRESHOLD[0]:
        gc.set_threshold(*GC_THRESHOLD)


def _drain_ended(done: Future[None]) -> None:
    """Report a database thread's drain that ended by an exception (it settles the
    calls it ran itself; one raising past that is a bug or a shutdown)."""
    if not done.cancelled() and done.exception() is not None:
        log.error("the database thread's drain ended: %r", done.exception())


class PartnerServicer(partner_service_pb2_grpc.PartnerServiceServicer):
    """The partner-facing endpoint. Reached only through mutual TLS with a pinned CA."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def Deliver(
        self,
        request: partner_service_pb2.DeliverRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> partner_service_pb2.DeliverResponse:
        peer = self._node.peer_party(context)
        if peer is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate is not issued by a pinned partner CA",
            )
        assert peer is not None
        if not self._node.admit(peer):
            await self._rate_limited(context, peer, "messages")
        try:
            reply = await self._node.db(
                self._node.engine.handle_delivery, peer, request.envelope, self._node.clock()
            )
        except RateLimited:  # over the partner's transfer items (§2.5), nothing recorded
            await self._rate_limited(context, peer, "transfer items")
        metrics = self._node.metrics
        metrics.child(metrics.received, peer, "handled").inc()
        metrics.child(metrics.calls, "received", peer, "Deliver").inc()
        self._node.kick_after_call()
        return partner_service_pb2.DeliverResponse(envelope=reply)

    async def _rate_limited(
        self, context: grpc.aio.ServicerContext[Any, Any], peer: str, what: str
    ) -> NoReturn:
        """End a Deliver call over the partner's rate (§2.1, §2.5)."""
        self._count_rate_limited(peer)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"more than the agreed rate of {what} from {peer}: retry later",
            trailing_metadata=(("itmolink-rejection-code", "REJECTION_CODE_RATE_LIMITED"),),
        )
        raise AssertionError("context.abort returned")  # it raises

    def _rate_limited_slot(
        self, outcome: partner_service_pb2.DeliverOutcome, peer: str, what: str
    ) -> None:
        """The outcome of an envelope of a DeliverBatch call over the partner's rate (§2.6)."""
        self._count_rate_limited(peer)
        outcome.failure.CopyFrom(
            failure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than the agreed rate of {what} from {peer}: retry later",
                "REJECTION_CODE_RATE_LIMITED",
            )
        )

    def _count_rate_limited(self, peer: str) -> None:
        self._node.metrics.received.labels(peer, "rate_limited").inc()
        self._node.metrics.rejection("sent", peer, "RATE_LIMITED")

    async def DeliverBatch(
        self,
        request: partner_service_pb2.DeliverBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> partner_service_pb2.DeliverBatchResponse:
        """Each envelope handled as a Deliver call of its own would be (PROTOCOL.md
        §2.6), all of them queued on the database thread together so that they share
        one group commit; one outcome per envelope, in order, none sent before the
        commit."""
        node = self._node
        peer = node.peer_party(context)
        if peer is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate is not issued by a pinned partner CA",
            )
        assert peer is not None
        count = len(request.envelopes)
        if not 1 <= count <= MAX_BATCH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a DeliverBatch call carries 1 to {MAX_BATCH} envelopes, not {count}",
            )
        node.metrics.calls.labels("received", peer, "DeliverBatch").inc()
        outcomes: list[partner_service_pb2.DeliverOutcome] = [
            partner_service_pb2.DeliverOutcome() for _ in range(count)
        ]
        calls: list[Callable[[], bytes]] = []
        slots: list[int] = []
        now = node.clock()
        for slot, envelope in enumerate(request.envelopes):
            if node.admit(peer):
                calls.append(functools.partial(node.engine.handle_delivery, peer, envelope, now))
                slots.append(slot)
                continue
            self._rate_limited_slot(outcomes[slot], peer, "messages")
        for slot, done in zip(slots, await node.db_many(calls), strict=True):
            error = done.exception()
            if error is None:
                outcomes[slot].envelope = done.result()
                node.metrics.child(node.metrics.received, peer, "handled").inc()
                continue
            if isinstance(error, RateLimited):  # over its transfer items, nothing recorded
                self._rate_limited_slot(outcomes[slot], peer, "transfer items")
                continue
            # What Deliver would end with: the step's transaction was rolled back.
            log.error(
                "handling envelope %d of a DeliverBatch call from %s failed",
                slot,
                peer,
                exc_info=error,
            )
            node.metrics.received.labels(peer, "failed").inc()
            outcomes[slot].failure.CopyFrom(
                failure(grpc.StatusCode.UNKNOWN, f"the step failed: {type(error).__name__}")
            )
        node.kick_after_call()
        return partner_service_pb2.DeliverBatchResponse(outcomes=outcomes)


def failure(
    code: grpc.StatusCode, message: str, rejection_code: str = ""
) -> partner_service_pb2.DeliverFailure:
    """A batch slot's non-OK status (PROTOCOL.md §2.6)."""
    number: int = code.value[0]
    return partner_service_pb2.DeliverFailure(
        code=number, message=message, rejection_code=rejection_code
    )


STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class DeliveryFailed(Exception):
    """A delivery that ended without a reply: the gRPC status a Deliver call ended
    with, or a DeliverBatch call or one of its slots (PROTOCOL.md §2.1, §2.6)."""

    def __init__(self, code: str, details: str, rejection_code: str | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.rejection_code = rejection_code

    @classmethod
    def of_rpc(cls, exc: grpc.aio.AioRpcError) -> DeliveryFailed:
        trailers: Any = exc.trailing_metadata() or ()
        code = next((v for k, v in trailers if k == "itmolink-rejection-code"), None)
        return cls(exc.code().name, exc.details() or "", code if isinstance(code, str) else None)

    @classmethod
    def of_slot(cls, slot: partner_service_pb2.DeliverFailure) -> DeliveryFailed:
        # A slot that claims OK (0) or an unknown code still failed: UNKNOWN.
        name = STATUS_NAMES.get(slot.code) if slot.code else None
        return cls(name or "UNKNOWN", slot.message, slot.rejection_code or None)


class Node:
    """One registry node process."""

    def __init__(self, config: NodeConfig, *, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itmolink-db")
        # Group commit (see db()): calls waiting for the database thread.
        self._group: Callable[[], contextlib.AbstractContextManager[None]] | None = None
        # Each entry: calls that share one group commit (one db() call, or the
        # envelopes of one DeliverBatch call).
        self._queue: collections.deque[list[tuple[Callable[[], Any], asyncio.Future[Any]]]] = (
            collections.deque()
        )
        self._queue_lock = threading.Lock()
        self._draining = False
        self._batching = False
        self._endpoints = {p.card.party: p.endpoint for p in config.partners}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, PartnerServiceAsyncStub] = {}
        self._inflight: set[str] = set()
        # Envelopes for a partner that became ready in this turn of the event loop,
        # sent together when it ends (_flush), and the partners that answered
        # DeliverBatch with UNIMPLEMENTED (until when Deliver alone is used).
        self._ready: dict[str, list[tuple[bytes, asyncio.Future[bytes | None]]]] = {}
        self._no_batch: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._partner_server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        self.partner_port = 0
        self.engine: Engine
        self.tls: NodeTls
        self._stub_generation: dict[str, int] = {}
        self._operators: dict[str, str] = {}
        self._operators_mtime = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._peers: dict[bytes, str | None] = {}
        self.metrics = NodeMetrics()
        self.health = HealthServicer()
        self.metrics_port = 0

    # -- plumbing --------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the database thread and return once its work is durable.

        Once the engine exists, calls queued while the thread is busy run one
        after another in one group commit (``Store.group``, when the store has
        it): each keeps its own transaction as a savepoint, and none returns
        (so no reply or delivery leaves) before the group has committed. The
        requests they put in the outbox are delivered at once after the commit.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if not self._batching:
            return await loop.run_in_executor(self._executor, call)
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(loop, [(call, future)])
        return await future

    async def db_many(self, calls: Sequence[Callable[[], T]]) -> list[asyncio.Future[T]]:
        """Run ``calls`` on the database thread, each in its own transaction, all in
        one group commit (when the node groups its calls; a group may then hold more
        than MAX_GROUP calls). Returns, once the group is durable, a settled future
        per call, in order: one call's error leaves the others alone, as separate
        :meth:`db` calls would."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[T]] = [loop.create_future() for _ in calls]
        if not futures:
            return futures
        if not self._batching:
            for call, future in zip(calls, futures, strict=True):
                try:
                    future.set_result(await loop.run_in_executor(self._executor, call))
                except Exception as exc:
                    future.set_exception(exc)
            return futures
        self._enqueue(loop, list(zip(calls, futures, strict=True)))
        await asyncio.wait(futures)
        return futures

    def _enqueue(
        self, loop: asyncio.AbstractEventLoop, entry: list[tuple[Callable[[], Any], Any]]
    ) -> None:
        """Queue calls that must share a group commit (one entry) for the database thread."""
        with self._queue_lock:
            self._queue.append(entry)
            idle = not self._draining
            self._draining = True
        if idle:
            # Not run_in_executor: its asyncio future would wake the event loop a
            # second time when _drain returns; _settle already hands over the results.
            self._executor.submit(self._drain, loop).add_done_callback(_drain_ended)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the database thread: run queued calls in groups until none is left.

        A group takes the calls queued when it begins, up to MAX_GROUP of them,
        and stops taking them after GROUP_SECONDS, so that a slow call (a report,
        a large query) holds back the answers of only the calls before it in its
        group. The calls of one queue entry (a DeliverBatch call's envelopes) are
        never split between groups.
        """
        engine = self.engine
        while True:
            with self._queue_lock:
                if not self._queue:
                    self._draining = False
                    return
                waiting = calls = 0
                for entry in self._queue:
                    if waiting and calls + len(entry) > MAX_GROUP:
                        break
                    waiting += 1
                    calls += len(entry)
            taken = 0
            ran: list[asyncio.Future[Any]] = []
            outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
            engine.sent = []
            started = time.monotonic()
            try:
                # Without a group (a store without one) each call commits alone.
                with self._group() if self._group is not None else contextlib.nullcontext():
                    while taken < waiting and (
                        not taken or time.monotonic() - started < GROUP_SECONDS
                    ):
                        with self._queue_lock:
                            entry = self._queue.popleft()
                        taken += 1
                        for call, future in entry:
                            ran.append(future)
                            mark = len(engine.sent)
                            try:
                                outcomes.append((future, None, call()))
                            except Exception as exc:  # its own transaction was rolled back
                                del engine.sent[mark:]
                                outcomes.append((future, exc, None))
            except Exception as exc:  # the group did not commit: nothing of it is durable
                log.error("group commit of %d calls failed: %s", len(ran), exc)
                outcomes = [(future, exc, None) for future in ran]
                engine.sent = []
            except BaseException as exc:  # the thread is being torn down
                # Nothing of the group is durable: its calls fail rather than hang, and
                # later calls start a drain anew.
                failed: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = [
                    (future, exc, None) for future in ran
                ]
                nothing: list[tuple[str, str, bytes]] = []
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._settle, failed, nothing)
                with self._queue_lock:
                    self._draining = False
                raise
            sent, engine.sent = engine.sent, []
            with contextlib.suppress(RuntimeError):  # the loop closed (shutting down)
                loop.call_soon_threadsafe(self._settle, outcomes, sent)

    def _settle(
        self,
        outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]],
        sent: list[tuple[str, str, bytes]],
    ) -> None:
        """On the event loop, after a group committed: deliver the requests it put in
        the outbox, and hand its results to the calls waiting for them."""
        for message_id, partner, envelope in sent:
            self._start_delivery(message_id, partner, envelope)
        for future, error, result in outcomes:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def run_on_db_thread(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn`` on the database thread from any thread (metrics scrapes)."""
        return self._executor.submit(fn, *args)

    def admit(self, party: str) -> bool:
        """Whether a message from ``party`` is within its rate limit."""
        return self._buckets[party].take(time.monotonic())

    def kick(self) -> None:
        """Wake the outbox worker: there may be something new to send."""
        self._kick.set()

    @property
    def delivers_at_once(self) -> bool:
        """Whether what an engine call puts in the outbox is claimed in its transaction
        and delivered once it commits (:meth:`_settle`), so that no pass of the outbox
        worker is needed to send it (a pass costs four transactions on the database
        thread, queued ahead of the next protocol step)."""
        return self._batching

    def kick_after_call(self) -> None:
        """Wake the outbox worker after an engine call that may have put requests in
        the outbox, unless they are already on their way (:attr:`delivers_at_once`)."""
        if not self.delivers_at_once:
            self.kick()

    def peer_party(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        certificates = context.auth_context().get("x509_pem_cert")
        if not certificates:
            return None
        # Parsing the certificate and checking it against each pinned CA costs more
        # than the rest of a delivery's handling outside the database: remembered
        # per certificate (the pinned CAs do not change while the node runs).
        certificate = next(iter(certificates))
        if certificate not in self._peers:
            if len(self._peers) >= 1024:
                self._peers.clear()
            self._peers[certificate] = issuing_party(
                certificate, [p.card for p in self.config.partners]
            )
        return self._peers[certificate]

    def operator(self, metadata: Any) -> str | None:
        """The admin operator a request's bearer token belongs to, if any.

        ``operators.toml`` is read again when it changes, so an operator added
        with ``itmolink operator add`` can act without a restart.
        """
        path = operators_file(self.config.keys.directory)
        mtime = path.stat().st_mtime_ns if path.exists() else 0
        if mtime != self._operators_mtime:
            self._operators = load_operators(self.config.keys.directory)
            self._operators_mtime = mtime
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return operator_for(token, self._operators)
        return None

    def set_partner_endpoint(self, party: str, endpoint: str) -> None:
        """Point the link to ``party`` at another address (tests bind port 0)."""
        self._endpoints[party] = endpoint
        self._close_channel(party)

    def _close_channel(self, party: str) -> None:
        """Forget the link to ``party``; its channel closes once its calls end (at
        most after a call's deadline)."""
        channel = self._channels.pop(party, None)
        self._stubs.pop(party, None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(RPC_TIMEOUT_SECONDS))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self.tls = NodeTls(
            config.keys.node_key,
            config.keys.node_certificate,
            b"".join(p.card.ca_certificate_pem for p in config.partners) or None,
            own_ca=PartnerCard.load(config.keys.card).ca_certificate_pem,
        )
        signing_key = SigningKey.load(config.party, config.keys.signing_key)
        self._operators = load_operators(config.keys.directory)
        if not self._operators:
            raise ValueError(
                f"no admin operator in {config.keys.directory}/operators.toml: "
                "create one with 'itmolink operator add'"
            )
        check_admin_socket(config.admin_listen)
        trust = TrustStore(key for p in config.partners for key in p.card.signing_keys)
        # A key a partner's card lists as revoked signs nothing, even if an older copy
        # of the card, or an announcement, pins it (PROTOCOL §2.4, §3.8).
        for partner in config.partners:
            for revoked in partner.card.revoked_keys:
                trust.revoke(revoked.key_id, revoked.compromised_since)
        store = await self.db(
            open_store, config.database, party=config.party, registry=config.registry
        )
        directory = config.keys.directory
        self.engine = Engine(
            party=config.party,
            registry=config.registry,
            signing_key=signing_key,
            trust=trust,
            partners=[
                Partner(p.card.party, p.card.registry, p.endpoint, p.complete_on_acceptance)
                for p in config.partners
            ],
            store=store,
            # Processes sharing a PostgreSQL database load a key another rotated to.
            key_loader=lambda key_id: SigningKey.load(
                config.party, directory / f"signing-{key_id}.key"
            ),
            default_timeout=dt.timedelta(seconds=config.transfer_timeout_seconds),
            withdrawal_grace=dt.timedelta(seconds=config.withdrawal_grace_seconds),
            accounting=config.accounting,
            threshold=config.threshold,
            limits=Limits(
                max_message_bytes=config.limits.max_message_bytes,
                max_blocks=config.limits.max_blocks,
                max_clock_skew=dt.timedelta(seconds=config.limits.max_clock_skew_seconds),
                max_message_age=dt.timedelta(days=config.limits.max_message_age_days),
                transfer_items_per_second=config.limits.transfer_items_per_second,
                transfer_items_burst=config.limits.transfer_items_burst,
            ),
        )
        self.engine.ledger_clock = self.clock
        await self.db(self._load_rotated_keys)
        # Revocations of our keys reach partners added since (PROTOCOL §3.8), and those
        # our card lists come back if the ledger lost them.
        own_card = PartnerCard.load(config.keys.card)
        await self.db(
            self.engine.announce_revocations,
            self.clock(),
            [(r.key_id, r.compromised_since) for r in own_card.revoked_keys],
        )
        # And the card lists the ledger's revocations: one made before cards listed
        # them (an upgraded node) reaches the partners that pin the card later.
        listing = own_card.listing(await self.db(self.engine.own_revocations))
        if listing != own_card:
            # Whole or not at all (a process sharing the database may be reading it), and
            # a card file the node may not write costs a warning, not the start.
            staged = config.keys.card.with_name(f".{config.keys.card.name}.new")
            try:
                staged.write_text(listing.to_toml())
                os.replace(staged, config.keys.card)
            except OSError as exc:
                log.error(
                    "ALARM: could not write %s to list every revocation our ledger records "
                    "(%s): give partners that pin the card later a card that lists them",
                    config.keys.card,
                    exc,
                )
            else:
                log.warning("our card file now lists every revocation our ledger records")
        self.engine.on_rejection = self.metrics.rejection
        self._group = getattr(store, "group", None)
        self.engine.claim_sent_us = LEASE // dt.timedelta(microseconds=1)
        self._batching = True
        self._buckets = {
            p.card.party: TokenBucket(
                config.limits.rate_per_second, config.limits.rate_burst, time.monotonic()
            )
            for p in config.partners
        }

        # gRPC itself refuses anything larger than an envelope may be, plus framing.
        self._partner_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", config.limits.max_message_bytes + 1024)]
        )
        partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(
            PartnerServicer(self), self._partner_server
        )
        self._add_health_and_reflection(self._partner_server, PARTNER_SERVICE)
        self.partner_port = self._partner_server.add_secure_port(
            config.partner_listen, self.tls.server_credentials()
        )
        if self.partner_port == 0:
            raise OSError(f"cannot listen on partner_listen = {config.partner_listen!r}")

        from itmolink.node.admin import add_admin_service

        self._admin_server = grpc.aio.server()
        add_admin_service(self, self._admin_server)
        self._add_health_and_reflection(self._admin_server, ADMIN_SERVICE)
        admin = config.admin_listen
        if admin.startswith("unix:"):
            socket = Path(admin.removeprefix("unix:"))
            check_admin_socket(admin)  # again, just before: only a stale socket is removed
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()  # noqa: ASYNC240 (start-up, before serving)
            old_umask = os.umask(0o177)
            try:
                bound = self._admin_server.add_insecure_port(admin)
            finally:
                os.umask(old_umask)
        else:
            bound = self._admin_server.add_insecure_port(admin)
        if bound == 0:
            raise OSError(f"cannot listen on admin_listen = {admin!r}")

        # Until everything below has started, health says NOT_SERVING (the servicer's
        # default would be SERVING for the node as a whole).
        for service in ("", PARTNER_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._partner_server.start()
        await self._admin_server.start()
        if admin.startswith("unix:"):
            os.chmod(admin.removeprefix("unix:"), 0o600)
        self._worker = asyncio.get_running_loop().create_task(self._outbox_loop())
        self._worker.add_done_callback(self._worker_ended)
        if config.metrics_listen is not None:
            self.metrics.attach(self, config.party, config.registry)
            self.metrics_port = self.metrics.serve(config.metrics_listen)
        for service in ("", PARTNER_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.serving.set(1)
        _collect_less_often()
        log.info(
            "node %s (%s) listening: partners on port %d (mutual TLS), admin on %s%s",
            config.party,
            config.registry,
            self.partner_port,
            admin,
            f", metrics on port {self.metrics_port}" if config.metrics_listen is not None else "",
        )

    def _add_health_and_reflection(self, server: grpc.aio.Server, service: str) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop gracefully: health goes NOT_SERVING, the servers stop taking calls and
        give those in progress ``grace`` seconds, the outbox worker finishes its pass
        and the deliveries in flight (each applies its reply or records the failure),
        the database thread finishes its queue, and only then is the store closed.

        A call still running after ``grace`` is cancelled on the gRPC side, but its
        database transaction, already queued, still runs to its end: the partner's
        retry then gets the stored reply.
        """
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        log.info("stopping: health NOT_SERVING, finishing in-flight steps")
        self.kick()
        # Partners first: while their calls drain, the admin interface still answers
        # (its health service says NOT_SERVING).
        for server in (self._partner_server, self._admin_server):
            if server is not None:
                await server.stop(grace)
        if self._worker is not None and not self._worker.done():  # else it died (logged)
            await self._worker
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for channel in self._channels.values():
            await channel.close(None)
        if hasattr(self, "engine"):
            self._batching = False  # what is queued runs before the store closes
            await self.db(self.engine.store.close)
        self._executor.shutdown(wait=True)
        self.metrics.close()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        if self._partner_server is not None:
            await self._partner_server.wait_for_termination()

    def _load_rotated_keys(self) -> None:
        """After a key rotation, sign with the key the ledger names (signing-<id>.key)."""
        with self.engine.store.transaction() as tx:
            current = tx.meta_get("signing_key_id")
            pending = tx.meta_get("pending_signing_key")
        directory = self.config.keys.directory
        if current and current != self.engine.signing_key.key_id:
            self.engine.signing_key = SigningKey.load(
                self.config.party, directory / f"signing-{current}.key"
            )
        if pending:
            self.engine.pending_key = SigningKey.load(
                self.config.party, directory / f"signing-{pending}.key"
            )

    def rotate_signing_key(self) -> str:
        """Make and store a new signing key, then announce it (on the database thread)."""
        key = SigningKey.generate(self.config.party)
        directory = self.config.keys.directory
        write_private_file(directory / f"signing-{key.key_id}.key", key.private_pem())
        self.engine.rotate_signing_key(key, self.clock())
        card = PartnerCard.load(directory / "card.toml")
        keys = [k for k in card.signing_keys if k.key_id != key.key_id]
        skew = dt.timedelta(seconds=self.config.limits.max_clock_skew_seconds)
        announced = key.verifying_key(not_before=self.clock() - skew)  # as announced in-band
        updated = dataclasses.replace(card, signing_keys=(*keys, announced))
        (directory / "card.toml").write_text(updated.to_toml())
        return key.key_id

    async def cancel_key_rotation(self) -> str:
        """Give up the key being announced: the engine revokes it where it may be pinned;
        once that is durable, the key leaves our partner card and its private key file
        is deleted (never before: a cancellation that did not commit leaves the node able
        to switch to the key). Returns its key id."""
        key_id = await self.db(self.engine.cancel_key_rotation, self.clock())
        directory = self.config.keys.directory
        card = PartnerCard.load(directory / "card.toml")
        # A copy of the card taken since the rotation began lists the key: the card
        # now says it is revoked.
        (directory / "card.toml").write_text(card.revoking(key_id, self.clock()).to_toml())
        (directory / f"signing-{key_id}.key").unlink(missing_ok=True)
        return key_id

    def revoke_signing_key(
        self, key_id: str, partner: str, compromised_since: dt.datetime | None = None
    ) -> None:
        """Revoke a key (on the database thread); our own moves from the signing keys
        of our partner card to its revoked keys."""
        now = self.clock()
        self.engine.revoke_signing_key(key_id, now, partner, compromised_since)
        if partner:
            return
        path = self.config.keys.directory / "card.toml"
        card = PartnerCard.load(path)
        path.write_text(card.revoking(key_id, now, compromised_since).to_toml())

    # -- the outbox worker -------------------------------------------------------------

    def partner_stub(self, party: str) -> PartnerServiceAsyncStub:
        """The mutual-TLS client for a partner link (one channel per partner)."""
        return self._stub(party)

    def _stub(self, party: str) -> PartnerServiceAsyncStub:
        stub = self._stubs.get(party)
        if stub is not None and self._stub_generation.get(party) != self.tls.generation:
            self._close_channel(party)  # the node certificate was renewed: dial anew
            stub = None
        if stub is None:
            card = next(p.card for p in self.config.partners if p.card.party == party)
            channel = grpc.aio.secure_channel(
                self._endpoints[party],
                self.tls.channel_credentials(card.ca_certificate_pem),
                # A DeliverBatch response carries a reply per envelope, up to MAX_BATCH.
                options=[
                    (
                        "grpc.max_receive_message_length",
                        MAX_BATCH * (self.config.limits.max_message_bytes + 1024),
                    )
                ],
            )
            self._channels[party] = channel
            self._stub_generation[party] = self.tls.generation
            stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
            self._stubs[party] = stub
        return stub

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )  # fmt: skip
        for service in ("", PARTNER_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, status)  # ignored once stopping
        self.metrics.serving.set(1 if serving and not self._stopping else 0)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """The outbox worker must run until the node stops: health says so if not."""
        if self._stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("ALARM: the outbox worker ended (%s): health NOT_SERVING", reason)
        asyncio.get_running_loop().create_task(self._set_health(False))

    async def _outbox_loop(self) -> None:
        failures = 0
        while not self._stopping:
            wait = MAX_IDLE_WAIT_SECONDS
            try:
                self.tls.reload()  # a renewed node certificate (node/tls.py)
            except Exception:
                log.exception("reading the node certificate failed")
            try:
                next_due = await self._outbox_pass()
            except Exception:
                log.exception("outbox pass failed; retrying")
                failures += 1
                if failures == STORE_FAILURES_UNHEALTHY:
                    log.error("%d outbox passes failed in a row: health NOT_SERVING", failures)
                    await self._set_health(False)
            else:
                if failures >= STORE_FAILURES_UNHEALTHY:
                    log.info("outbox pass works again: health SERVING")
                    await self._set_health(True)
                failures = 0
                if next_due is not None:
                    from itmolink.node.convert import to_us

                    wait = max(0.01, min(wait, (next_due - to_us(self.clock())) / 1e6))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            self._kick.clear()

    async def _outbox_pass(self) -> int | None:
        """Start delivering what is due; when the next message falls due (µs)."""
        # One call on the database thread (one group commit) for the whole pass.
        due, next_due = await self.db(self._outbox_step, self.clock(), LEASE)
        for message_id, partner, envelope in due:
            self._start_delivery(message_id, partner, envelope)
        return next_due

    def _start_delivery(self, message_id: str, partner: str, envelope: bytes) -> None:
        if message_id in self._inflight or self._stopping:
            return
        self._inflight.add(message_id)
        task = asyncio.get_running_loop().create_task(self._deliver(message_id, partner, envelope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _outbox_step(
        self, now: dt.datetime, lease: dt.timedelta
    ) -> tuple[list[tuple[str, str, bytes]], int | None]:
        self.engine.expire_transfers(now)
        self.engine.query_pending_transfers(now)
        due = self.engine.due_messages(now, lease=lease)
        return due, self.engine.next_due()

    async def _deliver(self, message_id: str, partner: str, envelope: bytes) -> None:
        fields = {"message_id": message_id, "partner": partner}
        started = time.monotonic()
        # When this attempt leaves, on the node's clock (at or before the call sends
        # it): S5 of the one-round transfer decides on it, not on when the reply is
        # applied (handle_reply).
        sent_at = self.clock()
        # Whether the outbox worker must look again: unless the reply was applied
        # and what it led to was claimed for delivery at once (a retry is scheduled,
        # or the call was cancelled).
        retry = True
        try:
            reply = await self._exchange(partner, envelope)
        except DeliveryFailed as exc:
            self.metrics.deliveries.labels(partner, "unreachable").inc()
            if exc.rejection_code is not None:
                self.metrics.rejection(
                    "received", partner, exc.rejection_code.removeprefix("REJECTION_CODE_")
                )
            log.info(
                "delivery of %s to %s failed (%s); will retry",
                message_id,
                partner,
                exc.code,
                extra=fields,
            )
            await self.db(self.engine.delivery_failed, message_id, str(exc), self.clock())
        else:
            metrics = self.metrics
            metrics.child(metrics.delivery_seconds, partner).observe(time.monotonic() - started)
            try:
                applied = await self.db(
                    self.engine.handle_reply, message_id, reply, self.clock(), sent_at=sent_at
                )
                if applied is False:
                    # A refusal that settles nothing yet (S5): retried with backoff.
                    self.metrics.deliveries.labels(partner, "retry").inc()
                else:
                    metrics.child(metrics.deliveries, partner, "ok").inc()
                    retry = not self.delivers_at_once
            except ReplyError as exc:
                self.metrics.deliveries.labels(partner, "bad_reply").inc()
                log.error(
                    "reply from %s to %s not applied: %s",
                    partner,
                    message_id,
                    exc,
                    extra={**fields, "code": exc.code.wire_name},
                )
                await self.db(self.engine.delivery_failed, message_id, str(exc), self.clock())
            except Exception as exc:
                # Nothing of the reply was applied (its transaction rolled back);
                # redeliver later: the partner answers with its stored reply.
                self.metrics.deliveries.labels(partner, "bad_reply").inc()
                log.exception(
                    "applying the reply to %s from %s failed", message_id, partner, extra=fields
                )
                await self.db(
                    self.engine.delivery_failed, message_id, f"{type(exc).__name__}", self.clock()
                )
        finally:
            self._inflight.discard(message_id)
            if retry:
                self.kick()

    # -- several envelopes in one call (PROTOCOL.md §2.6) ------------------------------

    async def _exchange(self, partner: str, envelope: bytes) -> bytes:
        """Send one envelope to ``partner`` and return its signed reply, or raise
        :class:`DeliveryFailed`.

        Envelopes for the same partner that become ready in the same turn of the
        event loop (the deliveries started after one group commit, or by one outbox
        pass) go together in one DeliverBatch call when the partner serves it; an
        envelope ready alone goes in a Deliver call, as before, without waiting.
        """
        loop = asyncio.get_running_loop()
        ready = self._ready.setdefault(partner, [])
        future: asyncio.Future[bytes | None] = loop.create_future()
        ready.append((envelope, future))
        if len(ready) == 1:
            # Runs after the other deliveries started in this turn took their step.
            loop.call_soon(self._flush, partner)
        reply = await future
        if reply is not None:
            return reply
        # Alone (or the partner has no DeliverBatch): one Deliver call.
        self.metrics.calls.labels("sent", partner, "Deliver").inc()
        try:
            response = await self._stub(partner).Deliver(
                partner_service_pb2.DeliverRequest(envelope=envelope),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            raise DeliveryFailed.of_rpc(exc) from exc
        return response.envelope

    def _flush(self, partner: str) -> None:
        """Send what became ready for ``partner``: batches of up to MAX_BATCH envelopes
        and ``limits.max_message_bytes`` in all; an envelope left alone goes by Deliver."""
        ready = self._ready.pop(partner, [])
        until = self._no_batch.get(partner)
        if until is not None and time.monotonic() >= until:
            del self._no_batch[partner]  # try DeliverBatch again
            until = None
        budget = self.config.limits.max_message_bytes
        batch: list[tuple[bytes, asyncio.Future[bytes | None]]] = []
        size = 0
        for item in [*ready, None]:
            if item is not None and item[1].done():
                continue  # its delivery was cancelled
            if batch and (item is None or len(batch) == MAX_BATCH or size + len(item[0]) > budget):
                if len(batch) == 1 or until is not None:
                    for _, future in batch:
                        future.set_result(None)  # Deliver, in its own task
                else:
                    task = asyncio.get_running_loop().create_task(self._send_batch(partner, batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                batch, size = [], 0
            if item is not None:
                batch.append(item)
                size += len(item[0])

    async def _send_batch(
        self, partner: str, batch: list[tuple[bytes, asyncio.Future[bytes | None]]]
    ) -> None:
        """One DeliverBatch call; each envelope's delivery gets its own outcome."""

        def settle(outcome: Callable[[asyncio.Future[bytes | None]], object]) -> None:
            for _, future in batch:
                if not future.done():
                    outcome(future)

        self.metrics.calls.labels("sent", partner, "DeliverBatch").inc()
        try:
            response = await self._stub(partner).DeliverBatch(
                partner_service_pb2.DeliverBatchRequest(envelopes=[e for e, _ in batch]),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            failed = DeliveryFailed.of_rpc(exc)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A partner without DeliverBatch: Deliver each now, and for a while.
                log.info("%s does not serve DeliverBatch: using Deliver", partner)
                self._no_batch[partner] = time.monotonic() + BATCH_RETRY_SECONDS
                settle(lambda future: future.set_result(None))
            elif exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and failed.rejection_code is None:
                # Not the rate limit (no rejection code; that refuses no whole call
                # here), so a message size limit of the partner's gRPC or ours for
                # the response, or an overloaded partner: each envelope alone, and
                # Deliver only for a little while.
                log.info("%s refused a DeliverBatch call (%s): using Deliver", partner, failed)
                self._no_batch[partner] = time.monotonic() + BATCH_BACKOFF_SECONDS
                settle(lambda future: future.set_result(None))
            else:
                settle(lambda future: future.set_exception(failed))
            return
        except Exception as exc:  # not a gRPC status (none expected): retry each later
            log.exception("DeliverBatch to %s failed", partner)
            broken = DeliveryFailed("INTERNAL", f"DeliverBatch failed: {type(exc).__name__}")
            settle(lambda future: future.set_exception(broken))
            return
        except BaseException:  # cancelled: the deliveries end as cancelled too
            settle(lambda future: future.cancel())
            raise
        if len(response.outcomes) != len(batch):
            wrong = DeliveryFailed(
                "INTERNAL",
                f"DeliverBatch answered {len(response.outcomes)} outcomes "
                f"for {len(batch)} envelopes",
            )
            log.error("%s: %s", partner, wrong)
            settle(lambda future: future.set_exception(wrong))
            return
        for (_, future), outcome in zip(batch, response.outcomes, strict=True):
            if future.done():
                continue
            if outcome.WhichOneof("outcome") == "envelope":
                future.set_result(outcome.envelope)
            elif outcome.WhichOneof("outcome") == "failure":
                future.set_exception(DeliveryFailed.of_slot(outcome.failure))
            else:
                future.set_exception(DeliveryFailed("INTERNAL", "DeliverBatch: an empty outcome"))
