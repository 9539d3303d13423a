"""The batch path's CPU per transfer in one process: two engines over SQLite files,
no network, no event loop (docs/PERFORMANCE.md, "Batched proposals").

    .venv/bin/python bench/engine_batch.py [--size 100] [--batches 30] [--profile FILE]

Each side's engine calls are timed with ``time.process_time`` (user and system CPU
of the process, durable commits included, waits for the disk not), so the figures
say what the protocol engine and the store cost per transfer, without gRPC. With
``--profile`` the run is also written as a cProfile (which slows it).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.node.operations import BatchItemRequest
from itmolink.store import SqliteStore


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/engine_batch.py")
    parser.add_argument("--size", type=int, default=100, help="transfers per batch")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--profile", default="", help="write a cProfile of the run here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    keys = {p: SigningKey.generate(p) for p in ("LAO", "KOR")}

    def engine(party: str, partner: str) -> Engine:
        counter = itertools.count(1)
        return Engine(
            party=party, registry=f"{party}-NR", signing_key=keys[party],
            trust=TrustStore([keys[partner].verifying_key()]),
            partners=[Partner(partner, f"{partner}-NR", "in-process")],
            store=SqliteStore(root / f"{party}.db", party=party, registry=f"{party}-NR"),
            new_id=lambda: f"{party}-{next(counter)}",
        )  # fmt: skip

    lao, kor = engine("LAO", "KOR"), engine("KOR", "LAO")
    now = dt.datetime.now(dt.UTC)

    def deliver_all() -> None:
        for sender, receiver in ((lao, kor), (kor, lao)):
            for message_id, _, envelope in sender.due_messages(now):
                reply = receiver.handle_delivery(sender.party, envelope, now)
                sender.handle_reply(message_id, reply, now)

    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR", acquiring_parties=["KOR"], purposes=[Purpose.NDC],
        oimp_detail="", first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
        vintage_from=2021, vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    deliver_all()
    lao.issue(authorisation_id=terms.authorisation_id, vintage=2025, quantity=10**12, now=now)
    deliver_all()
    cpu = {"LAO": 0.0, "KOR": 0.0}

    def timed(party: str, call: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        started = time.process_time()
        try:
            return call(*a, **kw)
        finally:
            cpu[party] += time.process_time() - started

    items = [BatchItemRequest(terms.authorisation_id, 2025, 1_000)] * args.size

    def run() -> None:
        for _ in range(args.batches):
            timed("LAO", lao.start_transfer_batch, to_party="KOR", items=items, now=now)
            for _ in range(2):  # the proposal, then the completion
                for message_id, _, envelope in lao.due_messages(now):
                    reply = timed("KOR", kor.handle_delivery, "LAO", envelope, now)
                    timed("LAO", lao.handle_reply, message_id, reply, now)

    if args.profile:
        cProfile.runctx("run()", globals(), {"run": run}, args.profile)
    else:
        run()
    done = args.size * args.batches
    print(
        f"batches of {args.size}: CPU per transfer sender {cpu['LAO'] / done * 1e6:.1f} us, "
        f"receiver {cpu['KOR'] / done * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
