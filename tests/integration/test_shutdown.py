"""Graceful shutdown of a node process: SIGTERM (or SIGINT) in the middle of a stream
of transfers ends the process with exit code 0 after its in-flight steps, and the
ledgers agree once it is back."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.crypto.pki import init_party
from itmolink.store import read_only

from ..conftest import Databases
from .conftest import NOW
from .test_kill import FINAL, NodeProcess, authorised_and_issued, free_port

ISSUED = 100_000


class JsonLoggingNode(NodeProcess):
    """A node process that logs JSON lines at info level."""

    run_options = ("--log-format", "json", "--grace", "5")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_transfers_finishes_in_flight_steps_and_exits_0(
    tmp_path: Path, sig: signal.Signals, databases: Databases
) -> None:
    ports = {"LAO": free_port(), "KOR": free_port()}
    for party in ports:
        init_party(tmp_path / party.lower() / "pki", party, f"{party}-NR", now=NOW)
    lao_database = databases.new("lao")
    lao = JsonLoggingNode(tmp_path, "LAO", "KOR", ports, lao_database)
    kor = JsonLoggingNode(tmp_path, "KOR", "LAO", ports, databases.new("kor"))
    lao.start()
    kor.start()
    try:
        authorisation = authorised_and_issued(lao, lao, ISSUED)

        # A stream of transfers from another thread; the signal lands in the middle
        # of it, with proposals, acceptances and completions in flight.
        proposed: list[str] = []
        stop_stream = threading.Event()

        def stream() -> None:
            while not stop_stream.is_set():
                try:
                    proposed.append(
                        lao.admin.Transfer(
                            admin_pb2.TransferRequest(
                                to_party="KOR",
                                authorisation_id=authorisation,
                                vintage=2025,
                                quantity=7,
                            ),
                            timeout=5,
                        ).transfer_id
                    )
                except grpc.RpcError:
                    return  # LAO stopped taking admin calls

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(1.0)
        assert lao.process is not None
        assert kor.process is not None
        lao.process.send_signal(sig)
        assert lao.process.wait(timeout=30) == 0, lao.log.read_text()
        stop_stream.set()
        streamer.join()
        assert len(proposed) >= 5
        kor.process.send_signal(sig)
        assert kor.process.wait(timeout=30) == 0, kor.log.read_text()
        for node in (lao, kor):
            entries = [json.loads(line) for line in node.log.read_text().splitlines() if line]
            messages = [e["message"] for e in entries]
            assert any(m.startswith("stopping: health NOT_SERVING") for m in messages)
            assert messages[-1] == "stopped"
            assert not [e for e in entries if e["level"] in ("error", "critical")]
            assert all(e["party"] == node.party for e in entries)

        with read_only(lao_database) as tx:  # for the record: how much was in flight
            unfinished = []
            for transfer_id in proposed:
                record = tx.transfer_get(transfer_id)
                assert record is not None, transfer_id
                if not record.state.is_final:
                    unfinished.append(transfer_id)
            print(f"{len(unfinished)} of {len(proposed)} unfinished after the stop")
        lao.start()
        kor.start()
        deadline = time.monotonic() + 60
        while True:
            here, there = lao.transfers(), kor.transfers()
            if all(
                here[t].state in FINAL and t in there and there[t].state in FINAL for t in proposed
            ):
                break
            assert time.monotonic() < deadline, "transfers did not finish after the restart"
            time.sleep(0.1)
        completed = [t for t in proposed if here[t].state == there[t].state]
        assert completed == proposed  # both sides agree on every transfer's outcome
        moved = sum(7 for t in proposed if here[t].state == FINAL_COMPLETED)
        held_lao = sum(e - s + 1 for s, e, _ in lao.holdings())
        held_kor = sum(e - s + 1 for s, e, _ in kor.holdings())
        assert held_lao + held_kor == ISSUED
        assert held_kor == moved
        assert lao.adjustments().keys() == kor.adjustments().keys()
    finally:
        lao.stop()
        kor.stop()


FINAL_COMPLETED = 3
