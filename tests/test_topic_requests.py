"""Topic and token requests on /ws/, through WebsocketCommunicator and the embedded layer."""

import asyncio
import json
import time

import pytest
from channels.layers import get_channel_layer

from pingpong import protocol, tokens, topics
from tests import authorize_hooks
from tests.communicators import ask, communicator, connected

SECRET = "topic-test-secret-" + "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def token_secret(settings):
    settings.PINGPONG_TOKEN_SECRET = SECRET
    yield
    topics.namespaces.cache_clear()
    topics.authorize_hook.cache_clear()


@pytest.fixture
def configure(settings):
    """Set pingpong settings that are read once per process (namespaces, the hook)."""

    def apply(**values):
        for name, value in values.items():
            setattr(settings, name, value)
        topics.namespaces.cache_clear()
        topics.authorize_hook.cache_clear()

    return apply


async def closed_with(ws, code: int) -> bool:
    return (await ws.receive_output())["code"] == code


async def test_anyone_subscribes_to_a_public_topic_and_receives_its_publications(clients):
    ws = await clients()
    reply = await ask(ws, type="subscribe", topic="public:news", id=7)
    reply.pop("offset"), reply.pop("epoch")  # public keeps history (tests/test_history.py)
    assert reply == {"type": "subscribed", "topic": "public:news", "id": 7}
    await topics.apublish("public:news", {"headline": "hi", "n": [1, 2]})
    event = json.loads(await ws.receive_from())
    assert event["type"] == "publication"
    assert event["topic"] == "public:news"
    assert event["data"] == {"headline": "hi", "n": [1, 2]}
    assert event["id"] and isinstance(event["sent_at"], float)


async def test_subscribing_twice_is_answered_twice_and_delivers_once(clients):
    ws = await clients()
    for request_id in (1, 2):
        assert (await ask(ws, type="subscribe", topic="public:a", id=request_id))["id"] == request_id
    await topics.apublish("public:a", 1)
    await topics.apublish("public:a", 2)
    assert [json.loads(await ws.receive_from())["data"] for _ in range(2)] == [1, 2]
    assert await ws.receive_nothing(timeout=0.1)


async def test_after_unsubscribe_no_publication_arrives(clients):
    ws = await clients()
    await ask(ws, type="subscribe", topic="public:a")
    await ask(ws, type="subscribe", topic="public:control")
    assert await ask(ws, type="unsubscribe", topic="public:a", id="u") == {
        "type": "unsubscribed",
        "topic": "public:a",
        "id": "u",
    }
    await topics.apublish("public:a", "gone")
    await topics.apublish("public:control", "here")
    assert json.loads(await ws.receive_from())["data"] == "here"  # same channel, in order: "gone" never came


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"type": "subscribe", "topic": "public:" + "x" * 200}, protocol.ERROR_BAD_TOPIC),
        ({"type": "subscribe", "topic": "public:a b"}, protocol.ERROR_BAD_TOPIC),
        ({"type": "subscribe"}, protocol.ERROR_BAD_TOPIC),
        ({"type": "subscribe", "topic": ["public:x"]}, protocol.ERROR_BAD_TOPIC),
        ({"type": "subscribe", "topic": "private:x"}, protocol.ERROR_UNKNOWN_NAMESPACE),
        ({"type": "subscribe", "topic": "user:1"}, protocol.ERROR_FORBIDDEN),
        ({"type": "unsubscribe", "topic": "public:never"}, protocol.ERROR_NOT_SUBSCRIBED),
        ({"type": "unsubscribe", "topic": 5}, protocol.ERROR_NOT_SUBSCRIBED),
        ({"type": "publish", "topic": "public:x", "data": 1}, protocol.ERROR_FORBIDDEN),
        ({"type": "publish", "topic": "public:x"}, protocol.ERROR_BAD_REQUEST),
        ({"type": "publish", "topic": "nope:x", "data": 1}, protocol.ERROR_UNKNOWN_NAMESPACE),
        ({"type": "refresh", "token": "x"}, protocol.ERROR_BAD_REQUEST),
    ],
    ids=lambda value: json.dumps(value)[:60] if isinstance(value, dict) else value,
)
async def test_a_refused_request_gets_its_error_with_the_id_and_the_connection_stays_open(clients, request_, error):
    ws = await clients()
    event = await ask(ws, **request_, id="r1")
    assert (event["type"], event["error"], event["id"]) == ("error", error, "r1")
    assert event["detail"]
    await ws.send_to(text_data="ping")
    assert await ws.receive_from() == "pong!"


async def test_a_token_in_the_query_string_may_subscribe_to_its_own_user_topic_only(clients):
    ws = await clients(token=tokens.issue("alice"))
    assert (await ask(ws, type="subscribe", topic="user:alice"))["type"] == "subscribed"
    assert (await ask(ws, type="subscribe", topic="user:bob"))["error"] == protocol.ERROR_FORBIDDEN


async def test_a_tokens_topics_claim_adds_topics_beyond_the_namespace_rule(clients):
    ws = await clients(token=tokens.issue("alice", topics=["user:shared"]))
    assert (await ask(ws, type="subscribe", topic="user:shared"))["type"] == "subscribed"


async def test_publications_to_a_user_reach_only_that_users_connections(clients):
    alice, alice_too, bob = (
        await clients(token=tokens.issue("alice")),
        await clients(),
        await clients(token=tokens.issue("bob")),
    )
    await ask(alice_too, type="auth", token=tokens.issue("alice"))
    for ws, user in ((alice, "alice"), (alice_too, "alice"), (bob, "bob")):
        await ask(ws, type="subscribe", topic=f"user:{user}")
    await topics.apublish("user:alice", "for alice")
    await topics.apublish("user:bob", "for bob")
    assert json.loads(await alice.receive_from())["data"] == "for alice"
    assert json.loads(await alice_too.receive_from())["data"] == "for alice"
    assert json.loads(await bob.receive_from())["data"] == "for bob"
    for ws in (alice, alice_too, bob):
        assert await ws.receive_nothing(timeout=0.1)


async def test_auth_turns_an_anonymous_connection_into_the_tokens_user(clients):
    ws = await clients()
    token = tokens.issue("carol", ttl=600)
    event = await ask(ws, type="auth", token=token, id=3)
    assert (event["type"], event["user"], event["id"]) == ("authenticated", "carol", 3)
    assert event["expires_at"] == tokens.verify(token).expires_at
    assert (await ask(ws, type="subscribe", topic="user:carol"))["type"] == "subscribed"
    assert (await ask(ws, type="auth", token=token))["error"] == protocol.ERROR_BAD_REQUEST


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "x" * (protocol.TOKEN_MAX_CHARS + 10),
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIiwiZXhwIjo5OTk5OTk5OTk5fQ.",
    ],
    ids=["garbage", "three-parts", "oversized", "alg-none"],
)
async def test_a_bad_token_at_connect_is_answered_unauthorized_then_4401(token):
    ws = communicator(f"/ws/?token={token}")
    accepted, _ = await ws.connect()
    assert accepted  # accepted only to say why: a client tells this apart from a network error
    assert json.loads(await ws.receive_from())["error"] == protocol.ERROR_UNAUTHORIZED
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_a_wrongly_signed_auth_request_is_answered_unauthorized_then_4401(clients, settings):
    ws = await clients()
    settings.PINGPONG_TOKEN_SECRET = "another-secret-" + "x" * 40
    forged = tokens.issue("alice")
    settings.PINGPONG_TOKEN_SECRET = SECRET
    assert (await ask(ws, type="auth", token=forged))["error"] == protocol.ERROR_UNAUTHORIZED
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_an_expired_token_is_refused_at_connect():
    ws = communicator(f"/ws/?token={tokens.issue('alice', ttl=-10)}")
    await ws.connect()
    event = json.loads(await ws.receive_from())
    assert event["error"] == protocol.ERROR_UNAUTHORIZED and "expired" in event["detail"]
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_without_a_secret_every_token_is_refused(settings):
    token = tokens.issue("alice")
    settings.PINGPONG_TOKEN_SECRET = ""
    ws = communicator(f"/ws/?token={token}")
    await ws.connect()
    assert "PINGPONG_TOKEN_SECRET" in json.loads(await ws.receive_from())["detail"]
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_a_token_about_to_expire_is_warned_then_closed_4401_at_exp(clients):
    token = tokens.issue("alice", ttl=2)
    ws = await clients(token=token)
    warning = json.loads(await ws.receive_from(timeout=5))
    assert warning == {
        "type": "token_expiring",
        "expires_at": tokens.verify(token).expires_at,
        "detail": warning["detail"],
    }
    expired = json.loads(await ws.receive_from(timeout=5))
    assert (expired["error"], expired["detail"]) == (protocol.ERROR_UNAUTHORIZED, "The token has expired.")
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_a_refresh_before_exp_keeps_the_connection_and_its_subscriptions(clients):
    old = tokens.issue("alice", ttl=2)
    ws = await clients(token=old)
    await ask(ws, type="subscribe", topic="user:alice")
    assert json.loads(await ws.receive_from(timeout=5))["type"] == "token_expiring"
    fresh = tokens.issue("alice", ttl=600)
    assert (await ask(ws, type="refresh", token=fresh))["expires_at"] == tokens.verify(fresh).expires_at
    await asyncio.sleep(max(0.0, tokens.verify(old).expires_at - time.time()) + 0.5)  # past the old exp
    await topics.apublish("user:alice", "still here")
    assert json.loads(await ws.receive_from())["data"] == "still here"


async def test_a_refresh_for_another_user_closes_4401(clients):
    ws = await clients(token=tokens.issue("alice"))
    assert (await ask(ws, type="refresh", token=tokens.issue("mallory")))["error"] == protocol.ERROR_UNAUTHORIZED
    assert await closed_with(ws, protocol.CloseCode.UNAUTHORIZED)


async def test_a_namespace_that_lets_users_publish_delivers_to_every_subscriber(clients, configure):
    configure(PINGPONG_NAMESPACES={"chat": {"subscribe": "anyone", "publish": "authenticated"}})
    reader, writer = await clients(), await clients(token=tokens.issue("alice"))
    await ask(reader, type="subscribe", topic="chat:lobby")
    assert (await ask(reader, type="publish", topic="chat:lobby", data=1))["error"] == protocol.ERROR_FORBIDDEN
    assert await ask(writer, type="publish", topic="chat:lobby", data={"text": "hello"}, id=9) == {
        "type": "published",
        "topic": "chat:lobby",
        "id": 9,
    }
    assert json.loads(await reader.receive_from())["data"] == {"text": "hello"}


async def test_publication_data_over_the_limit_is_a_bad_request(clients, configure, settings):
    configure(PINGPONG_NAMESPACES={"chat": {"subscribe": "anyone", "publish": "anyone"}})
    settings.PINGPONG_MAX_BROADCAST_BYTES = 100
    ws = await clients()
    assert (await ask(ws, type="publish", topic="chat:x", data="y" * 200))["error"] == protocol.ERROR_BAD_REQUEST


async def test_the_subscription_cap_holds(clients, settings):
    settings.PINGPONG_MAX_SUBSCRIPTIONS = 3
    ws = await clients()
    for index in range(3):
        assert (await ask(ws, type="subscribe", topic=f"public:{index}"))["type"] == "subscribed"
    assert (await ask(ws, type="subscribe", topic="public:3"))["error"] == protocol.ERROR_TOO_MANY_SUBSCRIPTIONS
    await ask(ws, type="unsubscribe", topic="public:0")
    assert (await ask(ws, type="subscribe", topic="public:3"))["type"] == "subscribed"


@pytest.mark.parametrize("hook", ["refuse_secret", "refuse_secret_async"])
async def test_the_authorize_hook_is_asked_after_the_namespace_rules_and_may_refuse(clients, configure, hook):
    configure(PINGPONG_AUTHORIZE=f"tests.authorize_hooks.{hook}")
    authorize_hooks.ASKED.clear()
    ws = await clients(token=tokens.issue("alice"))
    assert (await ask(ws, type="subscribe", topic="public:open"))["type"] == "subscribed"
    assert (await ask(ws, type="subscribe", topic=authorize_hooks.REFUSED_TOPIC))["error"] == protocol.ERROR_FORBIDDEN
    assert (await ask(ws, type="subscribe", topic="user:bob"))["error"] == protocol.ERROR_FORBIDDEN
    # Asked for what the namespace allowed, never for user:bob, which its rule refused first.
    assert authorize_hooks.ASKED == [
        ("alice", "subscribe", "public:open"),
        ("alice", "subscribe", authorize_hooks.REFUSED_TOPIC),
    ]


async def test_a_retried_publication_id_is_delivered_once(clients):
    ws = await clients()
    await ask(ws, type="subscribe", topic="public:r")
    await topics.apublish("public:r", "first", publication_id="p-1")
    await topics.apublish("public:r", "retry", publication_id="p-1")
    await topics.apublish("public:r", "next", publication_id="p-2")
    assert [json.loads(await ws.receive_from())["data"] for _ in range(2)] == ["first", "next"]


async def test_a_closed_connection_leaves_every_topic_group():
    layer = get_channel_layer()
    ws = await connected()
    for index in range(3):
        await ask(ws, type="subscribe", topic=f"public:leave{index}")
    assert all(layer.groups.get(topics.group_for(f"public:leave{index}")) for index in range(3))
    await ws.disconnect()
    assert not any(layer.groups.get(topics.group_for(f"public:leave{index}")) for index in range(3))
