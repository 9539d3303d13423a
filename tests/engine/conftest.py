"""Two protocol engines wired together in memory: no sockets, a clock we move by hand."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.store import SqliteStore, open_store

from ..conftest import Databases

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Pair:
    """LAO and KOR engines and the in-memory network between them."""

    lao: Engine
    kor: Engine
    keys: dict[str, SigningKey]
    now: dt.datetime = START
    # Called with (sender, receiver, envelope) -> envelope or None to drop it.
    network: Callable[[str, str, bytes], bytes | None] = field(
        default=lambda sender, receiver, envelope: envelope
    )

    def engine(self, party: str) -> Engine:
        return self.lao if party == "LAO" else self.kor

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    def pump(self, rounds: int = 20) -> int:
        """Deliver everything due, in both directions, until nothing moves."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for sender, receiver in (("LAO", "KOR"), ("KOR", "LAO")):
                engine = self.engine(sender)
                engine.expire_transfers(self.now)
                engine.query_pending_transfers(self.now)
                for message_id, _, envelope in engine.due_messages(self.now):
                    request = self.network(sender, receiver, envelope)
                    if request is None:
                        engine.delivery_failed(message_id, "dropped", self.now)
                        continue
                    reply = self.engine(receiver).handle_delivery(sender, request, self.now)
                    engine.handle_reply(message_id, reply, self.now)
                    moved = True
                    delivered += 1
            if not moved:
                break
        return delivered

    def authorise(self, **overrides: object) -> str:
        fields: dict[str, object] = dict(
            activity_id="LAO-SOLAR-WIND-1GW",
            activity_name="1 GW solar and wind",
            activity_description="",
            cooperative_approach_id="LAO-KOR-A6.2",
            acquiring_parties=["KOR"],
            purposes=[Purpose.NDC],
            oimp_detail="",
            first_transfer_definition=FirstTransferDefinition.UNSPECIFIED,
            vintage_from=2021,
            vintage_to=2030,
            quantity_cap=0,
            unit_type=UnitType.ITMO,
            now=self.now,
        )
        fields.update(overrides)
        return self.lao.authorise(**fields).authorisation_id  # type: ignore[arg-type]


def make_engine(
    databases: Databases | Path,
    party: str,
    partner: str,
    keys: dict[str, SigningKey],
    pinned: SigningKey,
    **options: Any,
) -> Engine:
    counter = itertools.count(1)
    return Engine(
        party=party,
        registry=f"{party}-NR",
        signing_key=keys[party],
        trust=TrustStore([pinned.verifying_key()]),
        partners=[Partner(partner, f"{partner}-NR", "in-memory")],
        # A directory (the fuzz harnesses): SQLite files there.
        store=databases.open(party)
        if isinstance(databases, Databases)
        else SqliteStore(databases / f"{party.lower()}.db", party=party, registry=f"{party}-NR"),
        default_timeout=dt.timedelta(seconds=60),
        new_id=lambda: f"{party}-msg-{next(counter)}",
        **options,
    )


def process_engine(
    url: str,
    party: str,
    partner: str,
    keys: dict[str, SigningKey],
    name: str = "",
    **options: Any,
) -> Engine:
    """``party``'s engine over the database at ``url`` with ``partner`` pinned, as one node
    process; ``name`` tells apart the message ids of several processes sharing it."""
    counter = itertools.count(1)
    if name:
        options["new_id"] = lambda: f"{party}-{name}-{next(counter)}"
    return Engine(
        party=party, registry=f"{party}-NR", signing_key=keys[party],
        trust=TrustStore([keys[partner].verifying_key()]),
        partners=[Partner(partner, f"{partner}-NR", "x")],
        store=open_store(url, party=party, registry=f"{party}-NR"),
        **options,
    )  # fmt: skip


@pytest.fixture
def pair(databases: Databases) -> Iterator[Pair]:
    keys = {party: SigningKey.generate(party) for party in ("LAO", "KOR")}
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"])
    kor = make_engine(databases, "KOR", "LAO", keys, keys["LAO"])
    yield Pair(lao=lao, kor=kor, keys=keys)
    lao.store.close()
    kor.store.close()
