"""What topic subscriptions cost a node on Redis, and that clients who vanish give all of it back (on daphne and on uvicorn)."""

import asyncio
import json

import pytest
import redis

from tests.processes import SERVERS, wait_until
from tests.wsclient import next_event, ping_pong, ws_connect

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.parametrize("server", SERVERS)]
CLIENTS = 10
CAP = 100  # PINGPONG_MAX_SUBSCRIPTIONS' default


def redis_channels(url: str) -> int:
    """Redis pub/sub channels someone subscribes to (the topics' groups, the broadcast group)."""
    with redis.Redis.from_url(url) as client:
        return len(client.pubsub_channels())


async def subscribe_all(ws, topics: list[str]) -> list[str]:
    for topic in topics:
        await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
    return [(await next_event(ws)).get("type") for _ in topics]


async def test_subscriptions_past_the_cap_are_refused_and_vanished_clients_release_their_redis_channels(
    redis_server, daphne_nodes
):
    node = daphne_nodes({"REDIS_URL": redis_server.url, "PINGPONG_RATE_PER_SECOND": "0"})
    control = await ws_connect(node.ws)
    assert await ping_pong(control) == "pong!"
    baseline = redis_channels(redis_server.url)
    clients = [await ws_connect(node.ws) for _ in range(CLIENTS)]
    for index, ws in enumerate(clients):
        answers = await subscribe_all(ws, [f"public:c{index}-t{topic}" for topic in range(CAP + 5)])
        assert answers == ["subscribed"] * CAP + ["error"] * 5
    assert redis_channels(redis_server.url) == baseline + CLIENTS * CAP
    for ws in clients[: CLIENTS // 2]:
        ws.transport.abort()  # gone without a close frame
    for ws in clients[CLIENTS // 2 :]:
        await ws.close()
    await asyncio.to_thread(
        wait_until, lambda: redis_channels(redis_server.url) == baseline, timeout=10, what="channels released"
    )
    assert await ping_pong(control) == "pong!"
    await control.close()
    assert "Traceback" not in node.output()
