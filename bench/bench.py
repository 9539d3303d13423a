"""Benchmarks: itmolink against the gRPC floor measured in the same run.

Run with ``make bench``. Nothing here is a test: it prints figures and their
ratios to a floor measured on this machine in the same run, so a noisy machine
moves both. Figures printed:

* the floor: a raw ``grpc.aio`` unary echo over mutual TLS on loopback, with a
  payload the size of a signed transfer proposal, one call at a time and 64 in
  flight (calls per second, p50 and p99);
* itmolink end to end between two real nodes (in-process, mutual TLS on
  loopback, durable SQLite commits, signatures made and verified both ways):
  completed transfers per second (both ledgers final) with 1 and 64 in flight,
  p50 and p99 latency from the operator's request to the receiver's completion;
* cost against quantity: the same transfers of 1 tCO2e and of 10^9 tCO2e;
* ``ratio transfers/echo: X`` for one transfer in flight and for 64.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.pki import PartyFiles, init_party
from itmolink.node.config import load_config
from itmolink.node.runtime import Node
from itmolink.v1 import partner_service_pb2, partner_service_pb2_grpc

NOW = dt.datetime.now(dt.UTC)
PAYLOAD = 700  # bytes: about a signed one-block TransferProposal envelope


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Echo(partner_service_pb2_grpc.PartnerServiceServicer):
    async def Deliver(self, request: Any, context: Any) -> Any:
        return partner_service_pb2.DeliverResponse(envelope=request.envelope)


async def echo_floor(keys: PartyFiles, count: int, in_flight: int) -> tuple[float, float, float]:
    """Calls per second, p50 and p99 (seconds) of a raw mTLS echo."""
    server = grpc.aio.server()
    partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(Echo(), server)
    credentials = grpc.ssl_server_credentials(
        [(keys.node_key.read_bytes(), keys.node_certificate.read_bytes())],
        root_certificates=keys.ca_certificate.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
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
    await stub.Deliver(request)  # connect
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
    await server.stop(None)
    return count / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


def write_config(root: Path, party: str, partner: str) -> Path:
    path = root / party.lower() / "node.toml"
    path.write_text(
        f'party = "{party}"\nregistry = "{party}-NR"\ndatabase = "{party.lower()}.db"\n'
        'partner_listen = "127.0.0.1:0"\nadmin_listen = "unix:admin.sock"\n'
        "transfer_timeout_seconds = 600\n"
        f'[keys]\ndirectory = "pki"\n[[partners]]\ncard = "../{partner.lower()}/pki/card.toml"\n'
        'endpoint = "127.0.0.1:1"\n[limits]\nrate_per_second = 100000\nrate_burst = 100000\n'
    )
    return path


class Pair:
    """Two real nodes, LAO and KOR, with an acknowledged authorisation."""

    async def start(self, root: Path) -> None:
        for party in ("LAO", "KOR"):
            init_party(root / party.lower() / "pki", party, f"{party}-NR", now=NOW)
        self.lao = Node(load_config(write_config(root, "LAO", "KOR")))
        self.kor = Node(load_config(write_config(root, "KOR", "LAO")))
        await self.lao.start()
        await self.kor.start()
        self.lao.set_partner_endpoint("KOR", f"127.0.0.1:{self.kor.partner_port}")
        self.kor.set_partner_endpoint("LAO", f"127.0.0.1:{self.lao.partner_port}")
        engine = self.lao.engine
        terms = await self.lao.db(
            engine.authorise, activity_id="LAO-SOLAR", activity_name="", activity_description="",
            cooperative_approach_id="LAO-KOR", acquiring_parties=["KOR"],
            purposes=[Purpose.NDC], oimp_detail="",
            first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
            vintage_from=2021, vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=NOW,
        )  # fmt: skip
        self.authorisation = terms.authorisation_id
        self.lao.kick()
        while True:
            states = await self.lao.db(self._states)
            if states.get("KOR") == "acknowledged":
                break
            await asyncio.sleep(0.01)

    def _states(self) -> dict[str, str]:
        with self.lao.engine.store.transaction() as tx:
            return tx.authorisation_party_states("LAO", self.authorisation, 1)

    async def issue(self, quantity: int) -> None:
        await self.lao.db(
            self.lao.engine.issue, authorisation_id=self.authorisation, vintage=2025,
            quantity=quantity, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip

    async def transfer(self, quantity: int) -> str:
        transfer_id: str = await self.lao.db(
            self.lao.engine.start_transfer, to_party="KOR", authorisation_id=self.authorisation,
            vintage=2025, quantity=quantity, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        self.lao.kick()
        return transfer_id

    def _completed_at_kor(self, transfer_id: str) -> bool:
        with self.kor.engine.store.transaction() as tx:
            record = tx.transfer_get(transfer_id)
        return record is not None and record.state == 3

    async def until_completed(self, transfer_id: str) -> None:
        # Polling the receiver's ledger costs its database thread a little; the
        # figures include that (docs/PERFORMANCE.md).
        while not await self.kor.db(self._completed_at_kor, transfer_id):  # noqa: ASYNC110
            await asyncio.sleep(0.0005)

    async def stop(self) -> None:
        await self.lao.stop(0.5)
        await self.kor.stop(0.5)


async def transfers(
    pair: Pair, count: int, in_flight: int, quantity: int
) -> tuple[float, float, float]:
    """Completed transfers per second, p50 and p99 (seconds), ``in_flight`` at a time."""
    latencies: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            transfer_id = await pair.transfer(quantity)
            await pair.until_completed(transfer_id)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return count / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


def row(label: str, rate: float, p50: float, p99: float, floor: tuple[float, float, float]) -> None:
    print(
        f"{label:<34} {rate:9.1f}/s  p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms   "
        f"rate ratio {rate / floor[0]:.3f}  p99 ratio {p99 / floor[2]:.1f}"
    )


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        echo_keys = init_party(root / "echo", "ECH", "ECH-NR", now=NOW)
        floor_1 = await echo_floor(echo_keys, count * 4, 1)
        floor_64 = await echo_floor(echo_keys, count * 16, 64)
        print(f"gRPC echo floor, mTLS, {PAYLOAD}-byte payload (same run):")
        row("echo, 1 in flight", *floor_1, floor_1)
        row("echo, 64 in flight", *floor_64, floor_64)

        pair = Pair()
        await pair.start(root / "nodes")
        try:
            await pair.issue(10**12)
            one = await transfers(pair, count, 1, 1_000)
            many = await transfers(pair, count * 2, 64, 1_000)
            small = await transfers(pair, count // 2, 1, 1)
            big = await transfers(pair, count // 2, 1, 10**9)
        finally:
            await pair.stop()
        print("itmolink, two nodes, durable SQLite, signatures both ways:")
        row("transfers, 1 in flight", *one, floor_1)
        row("transfers, 64 in flight", *many, floor_64)
        row("transfers of 1 tCO2e", *small, floor_1)
        row("transfers of 10^9 tCO2e", *big, floor_1)
        print(f"cost of 10^9 against 1 tCO2e (p50): {big[1] / small[1]:.2f}")
        print(f"ratio transfers/echo: {one[0] / floor_1[0]:.3f} (1 in flight), "
              f"{many[0] / floor_64[0]:.3f} (64 in flight)")  # fmt: skip
        if statistics.mean([one[0]]) <= 0:
            raise SystemExit("no transfer completed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/bench.py")
    parser.add_argument("--count", type=int, default=200, help="transfers per measurement")
    asyncio.run(main(parser.parse_args().count))
