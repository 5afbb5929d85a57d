"""Presence: GET /api/stats counts open websockets per node and in the cluster, kept in Redis."""

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from django.test import AsyncClient
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError
from websockets.asyncio.client import ClientConnection

from pingpong import presence
from tests.processes import SERVERS, DaphneNode, RedisServer, free_port, http_request, redis_binary, scaled
from tests.wsclient import ws_connect

# The promise: a node that dies drops out of the count within 15 s.
DEAD_NODE_DEADLINE_SECONDS = 15.0
# The nodes under test keep their counts this long, so expiry is seen in seconds, not 12+.
TEST_TTL = 3

# The tests that start nodes run them on daphne and on uvicorn.
on_both_servers = pytest.mark.parametrize("server", SERVERS)


async def stats_of(node: DaphneNode) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(http_request, f"{node.http}/api/stats")
    return status, json.loads(body)


async def stats_until(node: DaphneNode, expected: dict, *, within: float) -> dict:
    """Poll the node's /api/stats (every 0.2 s, at most `within` s, scaled) until it answers `expected`."""
    within = scaled(within)
    deadline = time.monotonic() + within
    seen: dict = {}
    while time.monotonic() < deadline:
        status, seen = await stats_of(node)
        if status == 200 and seen == expected:
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"after {within}s {node.http}/api/stats still says {seen}, not {expected}")


async def open_clients(node: DaphneNode, count: int) -> list[ClientConnection]:
    return [await ws_connect(node.ws) for _ in range(count)]


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


@pytest.fixture
def cluster(redis_server, daphne_nodes) -> tuple[DaphneNode, DaphneNode]:
    """Two nodes (on the test's `server`) sharing one real redis-server, named node-a and node-b."""
    return cluster_on(redis_server, daphne_nodes)


def cluster_on(server: RedisServer, daphne_nodes) -> tuple[DaphneNode, DaphneNode]:
    """node-a and node-b on `server`, with counts that live TEST_TTL seconds."""
    return tuple(  # type: ignore[return-value]
        daphne_nodes(env={"REDIS_URL": server.url, "PINGPONG_NODE_ID": name, "PINGPONG_PRESENCE_TTL": str(TEST_TTL)})
        for name in ("node-a", "node-b")
    )


@pytest.fixture
async def redis_client(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def test_node_id_is_the_setting_when_set(settings):
    settings.PINGPONG_NODE_ID = "web-7"
    assert presence.node_name() == "web-7"


def test_node_id_defaults_to_hostname_and_pid(settings):
    settings.PINGPONG_NODE_ID = ""
    assert presence.node_name().endswith(f"-{os.getpid()}")


def test_summary_totals_the_nodes():
    assert presence.summarise({"b": 2, "a": 3}) == {"connections": 5, "nodes": {"a": 3, "b": 2}}


def test_by_default_the_count_is_rewritten_every_5_seconds_and_lives_12():
    """The defaults: a dead node expires well within 15 s; two failed writes are tolerated."""
    assert presence.key_ttl() == 12 <= DEAD_NODE_DEADLINE_SECONDS
    assert presence.refresh_interval(presence.key_ttl()) == 5


def test_two_refreshes_and_slack_fit_in_every_allowed_ttl():
    """Even the smallest TTL leaves room for two missed writes before a live node expires."""
    for ttl in range(3, 30):
        assert 0 < 2 * presence.refresh_interval(ttl) < ttl


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
    await presence.publish(redis_client, prefix="t", node_id="n1", count=4, ttl=12)
    assert await presence.read(redis_client, prefix="t") == {"n1": 4}


@pytest.mark.redis
async def test_published_count_carries_the_ttl(redis_client):
    await presence.publish(redis_client, prefix="t", node_id="n1", count=4, ttl=7)
    assert 0 < await redis_client.ttl("t:presence:n1") <= 7


@pytest.mark.redis
async def test_read_ignores_other_prefixes_and_expired_nodes(redis_client):
    await presence.publish(redis_client, prefix="t", node_id="live", count=1, ttl=12)
    await presence.publish(redis_client, prefix="other", node_id="elsewhere", count=9, ttl=12)
    await presence.publish(redis_client, prefix="t", node_id="gone", count=5, ttl=1)
    await redis_client.pexpire("t:presence:gone", 1)
    await asyncio.sleep(0.05)
    assert await presence.read(redis_client, prefix="t") == {"live": 1}


@pytest.mark.slow
@on_both_servers
async def test_a_node_without_redis_counts_its_own_clients(daphne_nodes):
    node = daphne_nodes(env={"PINGPONG_NODE_ID": "solo"})
    clients = await open_clients(node, 2)
    try:
        assert await stats_until(node, {"connections": 2, "nodes": {"solo": 2}}, within=5)
    finally:
        await close_all(clients)


@pytest.mark.slow
@on_both_servers
async def test_stats_is_503_json_when_redis_is_unreachable(daphne_nodes):
    node = daphne_nodes(env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    status, body = await stats_of(node)
    assert (status, body["error"]) == (503, "unavailable")


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
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
@on_both_servers
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


# --- Redis full: presence writes fail with OOM while reads still work ----------------------

MAXMEMORY_MIB = 8
# One Lua script writes twice maxmemory in 1 KiB values: Redis checks maxmemory only when a
# command starts, so the script lands well past the line. Filled by plain SETs, Redis sits on
# the line and a small write is refused or taken depending on a freed client buffer.
FILLER_KEYS = 2 * MAXMEMORY_MIB * 1024
FILL_SCRIPT = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'filler:' .. i, string.rep('x', 1024)) end"
EMPTY_SCRIPT = "for i = 1, tonumber(ARGV[1]) do redis.call('DEL', 'filler:' .. i) end"


@pytest.fixture
def full_redis() -> Iterator[RedisServer]:
    """A redis-server with a small maxmemory that refuses writes instead of evicting keys."""
    maxmemory = f"{MAXMEMORY_MIB}mb"
    server = RedisServer(redis_binary(), args=("--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"))
    server.start()
    try:
        yield server
    finally:
        server.close()


async def fill_until_oom(client: Redis) -> None:
    """Fill Redis past maxmemory, then prove a presence-sized write is refused with OOM."""
    await client.eval(FILL_SCRIPT, 0, FILLER_KEYS)
    with pytest.raises(OutOfMemoryError):
        await client.set("pingpong:presence:probe", 1, ex=1)


async def presence_keys(client: Redis) -> list[bytes]:
    return [key async for key in client.scan_iter(match="pingpong:presence:*", count=100)]


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_stats_is_503_never_a_wrong_total_while_presence_writes_fail(full_redis, daphne_nodes):
    """Redis at maxmemory (noeviction): until the counts can be written again, no node answers a wrong total."""
    node_a, node_b = cluster_on(full_redis, daphne_nodes)
    clients = await open_clients(node_a, 2) + await open_clients(node_b, 1)
    everyone = {"connections": 3, "nodes": {"node-a": 2, "node-b": 1}}
    filler = Redis.from_url(full_redis.url)
    try:
        await asyncio.gather(stats_until(node_a, everyone, within=10), stats_until(node_b, everyone, within=10))
        await fill_until_oom(filler)
        # Watch both nodes until every count has expired in Redis (bounded): the moment a wrong
        # total would have been answered (node-a alone: 2, node-b alone: 1).
        answers: list[tuple[int, dict]] = []
        deadline = time.monotonic() + 3 * TEST_TTL + 5
        while await presence_keys(filler):
            assert time.monotonic() < deadline, "the presence keys never expired"
            answers += await asyncio.gather(stats_of(node_a), stats_of(node_b))
            await asyncio.sleep(0.2)
        answers += await asyncio.gather(stats_of(node_a), stats_of(node_b))
        wrong = [(status, body) for status, body in answers if status != 503 and body != everyone]
        assert not wrong, f"answered while counts could not be written: {wrong}"
        assert [status for status, _ in answers[-2:]] == [503, 503]
        assert answers[-1][1]["error"] == "unavailable" and "cannot write" in answers[-1][1]["detail"]
        await filler.eval(EMPTY_SCRIPT, 0, FILLER_KEYS)  # DEL is allowed past maxmemory
        await asyncio.gather(stats_until(node_a, everyone, within=10), stats_until(node_b, everyone, within=10))
    finally:
        await filler.aclose()
        await close_all(clients)
