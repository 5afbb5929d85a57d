"""Topic history on a real redis-server: offsets from concurrent processes, recovery through real nodes,
and the epoch changing when Redis loses the history (restart, FLUSHALL)."""

import asyncio
import json
import sys
from typing import Any

import pytest
from channels.layers import get_channel_layer
from redis import asyncio as aioredis

from pingpong import history, protocol, topics
from pingpong.layer_calls import ChannelLayerUnavailable
from tests.processes import ROOT, SERVERS, http_request, node_env, scaled, wait_until
from tests.wsclient import next_event, ws_connect

pytestmark = pytest.mark.redis

# The tests that start nodes run them on daphne and on uvicorn.
on_both_servers = pytest.mark.parametrize("server", SERVERS)

TOKEN = "history-redis-token"
SMALL = {"small": {"subscribe": "anyone", "publish": "anyone", "history_size": 3, "history_ttl": 60}}


@pytest.fixture
def namespaces(settings):
    """This process knows the `small` namespace the nodes are started with."""
    settings.PINGPONG_NAMESPACES = SMALL
    topics.namespaces.cache_clear()
    yield
    topics.namespaces.cache_clear()


@pytest.fixture
async def redis_layer(settings, redis_server, namespaces):
    """This process publishes through pingpong's Redis layer on the test's redis-server, as the nodes do."""
    settings.PINGPONG_LAYER_TIMEOUT = 10
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "pingpong.layers.PingpongPubSubChannelLayer",
            "CONFIG": {"hosts": [redis_server.url], "prefix": "pingpong"},
        }
    }
    layer = get_channel_layer()
    yield layer
    await layer.flush()


@pytest.fixture
def two_nodes(redis_server, daphne_nodes):
    # A generous layer deadline: these tests prove ordering and recovery, not speed, on a shared machine.
    env = {
        "PINGPONG_LAYER_TIMEOUT": "10",
        "REDIS_URL": redis_server.url,
        "PINGPONG_NAMESPACES": json.dumps(SMALL),
        "PINGPONG_BROADCAST_TOKEN": TOKEN,
    }
    return daphne_nodes(env), daphne_nodes(env)


async def subscribe(ws, topic: str, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "topic": topic, **fields}))
    return await next_event(ws)


async def offsets_of(ws, count: int) -> list[int]:
    events = [await next_event(ws) for _ in range(count)]
    assert all(event["type"] == protocol.EVENT_PUBLICATION for event in events), events
    return [event["offset"] for event in events]


async def nothing_more(ws) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), scaled(0.3))


async def nodes_ready(nodes) -> None:
    await asyncio.to_thread(
        wait_until,
        lambda: all(http_request(f"{node.http}/readyz")[0] == 200 for node in nodes),
        timeout=10,
        what="the nodes ready",
    )


async def test_the_published_message_is_in_the_layers_wire_format_with_its_offset(redis_layer):
    """The script builds the group message itself: a plain group member of the layer decodes it."""
    channel = await redis_layer.new_channel()
    await redis_layer.group_add(topics.group_for("public:wire"), channel)
    result = await topics.apublish("public:wire", {"x": [1, "é"]})
    message = await asyncio.wait_for(redis_layer.receive(channel), scaled(5))
    assert message["type"] == protocol.PUBLICATION_MESSAGE and message["topic"] == "public:wire"
    assert (message["offset"], message["epoch"]) == (1, result["epoch"]) == (result["offset"], result["epoch"])
    event = json.loads(message["event"])
    assert (event["offset"], event["epoch"], event["data"]) == (1, result["epoch"], {"x": [1, "é"]})


@pytest.mark.slow
@on_both_servers
async def test_publications_from_two_processes_at_once_get_offsets_without_gaps(redis_server, two_nodes, redis_layer):
    node = two_nodes[0]
    ws = await ws_connect(node.ws)
    assert (await subscribe(ws, "public:count"))["offset"] == 0
    env = node_env({"REDIS_URL": redis_server.url})
    publishers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.history_publisher",
            "public:count",
            "4",
            "25",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    async with asyncio.timeout(scaled(60)):
        outputs = [(await publisher.communicate())[0].decode() for publisher in publishers]
    assert [publisher.returncode for publisher in publishers] == [0, 0]
    results = [json.loads(line) for stdout in outputs for line in stdout.splitlines()]
    assert sorted(result["offset"] for result in results) == list(range(1, 201))
    assert len({result["epoch"] for result in results}) == 1
    assert await offsets_of(ws, 200) == list(range(1, 201))
    await nothing_more(ws)
    await ws.close()


@pytest.mark.slow
@on_both_servers
async def test_a_client_recovers_what_it_missed_while_disconnected_on_the_other_node(two_nodes, redis_layer):
    first, second = two_nodes
    ws = await ws_connect(first.ws)
    await subscribe(ws, "public:news")
    for n in range(3):
        result = await topics.apublish("public:news", n)
    assert await offsets_of(ws, 3) == [1, 2, 3]
    await ws.close()
    for n in range(3, 6):
        await topics.apublish("public:news", n)
    ws = await ws_connect(second.ws)
    reply = await subscribe(ws, "public:news", since={"offset": 3, "epoch": result["epoch"]})
    assert (reply["recovered"], reply["offset"], reply["epoch"]) == (True, 6, result["epoch"])
    assert await offsets_of(ws, 3) == [4, 5, 6]
    await topics.apublish("public:news", 6)
    assert await offsets_of(ws, 1) == [7]
    await nothing_more(ws)
    await ws.close()


@pytest.mark.slow
@on_both_servers
async def test_publications_racing_a_recovering_subscribe_arrive_exactly_once_in_order(two_nodes, redis_layer):
    for n in range(10):
        result = await topics.apublish("public:race", n)
    # `public` keeps 100: with at most 100 published, offset 5 is still kept whenever the read comes
    # (at 150, a read after the 105th was rightly answered recovered: false on a busy machine).
    total = 100

    async def publish_more() -> None:
        for n in range(10, total):
            await topics.apublish("public:race", n)

    ws = await ws_connect(two_nodes[0].ws)
    try:
        publisher = asyncio.ensure_future(publish_more())
        reply = await subscribe(ws, "public:race", since={"offset": 5, "epoch": result["epoch"]})
        await publisher
        assert reply["recovered"] is True
        assert await offsets_of(ws, total - 5) == list(range(6, total + 1))
        await nothing_more(ws)
    finally:
        await ws.close()


@pytest.mark.parametrize("loss", ["restart", "flushall"])
@pytest.mark.slow
@on_both_servers
async def test_when_redis_loses_the_history_the_epoch_changes_and_recovery_says_so(
    loss, redis_server, two_nodes, redis_layer
):
    for n in range(3):
        before = await topics.apublish("public:news", n)
    if loss == "restart":
        redis_server.kill()
        redis_server.start()  # the same port, nothing kept
        await nodes_ready(two_nodes)
        await redis_layer.flush()  # this process's layer reconnects on its next call
    else:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushall()
        await client.aclose()
    ws = await ws_connect(two_nodes[1].ws)
    reply = await subscribe(ws, "public:news", since={"offset": 3, "epoch": before["epoch"]})
    assert reply["recovered"] is False
    assert reply["epoch"] != before["epoch"] and reply["offset"] == 0
    after = await topics.apublish("public:news", "again")
    assert (after["offset"], after["epoch"]) == (1, reply["epoch"])
    event = await next_event(ws)
    assert (event["offset"], event["epoch"]) == (1, reply["epoch"])
    await ws.close()


@pytest.mark.slow
@on_both_servers
async def test_history_trimmed_past_history_size_is_not_recovered(two_nodes, redis_layer):
    for n in range(5):
        result = await topics.apublish("small:x", n)
    ws = await ws_connect(two_nodes[0].ws)
    trimmed = await subscribe(ws, "small:x", since={"offset": 1, "epoch": result["epoch"]})
    assert (trimmed["recovered"], trimmed["offset"]) == (False, 5)
    await ws.send(json.dumps({"type": "unsubscribe", "topic": "small:x"}))
    await next_event(ws)
    kept = await subscribe(ws, "small:x", since={"offset": 2, "epoch": result["epoch"]})
    assert kept["recovered"] is True
    assert await offsets_of(ws, 3) == [3, 4, 5]
    await ws.close()


@pytest.mark.slow
@on_both_servers
async def test_a_retried_publication_id_gets_its_first_offset_and_is_not_published_again(two_nodes, redis_layer):
    ws = await ws_connect(two_nodes[0].ws)
    await subscribe(ws, "public:orders")
    first = await topics.apublish("public:orders", "paid", publication_id="order-7")
    again = await topics.apublish("public:orders", "paid", publication_id="order-7")
    assert (first["offset"], again["offset"]) == (1, 1)
    assert await offsets_of(ws, 1) == [1]
    await nothing_more(ws)
    await ws.close()


async def test_concurrent_identical_recoveries_make_one_redis_read(redis_layer):
    for n in range(5):
        result = await topics.apublish("public:crowd", n)
    flights = history._redis(redis_layer).flights
    calls_before = flights.calls
    joined_at = history.next_sequence()
    reads = await asyncio.gather(
        *(
            history.read(
                redis_layer,
                "public:crowd",
                topics.group_for("public:crowd"),
                ttl=300,
                since=2,
                want_epoch=result["epoch"],
                limit=100,
                joined_at=joined_at,
            )
            for _ in range(50)
        )
    )
    assert flights.calls - calls_before == 1
    assert all(read.recovered and read.first == 3 and len(read.events) == 3 for read in reads)


@pytest.mark.slow
@on_both_servers
async def test_the_history_api_reads_redis(two_nodes, redis_layer):
    for n in range(4):
        await topics.apublish("public:api", n)
    status, body = await asyncio.to_thread(
        http_request,
        f"{two_nodes[0].http}/api/history/public:api?since=1",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    answer = json.loads(body)
    assert (answer["offset"], answer["complete"]) == (4, True)
    assert [event["offset"] for event in answer["publications"]] == [2, 3, 4]


async def test_a_script_redis_no_longer_has_is_sent_again_in_full(redis_server, redis_layer):
    """EVALSHA's fallback: after SCRIPT FLUSH (or a Redis restart) the publication still goes out, once."""
    first = await topics.apublish("public:scripts", 1)
    client = aioredis.Redis.from_url(redis_server.url)
    await client.script_flush()
    await client.aclose()
    second = await topics.apublish("public:scripts", 2)
    assert (second["offset"], second["epoch"]) == (2, first["epoch"])


@pytest.mark.slow
@on_both_servers
async def test_a_publication_while_redis_is_down_fails_and_its_retry_lands_in_a_new_epoch(
    redis_server, two_nodes, redis_layer
):
    """Never a silent success: the publish raises (503 or 504 at the API); retried with its id, it is published."""
    before = await topics.apublish("public:down", 1)
    redis_server.kill()
    with pytest.raises(ChannelLayerUnavailable):
        await topics.apublish("public:down", 2, publication_id="retry-me")
    redis_server.start()
    await nodes_ready(two_nodes)
    await redis_layer.flush()
    retried = await topics.apublish("public:down", 2, publication_id="retry-me")
    assert retried["epoch"] != before["epoch"] and retried["offset"] == 1


@pytest.mark.slow
@on_both_servers
async def test_many_clients_recovering_at_once_during_publications_each_get_the_exact_sequence(two_nodes, redis_layer):
    """Merged reads are shared only by subscriptions live before the read: no client is left with a gap."""
    for n in range(10):
        result = await topics.apublish("public:crowd", n)
    # `public` keeps 100: with at most 100 published, offset 5 is still kept whenever a read comes
    # (at 120, a read after the 105th was rightly answered recovered: false on a slow CI machine).
    total = 100
    clients = [await ws_connect(two_nodes[n % 2].ws) for n in range(20)]

    async def publish_more() -> None:
        for n in range(10, total):
            await topics.apublish("public:crowd", n)

    publisher = asyncio.ensure_future(publish_more())
    since = {"offset": 5, "epoch": result["epoch"]}
    replies = await asyncio.gather(*(subscribe(ws, "public:crowd", since=since) for ws in clients))
    await publisher
    assert all(reply["recovered"] for reply in replies)
    for ws in clients:
        assert await offsets_of(ws, total - 5) == list(range(6, total + 1))
    await nothing_more(clients[0])
    for ws in clients:
        await ws.close()
    reads = [await asyncio.to_thread(node.metric, "pingpong_history_reads_total") for node in two_nodes]
    assert all(1 <= count <= 10 for count in reads)  # one per client at most; merged ones count once
