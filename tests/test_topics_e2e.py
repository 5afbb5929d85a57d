"""Topics with identity end to end: two real nodes on one real redis-server, real websocket clients over TCP.

Users A and B each hold a connection on each node (tokens from `pingpong.tokens.issue` with the
nodes' secret); publications come from `/api/publish`, a sync Django view, a worker process
and `manage.py publish`. Every check that a connection got nothing it should not ends with a
marker publication to a topic every connection holds: Redis delivers one subscriber's
messages in order, so whatever a connection got before the marker is all it will ever get.
"""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import redis

from pingpong import protocol, tokens
from tests import processes
from tests.authorize_hooks import REFUSED_TOPIC
from tests.processes import (
    ROOT,
    SERVERS,
    DaphneNode,
    RedisServer,
    http_request,
    manage,
    node_env,
    redis_binary,
    scaled,
)
from tests.wsclient import close_code, next_event, ping_pong, ws_connect

SECRET = "e2e-token-secret-for-pingpong-tests-0123456789abcdef"
API_TOKEN = "e2e-api-token"
MAX_SUBSCRIPTIONS = 3
MARKER_TOPIC = "public:x"  # every connection of a routing test subscribes to it

# Every test runs on daphne and on uvicorn (the subscribers are on the server under test).
both_servers = pytest.mark.parametrize("server", SERVERS, scope="module")


@dataclass
class Cluster:
    redis: RedisServer
    nodes: tuple[DaphneNode, DaphneNode]  # the second one serves tests.settings_publish_view


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    server = RedisServer(redis_binary()).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cluster(module_daphne_nodes, module_redis) -> Cluster:
    """Two nodes on one Redis, with tokens, the API, the authorize hook and a small subscription cap.

    The Redis is the module's, shared by the daphne and the uvicorn cluster: it starts empty for each,
    since a topic with history remembers publication ids (a second publish of an id is a retry).
    """
    client = redis.Redis.from_url(module_redis.url)
    client.flushall()
    client.close()
    env = {
        "REDIS_URL": module_redis.url,
        "PINGPONG_TOKEN_SECRET": SECRET,
        "PINGPONG_API_TOKEN": API_TOKEN,
        "PINGPONG_AUTHORIZE": "tests.authorize_hooks.refuse_secret",
        "PINGPONG_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS),
    }
    first = module_daphne_nodes(env)
    second = module_daphne_nodes({**env, "DJANGO_SETTINGS_MODULE": "tests.settings_publish_view"})
    return Cluster(redis=module_redis, nodes=(first, second))


@pytest.fixture
def issue(settings):
    """`issue(user_id, ttl=..., secret=...)`: a token from pingpong.tokens.issue, by default with the nodes' secret."""

    def issue(user_id: str, *, ttl: float = 3600, secret: str = SECRET) -> str:
        settings.PINGPONG_TOKEN_SECRET = secret
        return tokens.issue(user_id, ttl=ttl)

    return issue


def api_publish(node: DaphneNode, topic: str, data: Any, *, publication_id: str) -> int:
    """POST /api/publish to `node`; the status."""
    return processes.api_publish(node, topic, data, token=API_TOKEN, publication_id=publication_id)


async def connect(node: DaphneNode, token: str | None = None):
    """A websocket to `node`, with `?token=` when given."""
    return await ws_connect(node.ws + (f"?token={quote(token)}" if token else ""))


async def request(ws, **fields: Any) -> dict[str, Any]:
    """Send one JSON request and return the next event (a publication may not be in flight)."""
    await ws.send(json.dumps(fields))
    return await next_event(ws)


async def subscribe(ws, *topics: str) -> None:
    for topic in topics:
        answer = await request(ws, type="subscribe", topic=topic)
        assert (answer["type"], answer.get("topic")) == (protocol.EVENT_SUBSCRIBED, topic), answer


async def publications_until(ws, marker_id: str, *, limit: int = 200) -> list[tuple[str, str]]:
    """The (topic, id) of each publication before the one with `marker_id` (which must come; at most `limit`)."""
    seen: list[tuple[str, str]] = []
    for _ in range(limit):
        event = await next_event(ws, timeout=10)
        if event["type"] != protocol.EVENT_PUBLICATION:
            continue
        if event["id"] == marker_id:
            return seen
        seen.append((event["topic"], event["id"]))
    raise AssertionError(f"no marker {marker_id} in {limit} events; got {seen}")


async def close_all(connections) -> None:
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)


@both_servers
async def test_a_publication_to_a_user_topic_reaches_only_that_users_connections_on_both_nodes_once_each(
    cluster, issue
):
    tokens_of = {"A": issue("A"), "B": issue("B")}
    connections = {
        (user, index): await connect(node, tokens_of[user]) for user in "AB" for index, node in enumerate(cluster.nodes)
    }
    try:
        for (user, _), ws in connections.items():
            await subscribe(ws, f"user:{user}", MARKER_TOPIC)
        assert (
            await asyncio.to_thread(api_publish, cluster.nodes[0], "user:A", {"for": "A"}, publication_id="to-a") == 202
        )
        assert (
            await asyncio.to_thread(api_publish, cluster.nodes[1], MARKER_TOPIC, "end", publication_id="end-a") == 202
        )
        got = {key: await publications_until(ws, "end-a") for key, ws in connections.items()}
        assert got == {
            ("A", 0): [("user:A", "to-a")],
            ("A", 1): [("user:A", "to-a")],
            ("B", 0): [],
            ("B", 1): [],
        }
    finally:
        await close_all(connections.values())


@both_servers
async def test_a_publication_to_a_public_topic_reaches_every_subscriber_on_both_nodes_once_each(cluster, issue):
    connections = [await connect(node, issue(user)) for user in "AB" for node in cluster.nodes]
    connections += [await connect(node) for node in cluster.nodes]  # anonymous
    try:
        for ws in connections:
            await subscribe(ws, MARKER_TOPIC, "public:news")
        assert (
            await asyncio.to_thread(api_publish, cluster.nodes[1], "public:news", [1, 2], publication_id="news") == 202
        )
        assert await asyncio.to_thread(api_publish, cluster.nodes[0], MARKER_TOPIC, None, publication_id="end-p") == 202
        got = [await publications_until(ws, "end-p") for ws in connections]
        assert got == [[("public:news", "news")]] * 6
    finally:
        await close_all(connections)


@both_servers
async def test_the_same_publication_id_published_twice_is_delivered_once(cluster):
    """A retry after an unknown outcome is safe: each node delivers an id once per topic."""
    connections = [await connect(node) for node in cluster.nodes]
    try:
        for ws in connections:
            await subscribe(ws, MARKER_TOPIC)
        for node in cluster.nodes:  # the first attempt through one node, the retry through the other
            assert await asyncio.to_thread(api_publish, node, MARKER_TOPIC, "once", publication_id="retried") == 202
        assert await asyncio.to_thread(api_publish, cluster.nodes[0], MARKER_TOPIC, None, publication_id="end-r") == 202
        assert [await publications_until(ws, "end-r") for ws in connections] == [[(MARKER_TOPIC, "retried")]] * 2
    finally:
        await close_all(connections)


@both_servers
@pytest.mark.parametrize(
    ("token_user", "wanted"),
    [
        (None, {"type": "subscribe", "topic": "user:A"}),
        (None, {"type": "publish", "topic": "public:news", "data": 1}),
        ("B", {"type": "subscribe", "topic": "user:A"}),
        ("A", {"type": "publish", "topic": "user:A", "data": 1}),
    ],
    ids=["anonymous-subscribes-user-A", "anonymous-publishes", "B-subscribes-user-A", "A-publishes-to-own-topic"],
)
async def test_a_request_the_connection_may_not_make_is_forbidden_and_the_connection_stays_open(
    cluster, issue, token_user, wanted
):
    async with await connect(cluster.nodes[0], issue(token_user) if token_user else None) as ws:
        answer = await request(ws, **wanted, id="r1")
        assert (answer["type"], answer["error"], answer["id"]) == ("error", protocol.ERROR_FORBIDDEN, "r1")
        assert await ping_pong(ws) == "pong!"


@both_servers
@pytest.mark.parametrize("where", ["query", "auth"])
async def test_a_wrongly_signed_token_is_answered_unauthorized_and_closed_with_4401(cluster, issue, where):
    forged = issue("A", secret="not-the-nodes-secret-0123456789-0123456789-0123")
    if where == "query":
        ws = await connect(cluster.nodes[0], forged)
    else:
        ws = await connect(cluster.nodes[0])
        await ws.send(json.dumps({"type": "auth", "token": forged}))
    async with ws:
        assert (await next_event(ws))["error"] == protocol.ERROR_UNAUTHORIZED
        assert await close_code(ws) == protocol.CloseCode.UNAUTHORIZED


@both_servers
async def test_the_authorize_hook_refuses_the_topic_it_says_no_to_and_allows_the_rest(cluster):
    async with await connect(cluster.nodes[1]) as ws:
        refused = await request(ws, type="subscribe", topic=REFUSED_TOPIC)
        assert (refused["type"], refused["error"]) == ("error", protocol.ERROR_FORBIDDEN)
        await subscribe(ws, "public:news")


@both_servers
async def test_a_subscription_over_the_cap_is_refused_and_the_others_keep_receiving(cluster):
    async with await connect(cluster.nodes[0]) as ws:
        held = [f"public:cap{n}" for n in range(MAX_SUBSCRIPTIONS)]
        await subscribe(ws, *held)
        refused = await request(ws, type="subscribe", topic="public:one-too-many")
        assert (refused["type"], refused["error"]) == ("error", protocol.ERROR_TOO_MANY_SUBSCRIPTIONS)
        assert (
            await asyncio.to_thread(api_publish, cluster.nodes[1], "public:one-too-many", 1, publication_id="no") == 202
        )
        assert await asyncio.to_thread(api_publish, cluster.nodes[1], held[-1], 1, publication_id="end-c") == 202
        assert await publications_until(ws, "end-c") == []


@both_servers
async def test_a_sync_django_view_publishes_on_the_servers_loop_to_subscribers_on_both_nodes(cluster):
    connections = [await connect(node) for node in cluster.nodes]
    try:
        for ws in connections:
            await subscribe(ws, "public:from-view", MARKER_TOPIC)
        url = f"{cluster.nodes[1].http}/test/publish?topic=public:from-view&id=view-1"
        status, body = await asyncio.to_thread(http_request, url)
        assert status == 200, body
        answer = json.loads(body)
        assert (answer["topic"], answer["id"], answer["on_server_loop"]) == ("public:from-view", "view-1", True)
        assert await asyncio.to_thread(api_publish, cluster.nodes[0], MARKER_TOPIC, None, publication_id="end-v") == 202
        assert [await publications_until(ws, "end-v") for ws in connections] == [[("public:from-view", "view-1")]] * 2
    finally:
        await close_all(connections)


def token_ttl() -> int:
    """A token lifetime well under the 30 s warning, long enough for a refresh on a slow machine."""
    return int(scaled(3)) + 2


@both_servers
async def test_a_token_that_expires_gets_token_expiring_then_unauthorized_and_4401(cluster, issue):
    async with await connect(cluster.nodes[0], issue("A", ttl=token_ttl())) as ws:
        warning = await next_event(ws)
        assert warning["type"] == protocol.EVENT_TOKEN_EXPIRING
        closing = await next_event(ws, timeout=token_ttl() + 5)
        assert (closing["type"], closing["error"]) == ("error", protocol.ERROR_UNAUTHORIZED)
        assert await close_code(ws) == protocol.CloseCode.UNAUTHORIZED


@both_servers
async def test_a_refresh_before_exp_keeps_the_connection_open_past_the_old_exp(cluster, issue):
    async with await connect(cluster.nodes[0], issue("A", ttl=token_ttl())) as ws:
        warning = await next_event(ws)
        assert warning["type"] == protocol.EVENT_TOKEN_EXPIRING
        refreshed = await request(ws, type="refresh", token=issue("A", ttl=3600))
        assert refreshed["type"] == protocol.EVENT_AUTHENTICATED
        assert refreshed["expires_at"] > warning["expires_at"]
        await asyncio.sleep(max(0.0, warning["expires_at"] - time.time()) + scaled(1))
        assert await ping_pong(ws) == "pong!"


def redis_clients_named(server: RedisServer, name: str) -> int:
    """How many connections Redis has from clients that gave `name` (CLIENT SETNAME)."""
    with redis.Redis.from_url(server.url) as client:
        return sum(1 for entry in client.client_list() if entry.get("name") == name)


@both_servers
async def test_a_worker_process_publishes_fifty_times_in_a_row_on_one_redis_connection_and_all_arrive(cluster):
    count, topic = 50, "public:worker"
    connections = [await connect(node) for node in cluster.nodes]
    env = node_env({"REDIS_URL": cluster.redis.url, "PINGPONG_NODE_ID": "publish-worker"})
    worker = None
    try:
        for ws in connections:
            await subscribe(ws, topic)
        worker = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-X", "dev", "-m", "tests.publish_worker", topic, str(count)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), scaled(60))
        assert line.strip() == f"published {count}", line
        assert redis_clients_named(cluster.redis, "pingpong:publish-worker") <= 1
        _, stderr = await asyncio.to_thread(worker.communicate, timeout=scaled(30))  # closes its stdin: it exits
        assert worker.returncode == 0, stderr
        assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr
        expected = [(topic, f"worker-{n}") for n in range(count)]
        for ws in connections:
            got = [await next_event(ws) for _ in range(count)]
            assert [(event["topic"], event["id"]) for event in got] == expected
            assert await ping_pong(ws) == "pong!"  # a duplicate would have come before the answer
    finally:
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=scaled(10))
            for stream in (worker.stdin, worker.stdout, worker.stderr):
                if stream is not None:
                    stream.close()
        await close_all(connections)


@both_servers
async def test_manage_py_publish_delivers_to_subscribers_on_both_nodes(cluster):
    connections = [await connect(node) for node in cluster.nodes]
    try:
        for ws in connections:
            await subscribe(ws, "public:cmd")
        done = await asyncio.to_thread(
            manage, "publish", "public:cmd", '{"via": "command"}', "--id", "cmd-1", env={"REDIS_URL": cluster.redis.url}
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "publication cmd-1 sent to public:cmd"
        for ws in connections:
            event = await next_event(ws)
            assert (event["type"], event["id"], event["data"]) == ("publication", "cmd-1", {"via": "command"})
    finally:
        await close_all(connections)
