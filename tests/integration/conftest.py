"""Real nodes for integration tests: key material, mutual TLS, port 0, unix admin sockets."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from itmolink.admin.v1 import admin_pb2, admin_pb2_grpc
from itmolink.crypto.envelope import seal
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.operators import read_token, token_file
from itmolink.crypto.pki import PartyFiles, init_party
from itmolink.node.config import load_config
from itmolink.node.convert import timestamp, to_us
from itmolink.node.runtime import Node
from itmolink.v1 import common_pb2, partner_service_pb2, partner_service_pb2_grpc

from ..conftest import Databases

NOW = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)


def write_node(
    tmp: Path,
    party: str,
    partners: list[str],
    *,
    timeout: int = 60,
    extra: str = "",
    database: str | None = None,
) -> Path:
    node_dir = tmp / party.lower()
    partner_entries = "".join(
        f'\n[[partners]]\ncard = "../{p.lower()}/pki/card.toml"\nendpoint = "127.0.0.1:1"\n'
        for p in partners
    )
    config = node_dir / "node.toml"
    config.write_text(
        f'party = "{party}"\nregistry = "{party}-NR"\n'
        f'database = "{database or party.lower() + ".db"}"\n'
        f'partner_listen = "127.0.0.1:0"\nadmin_listen = "unix:admin.sock"\n'
        f"transfer_timeout_seconds = {timeout}\n"
        f'[keys]\ndirectory = "pki"\n{partner_entries}\n{extra}'
    )
    return config


@dataclass
class Registry:
    """A running node and the operator's view of it."""

    party: str
    node: Node
    config_path: Path
    keys: PartyFiles
    admin: Any  # AdminServiceAsyncStub
    _channel: grpc.aio.Channel

    async def call(self, method: str, request: Any) -> Any:
        token = read_token(token_file(self.keys.directory, "admin"))
        return await getattr(self.admin, method)(
            request, timeout=10, metadata=(("authorization", f"Bearer {token}"),)
        )

    async def transfers(self) -> dict[str, Any]:
        response = await self.call("ListTransfers", admin_pb2.ListTransfersRequest())
        return {t.transfer_id: t for t in response.transfers}

    async def adjustments(self) -> list[Any]:
        response = await self.call("ListAdjustments", admin_pb2.ListAdjustmentsRequest())
        return list(response.adjustments)

    async def held(self) -> int:
        response = await self.call("ListHoldings", admin_pb2.ListHoldingsRequest())
        return sum(h.block.serial_end - h.block.serial_start + 1 for h in response.blocks)

    def signing_key(self) -> SigningKey:
        return SigningKey.load(self.party, self.keys.signing_key)


async def start_registry(config_path: Path) -> Registry:
    config = load_config(config_path)
    node = Node(config)
    await node.start()
    channel = grpc.aio.insecure_channel(config.admin_target)
    return Registry(
        party=config.party,
        node=node,
        config_path=config_path,
        keys=config.keys,
        admin=admin_pb2_grpc.AdminServiceStub(channel),
        _channel=channel,
    )


async def stop_registry(registry: Registry) -> None:
    await registry._channel.close(None)
    await registry.node.stop(0.5)


def link(a: Registry, b: Registry) -> None:
    a.node.set_partner_endpoint(b.party, f"127.0.0.1:{b.node.partner_port}")
    b.node.set_partner_endpoint(a.party, f"127.0.0.1:{a.node.partner_port}")


@pytest.fixture
def pki(tmp_path: Path, databases: Databases) -> Callable[..., Path]:
    """Create key material for parties and a node.toml for one of them, whose
    database is a fresh one of the kind under test (SQLite or PostgreSQL)."""
    made: dict[str, str] = {}

    def make(party: str, partners: list[str], **kwargs: Any) -> Path:
        for p in [party, *partners]:
            files = PartyFiles(tmp_path / p.lower() / "pki")
            if not files.card.exists():
                init_party(files.directory, p, f"{p}-NR", now=NOW)
        if party not in made:
            made[party] = databases.new(party.lower())
        return write_node(tmp_path, party, partners, database=made[party], **kwargs)

    return make


@contextlib.asynccontextmanager
async def running_pair(
    pki: Callable[..., Path], *, lao_extra: str = ""
) -> AsyncIterator[tuple[Registry, Registry]]:
    """LAO and KOR running and linked (``lao_extra``: more of LAO's node.toml)."""
    lao = await start_registry(pki("LAO", ["KOR"], extra=lao_extra))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    try:
        yield lao, kor
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


@pytest.fixture
async def lao_kor(pki: Callable[..., Path]) -> AsyncIterator[tuple[Registry, Registry]]:
    async with running_pair(pki) as pair:
        yield pair


async def authorise(lao: Registry, **overrides: Any) -> str:
    fields: dict[str, Any] = dict(
        activity_id="LAO-SOLAR-WIND-1GW",
        activity_name="1 GW solar and wind",
        cooperative_approach_id="LAO-KOR-A6.2",
        acquiring_parties=["KOR"],
        purposes=[common_pb2.PURPOSE_NDC],
        vintage_from=2021,
        vintage_to=2030,
        unit_type=common_pb2.UNIT_TYPE_ITMO,
    )
    fields.update(overrides)
    response = await lao.call("Authorise", admin_pb2.AuthoriseRequest(**fields))
    return str(response.authorisation_id)


async def eventually(check: Callable[[], Any], *, within: float = 10.0) -> Any:
    """Poll an async predicate until it returns a truthy value."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s: {check}")
        await asyncio.sleep(0.02)


async def acknowledged(lao: Registry, authorisation_id: str, party: str = "KOR") -> None:
    async def check() -> bool:
        response = await lao.call("ListAuthorisations", admin_pb2.ListAuthorisationsRequest())
        view = next(a for a in response.authorisations if a.authorisation_id == authorisation_id)
        return bool(view.party_states.get(party) == "acknowledged")

    await eventually(check)


async def final_state(registry: Registry, transfer_id: str) -> Any:
    async def check() -> Any:
        view = (await registry.transfers()).get(transfer_id)
        return view if view is not None and view.state in (3, 4, 5) else None

    return await eventually(check)


class PartnerClient:
    """A hand-driven partner: sends crafted envelopes to a node over mutual TLS."""

    def __init__(self, target: Registry, as_keys: PartyFiles, ca_pem: bytes) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=as_keys.node_key.read_bytes(),
            certificate_chain=as_keys.node_certificate.read_bytes(),
        )
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{target.node.partner_port}", credentials)
        self.stub = partner_service_pb2_grpc.PartnerServiceStub(self.channel)

    async def deliver(self, envelope: bytes) -> bytes:
        response = await self.stub.Deliver(
            partner_service_pb2.DeliverRequest(envelope=envelope), timeout=10
        )
        return bytes(response.envelope)

    async def close(self) -> None:
        await self.channel.close(None)


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The text entries of a failed call's trailing metadata, the first value of each
    key (e.g. itmolink-rejection-code; binary ``-bin`` entries are left out).

    grpc-stubs types ``RpcError.trailing_metadata()`` as a tuple of objects with key and
    value; a grpc.aio error gives a ``grpc.aio.Metadata``, which iterates over (key,
    value) pairs (its ``items()`` gives each key's list of values, whatever the stubs say)."""
    metadata: grpc.aio.Metadata = error.trailing_metadata()  # type: ignore[assignment]
    found: dict[str, str] = {}
    for key, value in metadata:
        if isinstance(value, str):
            found.setdefault(key, value)
    return found


def header(sender: str, audience: str, sequence: int, **overrides: Any) -> common_pb2.Header:
    fields: dict[str, Any] = dict(
        protocol_version=1,
        message_id=str(uuid.uuid4()),
        sender_party=sender,
        sender_registry=f"{sender}-NR",
        audience=audience,
        sent_at=timestamp(to_us(dt.datetime.now(dt.UTC))),
        sequence=sequence,
    )
    fields.update(overrides)
    return common_pb2.Header(**fields)


def signed(msg: Any, key: SigningKey) -> tuple[bytes, bytes]:
    """(payload, envelope) for a message signed by ``key``."""
    payload = msg.SerializeToString()
    return payload, seal(msg.DESCRIPTOR.full_name, payload, key)
