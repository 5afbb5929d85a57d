"""Topic history and recovery on the embedded layer: offsets, epochs, `since`, the join with live delivery."""

import asyncio
import json
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient

from pingpong import history, protocol, topics
from pingpong.history import LocalHistory, ReadFlights
from pingpong.topics import Namespace
from tests.communicators import connected
from tests.processes import scaled

TOKEN = "history-api-token"


@pytest.fixture(autouse=True)
def namespaces(settings):
    """The default namespaces plus `small` (3 publications kept) and `plain` (no history); a fresh layer."""
    settings.PINGPONG_NAMESPACES = {
        "small": {"subscribe": "anyone", "publish": "anyone", "history_size": 3, "history_ttl": 60},
        "plain": {"subscribe": "anyone", "publish": "anyone"},
    }
    topics.namespaces.cache_clear()
    yield
    topics.namespaces.cache_clear()


@pytest.fixture(autouse=True)
async def fresh_history():
    """Each test starts with no topic history in the embedded layer."""
    get_channel_layer().history = LocalHistory()


async def receive_event(ws, timeout: float = 2) -> dict[str, Any]:
    return json.loads(await ws.receive_from(timeout=scaled(timeout)))


async def subscribe(ws, topic: str, **fields: Any) -> dict[str, Any]:
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": topic, **fields}))
    return await receive_event(ws)


async def publications(ws, count: int) -> list[dict[str, Any]]:
    events = [await receive_event(ws) for _ in range(count)]
    assert all(event["type"] == protocol.EVENT_PUBLICATION for event in events), events
    return events


async def nothing_more(ws) -> None:
    assert await ws.receive_nothing(timeout=scaled(0.2))


# Namespaces


def test_the_default_namespaces_keep_100_publications_for_5_minutes():
    found = topics.namespaces_from(None)
    for name in ("public", "user"):
        assert found[name].history_size >= 100
        assert found[name].history_ttl >= 300


def test_a_namespace_configured_without_history_keeps_none():
    assert not topics.namespaces_from({"room": {"subscribe": "anyone", "publish": "anyone"}})["room"].has_history


@pytest.mark.parametrize(
    "fields",
    [
        {"history_size": 10},
        {"history_ttl": 10},
        {"history_size": -1, "history_ttl": 10},
        {"history_size": 10, "history_ttl": 0},
        {"history_size": "10", "history_ttl": 10},
        {"history_size": 10.5, "history_ttl": 10},
        {"history_size": True, "history_ttl": 10},
        {"history_size": topics.HISTORY_MAX_SIZE + 1, "history_ttl": 10},
        {"history_size": 10, "history_ttl": topics.HISTORY_MAX_TTL + 1},
        {"history": 10},
    ],
)
def test_a_bad_history_configuration_is_refused_at_start(fields):
    with pytest.raises(ImproperlyConfigured):
        topics.namespaces_from({"room": {"subscribe": "anyone", "publish": "anyone", **fields}})


# Offsets and epochs


async def test_publications_carry_offsets_1_2_3_and_one_epoch():
    ws = await connected()
    reply = await subscribe(ws, "public:news")
    assert reply["offset"] == 0 and isinstance(reply["epoch"], str)
    results = [await topics.apublish("public:news", {"n": n}) for n in range(3)]
    events = await publications(ws, 3)
    assert [event["offset"] for event in events] == [1, 2, 3]
    assert {event["epoch"] for event in events} == {reply["epoch"]}
    assert [result["offset"] for result in results] == [1, 2, 3]
    assert [event["data"] for event in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
    await ws.disconnect()


async def test_subscribed_carries_the_topics_current_offset():
    for n in range(4):
        await topics.apublish("public:news", n)
    ws = await connected()
    reply = await subscribe(ws, "public:news")
    assert reply["offset"] == 4
    await ws.disconnect()


async def test_a_topic_without_history_has_no_offsets():
    ws = await connected()
    reply = await subscribe(ws, "plain:x")
    assert "offset" not in reply and "epoch" not in reply
    result = await topics.apublish("plain:x", 1)
    event = await receive_event(ws)
    assert "offset" not in event and "offset" not in result
    await ws.disconnect()


async def test_a_retried_publication_id_keeps_its_offset_and_is_delivered_once():
    ws = await connected()
    await subscribe(ws, "public:news")
    first = await topics.apublish("public:news", "a", publication_id="order-1")
    again = await topics.apublish("public:news", "a", publication_id="order-1")
    after = await topics.apublish("public:news", "b")
    assert first["offset"] == again["offset"] == 1 and after["offset"] == 2
    assert [event["offset"] for event in await publications(ws, 2)] == [1, 2]
    await nothing_more(ws)
    await ws.disconnect()


async def test_flushing_the_layer_changes_the_epoch():
    """FLUSHALL's counterpart in one process: the history is gone, so the epoch changes."""
    before = await topics.apublish("public:news", 1)
    await get_channel_layer().flush()
    after = await topics.apublish("public:news", 2)
    assert after["offset"] == 1 and after["epoch"] != before["epoch"]


async def test_an_expired_topic_starts_a_new_epoch():
    now = [1000.0]
    get_channel_layer().history = LocalHistory(clock=lambda: now[0])
    before = await topics.apublish("small:x", 1)
    now[0] += 61
    after = await topics.apublish("small:x", 2)
    assert after["offset"] == 1 and after["epoch"] != before["epoch"]


# Recovery


async def test_a_client_that_reconnects_with_since_gets_exactly_what_it_missed_then_live():
    ws = await connected()
    await subscribe(ws, "public:news")
    for n in range(3):
        await topics.apublish("public:news", n)
    seen = await publications(ws, 3)
    await ws.disconnect()
    for n in range(3, 6):
        await topics.apublish("public:news", n)
    ws = await connected()
    reply = await subscribe(ws, "public:news", since={"offset": seen[-1]["offset"], "epoch": seen[-1]["epoch"]})
    assert reply["recovered"] is True and reply["offset"] == 6
    assert [event["offset"] for event in await publications(ws, 3)] == [4, 5, 6]
    await topics.apublish("public:news", 6)
    assert [event["offset"] for event in await publications(ws, 1)] == [7]
    await nothing_more(ws)
    await ws.disconnect()


async def test_since_the_current_offset_recovers_nothing_and_says_so():
    result = await topics.apublish("public:news", 0)
    ws = await connected()
    reply = await subscribe(ws, "public:news", since={"offset": 1, "epoch": result["epoch"]})
    assert reply["recovered"] is True and reply["offset"] == 1
    await nothing_more(ws)
    await ws.disconnect()


async def test_a_foreign_epoch_is_not_recovered_and_gets_the_current_position():
    for n in range(2):
        result = await topics.apublish("public:news", n)
    ws = await connected()
    reply = await subscribe(ws, "public:news", since={"offset": 1, "epoch": "not-this-one"})
    assert reply["recovered"] is False
    assert (reply["offset"], reply["epoch"]) == (2, result["epoch"])
    await nothing_more(ws)
    await ws.disconnect()


async def test_history_trimmed_past_history_size_is_not_recovered():
    for n in range(5):
        result = await topics.apublish("small:x", n)
    ws = await connected()
    trimmed = await subscribe(ws, "small:x", since={"offset": 1, "epoch": result["epoch"]})
    assert trimmed["recovered"] is False and trimmed["offset"] == 5
    await ws.send_to(text_data=json.dumps({"type": "unsubscribe", "topic": "small:x"}))
    await receive_event(ws)
    kept = await subscribe(ws, "small:x", since={"offset": 2, "epoch": result["epoch"]})
    assert kept["recovered"] is True
    assert [event["offset"] for event in await publications(ws, 3)] == [3, 4, 5]
    await ws.disconnect()


async def test_more_missed_than_max_recover_is_not_recovered(settings):
    settings.PINGPONG_MAX_RECOVER = 2
    for n in range(3):
        result = await topics.apublish("public:news", n)
    ws = await connected()
    reply = await subscribe(ws, "public:news", since={"offset": 0, "epoch": result["epoch"]})
    assert reply["recovered"] is False and reply["offset"] == 3
    await nothing_more(ws)
    await ws.disconnect()


async def test_a_far_future_offset_is_not_recovered():
    result = await topics.apublish("public:news", 0)
    ws = await connected()
    reply = await subscribe(ws, "public:news", since={"offset": 10**9, "epoch": result["epoch"]})
    assert reply["recovered"] is False and reply["offset"] == 1
    await ws.disconnect()


async def test_since_on_a_topic_without_history_is_answered_not_recovered():
    ws = await connected()
    reply = await subscribe(ws, "plain:x", since={"offset": 0, "epoch": "e"})
    assert reply["type"] == protocol.EVENT_SUBSCRIBED and reply["recovered"] is False
    await ws.disconnect()


@pytest.mark.parametrize(
    "since",
    [
        {"offset": -1, "epoch": "e"},
        {"offset": 2**53, "epoch": "e"},
        {"offset": 10**30, "epoch": "e"},
        {"offset": 1.0, "epoch": "e"},
        {"offset": "1", "epoch": "e"},
        {"offset": True, "epoch": "e"},
        {"offset": 1, "epoch": 7},
        {"offset": 1, "epoch": ""},
        {"offset": 1, "epoch": "e" * (protocol.SINCE_MAX_EPOCH_CHARS + 1)},
        {"offset": 1},
        {"epoch": "e"},
        {"offset": 1, "epoch": "e", "extra": 1},
        [1, "e"],
        "1",
        7,
    ],
)
async def test_a_malformed_since_is_a_bad_request_and_the_connection_stays_open(since):
    ws = await connected()
    error = await subscribe(ws, "public:news", since=since, id=5)
    assert (error["type"], error["error"], error["id"]) == ("error", protocol.ERROR_BAD_REQUEST, 5)
    reply = await subscribe(ws, "public:news")
    assert reply["type"] == protocol.EVENT_SUBSCRIBED
    await ws.disconnect()


async def test_publications_racing_a_recovering_subscribe_arrive_exactly_once_in_order():
    """The join: publications made while the subscribe reads the history are neither lost nor doubled."""
    for n in range(20):
        result = await topics.apublish("public:race", n)
    total = 80

    async def publish_more() -> None:
        for n in range(20, total):
            await topics.apublish("public:race", n)
            await asyncio.sleep(0)  # let the subscribe run between publications

    ws = await connected()
    publisher = asyncio.ensure_future(publish_more())
    await ws.send_to(
        text_data=json.dumps(
            {"type": "subscribe", "topic": "public:race", "since": {"offset": 10, "epoch": result["epoch"]}}
        )
    )
    reply = await receive_event(ws)
    await publisher
    assert reply["recovered"] is True and 20 <= reply["offset"] <= total
    offsets = [event["offset"] for event in await publications(ws, total - 10)]
    assert offsets == list(range(11, total + 1))
    await nothing_more(ws)
    await ws.disconnect()


async def test_many_subscribers_joining_during_a_stream_of_publications_each_get_every_later_one_once():
    total = 60
    clients = [await connected() for _ in range(5)]

    async def publish_all() -> None:
        for n in range(total):
            await topics.apublish("public:race", n)
            await asyncio.sleep(0)

    publisher = asyncio.ensure_future(publish_all())
    replies = []
    for ws in clients:
        replies.append(await subscribe(ws, "public:race"))
    await publisher
    for ws, reply in zip(clients, replies, strict=True):
        expected = list(range(reply["offset"] + 1, total + 1))
        assert [event["offset"] for event in await publications(ws, len(expected))] == expected
        await nothing_more(ws)
        await ws.disconnect()


async def test_a_subscriber_whose_queue_overflowed_gets_the_missing_publications_from_the_history():
    """The embedded layer skips a member whose queue is full; the offsets show the gap and the history fills it."""
    ws = await connected()
    await subscribe(ws, "public:burst")
    capacity = get_channel_layer().capacity
    total = capacity + 50
    for n in range(total):  # no await yields here: the consumer cannot read meanwhile
        await topics.apublish("public:burst", n)
    queued = [event["offset"] for event in await publications(ws, capacity + 1)]  # one was handed over at once
    assert queued == list(range(1, capacity + 2))
    await nothing_more(ws)
    await topics.apublish("public:burst", total)
    offsets = [event["offset"] for event in await publications(ws, total - capacity)]
    assert offsets == list(range(capacity + 2, total + 2))
    await nothing_more(ws)
    await ws.disconnect()


# Concurrent identical reads


async def test_concurrent_identical_reads_make_one_call():
    flights = ReadFlights()
    gate = asyncio.Event()
    calls = []

    async def read() -> str:
        calls.append(1)
        await gate.wait()
        return "the history"

    joined_at = history.next_sequence()
    flights_started = [asyncio.ensure_future(flights.read("k", joined_at=joined_at, call=read)) for _ in range(3)]
    await asyncio.sleep(0)
    later = asyncio.ensure_future(flights.read("k", joined_at=joined_at, call=read))
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*flights_started, later) == ["the history"] * 4
    assert len(calls) == 1 and flights.calls == 1


async def test_callers_that_went_live_after_a_read_started_share_the_next_read_instead():
    """A read older than a subscription may miss what it did not see live; the latecomers share one newer read."""
    flights = ReadFlights()
    gates = [asyncio.Event(), asyncio.Event()]
    snapshots = []

    async def read() -> int:
        snapshot = len(snapshots)
        snapshots.append(snapshot)
        await gates[snapshot].wait()
        return snapshot

    first = asyncio.ensure_future(flights.read("k", joined_at=history.next_sequence(), call=read))
    await asyncio.sleep(0)
    late_joined_at = history.next_sequence()  # went live after the first read started
    late = [asyncio.ensure_future(flights.read("k", joined_at=late_joined_at, call=read)) for _ in range(5)]
    await asyncio.sleep(0)
    assert len(snapshots) == 1  # the latecomers wait for the first read to end
    gates[0].set()
    assert await first == 0
    for _ in range(10):
        await asyncio.sleep(0)
    gates[1].set()
    assert await asyncio.gather(*late) == [1] * 5
    assert flights.calls == 2


# The HTTP API


class Api:
    """GET requests to the HTTP API with the bearer token."""

    def __init__(self) -> None:
        self.client = AsyncClient()

    async def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return await self.client.get(path, query or {}, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture
def api(settings):
    settings.PINGPONG_BROADCAST_TOKEN = TOKEN
    return Api()


async def test_the_history_api_returns_the_publications_after_since(api):
    for n in range(4):
        result = await topics.apublish("public:news", {"n": n})
    response = await api.get("/api/history/public:news", {"since": "1", "limit": "2"})
    assert response.status_code == 200
    body = json.loads(response.content)
    assert (body["offset"], body["epoch"], body["since"], body["complete"]) == (4, result["epoch"], 1, True)
    assert [event["offset"] for event in body["publications"]] == [2, 3]
    assert body["publications"][0]["data"] == {"n": 1}


async def test_the_history_api_says_incomplete_when_publications_were_trimmed(api):
    for n in range(5):
        await topics.apublish("small:x", n)
    body = json.loads((await api.get("/api/history/small:x", {"since": "0"})).content)
    assert body["complete"] is False
    assert [event["offset"] for event in body["publications"]] == [3, 4, 5]


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/api/history/plain:x", {}, 404),
        ("/api/history/nowhere:x", {}, 404),
        ("/api/history/public:news", {"since": "-1"}, 400),
        ("/api/history/public:news", {"since": "x"}, 400),
        ("/api/history/public:news", {"limit": "0"}, 400),
        ("/api/history/public:news", {"limit": "100000"}, 400),
    ],
)
async def test_the_history_api_refuses_bad_requests(api, path, query, status):
    assert (await api.get(path, query)).status_code == status


async def test_the_history_api_needs_the_token(settings):
    settings.PINGPONG_BROADCAST_TOKEN = TOKEN
    assert (await AsyncClient().get("/api/history/public:news")).status_code == 401
    settings.PINGPONG_BROADCAST_TOKEN = ""
    assert (await AsyncClient().get("/api/history/public:news")).status_code == 403


def test_a_namespace_dataclass_defaults_to_no_history():
    assert not Namespace(name="x").has_history


async def test_the_history_api_with_an_old_epoch_is_incomplete_and_empty(api):
    await topics.apublish("public:news", 1)
    body = json.loads((await api.get("/api/history/public:news", {"since": "0", "epoch": "old"})).content)
    assert (body["complete"], body["publications"], body["offset"]) == (False, [], 1)


async def test_subscribing_again_answers_the_last_position_this_connection_got():
    ws = await connected()
    await subscribe(ws, "public:news")
    result = await topics.apublish("public:news", 1)
    await publications(ws, 1)
    again = await subscribe(ws, "public:news")
    assert (again["type"], again["offset"], again["epoch"]) == (protocol.EVENT_SUBSCRIBED, 1, result["epoch"])
    await ws.disconnect()


async def test_subscribing_again_with_since_recovers_on_the_same_connection():
    ws = await connected()
    await subscribe(ws, "public:news")
    for n in range(3):
        result = await topics.apublish("public:news", n)
    await publications(ws, 3)
    again = await subscribe(ws, "public:news", since={"offset": 1, "epoch": result["epoch"]})
    assert again["recovered"] is True
    assert [event["offset"] for event in await publications(ws, 2)] == [2, 3]
    await topics.apublish("public:news", 3)
    assert [event["offset"] for event in await publications(ws, 1)] == [4]
    await nothing_more(ws)
    await ws.disconnect()


# The join buffer's bound


def test_the_join_buffer_keeps_at_most_its_bound_and_says_it_overflowed():
    from pingpong.consumers import JoinBuffer

    buffer = JoinBuffer()
    for index in range(protocol.JOIN_BUFFER_MAX + 5):
        buffer.add({"offset": index})
    assert len(buffer.messages) == protocol.JOIN_BUFFER_MAX
    assert buffer.overflowed


async def test_a_subscribe_whose_join_buffer_overflows_is_answered_unavailable_and_the_connection_stays(monkeypatch):
    """More live publications than the buffer holds arrive while the history is read: the subscribe fails whole."""
    monkeypatch.setattr(protocol, "JOIN_BUFFER_MAX", 3)
    reading, release = asyncio.Event(), asyncio.Event()
    real_read = history.read

    async def slow_read(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        await release.wait()
        return await real_read(*args, **kwargs)

    monkeypatch.setattr(history, "read", slow_read)
    ws = await connected()
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": "public:flood", "id": 1}))
    await asyncio.wait_for(reading.wait(), scaled(2))
    for index in range(protocol.JOIN_BUFFER_MAX + 1):  # live, while the join waits for the history
        await topics.apublish("public:flood", index)
    await asyncio.sleep(0.05)  # the layer task buffers them
    release.set()
    refused = await receive_event(ws)
    assert (refused["type"], refused["error"], refused["id"]) == ("error", protocol.ERROR_UNAVAILABLE, 1)
    await ws.send_to(text_data="ping")
    assert await ws.receive_from() == "pong!"
    await topics.apublish("public:flood", "after")
    await nothing_more(ws)  # not subscribed: the failed join left the group
    await ws.disconnect()


async def test_a_join_that_cannot_catch_up_with_live_publications_is_closed_4100(monkeypatch):
    """Publications keep coming faster than the buffered ones are sent: slow_consumer, close 4100, never a gap."""
    from pingpong.consumers import PingPongConsumer

    monkeypatch.setattr(protocol, "JOIN_BUFFER_MAX", 3)
    reading, release = asyncio.Event(), asyncio.Event()
    real_read, real_deliver = history.read, PingPongConsumer.deliver_publication
    flooded = []

    async def slow_read(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        await release.wait()
        return await real_read(*args, **kwargs)

    async def deliver_then_flood(self: PingPongConsumer, topic: str, message: dict[str, Any]) -> None:
        if not flooded:  # while the first buffered one is sent, more than the buffer holds arrive
            flooded.append(True)
            for index in range(protocol.JOIN_BUFFER_MAX + 2):
                await topics.apublish("public:catchup", f"late {index}")
            await asyncio.sleep(0.05)  # the layer task buffers them
        await real_deliver(self, topic, message)

    monkeypatch.setattr(history, "read", slow_read)
    monkeypatch.setattr(PingPongConsumer, "deliver_publication", deliver_then_flood)
    ws = await connected()
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": "public:catchup"}))
    await asyncio.wait_for(reading.wait(), scaled(2))
    await topics.apublish("public:catchup", "early")
    await asyncio.sleep(0.05)
    release.set()
    assert (await receive_event(ws))["type"] == protocol.EVENT_SUBSCRIBED
    events = []
    while (event := await receive_event(ws))["type"] == protocol.EVENT_PUBLICATION:
        events.append(event)
    assert [event["offset"] for event in events] == list(range(1, len(events) + 1))  # in order, no gap
    assert (event["error"], (await ws.receive_output())["code"]) == (protocol.ERROR_SLOW_CONSUMER, 4100)
