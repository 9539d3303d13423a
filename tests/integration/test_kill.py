"""Two node processes under a stream of transfers, each SIGKILLed and restarted
several times: afterwards no tonne is lost or doubled, and the two corresponding
adjustment ledgers match transfer by transfer."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from itmolink.admin.v1 import admin_pb2, admin_pb2_grpc
from itmolink.crypto.operators import read_token, token_file
from itmolink.crypto.pki import init_party
from itmolink.v1 import common_pb2, transfer_pb2

from ..conftest import Databases
from .conftest import NOW

KILL_PHASE_SECONDS = float(os.environ.get("ITMOLINK_KILL_SECONDS", "15"))
ISSUED = 1_000_000
FINAL = {
    transfer_pb2.TRANSFER_STATE_COMPLETED,
    transfer_pb2.TRANSFER_STATE_REJECTED,
    transfer_pb2.TRANSFER_STATE_VOIDED,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Authenticated:
    """An admin stub that presents the operator's token on every call."""

    def __init__(self, stub: admin_pb2_grpc.AdminServiceStub, token: Path) -> None:
        self._stub = stub
        self._token = token

    def __getattr__(self, name: str) -> Any:
        metadata = (("authorization", f"Bearer {read_token(self._token)}"),)
        return functools.partial(getattr(self._stub, name), metadata=metadata)


def node_toml(party: str, database: str, port: int, socket: str, partner: str, to: str) -> str:
    return (
        f'party = "{party}"\nregistry = "{party}-NR"\ndatabase = "{database}"\n'
        f'partner_listen = "127.0.0.1:{port}"\nadmin_listen = "unix:{socket}"\n'
        "transfer_timeout_seconds = 3\n"
        f'[keys]\ndirectory = "pki"\n'
        f'[[partners]]\ncard = "../{partner.lower()}/pki/card.toml"\nendpoint = "{to}"\n'
    )


class Process:
    """One node process, with its own node.toml (ports, admin socket)."""

    # The options of `itmolink node run` besides --config.
    run_options: tuple[str, ...] = ("--log-level", "warning")

    def __init__(self, directory: Path, name: str, config: str) -> None:
        self.name = name
        self.dir = directory
        self.config = directory / f"{name}.toml"
        self.config.write_text(config)
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        channel = grpc.insecure_channel(f"unix:{directory / f'{name}.sock'}")
        self.admin = Authenticated(
            admin_pb2_grpc.AdminServiceStub(channel), token_file(directory / "pki", "admin")
        )

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "itmolink.cli.main", "node", "run", "--config",
                 str(self.config), *self.run_options],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                self.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.05)
        raise AssertionError(f"{self.dir.name}/{self.name} did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def transfers(self) -> dict[str, admin_pb2.TransferView]:
        response = self.admin.ListTransfers(admin_pb2.ListTransfersRequest(), timeout=10)
        return {t.transfer_id: t for t in response.transfers}

    def adjustments(self) -> dict[str, int]:
        response = self.admin.ListAdjustments(admin_pb2.ListAdjustmentsRequest(), timeout=10)
        ledger: dict[str, int] = {}
        for entry in response.adjustments:
            assert entry.transfer_id not in ledger, f"two CA entries for {entry.transfer_id}"
            ledger[entry.transfer_id] = entry.amount
        return ledger

    def holdings(self) -> list[tuple[int, int, str]]:
        response = self.admin.ListHoldings(admin_pb2.ListHoldingsRequest(), timeout=10)
        return [(h.block.serial_start, h.block.serial_end, h.status) for h in response.blocks]


def authorised_and_issued(authorise: Process, issue: Process, quantity: int) -> str:
    """LAO authorises KOR through ``authorise`` and issues ``quantity`` of vintage 2025
    through ``issue``; returns once KOR acknowledged the authorisation (transfers may
    start)."""
    authorisation = authorise.admin.Authorise(
        admin_pb2.AuthoriseRequest(
            activity_id="LAO-SOLAR-WIND-1GW", cooperative_approach_id="LAO-KOR-A6.2",
            acquiring_parties=["KOR"], purposes=[common_pb2.PURPOSE_NDC],
            vintage_from=2021, vintage_to=2030, unit_type=common_pb2.UNIT_TYPE_ITMO,
        ),
        timeout=10,
    ).authorisation_id  # fmt: skip
    issue.admin.Issue(
        admin_pb2.IssueRequest(authorisation_id=authorisation, vintage=2025, quantity=quantity),
        timeout=10,
    )
    deadline = time.monotonic() + 30
    while True:
        views = issue.admin.ListAuthorisations(admin_pb2.ListAuthorisationsRequest(), timeout=10)
        if views.authorisations[0].party_states["KOR"] == "acknowledged":
            return str(authorisation)
        assert time.monotonic() < deadline, "KOR never acknowledged the authorisation"
        time.sleep(0.05)


class NodeProcess(Process):
    """A party's only node process (node.toml, node.log, node.sock in its directory)."""

    def __init__(
        self, root: Path, party: str, partner: str, ports: dict[str, int], database: str = ""
    ) -> None:
        super().__init__(
            root / party.lower(), "node",
            node_toml(party, database or f"{party.lower()}.db", ports[party], "node.sock",
                      partner, f"127.0.0.1:{ports[partner]}"),
        )  # fmt: skip
        self.party = party


@pytest.fixture
def nodes(tmp_path: Path, databases: Databases) -> Iterator[dict[str, NodeProcess]]:
    ports = {"LAO": free_port(), "KOR": free_port()}
    for party in ports:
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
    running = {
        "LAO": NodeProcess(tmp_path, "LAO", "KOR", ports, databases.new("lao")),
        "KOR": NodeProcess(tmp_path, "KOR", "LAO", ports, databases.new("kor")),
    }
    for node in running.values():
        node.start()
    yield running
    for node in running.values():
        node.stop()


def test_transfers_survive_sigkill_of_either_node_at_random_moments(
    nodes: dict[str, NodeProcess],
) -> None:
    lao, kor = nodes["LAO"], nodes["KOR"]
    rng = random.Random(int(os.environ.get("ITMOLINK_KILL_SEED", "20261127")))
    authorisation = authorised_and_issued(lao, lao, ISSUED)

    proposed = 0
    batched: set[str] = set()  # transfers proposed in batches
    end = time.monotonic() + KILL_PHASE_SECONDS
    next_kill = time.monotonic() + rng.uniform(0.5, 2.0)
    restart_at: dict[str, float] = {}
    while time.monotonic() < end or restart_at:
        now = time.monotonic()
        for party, when in list(restart_at.items()):
            if now >= when:
                nodes[party].start()
                del restart_at[party]
        if now >= next_kill and now < end:
            # The node killed less often so far (a coin decides a tie): both die.
            victim = min((lao, kor), key=lambda node: (node.kills, rng.random()))
            if victim.up:
                victim.kill()
                # Proposals keep coming while it is down; 4 s outlives the 3 s time-out.
                restart_at[victim.party] = now + rng.choice([0.0, 0.3, 1.0, 4.0])
            next_kill = now + rng.uniform(0.5, 2.5)
        if now < end:
            try:
                if rng.random() < 0.3:  # a batched proposal of a few transfers (§5.15)
                    response = lao.admin.TransferBatch(
                        admin_pb2.TransferBatchRequest(
                            to_party="KOR",
                            items=[
                                admin_pb2.TransferBatchRequestItem(
                                    authorisation_id=authorisation, vintage=2025,
                                    quantity=rng.choice([1, 10, 333, 5_000]),
                                )
                                for _ in range(rng.randint(2, 6))
                            ],
                        ),
                        timeout=2,
                    )  # fmt: skip
                    batched.update(response.transfer_ids)
                else:
                    lao.admin.Transfer(
                        admin_pb2.TransferRequest(
                            to_party="KOR", authorisation_id=authorisation, vintage=2025,
                            quantity=rng.choice([1, 10, 333, 5_000]),
                        ),
                        timeout=2,
                    )  # fmt: skip
                proposed += 1
            except grpc.RpcError:
                pass  # LAO is down or the request was refused: the operator tries again
        time.sleep(rng.uniform(0.0, 0.05))

    assert lao.kills + kor.kills >= 4, "the test must kill the nodes several times"
    assert lao.kills >= 1
    assert kor.kills >= 1
    assert proposed >= 20

    # Let everything settle: every transfer final on both sides.
    deadline = time.monotonic() + 120
    while True:
        lao_view, kor_view = lao.transfers(), kor.transfers()
        settled = all(t.state in FINAL for t in lao_view.values()) and all(
            t.state in FINAL for t in kor_view.values()
        )
        if settled and set(kor_view) >= {
            t for t, v in lao_view.items() if v.state == transfer_pb2.TRANSFER_STATE_COMPLETED
        }:
            break
        assert time.monotonic() < deadline, "transfers did not settle after the kills"
        time.sleep(0.2)

    completed, voided = check_exactly_once(lao, kor, lao_view, kor_view)
    assert batched & set(completed), "no batched transfer completed: batches went untested"
    print(
        f"{proposed} proposed ({len(batched)} transfers in batches), {len(completed)} "
        f"completed, {voided} voided, "
        f"kills: LAO {lao.kills}, KOR {kor.kills}, at {dt.datetime.now(dt.UTC):%H:%M:%S}"
    )


def check_exactly_once(
    lao: Any, kor: Any, lao_view: dict[str, Any], kor_view: dict[str, Any]
) -> tuple[dict[str, int], int]:
    """Once every transfer is final on both sides, check that each moved exactly once.

    ``lao`` and ``kor`` are node processes (their ledgers, read from their admin
    interfaces or databases, and their node.toml). Returns (the quantity of each
    completed transfer, the number voided).
    """
    completed = {
        t: v.quantity
        for t, v in lao_view.items()
        if v.state == transfer_pb2.TRANSFER_STATE_COMPLETED
    }
    assert completed, "no transfer completed: the test proved nothing"
    for transfer_id, view in kor_view.items():
        moved_here = view.state == transfer_pb2.TRANSFER_STATE_COMPLETED
        assert moved_here == (transfer_id in completed), (transfer_id, view.state)

    # The two CA ledgers match transfer by transfer; nothing else has a CA
    # (adjustments() refuses two entries for one transfer).
    assert lao.adjustments() == completed
    assert kor.adjustments() == {t: -q for t, q in completed.items()}

    # Conservation: what LAO issued is held by LAO or KOR, once, nothing reserved.
    lao_held, kor_held = lao.holdings(), kor.holdings()
    assert {status for _, _, status in lao_held} <= {"held"}
    blocks = sorted((start, end) for start, end, _ in lao_held + kor_held)
    assert sum(end - start + 1 for start, end in blocks) == ISSUED
    for (_, end_before), (start_after, _) in itertools.pairwise(blocks):
        assert end_before < start_after, "a serial is held twice"
    assert sum(end - start + 1 for start, end, _ in kor_held) == sum(completed.values())

    for node in (lao, kor):
        result = subprocess.run(
            [sys.executable, "-m", "itmolink.cli.main", "audit", "verify", "--config",
             str(node.config)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    voided = sum(v.state == transfer_pb2.TRANSFER_STATE_VOIDED for v in lao_view.values())
    return completed, voided
