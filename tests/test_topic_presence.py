"""Topic presence and join/leave events, in process (WebsocketCommunicator, the embedded layer)."""

import json

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient

from pingpong import protocol, tokens, topic_presence, topics
from tests.communicators import connected

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


@pytest.fixture
async def clients():
    """Connected /ws/ clients (`await clients(user=...)` for a token user), disconnected after the test."""
    opened = []

    async def connect(user: str | None = None):
        ws = await connected(f"/ws/?token={tokens.issue(user)}" if user is not None else "/ws/")
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        await ws.disconnect()


async def ask(ws, **request) -> dict:
    await ws.send_to(text_data=json.dumps(request))
    return json.loads(await ws.receive_from())


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
    alice, alice_too, anonymous = await clients("alice"), await clients("alice"), await clients()
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
    subscribers = [await clients(f"user{index}") for index in range(3)]
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
    first, second = await clients("alice"), await clients("bob")
    await subscribed(first, "room:j")
    await subscribed(second, "room:j")
    join = json.loads(await first.receive_from())
    assert {key: join[key] for key in ("type", "topic", "user")} == {"type": "join", "topic": "room:j", "user": "bob"}
    listed = {member["user"]: member["client"] for member in (await presence_of(second, "room:j"))["clients"]}
    assert join["client"] == listed["bob"]
    assert await first.receive_nothing(timeout=0.1)
    assert await second.receive_nothing(timeout=0.1)  # its own join is not echoed


async def test_subscribers_get_a_leave_on_unsubscribe_and_on_disconnect(clients):
    watcher, unsubscribes, disconnects = await clients(), await clients("u"), await clients("d")
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
    ws = await clients("alice")
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
