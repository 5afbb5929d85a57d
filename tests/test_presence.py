"""Presence: GET /api/stats counts open websockets per node and in the cluster, kept in Redis."""

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

import pytest
from django.test import AsyncClient
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from pingpong import presence
from tests.processes import ORIGIN, DaphneNode, free_port, http_request

# The promise: a node that dies drops out of the count within 15 s.
DEAD_NODE_DEADLINE_SECONDS = 15.0


async def stats_of(node: DaphneNode) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(http_request, f"{node.http}/api/stats")
    return status, json.loads(body)


async def stats_until(node: DaphneNode, expected: dict, *, within: float) -> dict:
    """Poll the node's /api/stats (every 0.2 s, at most `within` s) until it answers `expected`."""
    deadline = time.monotonic() + within
    seen: dict = {}
    while time.monotonic() < deadline:
        status, seen = await stats_of(node)
        if status == 200 and seen == expected:
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"after {within}s {node.http}/api/stats still says {seen}, not {expected}")


async def open_clients(node: DaphneNode, count: int) -> list[ClientConnection]:
    return [await connect(node.ws, origin=ORIGIN, open_timeout=10) for _ in range(count)]  # type: ignore[arg-type]


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


@pytest.fixture
def cluster(redis_server, daphne_nodes) -> tuple[DaphneNode, DaphneNode]:
    """Two daphne nodes sharing one real redis-server, named node-a and node-b."""
    return tuple(  # type: ignore[return-value]
        daphne_nodes(env={"REDIS_URL": redis_server.url, "PINGPONG_NODE_ID": name}) for name in ("node-a", "node-b")
    )


@pytest.fixture
async def redis_client(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def test_node_id_is_the_setting_when_set(settings):
    settings.PINGPONG_NODE_ID = "web-7"
    assert presence.presence_node_id() == "web-7"


def test_node_id_defaults_to_hostname_and_pid(settings):
    settings.PINGPONG_NODE_ID = ""
    assert presence.presence_node_id().endswith(f"-{os.getpid()}")


def test_summary_totals_the_nodes():
    assert presence.presence_summary({"b": 2, "a": 3}) == {"connections": 5, "nodes": {"a": 3, "b": 2}}


def test_a_dead_node_expires_well_within_15_seconds_of_its_last_refresh():
    assert presence.REFRESH_SECONDS < presence.TTL_SECONDS <= DEAD_NODE_DEADLINE_SECONDS


async def test_stats_rejects_post_with_405():
    response = await AsyncClient().post("/api/stats")
    assert response.status_code == 405


async def test_stats_without_redis_is_this_process_alone(settings):
    settings.REDIS_URL = ""
    settings.PINGPONG_NODE_ID = "solo"
    body = (await AsyncClient().get("/api/stats")).json()
    assert body == {"connections": body["nodes"]["solo"], "nodes": {"solo": body["nodes"]["solo"]}}


@pytest.mark.redis
async def test_published_count_is_read_back_under_the_node_id(redis_client):
    await presence.presence_publish(redis_client, prefix="t", node_id="n1", count=4)
    assert await presence.presence_read(redis_client, prefix="t") == {"n1": 4}


@pytest.mark.redis
async def test_published_count_carries_the_ttl(redis_client):
    await presence.presence_publish(redis_client, prefix="t", node_id="n1", count=4)
    assert 0 < await redis_client.ttl("t:presence:n1") <= presence.TTL_SECONDS


@pytest.mark.redis
async def test_read_ignores_other_prefixes_and_expired_nodes(redis_client):
    await presence.presence_publish(redis_client, prefix="t", node_id="live", count=1)
    await presence.presence_publish(redis_client, prefix="other", node_id="elsewhere", count=9)
    await presence.presence_publish(redis_client, prefix="t", node_id="gone", count=5, ttl=1)
    await redis_client.pexpire("t:presence:gone", 1)
    await asyncio.sleep(0.05)
    assert await presence.presence_read(redis_client, prefix="t") == {"live": 1}


@pytest.mark.slow
async def test_a_node_without_redis_counts_its_own_clients(daphne_nodes):
    node = daphne_nodes(env={"PINGPONG_NODE_ID": "solo"})
    clients = await open_clients(node, 2)
    try:
        assert await stats_until(node, {"connections": 2, "nodes": {"solo": 2}}, within=5)
    finally:
        await close_all(clients)


@pytest.mark.slow
async def test_stats_is_503_json_when_redis_is_unreachable(daphne_nodes):
    node = daphne_nodes(env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    status, body = await stats_of(node)
    assert (status, body["error"]) == (503, "unavailable")


@pytest.mark.redis
@pytest.mark.slow
async def test_stats_on_either_node_shows_the_cluster_total_and_each_node(cluster):
    node_a, node_b = cluster
    clients = await open_clients(node_a, 2) + await open_clients(node_b, 1)
    expected = {"connections": 3, "nodes": {"node-a": 2, "node-b": 1}}
    try:
        # The first /api/stats call on a node starts its refresher, so ask both.
        seen = await asyncio.gather(stats_until(node_a, expected, within=10), stats_until(node_b, expected, within=10))
        assert seen == [expected, expected]
    finally:
        await close_all(clients)


@pytest.mark.redis
@pytest.mark.slow
async def test_a_killed_node_drops_out_within_15_seconds(cluster):
    node_a, node_b = cluster
    clients = await open_clients(node_a, 2) + await open_clients(node_b, 1)
    try:
        everyone = {"connections": 3, "nodes": {"node-a": 2, "node-b": 1}}
        await asyncio.gather(stats_until(node_a, everyone, within=10), stats_until(node_b, everyone, within=10))
        node_b.kill()  # SIGKILL: no chance to say goodbye
        survivors = {"connections": 2, "nodes": {"node-a": 2}}
        assert await stats_until(node_a, survivors, within=DEAD_NODE_DEADLINE_SECONDS) == survivors
    finally:
        await close_all(clients)
