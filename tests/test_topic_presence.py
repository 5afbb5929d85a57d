"""Topic presence and join/leave events, in process (WebsocketCommunicator, the embedded layer) and across
two real nodes on one redis-server (each such test runs on daphne and on uvicorn)."""

import asyncio
import json
import signal
import time
from collections import Counter

import jwt
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from pingpong import presence, protocol, tokens, topic_presence, topics
from tests.communicators import ask
from tests.processes import SERVERS, DaphneNode, RedisServer, free_port, http_request, scaled
from tests.wsclient import next_event, ws_connect

SECRET = "presence-test-secret-" + "0123456789abcdef" * 4
API_TOKEN = "presence-api-token-4b1d"
NAMESPACES = {
    "room": {"subscribe": "anyone", "publish": "server", "presence": True, "join_leave": True},
    "lobby": {"subscribe": "anyone", "publish": "server", "presence": True},
    "chat": {"subscribe": "anyone", "publish": "server", "join_leave": True},
}


@pytest.fixture(autouse=True)
def presence_namespaces(settings):
    settings.PINGPONG_TOKEN_SECRET = SECRET
    settings.PINGPONG_BROADCAST_TOKEN = API_TOKEN
    settings.PINGPONG_NAMESPACES = NAMESPACES
    topics.namespaces.cache_clear()
    yield
    topics.namespaces.cache_clear()


async def subscribed(ws, topic: str) -> None:
    assert (await ask(ws, type="subscribe", topic=topic))["type"] == "subscribed"


async def presence_of(ws, topic: str) -> dict:
    event = await ask(ws, type="presence", topic=topic, id="p")
    assert (event["type"], event["id"]) == ("presence", "p"), event
    return event


def test_the_default_namespaces_keep_no_presence_and_send_no_join_or_leave():
    for namespace in topics.namespaces_from(None).values():
        assert (namespace.presence, namespace.join_leave) == (False, False)


def test_a_namespace_config_turns_presence_and_join_leave_on():
    room = topics.namespaces_from({"room": {"subscribe": "anyone", "presence": True, "join_leave": True}})["room"]
    assert (room.presence, room.join_leave, room.tracked) == (True, True, True)


@pytest.mark.parametrize("flags", [{"presence": "yes"}, {"join_leave": 1}, {"presence": None}, {"presense": True}])
def test_a_presence_flag_that_is_not_a_boolean_or_misspelt_is_refused_at_start(flags):
    with pytest.raises(ImproperlyConfigured):
        topics.namespaces_from({"room": {"subscribe": "anyone", **flags}})


async def test_presence_lists_every_subscriber_with_its_user_and_exact_counts(clients):
    alice, alice_too, anonymous = (
        await clients(token=tokens.issue("alice")),
        await clients(token=tokens.issue("alice")),
        await clients(),
    )
    for ws in (alice, alice_too, anonymous):
        await subscribed(ws, "room:1")
    event = await presence_of(anonymous, "room:1")
    assert (event["topic"], event["connections"], event["users"], event["truncated"]) == ("room:1", 3, 1, False)
    assert sorted(str(member["user"]) for member in event["clients"]) == ["None", "alice", "alice"]
    assert len({member["client"] for member in event["clients"]}) == 3


async def test_a_connection_that_unsubscribes_or_disconnects_leaves_the_presence(clients):
    stays, unsubscribes, disconnects = await clients(), await clients(), await clients()
    for ws in (stays, unsubscribes, disconnects):
        await subscribed(ws, "lobby:1")
    await ask(unsubscribes, type="unsubscribe", topic="lobby:1")
    await disconnects.disconnect()
    assert (await presence_of(stays, "lobby:1"))["connections"] == 1


async def test_the_list_is_capped_but_the_counts_stay_exact(clients, monkeypatch):
    monkeypatch.setattr(protocol, "PRESENCE_LIST_MAX", 2)
    subscribers = [await clients(token=tokens.issue(f"user{index}")) for index in range(3)]
    for ws in subscribers:
        await subscribed(ws, "lobby:big")
    event = await presence_of(subscribers[0], "lobby:big")
    assert (event["connections"], event["users"], len(event["clients"]), event["truncated"]) == (3, 3, 2, True)


@pytest.mark.parametrize(
    ("topic", "error"),
    [
        ("room:never", protocol.ERROR_NOT_SUBSCRIBED),  # a topic this connection did not subscribe to
        ("user:bob", protocol.ERROR_NOT_SUBSCRIBED),  # a forbidden topic: it cannot be subscribed
        ("nope:x", protocol.ERROR_NOT_SUBSCRIBED),
        ("room:a b", protocol.ERROR_BAD_TOPIC),
        (None, protocol.ERROR_BAD_TOPIC),
    ],
)
async def test_presence_of_a_topic_the_connection_is_not_subscribed_to_is_refused(clients, topic, error):
    ws = await clients()
    event = await ask(ws, type="presence", topic=topic, id=9)
    assert (event["type"], event["error"], event["id"]) == ("error", error, 9)
    await ws.send_to(text_data="ping")
    assert await ws.receive_from() == "pong!"


@pytest.mark.parametrize("topic", ["public:news", "chat:1"])
async def test_presence_of_a_topic_whose_namespace_keeps_none_is_a_bad_request(clients, topic):
    ws = await clients()
    await subscribed(ws, topic)
    event = await ask(ws, type="presence", topic=topic)
    assert (event["type"], event["error"]) == ("error", protocol.ERROR_BAD_REQUEST)


async def test_subscribers_get_a_join_when_another_connection_subscribes_but_not_their_own(clients):
    first, second = await clients(token=tokens.issue("alice")), await clients(token=tokens.issue("bob"))
    await subscribed(first, "room:j")
    await subscribed(second, "room:j")
    join = json.loads(await first.receive_from())
    assert {key: join[key] for key in ("type", "topic", "user")} == {"type": "join", "topic": "room:j", "user": "bob"}
    listed = {member["user"]: member["client"] for member in (await presence_of(second, "room:j"))["clients"]}
    assert join["client"] == listed["bob"]
    assert await first.receive_nothing(timeout=0.1)
    assert await second.receive_nothing(timeout=0.1)  # its own join is not echoed


async def test_subscribers_get_a_leave_on_unsubscribe_and_on_disconnect(clients):
    watcher, unsubscribes, disconnects = (
        await clients(),
        await clients(token=tokens.issue("u")),
        await clients(token=tokens.issue("d")),
    )
    await subscribed(watcher, "chat:l")
    for ws in (unsubscribes, disconnects):
        await subscribed(ws, "chat:l")
        assert json.loads(await watcher.receive_from())["type"] == "join"
    await ask(unsubscribes, type="unsubscribe", topic="chat:l")
    await disconnects.disconnect()
    leaves = [json.loads(await watcher.receive_from()) for _ in range(2)]
    assert [(event["type"], event["user"]) for event in leaves] == [("leave", "u"), ("leave", "d")]


async def test_a_namespace_without_join_leave_sends_no_join_or_leave(clients):
    watcher, other = await clients(), await clients()
    await subscribed(watcher, "lobby:quiet")
    await subscribed(other, "lobby:quiet")
    await ask(other, type="unsubscribe", topic="lobby:quiet")
    assert await watcher.receive_nothing(timeout=0.1)


async def test_subscribing_twice_records_one_entry_and_sends_one_join(clients):
    watcher, twice = await clients(), await clients()
    await subscribed(watcher, "room:twice")
    await subscribed(twice, "room:twice")
    await subscribed(twice, "room:twice")
    assert json.loads(await watcher.receive_from())["type"] == "join"
    assert await watcher.receive_nothing(timeout=0.1)
    assert (await presence_of(watcher, "room:twice"))["connections"] == 2


async def test_a_disconnected_client_leaves_no_entry_behind(clients):
    ws = await clients()
    await subscribed(ws, "room:gone")
    await ws.disconnect()
    assert await topic_presence.registry().read("room:gone", limit=10) == (0, 0, [])


async def test_the_api_lists_the_subscribers_with_the_api_token(clients):
    ws = await clients(token=tokens.issue("alice"))
    await subscribed(ws, "lobby:api")
    response = await AsyncClient().get("/api/presence/lobby:api", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 200
    body = response.json()
    assert (body["topic"], body["connections"], body["users"], body["truncated"]) == ("lobby:api", 1, 1, False)
    assert [member["user"] for member in body["clients"]] == ["alice"]


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/api/presence/lobby:x", None, 401),
        ("/api/presence/lobby:x", "wrong", 401),
        ("/api/presence/public:x", API_TOKEN, 400),  # no presence in the namespace
        ("/api/presence/nope:x", API_TOKEN, 404),
        ("/api/presence/lobby:a%20b", API_TOKEN, 400),
        ("/api/presence/lobby:empty", API_TOKEN, 200),
    ],
)
async def test_the_api_answers_each_refusal_with_its_status(path, token, status):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await AsyncClient().get(path, headers=headers)
    assert response.status_code == status
    if status != 200:
        assert response.json()["error"]


async def test_the_api_is_disabled_without_a_token(settings):
    settings.PINGPONG_BROADCAST_TOKEN = ""
    response = await AsyncClient().get("/api/presence/lobby:x", headers={"Authorization": "Bearer x"})
    assert response.status_code == 403


async def test_the_api_refuses_post_with_405():
    response = await AsyncClient().post("/api/presence/lobby:x")
    assert response.status_code == 405


# --- with Redis: the scripts in process, then two real nodes ------------------------------

# The issue's promise: a SIGKILLed node's entries are gone, and `leave` sent for them, within 15 s.
DEAD_NODE_DEADLINE_SECONDS = 15.0
# The nodes under test live TEST_TTL seconds without a heartbeat, so death is seen in seconds.
TEST_TTL = 3
# The tests that start nodes run them on daphne and on uvicorn.
on_both_servers = pytest.mark.parametrize("server", SERVERS)


@pytest.fixture
async def redis_registries(redis_server, settings):
    """`make()` builds a RedisRegistry on `redis_server` (as another process would have); all closed after the test."""
    settings.REDIS_URL = redis_server.url
    made: list[topic_presence.RedisRegistry] = []

    def make() -> topic_presence.RedisRegistry:
        registry = topic_presence.RedisRegistry(prefix="t", ttl=TEST_TTL)
        registry.task.cancel()  # the test runs heartbeats and sweeps itself
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()
    await presence.stop()
    client = presence._clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


@pytest.mark.redis
async def test_redis_entries_are_counted_per_connection_and_per_user(redis_registries):
    registry = redis_registries()
    for client, user in (("c1", "alice"), ("c2", "alice"), ("c3", None)):
        await registry.add(topic_presence.Entry("lobby:r", client, user))
    connections, users, listed = await registry.read("lobby:r", limit=2)
    assert (connections, users, listed) == (
        3,
        1,
        [{"client": "c1", "user": "alice"}, {"client": "c2", "user": "alice"}],
    )
    await registry.remove(topic_presence.Entry("lobby:r", "c1", "alice"))
    await registry.remove(topic_presence.Entry("lobby:r", "c2", "alice"))
    assert await registry.read("lobby:r", limit=10) == (1, 0, [{"client": "c3", "user": None}])


@pytest.mark.redis
async def test_a_burst_of_changes_is_written_in_one_script_call_per_batch(redis_registries, redis_server):
    registry = redis_registries()
    await registry.heartbeat()  # the scripts are loaded
    admin = Redis.from_url(redis_server.url)
    try:
        before = await command_calls(admin)
        entries = [topic_presence.Entry("lobby:burst", f"c{index}", str(index)) for index in range(2500)]
        await asyncio.gather(*(registry.add(entry) for entry in entries))
        calls = (await command_calls(admin)) - before
    finally:
        await admin.aclose()
    assert (await registry.read("lobby:burst", limit=1))[:2] == (2500, 2500)
    assert calls["evalsha"] + calls["eval"] <= 2500 // topic_presence.BATCH_OPS + 2


@pytest.mark.redis
async def test_a_sweep_removes_an_expired_processs_entries_once_and_returns_them(redis_registries, redis_server):
    dead, alive = redis_registries(), redis_registries()
    await dead.add(topic_presence.Entry("room:s", "gone", "bob"))
    await alive.add(topic_presence.Entry("room:s", "here", "ann"))
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.zadd("t:topicpresence:nodes", {dead.instance: 0})  # its heartbeat stopped long ago
    finally:
        await admin.aclose()
    assert await alive.sweep() == [topic_presence.Entry("room:s", "gone", "bob")]
    assert await alive.sweep() == []  # once
    assert await alive.read("room:s", limit=10) == (1, 1, [{"client": "here", "user": "ann"}])


@pytest.mark.redis
async def test_a_process_swept_while_alive_writes_its_entries_again(redis_registries, redis_server):
    paused, sweeper = redis_registries(), redis_registries()
    await paused.add(topic_presence.Entry("room:z", "c1", "zoe"))
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.zadd("t:topicpresence:nodes", {paused.instance: 0})
    finally:
        await admin.aclose()
    await sweeper.sweep()
    assert (await sweeper.read("room:z", limit=10))[0] == 0
    await paused.heartbeat()  # it wakes up: its instance was gone from Redis
    assert await sweeper.read("room:z", limit=10) == (1, 1, [{"client": "c1", "user": "zoe"}])


async def command_calls(client: Redis) -> Counter:
    """Redis' `INFO commandstats` as {command: calls}; commands run by scripts are counted too."""
    stats = await client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()})


def cluster_env(server: RedisServer, name: str) -> dict[str, str]:
    return {
        "REDIS_URL": server.url,
        "PINGPONG_NODE_ID": name,
        "PINGPONG_PRESENCE_TTL": str(TEST_TTL),
        "PINGPONG_NAMESPACES": json.dumps(NAMESPACES),
        "PINGPONG_TOKEN_SECRET": SECRET,
        "PINGPONG_BROADCAST_TOKEN": API_TOKEN,
    }


@pytest.fixture
def cluster(redis_server, daphne_nodes) -> tuple[DaphneNode, DaphneNode]:
    """node-a and node-b on one real redis-server, with presence that expires after TEST_TTL seconds."""
    return tuple(daphne_nodes(env=cluster_env(redis_server, name)) for name in ("node-a", "node-b"))  # type: ignore[return-value]


async def user_on(node: DaphneNode, user: str, topic: str) -> ClientConnection:
    """A connection of `user` on `node`, subscribed to `topic`."""
    ws = await ws_connect(f"{node.ws}?token={jwt.encode({'sub': user, 'exp': int(time.time()) + 600}, SECRET)}")
    await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
    assert (await next_event(ws))["type"] == "subscribed"
    return ws


async def events_until(ws: ClientConnection, kind: str, count: int, *, within: float) -> list[dict]:
    """The first `count` events of type `kind` within `within` seconds (scaled); other frames are skipped."""
    found: list[dict] = []
    async with asyncio.timeout(scaled(within)):
        while len(found) < count:
            event = json.loads(await ws.recv())
            if event.get("type") == kind:
                found.append(event)
    return found


async def ws_presence(ws: ClientConnection, topic: str) -> dict:
    await ws.send(json.dumps({"type": "presence", "topic": topic}))
    return (await events_until(ws, "presence", 1, within=5))[0]


async def api_presence(node: DaphneNode, topic: str) -> dict:
    status, body = await asyncio.to_thread(
        http_request, f"{node.http}/api/presence/{topic}", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    assert status == 200, body
    return json.loads(body)


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_joins_leaves_and_counts_cross_two_nodes(cluster):
    node_a, node_b = cluster
    ann = await user_on(node_a, "ann", "room:x")
    bob = await user_on(node_b, "bob", "room:x")
    clients = [ann, bob]
    try:
        (join,) = await events_until(ann, "join", 1, within=5)
        assert (join["topic"], join["user"]) == ("room:x", "bob")
        for ws in (ann, bob):
            seen = await ws_presence(ws, "room:x")
            assert (seen["connections"], seen["users"]) == (2, 2)
            assert sorted(member["user"] for member in seen["clients"]) == ["ann", "bob"]
        assert join["client"] in {member["client"] for member in seen["clients"]}
        await bob.close()
        (leave,) = await events_until(ann, "leave", 1, within=5)
        assert (leave["user"], leave["client"]) == ("bob", join["client"])
        assert (await api_presence(node_b, "room:x"))["connections"] == 1
    finally:
        await close_all(clients)


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_killed_nodes_entries_disappear_and_leave_events_arrive_within_15_seconds(cluster):
    node_a, node_b = cluster
    ann = await user_on(node_a, "ann", "room:k")
    doomed = [await user_on(node_b, user, "room:k") for user in ("bob", "cat")]
    try:
        await events_until(ann, "join", 2, within=5)
        assert (await api_presence(node_a, "room:k"))["connections"] == 3
        node_b.kill()  # SIGKILL: its connections never unsubscribe
        leaves = await events_until(ann, "leave", 2, within=DEAD_NODE_DEADLINE_SECONDS)
        assert sorted(event["user"] for event in leaves) == ["bob", "cat"]
        after = await api_presence(node_a, "room:k")
        assert (after["connections"], after["users"], [member["user"] for member in after["clients"]]) == (
            1,
            1,
            ["ann"],
        )
        assert not await events_until_quiet(ann, "leave", seconds=2 * TEST_TTL)  # each leave was sent once
    finally:
        await close_all([ann, *doomed])


async def events_until_quiet(ws: ClientConnection, kind: str, *, seconds: float) -> list[dict]:
    """Every event of type `kind` that arrives within `seconds` (not scaled: a window, not a deadline)."""
    found: list[dict] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                event = json.loads(await ws.recv())
                if event.get("type") == kind:
                    found.append(event)
    except TimeoutError:
        pass
    return found


REFRESH_CONNECTIONS = 300


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_refresh_is_one_round_trip_whatever_the_number_of_connections(redis_server, daphne_nodes):
    """With 300 subscribed connections, a few TTLs of refreshes cost a handful of Redis commands, not 300 each."""
    node = daphne_nodes(env=cluster_env(redis_server, "node-a"))
    clients: list[ClientConnection] = []
    admin = Redis.from_url(redis_server.url)
    try:
        for index in range(REFRESH_CONNECTIONS):
            clients.append(await user_on(node, f"u{index}", "lobby:many"))
        assert (await api_presence(node, "lobby:many"))["connections"] == REFRESH_CONNECTIONS
        before = await command_calls(admin)
        window = 2 * TEST_TTL  # 12 heartbeats (every 0.5 s) and 6 sweeps
        await asyncio.sleep(window)
        calls = (await command_calls(admin)) - before
        calls.pop("info", None)
        assert (await api_presence(node, "lobby:many"))["connections"] == REFRESH_CONNECTIONS  # still alive
    finally:
        await admin.aclose()
        await close_all(clients)
    assert calls["zadd"] < 2 * window / presence.refresh_interval(TEST_TTL) + 5, calls
    assert sum(calls.values()) < REFRESH_CONNECTIONS / 3, calls


@pytest.fixture
async def unreachable_redis(settings):
    """REDIS_URL names a port nothing listens on (the channel layer stays the embedded one)."""
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    yield
    await topic_presence.stop()
    client = presence._clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


async def test_an_entry_redis_cannot_record_is_refused_as_unavailable_and_kept_nowhere(unreachable_redis):
    with pytest.raises(topics.TopicRefused) as refused:
        await topic_presence.join(topics.namespaces()["room"], topic="room:down", client="c1", user="ann")
    assert refused.value.error == protocol.ERROR_UNAVAILABLE
    assert topic_presence.registry().user_of("room:down", "c1") == (False, None)


async def test_a_subscribe_redis_cannot_record_is_answered_unavailable_and_delivers_nothing(unreachable_redis, clients):
    ws = await clients()
    event = await ask(ws, type="subscribe", topic="room:down", id=1)
    assert (event["type"], event["error"], event["id"]) == ("error", protocol.ERROR_UNAVAILABLE, 1)
    await topics.apublish("room:down", "not for you")
    assert await ws.receive_nothing(timeout=0.1)
    assert (await ask(ws, type="presence", topic="room:down"))["error"] == protocol.ERROR_NOT_SUBSCRIBED


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_draining_nodes_connections_leave_at_once_and_leave_nothing_in_redis(cluster, redis_server):
    node_a, node_b = cluster
    ann = await user_on(node_a, "ann", "room:d")
    bob = await user_on(node_b, "bob", "room:d")
    try:
        await events_until(ann, "join", 1, within=5)
        node_b.signal(signal.SIGTERM)  # drain: its clients are closed, each unsubscribes on the way out
        (leave,) = await events_until(ann, "leave", 1, within=10)
        assert leave["user"] == "bob"
        assert node_b.wait(timeout=20) == 0
        assert (await api_presence(node_a, "room:d"))["connections"] == 1
        assert not await events_until_quiet(ann, "leave", seconds=2 * TEST_TTL)  # the sweep finds nothing more
    finally:
        await close_all([ann, bob])
