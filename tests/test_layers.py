"""pingpong.layers.PingpongPubSubChannelLayer against a real redis-server."""

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from pingpong.layers import PingpongPubSubChannelLayer, PingpongShard, _LocalQueue, glob_escape
from tests.processes import ROOT, scaled

pytestmark = pytest.mark.redis


@pytest.fixture
async def layers(redis_server):
    """Two layers on one Redis: two processes' worth of channel layer."""
    made = [PingpongPubSubChannelLayer(hosts=[redis_server.url], prefix="test") for _ in range(2)]
    yield made
    for layer in made:
        await layer.flush()


async def receive(layer, channel):
    return await asyncio.wait_for(layer.receive(channel), 5)


class StockPeer:
    """channels-redis' stock RedisPubSubChannelLayer in a process of its own (`tests/layer_peer.py`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(15):
            line = await self.proc.stdout.readline()
        assert line, "the peer exited"
        return json.loads(line)

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read()


@pytest.fixture
async def stock_peer(redis_server) -> AsyncIterator[StockPeer]:
    """A process on the same Redis and prefix as `layers`, using the stock layer class."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.layer_peer", redis_server.url, "test",
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peer = StockPeer(proc)
    try:
        assert await peer.read() == {"layer": "channels_redis.pubsub.RedisPubSubChannelLayer"}
        yield peer
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the peer flushes its layer and exits at the end of its input
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_message_to_a_consumer_channel_arrives_through_redis(layers):
    here, there = layers
    channel = await here.new_channel()
    await there.send(channel, {"type": "hello", "n": 1})
    assert await receive(here, channel) == {"type": "hello", "n": 1}


async def test_new_channels_share_one_redis_subscription_per_process(layers):
    layer = layers[0]
    first, second = await layer.new_channel(), await layer.new_channel()
    loop_layer = layer._get_layer()
    subscribed = set().union(*(shard._subscribed_to for shard in loop_layer._shards))
    patterns = set().union(*(shard._patterns for shard in loop_layer._shards))
    assert subscribed == set()
    assert patterns == {loop_layer.process_pattern} == {f"{loop_layer.process_channel}!*"}
    assert first.split("!")[0] == second.split("!")[0] == loop_layer.process_channel
    assert set(loop_layer._shards[0]._pubsub.patterns) == {loop_layer.process_pattern.encode()}


async def test_a_group_message_reaches_every_member_on_every_process_once(layers):
    here, there = layers
    members = [(here, await here.new_channel()), (here, await here.new_channel()), (there, await there.new_channel())]
    for layer, channel in members:
        await layer.group_add("room", channel)
    await here.group_send("room", {"type": "broadcast.message", "event": "x"})
    for layer, channel in members:
        assert await receive(layer, channel) == {"type": "broadcast.message", "event": "x"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(here.receive(members[0][1]), 0.3)


async def test_a_publish_from_another_connection_right_after_a_first_group_add_reaches_the_member(layers, redis_server):
    """A command written on another connection after a first group_add returns finds the group subscribed.

    Topic history's join relies on it: group_add waits for Redis' confirmation of the SUBSCRIBE.
    """
    here, there = layers
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for n in range(20):
            channel = await there.new_channel()
            await there.group_add(f"fresh{n}", channel)
            group_channel = there._get_layer()._get_group_channel_name(f"fresh{n}")
            assert dict(await client.pubsub_numsub(group_channel))[group_channel.encode()] == 1
            await here.group_send(f"fresh{n}", {"type": "m", "n": n})
            assert await receive(there, channel) == {"type": "m", "n": n}
    finally:
        await client.aclose()


async def test_each_member_gets_its_own_copy_of_a_group_message(layers):
    layer = layers[0]
    first, second = await layer.new_channel(), await layer.new_channel()
    for channel in (first, second):
        await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "m", "event": "x"})
    one = await receive(layer, first)
    one["event"] = "changed"
    assert (await receive(layer, second))["event"] == "x"


async def test_a_discarded_member_gets_no_more_group_messages(layers):
    layer = layers[0]
    stays, leaves = await layer.new_channel(), await layer.new_channel()
    for channel in (stays, leaves):
        await layer.group_add("room", channel)
    await layer.group_discard("room", leaves)
    await layer.group_send("room", {"type": "m"})
    assert await receive(layer, stays) == {"type": "m"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(leaves), 0.3)


async def test_a_group_emptied_and_rejoined_is_subscribed_again(layers):
    layer = layers[0]
    first = await layer.new_channel()
    await layer.group_add("room", first)
    await layer.group_discard("room", first)
    second = await layer.new_channel()
    await layer.group_add("room", second)
    await layer.group_send("room", {"type": "m"})
    assert await receive(layer, second) == {"type": "m"}


async def test_a_cancelled_receive_forgets_the_channel(layers):
    layer = layers[0]
    channel = await layer.new_channel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.1)
    assert channel not in layer._get_layer().channels


async def test_a_flushed_layer_delivers_to_new_channels_again(layers):
    layer = layers[0]
    await layer.new_channel()
    await layer.flush()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "after.flush"})
    assert (await receive(layer, channel))["type"] == "after.flush"


async def test_a_burst_of_first_joins_shares_one_process_subscription_and_all_receive(layers):
    layer = layers[0]

    async def join() -> str:
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        return channel

    channels = await asyncio.gather(*(join() for _ in range(200)))
    assert layer._get_layer()._process_subscription.done()
    await layer.group_send("room", {"type": "m"})
    for channel in channels:
        assert await receive(layer, channel) == {"type": "m"}


async def test_a_join_while_the_last_member_leaves_still_gets_group_messages(layers):
    layer = layers[0]
    leaving, joining = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", leaving)
    await asyncio.gather(layer.group_discard("room", leaving), layer.group_add("room", joining))
    await layer.group_send("room", {"type": "m"})
    assert await receive(layer, joining) == {"type": "m"}


async def subscribe_commands(redis_server) -> int:
    """SUBSCRIBE commands Redis has run since it started (INFO commandstats)."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))


async def test_a_burst_of_first_joins_of_a_group_shares_one_subscribe(layers, redis_server):
    """200 concurrent first group_adds for one group make one SUBSCRIBE, not a queue on the shard lock."""
    layer = layers[0]
    channels = [await layer.new_channel() for _ in range(200)]
    before = await subscribe_commands(redis_server)
    await asyncio.gather(*(layer.group_add("room", channel) for channel in channels))
    assert await subscribe_commands(redis_server) - before == 1
    await layer.group_send("room", {"type": "m"})
    for channel in channels:
        assert await receive(layer, channel) == {"type": "m"}


async def test_a_burst_of_first_joins_of_many_groups_is_one_subscribe_command(layers, redis_server):
    """A thousand clients resubscribing to their own topics after a restart: one SUBSCRIBE of every group."""
    layer = layers[0]
    channels = [await layer.new_channel() for _ in range(500)]
    before = await subscribe_commands(redis_server)
    await asyncio.gather(*(layer.group_add(f"own{index}", channel) for index, channel in enumerate(channels)))
    assert await subscribe_commands(redis_server) - before == 1
    await asyncio.gather(*(layer.group_send(f"own{index}", {"type": "m", "n": index}) for index in range(500)))
    for index, channel in enumerate(channels):
        assert await receive(layer, channel) == {"type": "m", "n": index}


async def test_a_warmed_up_group_stays_subscribed_when_its_last_member_leaves(layers):
    """After warm_up, joining needs no Redis call and the group outlives its members."""
    layer = layers[0]
    await layer.warm_up(["room"])
    loop_layer = layer._get_layer()
    group_channel = loop_layer._get_group_channel_name("room")
    assert group_channel in loop_layer._get_shard(group_channel)._subscribed_to
    first = await layer.new_channel()
    await layer.group_add("room", first)
    await layer.group_discard("room", first)
    assert group_channel in loop_layer._get_shard(group_channel)._subscribed_to
    second = await layer.new_channel()
    await layer.group_add("room", second)
    await layer.group_send("room", {"type": "m"})
    assert await receive(layer, second) == {"type": "m"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(first), 0.3)


async def test_a_stock_layer_process_sends_to_our_consumer_channel(layers, stock_peer):
    """A worker on channels-redis' own layer reaches a pingpong consumer by its channel name (rolling upgrade)."""
    here = layers[0]
    channel = await here.new_channel()
    assert await stock_peer.call(op="send", channel=channel, message={"type": "hello", "n": 1}) == {"ok": True}
    assert await receive(here, channel) == {"type": "hello", "n": 1}


async def test_our_layer_sends_to_a_stock_layer_consumer_channel(layers, stock_peer):
    """A pingpong process reaches a consumer on channels-redis' own layer by its channel name."""
    channel = (await stock_peer.call(op="new_channel"))["channel"]
    await layers[0].send(channel, {"type": "hello", "n": 2})
    answer = await stock_peer.call(op="receive", channel=channel, timeout=5)
    assert answer == {"message": {"type": "hello", "n": 2}}


async def test_a_stock_layer_group_send_reaches_our_group_members(layers, stock_peer):
    """group_add on our layer, group_send from a stock-layer process: every member here gets it."""
    here = layers[0]
    members = [await here.new_channel(), await here.new_channel()]
    for channel in members:
        await here.group_add("room", channel)
    await stock_peer.call(op="group_send", group="room", message={"type": "m", "event": "from stock"})
    for channel in members:
        assert await receive(here, channel) == {"type": "m", "event": "from stock"}


async def test_our_group_send_reaches_a_stock_layer_group_member(layers, stock_peer):
    """group_add on a stock-layer process, group_send from ours: the stock member gets it."""
    channel = (await stock_peer.call(op="new_channel"))["channel"]
    assert await stock_peer.call(op="group_add", group="room", channel=channel) == {"ok": True}
    await layers[0].group_send("room", {"type": "m", "event": "from pingpong"})
    answer = await stock_peer.call(op="receive", channel=channel, timeout=5)
    assert answer == {"message": {"type": "m", "event": "from pingpong"}}


def test_the_process_pattern_matches_only_its_own_channel_names():
    """A prefix with glob characters is escaped, so a process never subscribes to another's channels."""
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"


async def test_a_prefix_with_glob_characters_still_delivers_direct_messages(redis_server):
    """The escaped pattern still matches this process's own consumer channels."""
    here, there = (PingpongPubSubChannelLayer(hosts=[redis_server.url], prefix="t*[?]") for _ in range(2))
    try:
        channel = await here.new_channel()
        await there.send(channel, {"type": "hello"})
        assert await receive(here, channel) == {"type": "hello"}
    finally:
        await here.flush()
        await there.flush()


def shard_of(layer: PingpongPubSubChannelLayer, group: str) -> PingpongShard:
    """The shard that carries `group`'s channel."""
    loop_layer = layer._get_layer()
    shard = loop_layer._get_shard(loop_layer._get_group_channel_name(group))
    assert isinstance(shard, PingpongShard)
    return shard


async def subscribers(client: aioredis.Redis, layer: PingpongPubSubChannelLayer, group: str) -> int:
    """How many connections Redis has subscribed to `group`'s channel (PUBSUB NUMSUB)."""
    group_channel = layer._get_layer()._get_group_channel_name(group)
    return int(dict(await client.pubsub_numsub(group_channel))[group_channel.encode()])


async def test_a_first_group_add_returns_only_once_redis_has_run_the_subscribe(layers, redis_server):
    """redis-py does not wait for SUBSCRIBE's answer; group_add does, so a read that follows cannot overtake it."""
    layer = layers[0]
    await layer.group_add("warm", await layer.new_channel())  # the subscriber connection is up
    channel = await layer.new_channel()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # Redis runs no command for 1 s
        joining = asyncio.ensure_future(layer.group_add("late", channel))
        await asyncio.sleep(0.3)
        assert not joining.done(), "group_add returned before Redis ran the SUBSCRIBE"
        await asyncio.wait_for(joining, scaled(5))
        assert await subscribers(client, layer, "late") == 1
        assert shard_of(layer, "late")._confirming == {}
    finally:
        await client.aclose()


async def test_a_first_group_add_that_redis_does_not_confirm_in_time_fails_and_leaves_no_waiter(redis_server):
    """Past subscribe_timeout the join raises, nothing waits on, and the next first join subscribes again."""
    layer = PingpongPubSubChannelLayer(hosts=[redis_server.url], prefix="test", subscribe_timeout=0.3)
    client = aioredis.Redis.from_url(redis_server.url)
    pause = 0.3 + scaled(1.5)
    try:
        await layer.group_add("warm", await layer.new_channel())
        channel = await layer.new_channel()
        await client.execute_command("CLIENT", "PAUSE", str(int(pause * 1000)), "ALL")
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError, match="did not confirm SUBSCRIBE"):
            await asyncio.wait_for(layer.group_add("late", channel), scaled(5))
        assert asyncio.get_running_loop().time() - started < pause, "the wait outlasted Redis' pause"
        shard = shard_of(layer, "late")
        assert shard._confirming == {}
        assert layer._get_layer()._get_group_channel_name("late") not in shard._subscribed_to
        await asyncio.sleep(pause)  # Redis runs again
        await asyncio.wait_for(layer.group_add("late", channel), scaled(5))
        assert shard._confirming == {}
        await layer.group_send("late", {"type": "m"})
        assert await receive(layer, channel) == {"type": "m"}
    finally:
        await client.aclose()
        await layer.flush()


async def test_a_first_group_add_whose_subscriber_connection_is_killed_completes_after_the_resubscribe(
    layers, redis_server, monkeypatch
):
    """The SUBSCRIBE goes out on a connection Redis has closed: redis-py reconnects and resubscribes, and that confirms."""
    layer = layers[0]
    await layer.group_add("warm", await layer.new_channel())
    channel = await layer.new_channel()
    shard = shard_of(layer, "late")
    pubsub = shard._pubsub
    assert pubsub is not None
    reading = asyncio.Event()
    get_message = pubsub.get_message

    async def held_get_message(*args: Any, **kwargs: Any) -> Any:
        await reading.wait()  # the receive loop reads nothing until the test lets it
        return await get_message(*args, **kwargs)

    monkeypatch.setattr(pubsub, "get_message", held_get_message)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await asyncio.sleep(0.3)  # a read already in progress ends (the loop polls every 0.1 s)
        connections_before = (await client.info("stats"))["total_connections_received"]
        assert await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await asyncio.sleep(0.1)
        joining = asyncio.ensure_future(layer.group_add("late", channel))
        await asyncio.sleep(0.3)
        assert not joining.done(), "group_add returned with no confirmation read"
        reading.set()
        await asyncio.wait_for(joining, scaled(5))
        assert (await client.info("stats"))["total_connections_received"] > connections_before  # it reconnected
        assert await subscribers(client, layer, "late") == 1
        assert shard._confirming == {}
        await layers[1].group_send("late", {"type": "m"})
        assert await receive(layer, channel) == {"type": "m"}
    finally:
        reading.set()
        await client.aclose()


# A consumer channel's queue (no Redis needed)


class NoDecoding:
    def decode_shared(self, data: bytes) -> Any:
        return json.loads(data)


async def test_a_channel_queue_holds_nothing_until_its_first_message_and_decodes_group_payloads():
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    assert queue._items is None and queue.qsize() == 0
    queue.put_nowait(b'{"type": "broadcast.message"}')
    queue.put_nowait({"type": "direct"})
    assert [await queue.get(), await queue.get()] == [{"type": "broadcast.message"}, {"type": "direct"}]


async def test_a_channel_queue_wakes_its_receivers_in_order_one_message_each():
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait({"n": 1})
    queue.put_nowait({"n": 2})
    assert await asyncio.gather(first, second) == [{"n": 1}, {"n": 2}]
    assert queue._waiters == []


async def test_a_receiver_cancelled_as_it_is_woken_passes_the_message_to_the_next():
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait({"n": 1})  # wakes the first receiver...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, scaled(2)) == {"n": 1}
    assert first.cancelled() and queue._waiters == [] and queue.qsize() == 0


async def test_a_cancelled_receiver_leaves_no_waiter_behind():
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    receiver = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    receiver.cancel()
    await asyncio.gather(receiver, return_exceptions=True)
    assert queue._waiters == []
    queue.put_nowait({"n": 1})
    assert await queue.get() == {"n": 1}


async def test_a_direct_receiver_takes_a_message_while_its_receiver_waits_with_nothing_queued():
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    taken: list[Any] = []
    queue.direct = lambda message: taken.append(message) or True
    queue.put_nowait({"n": 0})  # no receiver waits: queued
    receiver = asyncio.ensure_future(queue.get())
    assert await receiver == {"n": 0}
    receiver = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(b'{"n": 1}')  # waiting, nothing queued: taken, decoded
    assert taken == [{"n": 1}] and not receiver.done()
    queue.direct = lambda message: False  # declined: queued for the waiting receiver
    queue.put_nowait({"n": 2})
    assert await receiver == {"n": 2}


async def test_a_direct_receiver_is_not_offered_a_message_behind_queued_ones():
    """Order holds: while a message waits to be taken, the next ones queue behind it."""
    queue = _LocalQueue(NoDecoding())  # type: ignore[arg-type]
    taken: list[Any] = []
    queue.direct = lambda message: taken.append(message) or True
    receiver = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.direct = lambda message: False
    queue.put_nowait({"n": 1})  # declined: queued, the receiver woken but not run yet
    queue.direct = lambda message: taken.append(message) or True
    queue.put_nowait({"n": 2})
    assert taken == []
    assert [await receiver, await queue.get()] == [{"n": 1}, {"n": 2}]
