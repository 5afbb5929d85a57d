"""The embedded channel layer: process-local, O(1) per connection and per delivered message.

Channels' `InMemoryChannelLayer` scans every channel and every group membership on each
`receive` and `group_send` (`_clean_expired`), so a node with thousands of connections spends
its time scanning: 12,000 connections took 133 s to open on it, against 14 s on Redis.
`LocalChannelLayer` keeps the same API and semantics (`tests/test_local_layer.py` runs every
behaviour on both classes) with these tables:

- `channels`: name -> `LocalChannel` (its queued messages, its waiting receivers, its groups).
  A channel exists while it has messages, a waiting receiver or a group; then it is deleted.
- `groups`: group -> {channel: joined at}, in join order; `group_send` is O(members).
- `pending`: the channels holding messages, oldest first, with their oldest message's expiry;
  `joins`: memberships in join order (only with a `group_expiry`). Both are swept from the
  front on every call, so expiry costs O(expired), never a scan.

Semantics kept from InMemoryChannelLayer: per-channel FIFO; `capacity` messages per channel
(and `channel_capacity` patterns), then `send` raises ChannelFull and `group_send` skips the
full member; a message older than `expiry` is never delivered, and its channel leaves all of
its groups (a consumer that does not read is presumed gone); a membership older than
`group_expiry` ends; names validated as Channels does; `flush`.

Deliberate differences:
- a cancelled `receive` forgets its channel: queued messages and group memberships too, as
  channels_redis' pub/sub layer does (stock: the memberships stay until they expire);
- `group_send` deep-copies the message once and gives each member its own shallow copy, as
  the Redis layers give each member its own decoded copy of one payload (stock: a deep copy
  per member);
- `group_expiry=None` means memberships never expire (stock: always expire);
- the memory of an expired message that nobody receives is reclaimed within 2 x `expiry`
  (it is never delivered after `expiry`);
- each member skipped by `group_send` because its queue is full is counted in
  `pingpong_channel_layer_dropped_total{reason="full"}` and logged at most once per 10 s
  (stock: silently). Expired messages count under `reason="expired"`.
"""

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from copy import deepcopy
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from pingpong import metrics
from pingpong.history import LocalHistory
from pingpong.layer_calls import DirectReceiver

logger = logging.getLogger(__name__)

Message = dict[str, Any]

#: Seconds between two warnings about members skipped because their queue was full.
FULL_WARNING_INTERVAL = 10.0


class LocalChannel:
    """One channel: queued (expires at, message) pairs, receivers waiting for one, its groups."""

    __slots__ = ("capacity", "groups", "messages", "waiters", "direct")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.messages: deque[tuple[float, Message]] = deque()
        # A list, not a deque: a channel has one receiver, and an empty deque costs 600 bytes a connection.
        self.waiters: list[asyncio.Future[Message]] = []
        self.groups: set[str] = set()
        self.direct: DirectReceiver | None = None

    def idle(self) -> bool:
        """Nothing queued, nobody waiting, in no group, no direct receiver: the layer can forget it."""
        return not self.messages and not self.waiters and not self.groups and self.direct is None


class LocalChannelLayer(BaseChannelLayer):
    """A process-local channel layer whose calls cost O(1) (group_send: O(members)); see the module docstring."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        expiry: float = 60,
        group_expiry: float | None = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity, **kwargs)
        # Compiled once: the base class stores the raw dict, which get_capacity cannot read.
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.group_expiry = group_expiry
        self.channels: dict[str, LocalChannel] = {}
        self.groups: dict[str, dict[str, float]] = {}
        self.pending: OrderedDict[str, float] = OrderedDict()
        self.joins: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.dropped_full = 0
        self.dropped_expired = 0
        self._unreported_full = 0
        self._full_warned_at = -FULL_WARNING_INTERVAL
        # Names only need to be unique in this process: a counter, behind a random token per layer.
        self._token = secrets.token_hex(4)
        self._counter = itertools.count()
        # Topic history (pingpong.history): offsets and retained publications, in this process.
        self.history = LocalHistory()

    # Channel layer API

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A new process-local channel name; nothing is stored until it is used."""
        return f"{prefix}local!{self._token}{next(self._counter)}"

    async def send(self, channel: str, message: Message) -> None:
        """Queue a copy of `message` on `channel` (or hand it to a waiting receiver); ChannelFull at capacity."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        now = time.monotonic()
        self._sweep(now)
        if not self._deliver(channel, deepcopy(message), now):
            raise ChannelFull(channel)

    def _channel(self, channel: str) -> "LocalChannel":
        """The state of `channel`, made on first use."""
        local = self.channels.get(channel)
        if local is None:
            local = self.channels[channel] = LocalChannel(self.get_capacity(channel))
        return local

    def direct_receiver_set(self, channel: str, receiver: DirectReceiver | None) -> bool:
        """See `pingpong.layer_calls.DirectReceiver`; None forgets the channel's receiver."""
        if receiver is not None:
            self._channel(channel).direct = receiver
            return True
        local = self.channels.get(channel)
        if local is not None:
            local.direct = None
            if local.idle():
                del self.channels[channel]
        return True

    async def receive(self, channel: str) -> Message:
        """The oldest unexpired message on `channel`, waiting for one; cancelled, it forgets the channel."""
        self.require_valid_channel_name(channel)
        now = time.monotonic()
        self._sweep(now)
        local = self._channel(channel)
        if local.messages:
            self._drop_expired(channel, local, now)
        if local.messages:
            _, message = local.messages.popleft()
            if not local.messages:
                self.pending.pop(channel, None)
                if local.idle():
                    del self.channels[channel]
            return message
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        local.waiters.append(waiter)
        try:
            return await waiter
        except (asyncio.CancelledError, TimeoutError, GeneratorExit):
            # As in channels_redis: a cancelled receive means the consumer is leaving.
            if waiter in local.waiters:
                local.waiters.remove(waiter)
            if not local.waiters and self.channels.get(channel) is local:
                self._forget(channel, local)
            raise
        finally:
            if self.channels.get(channel) is local and local.idle():
                del self.channels[channel]

    async def flush(self) -> None:
        """Forget every channel, message, group and topic history (receivers already waiting are not woken)."""
        self.history = LocalHistory()  # like FLUSHALL on Redis: every topic starts a new epoch
        self.channels = {}
        self.groups = {}
        self.pending = OrderedDict()
        self.joins = OrderedDict()

    async def close(self) -> None:
        """Nothing to close."""

    # Groups extension

    async def group_add(self, group: str, channel: str) -> None:
        """Add `channel` to `group`, or renew its membership."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        now = time.monotonic()
        self._sweep(now)
        local = self._channel(channel)
        members = self.groups.setdefault(group, {})
        members.pop(channel, None)  # a renewed membership moves to the end: join order stays time order
        members[channel] = now
        local.groups.add(group)
        if self.group_expiry is not None:
            self.joins[(group, channel)] = now
            self.joins.move_to_end((group, channel))

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove `channel` from `group`; nothing if it is not a member."""
        self.require_valid_channel_name(channel)
        self.require_valid_group_name(group)
        self._leave(group, channel)
        local = self.channels.get(channel)
        if local is not None and local.idle():
            del self.channels[channel]

    async def group_send(self, group: str, message: Message) -> None:
        """Send `message` to every member; a member whose queue is full is skipped and counted."""
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        now = time.monotonic()
        self._sweep(now)
        members = self.groups.get(group)
        if not members:
            return
        original = deepcopy(message)
        skipped = 0
        for channel in members:
            if not self._deliver(channel, dict(original), now):
                skipped += 1
        if skipped:
            self._count_full(skipped, group=group, now=now)

    # Internals

    def _deliver(self, channel: str, message: Message, now: float) -> bool:
        """Hand `message` to the direct receiver or a waiting one, or queue it; False when the channel is full."""
        local = self._channel(channel)
        waiters = local.waiters
        if local.direct is not None and waiters and not local.messages and local.direct(message):
            return True  # taken at once: its receiver waited with nothing queued, so the order holds
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():  # a cancelled receiver's future is done at once
                waiter.set_result(message)
                return True
        if len(local.messages) >= local.capacity:
            return False
        if not local.messages:
            self.pending[channel] = now + self.expiry
        local.messages.append((now + self.expiry, message))
        return True

    def _sweep(self, now: float) -> None:
        """Expire messages and memberships from the front of `pending` and `joins`: O(expired)."""
        pending = self.pending
        while pending:
            channel = next(iter(pending))
            if pending[channel] >= now:
                break
            del pending[channel]
            local = self.channels.get(channel)
            if local is None:
                continue
            self._drop_expired(channel, local, now)
            if local.messages:
                # Its oldest message was received since: back in line with the new oldest one's expiry.
                pending[channel] = local.messages[0][0]
            elif local.idle():
                del self.channels[channel]
        if self.group_expiry is not None:
            cutoff = now - self.group_expiry
            joins = self.joins
            while joins:
                key = next(iter(joins))
                if joins[key] >= cutoff:
                    break
                self._leave(*key)
                local = self.channels.get(key[1])
                if local is not None and local.idle():
                    del self.channels[key[1]]

    def _drop_expired(self, channel: str, local: LocalChannel, now: float) -> None:
        """Drop expired messages from the head of the channel; a channel with one leaves its groups."""
        messages = local.messages
        dropped = 0
        while messages and messages[0][0] < now:
            messages.popleft()
            dropped += 1
        if not dropped:
            return
        self.dropped_expired += dropped
        metrics.LAYER_DROPPED.labels("expired").inc(dropped)
        for group in list(local.groups):
            self._leave(group, channel)
        if not messages:
            self.pending.pop(channel, None)

    def _leave(self, group: str, channel: str) -> None:
        """End one membership in every table that records it."""
        members = self.groups.get(group)
        if members is not None and members.pop(channel, None) is not None and not members:
            del self.groups[group]
        local = self.channels.get(channel)
        if local is not None:
            local.groups.discard(group)
        self.joins.pop((group, channel), None)

    def _forget(self, channel: str, local: LocalChannel) -> None:
        """Remove a channel whose consumer is gone: its messages and its memberships."""
        for group in list(local.groups):
            self._leave(group, channel)
        local.messages.clear()
        self.pending.pop(channel, None)
        del self.channels[channel]

    def _count_full(self, skipped: int, *, group: str, now: float) -> None:
        """Count members skipped by group_send; warn at most once per FULL_WARNING_INTERVAL."""
        self.dropped_full += skipped
        metrics.LAYER_DROPPED.labels("full").inc(skipped)
        self._unreported_full += skipped
        if now - self._full_warned_at >= FULL_WARNING_INTERVAL:
            logger.warning(
                "group_send skipped %d member(s) whose queue was full (capacity %d), latest in group %r",
                self._unreported_full,
                self.capacity,
                group,
            )
            self._unreported_full = 0
            self._full_warned_at = now
