"""A node over PostgreSQL survives the database going away and coming back: its
health says NOT_SERVING while the store fails, SERVING once it works again, and
what it is asked afterwards is delivered (docs/POSTGRES.md, docs/OPERATIONS.md)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import postgres_cluster
from .conftest import Registry, acknowledged, authorise, eventually

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(registry: Registry) -> int:
    async with grpc.aio.insecure_channel(registry.node.config.admin_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(response.status)


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
async def test_a_node_recovers_and_delivers_after_a_database_outage(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, _ = lao_kor
    first = await authorise(lao)
    await acknowledged(lao, first)
    assert await _health(lao) == SERVING

    cluster = postgres_cluster()
    cluster.stop_server()
    try:

        async def unhealthy() -> bool:
            return await _health(lao) == NOT_SERVING

        await eventually(unhealthy, within=60)
    finally:
        cluster.start()

    async def healthy() -> bool:
        return await _health(lao) == SERVING

    await eventually(healthy, within=60)
    second = await authorise(lao, activity_id="LAO-SOLAR-WIND-2GW")
    await acknowledged(lao, second)
    assert lao.node._worker is not None
    assert not lao.node._worker.done()


async def test_health_says_not_serving_once_the_outbox_worker_died(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, _ = lao_kor
    assert await _health(lao) == SERVING
    assert lao.node._worker is not None
    lao.node._worker.cancel()

    async def unhealthy() -> bool:
        return await _health(lao) == NOT_SERVING

    await eventually(unhealthy)
