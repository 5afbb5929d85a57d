"""A Redis pub/sub channel layer whose connections cost Redis nothing.

channels_redis' `RedisPubSubChannelLayer` subscribes every consumer's own channel in Redis
(`new_channel`) and takes its per-shard lock for every `group_add`, even for a group the
process already subscribes to. Those calls are serialised behind the lock, one event-loop
turn or more each, so a burst of connections on a busy node waits seconds (and the
project's PINGPONG_LAYER_TIMEOUT turns the wait into 4013 refusals); and a group message
is decoded once per member. `PingpongPubSubChannelLayer` keeps the same wire format and API:

- consumer channels are process-local, `<process channel>!<id>`: one pattern subscription
  per process (`PSUBSCRIBE <process channel>!*`) carries direct messages for all of them, so
  `new_channel` makes no Redis call after the first. A message is published to the consumer's
  full channel name, as the stock layer does, so the two layers can send to each other's
  consumers (a rolling upgrade, or a worker on the stock backend answering our consumer);
- `group_add` for a group this process already subscribes to makes no Redis call;
- a group message is decoded once; each member receives its own shallow copy;
- publishing (send, group_send) does not wait for the shard's subscribe lock, and the
  publishes waiting at the same time go out together in one pipeline;
- concurrent first `group_add`s for a group share one in-flight subscribe, instead of
  queueing one by one on the shard lock (a cold node's burst of connections timed out there);
- a first `group_add` returns once Redis has confirmed the SUBSCRIBE (redis-py does not wait for
  it), so a read made after it on another connection (a topic's history) cannot overtake it; the
  confirmation that redis-py's reconnect asks for by subscribing again counts too, and the wait is
  bounded by `subscribe_timeout`;
- each shard's connections come from a `BoundedConnectionPool` (pingpong/pool.py): at most
  `max_connections`, the subscriber's included, a caller waits up to `pool_timeout` seconds
  for one, and connections idle for `idle_seconds` are closed; a Sentinel host entry gets a
  `BoundedSentinelConnectionPool`, bounded the same way.

It relies on channels_redis 4.x internals (`RedisPubSubLoopLayer`, the shard's
`_subscribed_to`, `_lock`, `_redis`, `_pubsub`, `_ensure_redis`, `_ensure_receiver`, its receive loop
`_do_receiving` and `_receive_message` routing a `pmessage` by channel name), which pyproject pins below 5.
"""

import asyncio
import logging
import uuid
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _wrap_close
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pingpong.layer_calls import DirectReceiver
from pingpong.pool import BoundedConnectionPool, BoundedSentinelConnectionPool

# The receive loop's errors go to channels-redis' logger, as the base loop's did: the project's
# logging config keeps Redis connection errors there to one line (pingpong.logs.BriefConnectionErrors).
receive_logger = logging.getLogger("channels_redis.pubsub")

#: The receive loop's wait after a failed read, doubling from the first to the second.
RECEIVE_RETRY_MIN, RECEIVE_RETRY_MAX = 0.1, 1.0

#: Most PUBLISH commands in one pipeline, so one burst cannot build an unbounded request.
PUBLISH_BATCH = 500


@dataclass
class PublishProgress:
    """Whether a PUBLISH reached the socket: after that, a failure leaves the outcome unknown."""

    written: bool = False


#: Set by a caller that must tell "not sent" from "unknown" (pingpong.broadcast); `_publish` marks it.
PUBLISH_PROGRESS: ContextVar[PublishProgress | None] = ContextVar("pingpong_publish_progress", default=None)


class _LocalQueue:
    """A consumer channel's queue: holds decoded messages; raw group payloads are decoded once.

    The two calls the layer makes of asyncio.Queue (`put_nowait`, `get`), without its four deques
    and Event: those cost about 3 KB per idle connection, a tenth of what a connection costs the
    node. Its deque is made by the first message; receivers wait on futures, as asyncio.Queue's do
    (woken, not handed the item, so a receiver cancelled as it wakes loses nothing). Unbounded, as
    channels-redis' queue is: the consumer drains it, and the server's pending-bytes cap bounds
    what waits for a slow client.
    """

    __slots__ = ("_layer", "_items", "_waiters", "direct")

    def __init__(self, layer: "PingpongPubSubLoopLayer") -> None:
        self._layer = layer
        self._items: deque[Any] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.direct: DirectReceiver | None = None

    def put_nowait(self, item: Any) -> None:
        if isinstance(item, bytes):
            item = self._layer.decode_shared(item)
        if self.direct is not None and not self._items and self._waiters and self.direct(item):
            return  # taken at once: its receiver waited with nothing queued, so the order holds
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._wake_next()

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif self._items:  # woken as it was cancelled: pass the wake-up on
                    self._wake_next()
                raise
        return self._items.popleft()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


def glob_escape(text: str) -> str:
    """`text` as a Redis glob pattern that matches only itself."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def pool_create(
    host: dict[str, Any], *, max_connections: int, timeout: float, idle_seconds: float
) -> BoundedConnectionPool:
    """A bounded pool for one channels_redis host entry (`address` URL, Sentinels or connection keywords)."""
    options = dict(host)
    options.update(max_connections=max_connections, timeout=timeout, idle_seconds=idle_seconds)
    if "master_name" in options:  # channels_redis' Sentinel entry: master_name, sentinels, sentinel_kwargs
        return BoundedSentinelConnectionPool(
            options.pop("master_name"),
            sentinels=options.pop("sentinels"),
            sentinel_kwargs=options.pop("sentinel_kwargs", None),
            **options,
        )
    if "address" in options:
        return BoundedConnectionPool.from_url(options.pop("address"), **options)
    return BoundedConnectionPool(**options)


@dataclass
class _Outgoing:
    """One command (a PUBLISH, or a history script that publishes) waiting for the shard's sender."""

    command: tuple[Any, ...]
    sent: "asyncio.Future[Any]"
    progress: PublishProgress | None


def _settle(items: list[_Outgoing], error: BaseException | None, reply: Any = None) -> None:
    """Tell each waiting caller how its command ended: Redis' reply, or the error."""
    for item in items:
        if item.sent.done():
            continue
        if error is None:
            item.sent.set_result(reply)
        else:
            item.sent.set_exception(error)


class PingpongShard(RedisSingleShardConnection):
    """A channels_redis shard whose Redis client draws on a BoundedConnectionPool, publishing in batches."""

    _redis: aioredis.Redis | None

    def __init__(
        self, host: dict[str, Any], channel_layer: "PingpongPubSubLoopLayer", *, subscribe_timeout: float, **bounds: Any
    ) -> None:
        super().__init__(host, channel_layer)
        self._bounds = bounds
        self._outbox: list[_Outgoing] = []
        self._sender: asyncio.Task[None] | None = None
        self._patterns: set[str] = set()
        self._subscribe_timeout = subscribe_timeout
        self._confirming: dict[str, asyncio.Future[None]] = {}  # channel -> its SUBSCRIBE's waiter

    def _ensure_redis(self) -> None:
        if self._redis is None:
            client = aioredis.Redis(connection_pool=pool_create(self.host, **self._bounds))
            # The subscriber takes its connection from the same pool and keeps it: it counts in the cap.
            self._redis, self._pubsub = client, client.pubsub()

    async def subscribe(self, channel: str) -> None:
        await self.subscribe_many([channel])

    async def subscribe_many(self, channels: list[str]) -> None:
        """SUBSCRIBE the channels not subscribed yet, in one command; return once Redis has run it.

        redis-py does not wait for SUBSCRIBE's answer, and a read made next on another connection
        (a topic's history) could reach Redis first and miss a publication made in between. Each
        channel's waiter is settled by its `subscribe` confirmation: the one for our command, or the
        one for redis-py's own SUBSCRIBE when it reconnects (and so resubscribes) before ours was
        answered. Past `subscribe_timeout` this raises, the channels stay unsubscribed for us (a next
        first join subscribes again), and no waiter is left. Holding the lock meanwhile keeps an
        UNSUBSCRIBE from slipping in before the confirmation.
        """
        async with self._lock:
            wanted = [channel for channel in dict.fromkeys(channels) if channel not in self._subscribed_to]
            if not wanted:
                return
            self._ensure_redis()
            self._ensure_receiver()
            assert self._pubsub is not None
            loop = asyncio.get_running_loop()
            waiters = {channel: loop.create_future() for channel in wanted}
            self._confirming.update(waiters)
            try:
                # asyncio.timeout, not wait_for (see pingpong.layer_calls); it bounds the write too.
                async with asyncio.timeout(self._subscribe_timeout):
                    await self._pubsub.subscribe(*wanted)
                    await asyncio.gather(*waiters.values())
            except TimeoutError as error:
                raise RedisTimeoutError(
                    f"Redis did not confirm SUBSCRIBE within {self._subscribe_timeout:g} s"
                ) from error
            finally:
                for channel, waiter in waiters.items():
                    if self._confirming.get(channel) is waiter:
                        del self._confirming[channel]
                    waiter.cancel()  # a no-op once settled
            self._subscribed_to.update(wanted)

    async def _do_receiving(self) -> None:
        """channels-redis' receive loop, with subscribe confirmations kept: they settle `subscribe_many`'s waiters.

        After a failed read (a reconnect that failed) it tries again in 0.1 s, doubling to 1 s, not
        channels-redis' fixed 1 s: the subscriptions come back sooner, and fewer publications are missed.
        """
        retry = RECEIVE_RETRY_MIN
        while True:
            try:
                if self._pubsub is not None and self._pubsub.subscribed:
                    self._receive_message(await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=0.1))
                else:
                    await asyncio.sleep(0.1)
                retry = RECEIVE_RETRY_MIN
            except (TimeoutError, asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException:
                receive_logger.exception("Unexpected exception in receive task")
                await asyncio.sleep(retry)
                retry = min(retry * 2, RECEIVE_RETRY_MAX)

    def _receive_message(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        kind = message["type"]
        if kind == "subscribe":
            name = message["channel"]
            waiter = self._confirming.pop(name.decode() if isinstance(name, bytes) else name, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind in ("message", "pmessage"):  # not the other confirmations, nor a pong
            super()._receive_message(message)

    async def psubscribe(self, pattern: str) -> None:
        """Subscribe a pattern, under the shard lock like the base `subscribe`; redis-py renews it on reconnect.

        Matching messages arrive as `pmessage`s whose `channel` is the published name, so the base
        receive loop routes them to `channels[<that name>]` like any message.
        """
        async with self._lock:
            if pattern not in self._patterns:
                self._ensure_redis()
                self._ensure_receiver()
                assert self._pubsub is not None
                await self._pubsub.psubscribe(pattern)
                self._patterns.add(pattern)

    async def publish_batched(self, channel: str, data: bytes) -> None:
        """PUBLISH, pipelined with the other publishes waiting at the same time; no shard lock.

        One PUBLISH per pooled connection and round trip is too slow with the pool capped: on a
        busy node, 400 concurrent broadcasts waited past their deadline for a connection. Sent
        together, a burst costs a few round trips on one connection. The caller's
        `PublishProgress` (if any) is marked at the moment its PUBLISH is written.
        """
        await self.execute_batched("PUBLISH", channel, data)

    async def execute_batched(self, *command: Any) -> Any:
        """Run one command in the shard's next pipeline (see `publish_batched`) and return Redis' reply.

        Written once, never retried: an error reply raises its ResponseError (the command did
        not run); any other failure after the write leaves the outcome unknown.
        """
        sent = asyncio.get_running_loop().create_future()
        self._outbox.append(_Outgoing(command, sent, PUBLISH_PROGRESS.get()))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_outbox())
        return await sent

    async def _send_outbox(self) -> None:
        """Send queued publishes in pipelines of at most PUBLISH_BATCH until none is left."""
        while self._outbox:
            batch = self._outbox[:PUBLISH_BATCH]
            del self._outbox[:PUBLISH_BATCH]
            try:
                await self._send_batch(batch)
            except BaseException:  # cancelled by flush: no caller is left waiting
                for item in batch:
                    item.sent.cancel()
                raise

    async def _send_batch(self, batch: list["_Outgoing"]) -> None:
        """Write one pipeline of commands by hand and settle each caller's future.

        Not `Redis.pipeline()`: redis-py's retry writes the commands again after a connection
        error (a duplicate broadcast), and it cannot say when the commands were written.
        """
        self._ensure_redis()
        assert self._redis is not None
        pool = self._redis.connection_pool
        try:
            connection = await pool.get_connection()  # connects if needed: nothing of ours is written yet
        except Exception as error:
            _settle(batch, error)
            return
        try:
            # redis-py 8 skips this check when maintenance notifications are on ("auto"), and a
            # socket Redis closed would then fail only after PUBLISH was written.
            if await connection.can_read():  # closed by Redis, or holding stray data: start afresh
                await connection.disconnect()
                await connection.connect()
            await connection.check_health()  # a due health-check PING, before our commands
            batch = [item for item in batch if not item.sent.done()]  # callers that gave up: not sent
            if not batch:
                return
            for item in batch:
                if item.progress is not None:
                    item.progress.written = True
            commands = [item.command for item in batch]
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
            for item in batch:
                try:
                    reply = await connection.read_response()
                except ResponseError as error:  # Redis refused this command (an error reply): it did not run
                    if item.progress is not None:
                        item.progress.written = False
                    _settle([item], error)
                else:
                    _settle([item], None, reply)
        except BaseException as error:  # the rest of the batch: written, outcome unknown
            await connection.disconnect()  # a late reply must not be read by the next command
            if not isinstance(error, Exception):  # cancelled (flush): the caller of the sender settles
                raise
            _settle(batch, error)
        finally:
            await pool.release(connection)

    async def flush(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        for item in self._outbox:
            item.sent.cancel()
        self._outbox = []
        await super().flush()
        self._patterns = set()
        for waiter in self._confirming.values():  # none, unless a subscribe outlived its caller's lock
            waiter.cancel()
        self._confirming = {}


class PingpongPubSubLoopLayer(RedisPubSubLoopLayer):
    """The per-event-loop half of PingpongPubSubChannelLayer."""

    def __init__(
        self,
        *args: Any,
        max_connections: int = 10,
        pool_timeout: float = 2.0,
        idle_seconds: float = 30.0,
        subscribe_timeout: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._shards: list[RedisSingleShardConnection] = [
            PingpongShard(
                shard.host,
                self,
                subscribe_timeout=subscribe_timeout,
                max_connections=max_connections,
                timeout=pool_timeout,
                idle_seconds=idle_seconds,
            )
            for shard in self._shards
        ]
        self.process_channel = f"{self.prefix}process.{uuid.uuid4().hex}"
        self.process_pattern = f"{glob_escape(self.process_channel)}!*"
        self._process_subscription: asyncio.Future[None] | None = None
        self._group_subscriptions: dict[str, asyncio.Future[None]] = {}
        self._subscribe_batch: dict[str, asyncio.Future[None]] = {}  # first joined, not yet written
        self._subscribe_task: asyncio.Future[None] | None = None
        self._kept_groups: set[str] = set()
        self._unsubscribing: set[str] = set()
        self._last_raw: bytes | None = None
        self._last_message: dict[str, Any] = {}

    def decode_shared(self, data: bytes) -> dict[str, Any]:
        """Decode a group payload once however many members it is queued for; a copy each."""
        if data is not self._last_raw:
            self._last_message = self.channel_layer.deserialize(data)
            self._last_raw = data
        return dict(self._last_message)

    async def _process_subscribe(self) -> None:
        """Subscribe the process pattern once; concurrent first callers share that one call.

        Each caller queueing on the shard lock instead would cost a loop turn per handoff:
        under a burst of connections on a busy node that convoy took seconds. Every shard gets
        the pattern: a sender picks the shard by the consumer's full channel name.
        """
        subscription = self._process_subscription
        if subscription is None or (subscription.done() and subscription.exception() is not None):
            subscription = self._process_subscription = asyncio.ensure_future(self._psubscribe_every_shard())
        await asyncio.shield(subscription)

    async def _psubscribe_every_shard(self) -> None:
        shards = [shard for shard in self._shards if isinstance(shard, PingpongShard)]
        await asyncio.gather(*(shard.psubscribe(self.process_pattern) for shard in shards))

    async def new_channel(self, prefix: str = "specific.") -> str:
        await self._process_subscribe()
        # A warm node makes no Redis call here, so ask the subscriber's socket instead: a new
        # consumer is refused (4013) while Redis is gone, not admitted to miss every broadcast.
        if not all(self._subscriber_connected(shard) for shard in self._shards):
            raise RedisConnectionError("the subscriber's connection to Redis is down")
        channel = f"{self.process_channel}!{prefix}{uuid.uuid4().hex}"
        self.channels[channel] = _LocalQueue(self)
        return channel

    def _subscriber_connected(self, shard: RedisSingleShardConnection) -> bool:
        """Whether the shard's subscriber socket is open, and Redis has not closed its end."""
        pubsub = shard._pubsub
        connection = pubsub.connection if pubsub is not None else None
        if connection is None or not connection.is_connected:
            return False
        reader = getattr(connection, "_reader", None)  # redis-py's StreamReader: EOF once Redis hangs up
        return not (isinstance(reader, asyncio.StreamReader) and reader.at_eof())

    async def _publish(self, channel: str, data: bytes) -> None:
        """Publish without the shard lock, which only needs to order (un)subscribes.

        Behind the lock, a broadcast on a busy node queued for seconds and the API answered 503.
        """
        shard = self._get_shard(channel)
        assert isinstance(shard, PingpongShard)
        await shard.publish_batched(channel, data)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        # To the full channel name, as the stock layer publishes: the receiving process's pattern
        # takes it whichever layer sent it, and a stock consumer's channel is subscribed by name.
        await self._publish(channel, self.channel_layer.serialize(message))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        group_channel = self._get_group_channel_name(group)
        await self._publish(group_channel, self.channel_layer.serialize(message))

    def direct_receiver_set(self, channel: str, receiver: DirectReceiver | None) -> bool:
        """See `pingpong.layer_calls.DirectReceiver`: True when `channel` is this process's and takes one."""
        queue = self.channels.get(channel)
        if not isinstance(queue, _LocalQueue):
            return False
        queue.direct = receiver
        return True

    async def receive(self, channel: str) -> Any:
        if "!" not in channel:
            return await super().receive(channel)
        queue = self.channels.get(channel)
        if not isinstance(queue, _LocalQueue):
            await self._process_subscribe()
            queue = self.channels[channel] = _LocalQueue(self)
        try:
            return await queue.get()
        except (TimeoutError, asyncio.CancelledError, GeneratorExit):
            # As in channels_redis: a cancelled receive means the consumer is leaving.
            self.channels.pop(channel, None)
            raise

    async def flush(self) -> None:
        # The base flush forgets every channel, the process router included: subscribe it anew.
        self._process_subscription = None
        self._group_subscriptions = {}
        self._subscribe_batch = {}
        self._kept_groups = set()
        await super().flush()

    async def warm_up(self, groups: list[str]) -> None:
        """Connect and subscribe the process channel and `groups` now, and keep the groups subscribed.

        Then a burst of connections on a freshly started node makes no Redis call at all: its
        first subscribes no longer race a saturated event loop against PINGPONG_LAYER_TIMEOUT.
        """
        channels = [self._get_group_channel_name(group) for group in groups]
        self._kept_groups.update(channels)
        await asyncio.gather(self._process_subscribe(), *(self._group_subscribe(channel) for channel in channels))

    async def group_add(self, group: str, channel: str) -> None:
        group_channel = self._get_group_channel_name(group)
        # While this group's unsubscribe is in flight it holds the lock until Redis has dropped
        # the group; then the base group_add (behind that lock) subscribes again.
        if channel not in self.channels or group_channel in self._unsubscribing:
            await super().group_add(group, channel)
            return
        self.groups.setdefault(group_channel, set()).add(channel)
        if group_channel not in self._get_shard(group_channel)._subscribed_to:
            await self._group_subscribe(group_channel)

    async def _group_subscribe(self, group_channel: str) -> None:
        """Subscribe a group once; concurrent first joiners share the call, as in _process_subscribe.

        The groups first joined in the same turn of the event loop go to Redis as one SUBSCRIBE
        with every channel: a thousand clients resubscribing to their own topics after a node
        restart make one write, not a thousand turns of the shard's lock.
        """
        subscription = self._group_subscriptions.get(group_channel)
        if subscription is None:
            subscription = self._group_subscriptions[group_channel] = asyncio.get_running_loop().create_future()
            # Forget it when done: success shows in the shard's _subscribed_to, and a failure
            # must let the next joiner try again.
            subscription.add_done_callback(lambda done: self._group_forget(group_channel, done))
            self._subscribe_batch[group_channel] = subscription
            if self._subscribe_task is None:
                self._subscribe_task = asyncio.ensure_future(self._subscribe_batches())
        await asyncio.shield(subscription)

    async def _subscribe_batches(self) -> None:
        """SUBSCRIBE the waiting groups, one command per shard per batch, until none wait."""
        try:
            while self._subscribe_batch:
                await asyncio.sleep(0)  # the other joiners of this turn add theirs
                batch, self._subscribe_batch = self._subscribe_batch, {}
                by_shard: dict[int, list[str]] = {}
                for group_channel in batch:
                    by_shard.setdefault(id(self._get_shard(group_channel)), []).append(group_channel)
                for channels in by_shard.values():
                    shard = self._get_shard(channels[0])
                    assert isinstance(shard, PingpongShard)
                    try:
                        await shard.subscribe_many(channels)
                    except Exception as error:  # every joiner of the batch gets the error
                        for group_channel in channels:
                            if not batch[group_channel].done():
                                batch[group_channel].set_exception(error)
                    else:
                        for group_channel in channels:
                            if not batch[group_channel].done():
                                batch[group_channel].set_result(None)
        finally:
            self._subscribe_task = None

    def _group_forget(self, group_channel: str, subscription: "asyncio.Future[None]") -> None:
        if self._group_subscriptions.get(group_channel) is subscription:
            del self._group_subscriptions[group_channel]
        if not subscription.cancelled():
            subscription.exception()  # retrieved here, so a failure nobody awaits is not logged as lost

    async def group_discard(self, group: str, channel: str) -> None:
        group_channel = self._get_group_channel_name(group)
        if group_channel in self._kept_groups:  # stays subscribed when its last member leaves
            members = self.groups.get(group_channel, set())
            members.discard(channel)
            if not members:
                self.groups.pop(group_channel, None)
            return
        if self.groups.get(group_channel) != {channel}:
            await super().group_discard(group, channel)
            return
        # The last member leaves: the base unsubscribes the process from the group.
        self._unsubscribing.add(group_channel)
        try:
            await super().group_discard(group, channel)
        finally:
            self._unsubscribing.discard(group_channel)


class PingpongPubSubChannelLayer(RedisPubSubChannelLayer):
    """RedisPubSubChannelLayer with process-local consumer channels (see the module docstring)."""

    def direct_receiver_set(self, channel: str, receiver: DirectReceiver | None) -> bool:
        """See `pingpong.layer_calls.DirectReceiver`."""
        return self._get_layer().direct_receiver_set(channel, receiver)

    def _get_layer(self) -> PingpongPubSubLoopLayer:
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = PingpongPubSubLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
            return layer
