"""Benchmarks: itmolink against the gRPC floor measured in the same run.

Run with ``make bench``. Nothing here is a test: it prints figures and their
ratios to a floor measured on this machine in the same run, so a noisy machine
moves both. Every party runs in its own operating-system process, as in
production, so no two of them share an interpreter lock:

* the floor: a raw ``grpc.aio`` unary echo over mutual TLS on loopback, the
  server in one process and the client in another, with a payload the size of
  a signed transfer proposal, one call at a time and 64 in flight (calls per
  second, p50 and p99; each the median of three runs);
* itmolink end to end between two real nodes, each in its own process (mutual
  TLS on loopback, durable SQLite commits, signatures made and verified both
  ways): completed transfers per second with 1 and 64 in flight, p50 and p99
  latency from the operator's request (made in the sender's process, as the
  admin service would) until the receiver's answer to the completion reaches
  the sender: the receiver answers after committing, so both ledgers are final;
* cost against quantity: transfers of 1 tCO2e and of 10^9 tCO2e, alternating;
* the CPU time each node process spends per transfer (all its threads);
* reconciliation of two ledgers of N transfers of one block each (10^6 by
  default, written straight into both databases): the time and the work
  (queries, buckets and leaves compared) when identical and when d transfers
  differ, and each node's memory (peak RSS) holding them;
* the floor of a durable, signed transfer with one in flight: the parts no
  implementation can skip (durable commits of one row and of a protocol step's
  pages, Ed25519 signatures and verifications, the echo's round trip), summed for
  a one-round transfer, and the largest ratio to the echo they leave possible;
* ``ratio transfers/echo: X`` for one transfer in flight and for 64;
* one-round transfers (docs/PROTOCOL.md §6.11: the sender asks the receiver to
  complete in the step that accepts): the same measurements with a second pair
  of nodes whose sender asks, a transfer being complete when the sender has
  committed the receiver's completed acceptance (both ledgers final), and
  ``ratio one-round transfers/echo: X``;
* batched proposals (docs/PROTOCOL.md §5.15): completed transfers per second
  with N transfers per TransferBatchProposal and B batches in flight, against
  the echo with 64 in flight, p50 and p99 per transfer (a transfer completes
  when the receiver's answer to its batch's completion reaches the sender),
  the CPU per transfer, and ``ratio batched transfers/echo: X``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import logging
import multiprocessing as mp
import socket
import sqlite3
import statistics
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from itmolink.core.blocks import Block
from itmolink.core.reconcile import TransferFacts, blocks_leaf, id_hash, journal_leaf, slices
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.pki import PartyFiles, init_party
from itmolink.node import eventloop
from itmolink.node.config import load_config
from itmolink.node.operations import BatchItemRequest
from itmolink.node.reconciliation import Reconciliation
from itmolink.node.runtime import Node
from itmolink.store import SqliteStore
from itmolink.v1 import envelope_pb2, partner_service_pb2, partner_service_pb2_grpc, transfer_pb2

NOW = dt.datetime.now(dt.UTC)
PAYLOAD = 700  # bytes: about a signed one-block TransferProposal envelope
COMPLETION = "itmolink.v1.TransferCompletion"
PROPOSAL = "itmolink.v1.TransferProposal"
BATCH_COMPLETION = "itmolink.v1.TransferBatchCompletion"
Figures = tuple[float, float, float]  # per second, p50 (s), p99 (s)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb() -> tuple[float, float]:
    """This process's resident memory now and at its peak, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# -- the floor: a raw mTLS echo, server and client in two processes -----------------------


class Echo(partner_service_pb2_grpc.PartnerServiceServicer):
    async def Deliver(self, request: Any, context: Any) -> Any:
        return partner_service_pb2.DeliverResponse(envelope=request.envelope)

    async def DeliverBatch(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo answers Deliver only")


def echo_server(keys: PartyFiles, port: int, stop: Any) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(Echo(), server)
        credentials = grpc.ssl_server_credentials(
            [(keys.node_key.read_bytes(), keys.node_certificate.read_bytes())],
            root_certificates=keys.ca_certificate.read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
        await server.start()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(None)

    asyncio.run(serve())


def echo_client(keys: PartyFiles, port: int, count: int, in_flight: int, out: Any) -> None:
    async def run() -> Figures:
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(
                root_certificates=keys.ca_certificate.read_bytes(),
                private_key=keys.node_key.read_bytes(),
                certificate_chain=keys.node_certificate.read_bytes(),
            ),
        )
        stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
        request = partner_service_pb2.DeliverRequest(envelope=b"x" * PAYLOAD)
        for _ in range(20):  # connect and warm up
            await stub.Deliver(request)
        latencies: list[float] = []
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                await stub.Deliver(request)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        await channel.close(None)
        return count / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)

    out.put(asyncio.run(run()))


def echo_floor(ctx: Any, keys: PartyFiles, count: int, in_flight: int) -> Figures:
    """The median of three runs, each figure on its own: on a shared machine a
    single run of the floor moves by a factor of two or more."""
    runs = [echo_run(ctx, keys, count, in_flight) for _ in range(3)]
    rate, p50, p99 = (statistics.median(run[i] for run in runs) for i in range(3))
    return rate, p50, p99


def echo_run(ctx: Any, keys: PartyFiles, count: int, in_flight: int) -> Figures:
    port = free_port()
    stop = ctx.Event()
    server = ctx.Process(target=echo_server, args=(keys, port, stop))
    server.start()
    time.sleep(1.0)
    out = ctx.Queue()
    client = ctx.Process(target=echo_client, args=(keys, port, count, in_flight, out))
    client.start()
    figures: Figures = out.get()
    client.join()
    stop.set()
    server.join()
    return figures


# -- the floor of a durable, signed transfer: only the parts no implementation can skip ----


def commit_p50(directory: Path, rows_updated: int, commits: int = 2000) -> float:
    """The p50 of durable commits (SQLite WAL, ``synchronous=FULL``, as the node's store)
    of one 700-byte row insert and ``rows_updated`` updates of 200-byte rows spread over a
    table of 50,000 (15 make about the 17 pages a protocol step writes), in seconds."""
    path = directory / f"commits-{rows_updated}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.execute("CREATE TABLE j (id INTEGER PRIMARY KEY, b BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, bytes(200)) for i in range(50_000)))
        conn.execute("COMMIT")
        times = []
        for n in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            for k in range(rows_updated):
                conn.execute(
                    "UPDATE t SET v = ? WHERE id = ?",
                    (n.to_bytes(200, "big"), (n * 7919 + k * 3331) % 50_000),
                )
            conn.execute("INSERT INTO j (b) VALUES (?)", (n.to_bytes(PAYLOAD, "big"),))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    return percentile(times, 0.5)


def signature_costs(count: int = 5000) -> tuple[float, float]:
    """Seconds per Ed25519 signature and per verification of a PAYLOAD-byte message,
    with the node's own keys (itmolink.crypto.keys: libsodium)."""
    key = SigningKey.generate("BEN")
    public = key.verifying_key()
    message = bytes(PAYLOAD)
    started = time.perf_counter()
    for _ in range(count):
        signature = key.sign(message)
    signed = time.perf_counter()
    for _ in range(count):
        public.verify(signature, message)
    return (signed - started) / count, (time.perf_counter() - signed) / count


def durable_floor(directory: Path, floor_1: Figures) -> None:
    """Print the least time a one-round transfer (PROTOCOL.md §6.11) can take with one in
    flight on this machine, whatever the implementation: three durable commits (the
    sender's reservation before it sends, the receiver's credit before it answers, the
    sender's debit before it reports the transfer complete), one round trip as the echo
    makes it, and two signatures and two verifications. Nothing of either engine's SQL,
    protobuf or Python is counted, so the ratio printed is an upper bound."""
    directory.mkdir(parents=True, exist_ok=True)
    one_row, step = commit_p50(directory, 0), commit_p50(directory, 15)
    sign, verify = signature_costs()
    trip = 1 / floor_1[0]  # seconds per echo call with one in flight
    allowed = trip / 0.3  # one transfer in this time is 0.3 x the echo
    print("floor of a durable, signed one-round transfer, 1 in flight (no SQL statement, "
          "protobuf or Python of either engine counted):")  # fmt: skip
    print(f"  durable SQLite commit, p50: one 700-byte row {one_row * 1e3:.3f} ms, "
          f"a protocol step's pages {step * 1e3:.3f} ms; Ed25519 sign {sign * 1e3:.3f} ms, "
          f"verify {verify * 1e3:.3f} ms; echo call {trip * 1e3:.3f} ms")  # fmt: skip
    for label, commit in (("step-sized", step), ("one-row", one_row)):
        least = trip + 3 * commit + 2 * (sign + verify)
        print(f"  3 {label} commits, the round trip, 2 signatures, 2 verifications: "
              f"{least * 1e3:.3f} ms: ratio at most {trip / least:.3f}; at 0.3 x the echo "
              f"{(allowed - least) * 1e3:.3f} ms left for both engines' own work")  # fmt: skip


# -- the nodes: one process each, driven by commands over a pipe ---------------------------


def write_config(
    root: Path, party: str, partner: str, port: int, partner_port: int, one_round: bool = False
) -> Path:
    path = root / party.lower() / "node.toml"
    path.write_text(
        f'party = "{party}"\nregistry = "{party}-NR"\ndatabase = "{party.lower()}.db"\n'
        f'partner_listen = "127.0.0.1:{port}"\nadmin_listen = "unix:admin.sock"\n'
        "transfer_timeout_seconds = 600\n"
        f'[keys]\ndirectory = "pki"\n[[partners]]\ncard = "../{partner.lower()}/pki/card.toml"\n'
        f'endpoint = "127.0.0.1:{partner_port}"\n'
        f"complete_on_acceptance = {'true' if one_round else 'false'}\n"
        "[limits]\nrate_per_second = 100000\nrate_burst = 100000\n"
        "transfer_items_per_second = 1000000\ntransfer_items_burst = 1000000\n"
    )
    return path


class BenchNode(Node):
    """A node that tells the benchmark when a transfer is final on both sides: when
    the receiver's answer to its completion came back (the receiver answers only
    after committing the completion, and the sender committed before sending it),
    or, for a one-round transfer, when the sender has committed the receiver's
    completed acceptance (the receiver committed before answering)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self._completions: dict[str, str] = {}  # completion message id -> transfer id
        self._one_round: dict[str, str] = {}  # one-round proposal message id -> transfer id
        self._answered: dict[str, float] = {}  # message id -> when its answer came

    async def start(self) -> None:
        await super().start()
        apply_reply = self.engine.handle_reply

        def handle_reply(message_id: str, raw: bytes, now: dt.datetime, **kwargs: Any) -> bool:
            if message_id in self._completions:  # the receiver's answer is here
                self._answered[message_id] = time.perf_counter()
            applied = apply_reply(message_id, raw, now, **kwargs)
            if message_id in self._one_round and _completed(raw):
                self._answered[message_id] = time.perf_counter()  # both ledgers final
            return applied

        self.engine.handle_reply = handle_reply  # type: ignore[method-assign]

    async def _deliver(self, message_id: str, partner: str, envelope: bytes) -> None:
        sealed = envelope_pb2.Envelope.FromString(envelope)
        if sealed.payload_type == PROPOSAL:
            proposal = transfer_pb2.TransferProposal.FromString(sealed.payload)
            if proposal.complete_on_acceptance:
                self._one_round[message_id] = proposal.transfer_id
        elif sealed.payload_type == COMPLETION:
            completion = transfer_pb2.TransferCompletion.FromString(sealed.payload)
            self._completions[message_id] = completion.transfer_id
        elif sealed.payload_type == BATCH_COMPLETION:  # waited for by its batch id
            batch = transfer_pb2.TransferBatchCompletion.FromString(sealed.payload)
            self._completions[message_id] = batch.batch_id
        await super()._deliver(message_id, partner, envelope)
        one_round = self._one_round.pop(message_id, None)  # a failed attempt adds it again
        answered = self._answered.pop(message_id, None)
        subject = self._completions.pop(message_id, None) or one_round
        if answered is not None and subject is not None:
            waiter = self.waiting.pop(subject, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answered)


def _completed(raw: bytes) -> bool:
    """Whether a reply envelope is an acceptance with ``completed`` (read after the
    engine verified and applied it)."""
    sealed = envelope_pb2.Envelope.FromString(raw)
    return (
        sealed.payload_type == "itmolink.v1.TransferAcceptance"
        and transfer_pb2.TransferAcceptance.FromString(sealed.payload).completed
    )


class Driver:
    """The sender's side of the benchmark, in the sender's process."""

    def __init__(self, node: BenchNode) -> None:
        self.node = node
        self.authorisation = ""

    async def authorise(self) -> None:
        engine = self.node.engine
        terms = await self.node.db(
            engine.authorise, activity_id="LAO-SOLAR", activity_name="", activity_description="",
            cooperative_approach_id="LAO-KOR", acquiring_parties=["KOR"],
            purposes=[Purpose.NDC], oimp_detail="",
            first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
            vintage_from=2021, vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=NOW,
        )  # fmt: skip
        self.authorisation = terms.authorisation_id
        self.node.kick_after_call()
        while (await self.node.db(self._states)).get("KOR") != "acknowledged":  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await self.node.db(
            engine.issue, authorisation_id=self.authorisation, vintage=2025,
            quantity=10**12, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip

    def _states(self) -> dict[str, str]:
        with self.node.engine.store.transaction() as tx:
            return tx.authorisation_party_states("LAO", self.authorisation, 1)

    async def transfer(self, quantity: int) -> float:
        """Make one transfer; when the receiver's answer to its completion came."""
        loop = asyncio.get_running_loop()
        transfer_id: str = await self.node.db(
            self.node.engine.start_transfer, to_party="KOR", authorisation_id=self.authorisation,
            vintage=2025, quantity=quantity, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        done: asyncio.Future[float] = loop.create_future()
        self.node.waiting[transfer_id] = done
        self.node.kick_after_call()
        return await done

    async def transfers(self, count: int, in_flight: int, quantity: int) -> Figures:
        latencies: list[float] = []
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                latencies.append(await self.transfer(quantity) - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        return count / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)

    async def batch(self, size: int, quantity: int) -> float:
        """Propose ``size`` transfers in one batch; when the receiver's answer to the
        batch's completion came (every transfer of it is then final on both sides)."""
        loop = asyncio.get_running_loop()
        batch_id, _ = await self.node.db(
            self.node.engine.start_transfer_batch, to_party="KOR",
            items=[BatchItemRequest(self.authorisation, 2025, quantity)] * size,
            now=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        done: asyncio.Future[float] = loop.create_future()
        self.node.waiting[batch_id] = done
        self.node.kick_after_call()
        return await done

    async def batches(self, count: int, size: int, in_flight: int, quantity: int) -> Figures:
        """``count`` transfers in batches of ``size``, ``in_flight`` batches at a time;
        per second and per-transfer p50 and p99 (a transfer's latency is its batch's)."""
        latencies: list[float] = []
        queue = iter(range(count // size))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                latencies.extend([await self.batch(size, quantity) - started] * size)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        return len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)

    async def quantities(self, count: int, quantities: list[int]) -> list[Figures]:
        """Transfers of each quantity in turn, one in flight: a machine whose load
        drifts during the run moves every quantity's figures alike."""
        latencies: dict[int, list[float]] = {q: [] for q in quantities}
        elapsed = dict.fromkeys(quantities, 0.0)
        for i in range(count * len(quantities)):
            quantity = quantities[i % len(quantities)]
            started = time.perf_counter()
            latencies[quantity].append(await self.transfer(quantity) - started)
            elapsed[quantity] += time.perf_counter() - started
        return [
            (count / elapsed[q], percentile(latencies[q], 0.5), percentile(latencies[q], 0.99))
            for q in quantities
        ]

    async def reconcile(self) -> dict[str, float]:
        started = time.perf_counter()
        report = await Reconciliation(
            self.node, "KOR", dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        ).run()
        return {
            "seconds": time.perf_counter() - started,
            "queries": report.queries,
            "buckets": report.buckets_compared,
            "leaves": report.leaves_compared,
            "transfers": report.transfers_here,
            "discrepancies": len(report.discrepancies),
        }


def node_process(config: Path, conn: Connection, profile: str) -> None:
    """Run one node; obey commands from the benchmark until told to stop."""

    # A reconciliation that finds differences logs an alarm for each; the figures say it.
    logging.getLogger("itmolink.engine").addFilter(
        lambda record: not str(record.msg).startswith("ALARM: reconciliation")
    )

    async def run() -> None:
        node = BenchNode(load_config(config))
        await node.start()
        driver = Driver(node)
        loop = asyncio.get_running_loop()
        conn.send("started")
        while True:
            command, args = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                break
            result: Any = None
            if command == "authorise":
                await driver.authorise()
            elif command == "transfers":
                result = await driver.transfers(*args)
            elif command == "batches":
                result = await driver.batches(*args)
            elif command == "quantities":
                result = await driver.quantities(*args)
            elif command == "reconcile":
                result = await driver.reconcile()
            elif command == "rss":
                result = peak_rss_mb()
            elif command == "cpu":
                result = time.process_time()
            conn.send(result)
        await node.stop(0.5)
        conn.send("stopped")

    if profile:
        import cProfile

        cProfile.runctx(
            "eventloop.run(run())", globals(), {"run": run, "eventloop": eventloop}, profile
        )
    else:
        eventloop.run(run())  # the node's own loop, as `itmolink node run`


class Pair:
    """Two node processes, LAO (the sender, which also drives) and KOR."""

    def __init__(self, ctx: Any, root: Path, profile: str = "", one_round: bool = False) -> None:
        lao_port, kor_port = free_port(), free_port()
        self.pipes: dict[str, Connection] = {}
        self.processes = []
        for party, partner, port, partner_port in (
            ("KOR", "LAO", kor_port, lao_port),
            ("LAO", "KOR", lao_port, kor_port),
        ):
            config = write_config(root, party, partner, port, partner_port, one_round)
            ours, theirs = ctx.Pipe()
            target = f"{profile}.{party.lower()}" if profile else ""
            process = ctx.Process(target=node_process, args=(config, theirs, target))
            process.start()
            assert ours.recv() == "started"
            self.pipes[party] = ours
            self.processes.append(process)

    def call(self, party: str, command: str, *args: Any) -> Any:
        self.pipes[party].send((command, args))
        return self.pipes[party].recv()

    def stop(self) -> None:
        for party, pipe in self.pipes.items():
            pipe.send(("stop", ()))
            assert pipe.recv() == "stopped", party
        for process in self.processes:
            process.join()


def make_parties(root: Path) -> None:
    for party in ("LAO", "KOR"):
        init_party(root / party.lower() / "pki", party, f"{party}-NR", now=NOW)


# -- ledgers of many transfers, written straight into both databases ----------------------


def fill_ledger(path: Path, party: str, partner: str, transfers: int) -> None:
    """``transfers`` completed transfers of one 10-unit block from LAO to KOR, as
    both registries record them (same leaves); the receiver holds every block."""
    SqliteStore(path, party=party, registry=f"{party}-NR").close()
    sender = party == "LAO"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    proposed = int((NOW - dt.timedelta(days=1)).timestamp() * 1_000_000)

    def rows() -> Any:
        for i in range(transfers):
            transfer_id = str(uuid.UUID(int=i + 1))
            block = Block(
                "LAO-NR", i * 10 + 1, i * 10 + 10, UnitType.ITMO, 2025, "LAO-SOLAR", "AUTH",
                "LAO-KOR", "LAO",
            )  # fmt: skip
            digest_p = hashlib.sha256(b"p" + transfer_id.encode()).digest()
            digest_a = hashlib.sha256(b"a" + transfer_id.encode()).digest()
            facts = TransferFacts(
                transfer_id, "LAO", "KOR", True, (block,), (), (), digest_p, digest_a
            )
            b_leaf, j_leaf = blocks_leaf(facts), journal_leaf(facts)
            (b1, b2), (j1, j2) = slices(b_leaf), slices(j_leaf)
            values = ("LAO-NR", i * 10 + 1, i * 10 + 10, int(UnitType.ITMO), 2025, "LAO-SOLAR",
                      "AUTH", "LAO-KOR", "LAO")  # fmt: skip
            yield transfer_id, values, (
                transfer_id, "out" if sender else "in", partner, 3, 10, "AUTH", 1,
                f"m-{transfer_id}", digest_p, digest_a, proposed + 600_000_000, 0, "",
                proposed, proposed, proposed, id_hash(transfer_id), b_leaf, j_leaf, b1, b2,
                j1, j2,
            )  # fmt: skip

    conn.execute("BEGIN")
    batch: list[Any] = []

    def flush() -> None:
        conn.executemany(
            "INSERT INTO transfers (transfer_id, direction, partner, state, quantity, "
            "authorisation_id, first_transfer, proposal_message_id, proposal_digest, "
            "acceptance_digest, expires_at, rejection_code, rejection_detail, created_at, "
            "updated_at, proposed_at, id_hash, blocks_leaf, journal_leaf, blocks_h1, blocks_h2, "
            "journal_h1, journal_h2) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [r[2] for r in batch],
        )
        conn.executemany(
            "INSERT INTO transfer_blocks VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(r[0], *r[1]) for r in batch],
        )
        if not sender:
            conn.executemany(
                "INSERT INTO blocks VALUES (?,?,?,?,?,?,?,?,?,'holding','held',NULL)",
                [r[1] for r in batch],
            )
        batch.clear()

    for row in rows():
        batch.append(row)
        if len(batch) == 10_000:
            flush()
    flush()
    if sender:  # units issued from now on come after the serials written here
        conn.execute(
            "INSERT INTO counters (name, value) VALUES ('serial:LAO-NR', ?)", (10 * transfers + 1,)
        )
    # The running sums a node keeps as transfers become final (migration 0003; a
    # schema without them is that of the code before issue #9, measured for comparison).
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reconcile_buckets'").fetchone():
        write_sums(conn, partner, sender, transfers)
    conn.execute("COMMIT")
    conn.close()


def write_sums(conn: sqlite3.Connection, partner: str, sender: bool, transfers: int) -> None:
    conn.execute(
        "INSERT INTO reconcile_buckets SELECT partner, substr(id_hash, 1, 3), COUNT(*), "
        "SUM(blocks_h1), SUM(blocks_h2), SUM(journal_h1), SUM(journal_h2) FROM transfers "
        "GROUP BY partner, substr(id_hash, 1, 3)"
    )
    conn.execute(
        "INSERT INTO reconcile_totals VALUES (?, ?, ?, ?, ?, ?, ?)",
        (partner, "out" if sender else "in", int(UnitType.ITMO), 2025, "AUTH", 10 * transfers,
         transfers),
    )  # fmt: skip


def spoil(path: Path, count: int, seed: int) -> None:
    """Make ``count`` of the receiver's transfers disagree with the sender's."""
    conn = sqlite3.connect(path, timeout=30)
    ids = conn.execute(
        "SELECT transfer_id FROM transfers WHERE blocks_leaf IS NOT NULL "
        "ORDER BY (rowid * ?) % 1000003 LIMIT ?",
        (seed, count),
    ).fetchall()
    sums = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reconcile_buckets'").fetchone()
    with conn:
        for (transfer_id,) in ids:
            conn.execute(
                "UPDATE transfers SET blocks_h1 = blocks_h1 + 1, blocks_leaf = ? "
                "WHERE transfer_id = ?",
                (hashlib.sha256(transfer_id.encode()).digest(), transfer_id),
            )
            if sums:  # as the node keeps its running sums
                conn.execute(
                    "UPDATE reconcile_buckets SET blocks_h1 = blocks_h1 + 1 WHERE prefix = ?",
                    (id_hash(transfer_id)[:3],),
                )
    conn.close()


# -- reporting ----------------------------------------------------------------------------


def row(label: str, figures: Figures, floor: Figures) -> None:
    rate, p50, p99 = figures
    print(
        f"{label:<40} {rate:9.1f}/s  p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms   "
        f"rate ratio {rate / floor[0]:.3f}  p99 ratio {p99 / floor[2]:.1f}",
        flush=True,
    )


def transfers_part(
    ctx: Any,
    root: Path,
    count: int,
    profile: str,
    batch_size: int = 0,
    batch_in_flight: int = 1,
    batch_count: int = 0,
) -> None:
    echo_keys = init_party(root / "echo", "ECH", "ECH-NR", now=NOW)
    floor_1 = echo_floor(ctx, echo_keys, count * 4, 1)
    floor_64 = echo_floor(ctx, echo_keys, count * 16, 64)
    print("gRPC echo floor, mTLS, client and server in two processes, "
          f"{PAYLOAD}-byte payload (same run, median of 3):")  # fmt: skip
    row("echo, 1 in flight", floor_1, floor_1)
    row("echo, 64 in flight", floor_64, floor_64)
    durable_floor(root / "floor", floor_1)

    make_parties(root / "nodes")
    pair = Pair(ctx, root / "nodes", profile)
    try:
        pair.call("LAO", "authorise")
        pair.call("LAO", "transfers", 20, 1, 1_000)  # warm up
        cpu: dict[str, tuple[float, float]] = {}

        def measure(label: str, *args: int) -> Figures:
            before = {p: pair.call(p, "cpu") for p in ("LAO", "KOR")}
            figures: Figures = pair.call("LAO", "transfers", *args)
            cpu[label] = (
                (pair.call("LAO", "cpu") - before["LAO"]) / args[0],
                (pair.call("KOR", "cpu") - before["KOR"]) / args[0],
            )
            return figures

        one = measure("1 in flight", count, 1, 1_000)
        many = measure("64 in flight", count * 2, 64, 1_000)
        small, big = pair.call("LAO", "quantities", count // 2, [1, 10**9])
        batched: Figures | None = None
        if batch_size:
            pair.call("LAO", "batches", batch_size * batch_in_flight, batch_size,
                      batch_in_flight, 1_000)  # warm up  # fmt: skip
            label = f"batches of {batch_size}, {batch_in_flight} in flight"
            before = {p: pair.call(p, "cpu") for p in ("LAO", "KOR")}
            total = max(batch_count, batch_size * batch_in_flight)
            batched = pair.call("LAO", "batches", total, batch_size, batch_in_flight, 1_000)
            done = total // batch_size * batch_size
            cpu[label] = (
                (pair.call("LAO", "cpu") - before["LAO"]) / done,
                (pair.call("KOR", "cpu") - before["KOR"]) / done,
            )
    finally:
        pair.stop()
    # The same with a sender that asks for one-round transfers (PROTOCOL.md §6.11).
    make_parties(root / "one-round")
    pair = Pair(ctx, root / "one-round", profile and f"{profile}.one-round", one_round=True)
    try:
        pair.call("LAO", "authorise")
        pair.call("LAO", "transfers", 20, 1, 1_000)  # warm up
        one_round_1 = measure("one-round, 1 in flight", count, 1, 1_000)
        one_round_64 = measure("one-round, 64 in flight", count * 2, 64, 1_000)
    finally:
        pair.stop()
    print("itmolink, two node processes, durable SQLite, signatures both ways:")
    row("transfers, 1 in flight", one, floor_1)
    row("transfers, 64 in flight", many, floor_64)
    row("one-round transfers, 1 in flight", one_round_1, floor_1)
    row("one-round transfers, 64 in flight", one_round_64, floor_64)
    row("transfers of 1 tCO2e (alternating)", small, floor_1)
    row("transfers of 10^9 tCO2e (alternating)", big, floor_1)
    for label, (lao, kor) in cpu.items():
        print(
            f"CPU per transfer, {label}: sender {lao * 1000:.2f} ms, receiver {kor * 1000:.2f} ms"
        )
    print(f"cost of 10^9 against 1 tCO2e: p50 {big[1] / small[1]:.2f}, "
          f"rate {small[0] / big[0]:.2f}")  # fmt: skip
    print(f"ratio transfers/echo: {one[0] / floor_1[0]:.3f} (1 in flight), "
          f"{many[0] / floor_64[0]:.3f} (64 in flight)", flush=True)  # fmt: skip
    print(f"ratio one-round transfers/echo: {one_round_1[0] / floor_1[0]:.3f} (1 in flight), "
          f"{one_round_64[0] / floor_64[0]:.3f} (64 in flight)", flush=True)  # fmt: skip
    if batched is not None:
        print(f"batched proposals ({batch_size} transfers per TransferBatchProposal, "
              f"{batch_in_flight} batches in flight), per transfer, against the echo with 64 "
              "in flight:")  # fmt: skip
        row(f"transfers in batches of {batch_size}", batched, floor_64)
        print(f"ratio batched transfers/echo: {batched[0] / floor_64[0]:.3f}", flush=True)


def reconcile_part(
    ctx: Any, root: Path, transfers: int, differences: list[int], count: int
) -> None:
    make_parties(root)
    started = time.perf_counter()
    fillers = [
        ctx.Process(target=fill_ledger, args=(root / p.lower() / f"{p.lower()}.db", p, q,
                                              transfers))
        for p, q in (("LAO", "KOR"), ("KOR", "LAO"))
    ]  # fmt: skip
    for filler in fillers:
        filler.start()
    for filler in fillers:
        filler.join()
    print(f"reconciliation, two ledgers of {transfers:,} transfers of one block each "
          f"(written in {time.perf_counter() - started:.0f} s):", flush=True)  # fmt: skip
    pair = Pair(ctx, root)
    try:
        for party in ("LAO", "KOR"):
            rss, peak = pair.call(party, "rss")
            print(f"  {party} node after start: RSS {rss:.0f} MB (peak {peak:.0f} MB)")
        spoiled = 0
        for d in [0, *differences]:
            if d > spoiled:
                spoil(root / "kor" / "kor.db", d - spoiled, 7919 + d)
                spoiled = d
            result = pair.call("LAO", "reconcile")
            print(
                f"  {spoiled:>5} differing: {result['seconds']:6.2f} s, "
                f"{result['queries']} queries, {result['buckets']} buckets and "
                f"{result['leaves']} leaves compared, {result['discrepancies']} discrepancies "
                f"({result['transfers']:,} transfers here)",
                flush=True,
            )
        pair.call("LAO", "authorise")
        rate, p50, p99 = pair.call("LAO", "transfers", count, 1, 1_000)
        print(f"  transfers between these ledgers, 1 in flight: {rate:.1f}/s, "
              f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")  # fmt: skip
        for party in ("LAO", "KOR"):
            rss, peak = pair.call(party, "rss")
            print(f"  {party} node after the reconciliations and transfers: RSS {rss:.0f} MB "
                  f"(peak {peak:.0f} MB)")  # fmt: skip
    finally:
        pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/bench.py")
    parser.add_argument("--count", type=int, default=200, help="transfers per measurement")
    parser.add_argument(
        "--reconcile", type=int, default=1_000_000,
        help="transfers in each ledger for the reconciliation benchmark (0: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--differences", default="1,10,100,1000",
        help="numbers of differing transfers to reconcile, comma-separated",
    )  # fmt: skip
    parser.add_argument("--skip-transfers", action="store_true")
    parser.add_argument(
        "--batch-size", type=int, default=100,
        help="transfers per batched proposal (0: skip the batched measurement)",
    )  # fmt: skip
    parser.add_argument("--batch-in-flight", type=int, default=8, help="batches in flight")
    parser.add_argument(
        "--batch-count", type=int, default=0,
        help="transfers in the batched measurement (default: 20 x --count)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", default="",
        help="write cProfile output of each node process to PREFIX.lao and PREFIX.kor",
    )  # fmt: skip
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_transfers:
            transfers_part(
                ctx, root / "t", args.count, args.profile, args.batch_size,
                args.batch_in_flight, args.batch_count or 20 * args.count,
            )  # fmt: skip
        if args.reconcile:
            differences = [int(d) for d in args.differences.split(",") if d]
            reconcile_part(ctx, root / "r", args.reconcile, differences, args.count)


if __name__ == "__main__":
    main()
