"""A Redis pub/sub channel layer whose connections cost Redis nothing.

channels_redis' `RedisPubSubChannelLayer` subscribes every consumer's own channel in Redis
(`new_channel`) and takes its per-shard lock for every `group_add`, even for a group the
process already subscribes to. Those calls are serialised behind the lock, one event-loop
turn or more each, so a burst of connections on a busy node waits seconds (and the
project's PINGPONG_LAYER_TIMEOUT turns the wait into 4013 refusals); and a group message
is decoded once per member. `PingpongPubSubChannelLayer` keeps the same wire format and API:

- consumer channels are process-local, `<process channel>!<id>`: one Redis subscription per
  process carries direct messages for all of them, so `new_channel` makes no Redis call
  after the first;
- `group_add` for a group this process already subscribes to makes no Redis call;
- a group message is decoded once; each member receives its own shallow copy;
- publishing (send, group_send) does not wait for the shard's subscribe lock.

It relies on channels_redis 4.x internals (`RedisPubSubLoopLayer`, the shard's
`_subscribed_to` and `_lock`), which pyproject pins below 5.
"""

import asyncio
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer
from channels_redis.utils import _wrap_close
from redis.exceptions import ResponseError

#: Key that carries the target channel inside a message sent to a process channel.
TARGET_KEY = "__pingpong_to__"


@dataclass
class PublishProgress:
    """Whether a PUBLISH reached the socket: after that, a failure leaves the outcome unknown."""

    written: bool = False


#: Set by a caller that must tell "not sent" from "unknown" (pingpong.broadcast); `_publish` marks it.
PUBLISH_PROGRESS: ContextVar[PublishProgress | None] = ContextVar("pingpong_publish_progress", default=None)


class _LocalQueue(asyncio.Queue):  # type: ignore[type-arg]
    """A consumer channel's queue: holds decoded messages; raw group payloads are decoded once."""

    def __init__(self, layer: "PingpongPubSubLoopLayer") -> None:
        super().__init__()
        self._layer = layer

    def put_nowait(self, item: Any) -> None:
        if isinstance(item, bytes):
            item = self._layer.decode_shared(item)
        super().put_nowait(item)


class _ProcessRouter:
    """Stands in the layer's channel table for the process channel: routes to local queues."""

    def __init__(self, layer: "PingpongPubSubLoopLayer") -> None:
        self._layer = layer

    def put_nowait(self, data: bytes) -> None:
        message = self._layer.channel_layer.deserialize(data)
        target = message.pop(TARGET_KEY, None)
        queue = self._layer.channels.get(target)
        if isinstance(queue, _LocalQueue):
            queue.put_nowait(message)


class PingpongPubSubLoopLayer(RedisPubSubLoopLayer):
    """The per-event-loop half of PingpongPubSubChannelLayer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_channel = f"{self.prefix}process.{uuid.uuid4().hex}"
        self._process_subscription: asyncio.Future[None] | None = None
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
        """Subscribe the process channel once; concurrent first callers share that one call.

        Each caller queueing on the shard lock instead would cost a loop turn per handoff:
        under a burst of connections on a busy node that convoy took seconds.
        """
        subscription = self._process_subscription
        if subscription is None or (subscription.done() and subscription.exception() is not None):
            self.channels[self.process_channel] = _ProcessRouter(self)
            shard = self._get_shard(self.process_channel)
            subscription = self._process_subscription = asyncio.ensure_future(shard.subscribe(self.process_channel))
        await asyncio.shield(subscription)

    async def new_channel(self, prefix: str = "specific.") -> str:
        await self._process_subscribe()
        channel = f"{self.process_channel}!{prefix}{uuid.uuid4().hex}"
        self.channels[channel] = _LocalQueue(self)
        return channel

    async def _publish(self, channel: str, data: bytes) -> None:
        """Publish without the shard lock, which only needs to order (un)subscribes.

        redis-py's pool serves concurrent commands; behind the lock, a broadcast on a busy
        node queued for seconds and the API answered 503. The command is sent by hand, not
        by `Redis.publish`, for two reasons: the caller's `PublishProgress` is marked at the
        moment PUBLISH is written (a failure before it means nothing was sent), and redis-py's
        retry, which writes the PUBLISH again after a connection error, is not used.
        """
        shard = self._get_shard(channel)
        shard._ensure_redis()
        pool = shard._redis.connection_pool
        connection = await pool.get_connection()  # connects if needed: nothing of ours is written yet
        progress = PUBLISH_PROGRESS.get()
        try:
            # redis-py 8 skips this check when maintenance notifications are on ("auto"), and
            # a socket Redis closed would then fail only after PUBLISH was written.
            if await connection.can_read():  # closed by Redis, or holding stray data: start afresh
                await connection.disconnect()
                await connection.connect()
            await connection.check_health()  # a due health-check PING, before our command
            if progress is not None:
                progress.written = True
            # On an error or a cancellation redis-py drops the connection, so no late reply is
            # read by the next command.
            await connection.send_command("PUBLISH", channel, data, check_health=False)
            try:
                await connection.read_response()
            except ResponseError:  # Redis refused the command (an error reply): it did not run
                if progress is not None:
                    progress.written = False
                raise
        finally:
            await pool.release(connection)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if "!" not in channel:
            await self._publish(channel, self.channel_layer.serialize(message))
            return
        process_channel = channel.split("!", 1)[0]
        payload = {**message, TARGET_KEY: channel}
        await self._publish(process_channel, self.channel_layer.serialize(payload))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        group_channel = self._get_group_channel_name(group)
        await self._publish(group_channel, self.channel_layer.serialize(message))

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
        await super().flush()

    async def group_add(self, group: str, channel: str) -> None:
        group_channel = self._get_group_channel_name(group)
        shard = self._get_shard(group_channel)
        # Fast path unless this group's unsubscribe is in flight: it holds the lock until Redis
        # has dropped the group, and then the base group_add (behind that lock) subscribes again.
        if (
            channel in self.channels
            and group_channel in shard._subscribed_to
            and group_channel not in self._unsubscribing
        ):
            self.groups.setdefault(group_channel, set()).add(channel)
            return
        await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        group_channel = self._get_group_channel_name(group)
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

    def _get_layer(self) -> PingpongPubSubLoopLayer:
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = PingpongPubSubLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
            return layer
