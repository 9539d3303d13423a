"""The two protocol engines alone: CPU per transfer and per protocol step.

No gRPC, no event loop, no threads: one process calls LAO's and KOR's engines
in turn, as the nodes' database threads would, each with its own SQLite ledger
(durable commits unless ``--no-sync``). A transfer is five steps: LAO proposes,
KOR answers the proposal, LAO applies the acceptance (and sends the
completion), KOR answers the completion, LAO applies the receipt. With
``--group N`` each step is taken for N transfers in one group commit, as a node
does with many transfers in flight; with ``--group 1`` each step commits alone,
as with one in flight. With ``--one-round`` LAO asks for one-round transfers
(docs/PROTOCOL.md §6.11): three steps, LAO proposes, KOR answers with a completed
acceptance, LAO applies it (the "completion" and "receipt" steps then cost nothing).

    .venv/bin/python bench/engine.py --count 2048 --group 64 --no-sync

prints the process's CPU time (user and system) per transfer and each step's
share. What the figures leave out (gRPC, thread hand-offs) is what
``bench/pair.py`` adds. ``--profile FILE`` writes a cProfile of the measured part.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.store import SqliteStore

STEPS = ("propose", "proposal", "acceptance", "completion", "receipt")


def engine(
    root: Path,
    party: str,
    partner: str,
    keys: dict[str, SigningKey],
    sync: bool,
    one_round: bool = False,
) -> Engine:
    store = SqliteStore(root / f"{party.lower()}.db", party=party, registry=f"{party}-NR")
    if not sync:
        store._conn.execute("PRAGMA synchronous=OFF")
    made = Engine(
        party=party,
        registry=f"{party}-NR",
        signing_key=keys[party],
        trust=TrustStore([keys[partner].verifying_key()]),
        partners=[
            Partner(partner, f"{partner}-NR", "in-process", complete_on_acceptance=one_round)
        ],
        store=store,
        default_timeout=dt.timedelta(minutes=10),
    )
    made.claim_sent_us = 11_000_000  # as the node: requests are listed in .sent
    return made


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/engine.py")
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--group", type=int, default=1)
    parser.add_argument("--no-sync", action="store_true", help="synchronous=OFF (no fsync)")
    parser.add_argument("--profile", default="", help="write a cProfile here")
    parser.add_argument(
        "--one-round", action="store_true",
        help="LAO asks for one-round transfers (docs/PROTOCOL.md §6.11): three steps, not five",
    )  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    lao = engine(root, "LAO", "KOR", keys, not args.no_sync, args.one_round)
    kor = engine(root, "KOR", "LAO", keys, not args.no_sync)
    now = dt.datetime.now(dt.UTC)
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR", acquiring_parties=["KOR"], purposes=[Purpose.NDC],
        oimp_detail="", first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
        vintage_from=2021, vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    for message_id, _, envelope in lao.sent:
        lao.handle_reply(message_id, kor.handle_delivery("LAO", envelope, now), now)
    lao.issue(authorisation_id=terms.authorisation_id, vintage=2025, quantity=10**12, now=now)
    spent = dict.fromkeys(STEPS, 0.0)

    def timed(step: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        result = fn(*args, **kwargs)
        spent[step] += time.process_time() - started
        return result

    def group(node: Engine) -> contextlib.AbstractContextManager[None]:
        return node.store.group() if args.group > 1 else contextlib.nullcontext()  # type: ignore[attr-defined]

    def sent(node: Engine) -> Iterator[tuple[str, bytes]]:
        taken, node.sent = node.sent, []
        for message_id, _, envelope in taken:
            yield message_id, envelope

    def transfers() -> None:
        lao.sent = []
        with group(lao):
            for _ in range(args.group):
                timed(
                    "propose", lao.start_transfer, to_party="KOR",
                    authorisation_id=terms.authorisation_id, vintage=2025, quantity=1000, now=now,
                )  # fmt: skip
        for request, reply in (("proposal", "acceptance"), ("completion", "receipt")):
            with group(kor):
                answers = [
                    (message_id, timed(request, kor.handle_delivery, "LAO", envelope, now))
                    for message_id, envelope in sent(lao)
                ]
            with group(lao):
                for message_id, answer in answers:
                    timed(reply, lao.handle_reply, message_id, answer, now)

    rounds = max(1, args.count // args.group)
    for _ in range(max(1, 64 // args.group)):  # warm up
        transfers()
    spent = dict.fromkeys(STEPS, 0.0)
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    times, started = os.times(), time.perf_counter()
    for _ in range(rounds):
        transfers()
    elapsed, ended = time.perf_counter() - started, os.times()
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    count = rounds * args.group
    user, system = (ended.user - times.user) / count, (ended.system - times.system) / count
    print(
        f"{count} transfers, {args.group} per group commit, "
        f"{'no fsync' if args.no_sync else 'durable commits'}: CPU per transfer "
        f"{(user + system) * 1e3:.3f} ms (user {user * 1e3:.3f}, system {system * 1e3:.3f}), "
        f"wall {elapsed / count * 1e3:.3f} ms"
    )
    print("per step (us): " + ", ".join(f"{s} {spent[s] / count * 1e6:.0f}" for s in STEPS))


if __name__ == "__main__":
    main()
