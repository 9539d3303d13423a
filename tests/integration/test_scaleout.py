"""Scale-out: two node processes of LAO over one PostgreSQL database serve the link
to KOR under a stream of transfers driven through both; each is SIGKILLed in turn
(the first one restarted). Afterwards every transfer ended exactly once on both
sides, no tonne is lost or doubled, the CA ledgers match transfer by transfer and
both journals verify."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.crypto.pki import init_party
from itmolink.v1 import transfer_pb2

from ..conftest import postgres_cluster
from .conftest import NOW
from .test_kill import (
    FINAL,
    ISSUED,
    Process,
    authorised_and_issued,
    check_exactly_once,
    free_port,
    node_toml,
)

LOAD_SECONDS = float(os.environ.get("ITMOLINK_SCALEOUT_SECONDS", "10"))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[dict[str, Process]]:
    cluster = postgres_cluster()
    lao_db, kor_db = cluster.new_database("lao"), cluster.new_database("kor")
    ports = {name: free_port() for name in ("lao-a", "lao-b", "kor")}
    for party in ("LAO", "KOR"):
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
    kor_to = f"127.0.0.1:{ports['kor']}"
    # KOR reaches LAO at either process (gRPC tries the next address if one is down),
    # as it would through a load balancer in front of them.
    lao_to = f"ipv4:127.0.0.1:{ports['lao-a']},127.0.0.1:{ports['lao-b']}"
    lao_dir, kor_dir = tmp_path / "lao", tmp_path / "kor"
    running = {
        "lao-a": Process(
            lao_dir, "lao-a", node_toml("LAO", lao_db, ports["lao-a"], "lao-a.sock", "KOR", kor_to)
        ),
        "lao-b": Process(
            lao_dir, "lao-b", node_toml("LAO", lao_db, ports["lao-b"], "lao-b.sock", "KOR", kor_to)
        ),
        "kor": Process(
            kor_dir, "kor", node_toml("KOR", kor_db, ports["kor"], "kor.sock", "LAO", lao_to)
        ),
    }
    for process in running.values():
        process.start()
    yield running
    for process in running.values():
        process.stop()


def test_two_processes_of_one_registry_deliver_each_transfer_exactly_once(
    processes: dict[str, Process],
) -> None:
    lao_a, lao_b, kor = processes["lao-a"], processes["lao-b"], processes["kor"]
    rng = random.Random(20261128)
    # Issued through the other process: both see one ledger.
    authorisation = authorised_and_issued(lao_a, lao_b, ISSUED)

    # Load through both processes. A is killed at 30% and restarted at 50%; B is
    # killed at 80% and left down, so A must finish what B had claimed.
    proposed = {"lao-a": 0, "lao-b": 0}
    failures: list[str] = []
    start = time.monotonic()
    events = [(0.3, "kill", lao_a), (0.5, "start", lao_a), (0.8, "kill", lao_b)]
    up = {"lao-a": True, "lao-b": True}
    while (elapsed := (time.monotonic() - start) / LOAD_SECONDS) < 1.0:
        while events and elapsed >= events[0][0]:
            _, action, process = events.pop(0)
            if action == "kill":
                process.kill()
            else:
                process.start()
            up[process.name] = action == "start"
        for process in (lao_a, lao_b):
            if not up[process.name]:
                continue
            try:
                process.admin.Transfer(
                    admin_pb2.TransferRequest(
                        to_party="KOR", authorisation_id=authorisation, vintage=2025,
                        quantity=rng.choice([1, 10, 333, 5_000]),
                    ),
                    timeout=2,
                )  # fmt: skip
                proposed[process.name] += 1
            except grpc.RpcError as exc:
                # While a process dies its admin socket goes away (UNAVAILABLE); any
                # other failure is a bug (e.g. two processes racing for one block).
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    failures.append(f"{process.name}: {exc.code().name} {exc.details()}")
        time.sleep(rng.uniform(0.0, 0.03))
    assert failures == []
    assert lao_a.kills == 1
    assert lao_b.kills == 1
    assert proposed["lao-a"] >= 10
    assert proposed["lao-b"] >= 10

    # Settle: what B had claimed when it died is redelivered by A once B's lease ends.
    deadline = time.monotonic() + 60
    while True:
        lao_view, kor_view = lao_a.transfers(), kor.transfers()
        settled = all(t.state in FINAL for t in lao_view.values()) and all(
            t.state in FINAL for t in kor_view.values()
        )
        completed_here = {
            t for t, v in lao_view.items() if v.state == transfer_pb2.TRANSFER_STATE_COMPLETED
        }
        if settled and set(kor_view) >= completed_here:
            break
        assert time.monotonic() < deadline, "transfers did not settle"
        time.sleep(0.2)

    assert len(lao_view) == sum(proposed.values()), "a proposal accepted by LAO was lost"
    # Every transfer KOR knows of was proposed through one of the LAO processes.
    for transfer_id in kor_view:
        assert transfer_id in lao_view
    completed, voided = check_exactly_once(lao_a, kor, lao_view, kor_view)
    print(
        f"proposed via A {proposed['lao-a']}, via B {proposed['lao-b']}; "
        f"{len(completed)} completed, {voided} voided"
    )
