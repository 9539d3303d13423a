"""Prometheus metrics of a running node (``[metrics] listen`` in node.toml).

Two kinds of value:

* **From the database, read at scrape time** (on the node's database thread):
  transfers by direction, partner and state, the transfer duration histogram
  (proposal to final state, over every finished transfer), the outbox depth and
  the age of its oldest pending message, the schema version. These are right
  after a restart and agree between several processes over one database.
* **Counted by this process since it started** (Prometheus counters; ``rate()``
  copes with restarts): rejections sent and received by code, delivery attempts
  by outcome and their round-trip time, admission refusals by the rate limit.

The protocol core knows nothing of this module: the node calls it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from itmolink import __version__
from itmolink.v1 import transfer_pb2

log = logging.getLogger("itmolink.metrics")

# Transfer durations (seconds): a transfer normally ends in well under a second;
# one that waits for a partner to come back can take up to its time-out.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_TIMEOUT_SECONDS = 5.0


def state_name(state: int) -> str:
    return transfer_pb2.TransferState.Name(state).removeprefix("TRANSFER_STATE_").lower()  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class StoreReading:
    """What one scrape reads from the database."""

    transfers: list[tuple[str, str, int, int]]  # direction, partner, state, count
    durations: dict[str, tuple[list[int], int, float]]  # direction -> (cumulative, count, sum)
    outbox: list[tuple[str, int, int]]  # partner, pending, oldest created_at (µs)
    schema_version: int


def read_store(store: Any) -> StoreReading:
    """Read the database-backed values in one transaction (on the database thread)."""
    bounds_us = [int(b * 1_000_000) for b in DURATION_BUCKETS]
    # Reads only: on PostgreSQL it need not wait for the registry's write lock.
    with store.transaction(exclusive=False) as tx:
        transfers = tx.metrics_transfer_counts()
        durations = {
            direction: (cumulative, count, total_us / 1e6)
            for direction, cumulative, count, total_us in tx.metrics_transfer_durations(bounds_us)
        }
        outbox = tx.metrics_outbox()
    return StoreReading(transfers, durations, outbox, store.schema_version())


class StoreCollector(Collector):
    """Database-backed gauges and the duration histogram, read at each scrape."""

    def __init__(self, node: Any) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "itmolink_store_up", "1 if the last scrape could read the node's database"
        )
        try:
            future: Future[StoreReading] = self._node.run_on_db_thread(
                read_store, self._node.engine.store
            )
            reading = future.result(timeout=SCRAPE_TIMEOUT_SECONDS)
        except Exception as exc:  # a scrape must answer even when the store cannot
            log.warning("metrics: cannot read the store: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        transfers = GaugeMetricFamily(
            "itmolink_transfers",
            "Transfers in the ledger by direction, partner and state",
            labels=["direction", "partner", "state"],
        )
        for direction, partner, state, count in reading.transfers:
            transfers.add_metric([direction, partner, state_name(state)], count)
        yield transfers

        durations = HistogramMetricFamily(
            "itmolink_transfer_duration_seconds",
            "Time from a transfer's proposal (as recorded here) to its final state",
            labels=["direction"],
        )
        for direction, (cumulative, count, total) in sorted(reading.durations.items()):
            buckets = [(repr(b), c) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", count))
            durations.add_metric([direction], buckets, total)
        yield durations

        depth = GaugeMetricFamily(
            "itmolink_outbox_pending",
            "Messages waiting in the outbox for delivery, by partner",
            labels=["partner"],
        )
        oldest = GaugeMetricFamily(
            "itmolink_outbox_oldest_pending_seconds",
            "Age of the oldest message waiting in the outbox, by partner",
            labels=["partner"],
        )
        now_us = time.time_ns() // 1000
        for partner, pending, created_at in reading.outbox:
            depth.add_metric([partner], pending)
            oldest.add_metric([partner], max(0.0, (now_us - created_at) / 1e6))
        yield depth
        yield oldest

        schema = GaugeMetricFamily("itmolink_schema_version", "The database's schema version")
        schema.add_metric([], reading.schema_version)
        yield schema


class NodeMetrics:
    """The metrics of one node, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.info = Gauge(
            "itmolink_node_info",
            "This node's identity (always 1)",
            ["party", "registry", "version"],
            registry=self.registry,
        )
        self.serving = Gauge(
            "itmolink_serving",
            "1 while the node serves (the gRPC health status is SERVING)",
            registry=self.registry,
        )
        self.rejections = Counter(
            "itmolink_rejections",
            "Rejections sent to or received from partners, by code (since start)",
            ["direction", "partner", "code"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "itmolink_deliveries",
            "Outbox delivery attempts by partner and outcome: ok (reply applied), "
            "unreachable (RPC failed), bad_reply (reply not applied), retry (a refusal that "
            "settles nothing yet: delivered again)",
            ["partner", "outcome"],
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "itmolink_delivery_rpc_seconds",
            "Round-trip time of Deliver calls to partners",
            ["partner"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.received = Counter(
            "itmolink_messages_received",
            "Envelopes received from partners (Deliver or DeliverBatch), by outcome: handled, "
            "rate_limited, failed (a step that failed inside a DeliverBatch call)",
            ["partner", "outcome"],
            registry=self.registry,
        )
        self.certificate_expiry = Gauge(
            "itmolink_node_certificate_expiry_timestamp_seconds",
            "When the node's TLS certificate in use expires (Unix time): renew it before "
            "(itmolink pki renew)",
            registry=self.registry,
        )
        self.calls = Counter(
            "itmolink_partner_calls",
            "Partner RPC calls sent and received, by method: Deliver (one envelope) or "
            "DeliverBatch (several); the messages counters above count envelopes",
            ["direction", "partner", "method"],
            registry=self.registry,
        )
        self._server: Any = None
        self.port = 0
        # Labelled children already looked up (child): a delivery or a received
        # envelope counts in two of them, and labels() costs about a microsecond each.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per set of labels (the same
        child prometheus_client keeps; no metric of this registry removes any)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def attach(self, node: Any, party: str, registry: str) -> None:
        self.info.labels(party, registry, __version__).set(1)
        self.certificate_expiry.set_function(lambda: node.tls.not_after.timestamp())
        self.registry.register(StoreCollector(node))

    def rejection(self, direction: str, partner: str, code: str) -> None:
        self.rejections.labels(direction, partner, code.removeprefix("REJECTION_CODE_")).inc()

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port``; returns the bound port."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
