"""Scale-out through a real redis-server: two nodes act as one, and faults lose nothing silently.

Every test that starts a node runs it on daphne and on uvicorn.
"""

import asyncio
import json

import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer

from pingpong import protocol
from tests.processes import SERVERS, api_broadcast, http_request, manage, wait_until
from tests.wsclient import broadcasts_on_each, broadcasts_within, ping_pong, ws_connect

pytestmark = pytest.mark.redis
TOKEN = "redis-test-token"

on_both_servers = pytest.mark.parametrize("server", SERVERS)


def redis_env(redis_server, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "PINGPONG_BROADCAST_TOKEN": TOKEN, **extra}


@pytest.fixture
def two_nodes(redis_server, daphne_nodes):
    env = redis_env(redis_server)
    return daphne_nodes(env), daphne_nodes(env)


@pytest.mark.slow
@on_both_servers
async def test_broadcasts_reach_every_client_on_both_nodes_exactly_once(redis_server, two_nodes):
    clients = [await ws_connect(node.ws) for node in two_nodes for _ in range(3)]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
    assert await asyncio.to_thread(api_broadcast, two_nodes[0], "through the API", token=TOKEN) == 202
    command = await asyncio.to_thread(manage, "broadcast", "through the command", env=redis_env(redis_server))
    assert command.returncode == 0, command.stderr
    for events in await broadcasts_on_each(clients, seconds=1.5):
        assert sorted(event["text"] for event in events) == ["through the API", "through the command"]
    await asyncio.gather(*(ws.close() for ws in clients))


@pytest.mark.slow
@on_both_servers
async def test_idle_client_stays_connected_for_20_seconds(redis_server, daphne_nodes):
    node = daphne_nodes(redis_env(redis_server))
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == "pong!"
        await asyncio.sleep(20)
        assert await ping_pong(ws) == "pong!"
        assert await asyncio.to_thread(api_broadcast, node, "still here", token=TOKEN) == 202
        assert [e["text"] for e in await broadcasts_within(ws, seconds=1)] == ["still here"]
    assert "1011" not in node.output()


@pytest.mark.slow
@on_both_servers
async def test_broadcasts_still_arrive_after_the_group_expiry(redis_server, daphne_nodes):
    node = daphne_nodes(redis_env(redis_server, DJANGO_SETTINGS_MODULE="tests.settings_short_expiry"))
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == "pong!"
        await asyncio.sleep(3)  # three times the configured group_expiry
        assert await asyncio.to_thread(api_broadcast, node, "after expiry", token=TOKEN) == 202
        assert [e["text"] for e in await broadcasts_within(ws, seconds=1)] == ["after expiry"]


def test_broadcast_command_exits_non_zero_when_redis_is_unreachable(redis_server):
    redis_server.kill()
    result = manage("broadcast", "nobody hears this", env=redis_env(redis_server))
    assert result.returncode != 0
    assert "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@on_both_servers
async def test_redis_outage_keeps_ping_working_and_reports_503_then_recovers(redis_server, two_nodes):
    clients = [await ws_connect(node.ws) for node in two_nodes for _ in range(2)]
    redis_server.kill()
    for _ in range(5):  # every connection keeps answering while Redis is down
        for ws in clients:
            assert await ping_pong(ws) == "pong!"
    for node in two_nodes:
        assert (await asyncio.to_thread(http_request, f"{node.http}/readyz"))[0] == 503
        assert await asyncio.to_thread(api_broadcast, node, "lost?", token=TOKEN) == 503
    command = await asyncio.to_thread(manage, "broadcast", "lost?", env=redis_env(redis_server))
    assert command.returncode != 0

    redis_server.start()  # same port, no node restart
    await asyncio.to_thread(
        wait_until,
        lambda: all(http_request(f"{n.http}/readyz")[0] == 200 for n in two_nodes),
        timeout=5,
        what="both nodes ready again",
    )
    assert await asyncio.to_thread(api_broadcast, two_nodes[1], "back", token=TOKEN) == 202
    for events in await broadcasts_on_each(clients, seconds=1):
        assert [e["text"] for e in events] == ["back"]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
        await ws.close()
    for node in two_nodes:
        assert "Traceback" not in node.output()


@pytest.mark.slow
@on_both_servers
async def test_killing_one_node_leaves_the_other_serving_and_reconnects_land_there(redis_server, two_nodes):
    doomed, survivor = two_nodes
    on_doomed = await ws_connect(doomed.ws)
    on_survivor = await ws_connect(survivor.ws)
    doomed.kill()
    assert await ping_pong(on_survivor) == "pong!"
    await on_doomed.close()
    reconnected = await ws_connect(survivor.ws)
    assert await asyncio.to_thread(api_broadcast, survivor, "after the crash", token=TOKEN) == 202
    for events in await broadcasts_on_each([on_survivor, reconnected], seconds=1):
        assert [e["text"] for e in events] == ["after the crash"]
    await asyncio.gather(on_survivor.close(), reconnected.close())
    assert "Traceback" not in survivor.output()


@on_both_servers
async def test_new_connection_while_redis_is_down_is_told_to_try_again_later(redis_server, daphne_nodes):
    node = daphne_nodes(redis_env(redis_server))
    redis_server.kill()
    # A warm node asks its subscriber's socket, which sees Redis hang up within its 0.1 s poll.
    await asyncio.sleep(0.5)
    async with await ws_connect(node.ws) as ws:
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert event["error"] == "unavailable"
        await asyncio.sleep(0)
    assert ws.close_code == protocol.CloseCode.TRY_AGAIN_LATER


@on_both_servers
async def test_channel_layer_message_of_unknown_type_is_logged_and_dropped(redis_server, daphne_nodes):
    node = daphne_nodes(redis_env(redis_server))
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == "pong!"
        layer = RedisPubSubChannelLayer(hosts=[redis_server.url], prefix="pingpong")
        await layer.group_send(protocol.BROADCAST_GROUP, {"type": "no.such.handler"})
        await layer.group_send(protocol.BROADCAST_GROUP, {"type": "websocket.disconnect", "code": 1000})
        await layer.flush()
        await asyncio.to_thread(
            wait_until, lambda: "posing as 'websocket.disconnect'" in node.output(), timeout=5, what="the drop log"
        )
        assert await ping_pong(ws) == "pong!"
    assert "dropped message of unknown type 'no.such.handler'" in node.output()
