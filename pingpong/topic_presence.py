"""Who is subscribed to a topic, cluster-wide, and join/leave events, for namespaces that ask for them.

An **entry** is one connection subscribed to one topic of a namespace with `presence` or
`join_leave`: the topic, the connection id, and the user id it had when it subscribed. Entries
are bounded by subscriptions: PINGPONG_MAX_SUBSCRIPTIONS per connection, and the connection caps.

With Redis, under `<prefix>:topicpresence:` (not `<prefix>:presence:`, which /api/stats scans):

- `topic:<topic>`, a sorted set of `<client> <user as JSON>` (all scores 0, so ZRANGE is in member
  order): the listing, and the connection count (ZCARD);
- `users:<topic>`, a hash: user id (JSON) -> that user's connections: the unique-user count (HLEN);
- `node:<instance>`, a sorted set of `<topic> <client> <user>`: every entry a process holds;
- `nodes`, a sorted set of process instances scored by the Redis time at which they expire.

Liveness is per process, not per entry: every refresh interval of PINGPONG_PRESENCE_TTL
(`presence.refresh_interval`, 5 s of 12) a process pushes its own expiry forward with one ZADD,
whatever its number of entries. Subscribes and unsubscribes are queued and written by one Lua
script call per batch (at most BATCH_OPS changes), never one round trip per connection.

Every SWEEP_SECONDS each process runs a sweep script: it claims the instances whose expiry
passed (their `node:` set moves to `dead:`), removes up to SWEEP_BATCH of their entries from their
topics, and returns them. Only the script that removed an entry returns it, so the process
that ran it publishes one `leave` per entry, once. A SIGKILLed node's entries are gone, and
their `leave` events sent, within TTL + SWEEP_SECONDS (13 s by default). A process that
finds it was swept while alive (paused past the TTL) writes its entries again, and sends
`join` for them.

Without Redis (the embedded layer) the same entries live in this process and connections
leave when they finish; there is no other node to die.
"""

import asyncio
import json
import logging
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from django.conf import settings
from redis.commands.core import AsyncScript

from pingpong import layer_calls, presence, protocol, topics
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.presence import PRESENCE_ERRORS
from pingpong.topics import Namespace, TopicRefused

logger = logging.getLogger(__name__)

# Changes written per script call: a burst of subscribes costs len(burst) / BATCH_OPS round trips.
BATCH_OPS: Final = 1_000
# Entries of dead processes one sweep call removes, and sweep calls per tick: a dead node with
# 2,000,000 entries is cleared in 2,000,000 / (SWEEP_BATCH * SWEEPS_PER_TICK) ticks, Redis never blocked long.
SWEEP_BATCH: Final = 1_000
SWEEPS_PER_TICK: Final = 10
SWEEP_SECONDS: Final = 1.0
# Removals kept for a retry while Redis fails (one per entry that may be left in Redis); past it the
# oldest is dropped with a warning, and its entry stays until this process's own entries expire.
MAX_RETRIES: Final = 100_000

# Changes as (op, entry): "+" records an entry, "-" removes one. Each change is idempotent.
ADD: Final = "+"
REMOVE: Final = "-"

_APPLY = """
local p = ARGV[1] .. ':topicpresence:'
local instance = ARGV[2]
local now = redis.call('TIME')
local new = redis.call('ZADD', p .. 'nodes', tonumber(now[1]) + tonumber(ARGV[3]), instance)
local nodekey = p .. 'node:' .. instance
for i = 5, #ARGV, 4 do
  local op, topic, client, user = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local member = client .. ' ' .. user
  local userskey = p .. 'users:' .. topic
  if op == '+' then
    redis.call('ZADD', nodekey, 0, topic .. ' ' .. member)
    if redis.call('ZADD', p .. 'topic:' .. topic, 0, member) == 1 and user ~= 'null' then
      redis.call('HINCRBY', userskey, user, 1)
    end
  else
    redis.call('ZREM', nodekey, topic .. ' ' .. member)
    if redis.call('ZREM', p .. 'topic:' .. topic, member) == 1 and user ~= 'null' then
      if redis.call('HINCRBY', userskey, user, -1) <= 0 then redis.call('HDEL', userskey, user) end
    end
  end
end
-- 1: this instance had written before (ARGV[4]) and was swept since (it expired while alive).
if new == 1 and ARGV[4] == '1' then return 1 end
return 0
"""

_SWEEP = """
local p = ARGV[1] .. ':topicpresence:'
local budget = tonumber(ARGV[2])
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
for _, instance in ipairs(redis.call('ZRANGEBYSCORE', p .. 'nodes', '-inf', t, 'LIMIT', 0, 100)) do
  redis.call('ZREM', p .. 'nodes', instance)
  local nodekey = p .. 'node:' .. instance
  if redis.call('EXISTS', nodekey) == 1 then
    local deadkey = p .. 'dead:' .. instance
    redis.call('ZUNIONSTORE', deadkey, 2, deadkey, nodekey)
    redis.call('DEL', nodekey)
    redis.call('SADD', p .. 'dying', instance)
  end
end
local removed = {}
for _, instance in ipairs(redis.call('SRANDMEMBER', p .. 'dying', 10)) do
  if budget <= 0 then break end
  local deadkey = p .. 'dead:' .. instance
  local batch = redis.call('ZRANGE', deadkey, 0, budget - 1)
  budget = budget - #batch
  for _, entry in ipairs(batch) do
    redis.call('ZREM', deadkey, entry)
    -- An instance that was swept while alive writes its entries again: those are not removed.
    if not redis.call('ZSCORE', p .. 'node:' .. instance, entry) then
      local topic, client, user = string.match(entry, '^(%S+) (%S+) (.*)$')
      if topic and redis.call('ZREM', p .. 'topic:' .. topic, client .. ' ' .. user) == 1 then
        local userskey = p .. 'users:' .. topic
        if user ~= 'null' and redis.call('HINCRBY', userskey, user, -1) <= 0 then
          redis.call('HDEL', userskey, user)
        end
        removed[#removed + 1] = entry
      end
    end
  end
  if redis.call('EXISTS', deadkey) == 0 then redis.call('SREM', p .. 'dying', instance) end
end
return removed
"""

_READ = """
local p = ARGV[1] .. ':topicpresence:'
local key = p .. 'topic:' .. ARGV[2]
return {redis.call('ZCARD', key), redis.call('HLEN', p .. 'users:' .. ARGV[2]),
        redis.call('ZRANGE', key, 0, tonumber(ARGV[3]) - 1)}
"""


@dataclass(frozen=True)
class Entry:
    """One connection subscribed to one topic, with the user id it had when it subscribed."""

    topic: str
    client: str
    user: str | None


class Member(TypedDict):
    client: str
    user: str | None


class Listing(TypedDict):
    """The answer to a presence request, and the body of GET /api/presence/<topic>."""

    topic: str
    connections: int
    users: int
    clients: list[Member]
    truncated: bool


class MemoryRegistry:
    """The entries of this process, for the embedded layer: the same semantics, no Redis."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, str | None]] = {}  # topic -> client -> user
        self.users: dict[str, Counter[str]] = {}

    def user_of(self, topic: str, client: str) -> tuple[bool, str | None]:
        members = self.members.get(topic, {})
        return client in members, members.get(client)

    async def add(self, entry: Entry) -> None:
        members = self.members.setdefault(entry.topic, {})
        if entry.client in members:
            return
        members[entry.client] = entry.user
        if entry.user is not None:
            self.users.setdefault(entry.topic, Counter())[entry.user] += 1

    async def remove(self, entry: Entry) -> None:
        members = self.members.get(entry.topic)
        if members is None or entry.client not in members:
            return
        del members[entry.client]
        if not members:
            del self.members[entry.topic]
        users = self.users.get(entry.topic)
        if users is not None and entry.user is not None:
            users[entry.user] -= 1
            if users[entry.user] <= 0:
                del users[entry.user]
            if not users:
                del self.users[entry.topic]

    async def read(self, topic: str, *, limit: int) -> tuple[int, int, list[Member]]:
        members = self.members.get(topic, {})
        listed = [Member(client=client, user=user) for client, user in sorted(members.items())[:limit]]
        return len(members), len(self.users.get(topic, ())), listed

    async def close(self) -> None:
        self.members.clear()
        self.users.clear()


class RedisRegistry:
    """This process's entries in Redis: batched writes, one heartbeat per interval, the sweep of dead processes."""

    def __init__(self, *, prefix: str, ttl: int) -> None:
        self.prefix = prefix
        self.ttl = ttl
        # A process-unique name: a restarted worker keeps its node id, but not its dead predecessor's entries.
        self.instance = f"{presence.node_name()}/{uuid.uuid4().hex[:8]}"
        self.entries: dict[tuple[str, str], str | None] = {}  # (topic, client) -> user: what this process holds
        self.queue: list[tuple[str, Entry, asyncio.Future[None]]] = []
        # Removals whose write failed, written again at the next heartbeat (insertion-ordered, at most MAX_RETRIES).
        self.retry: dict[Entry, None] = {}
        self.flusher: asyncio.Task[None] | None = None
        self.written = False  # this instance has written to Redis (so a missing heartbeat means it was swept)
        self.swept = False
        client = presence.redis_client()
        self.apply_script: AsyncScript = client.register_script(_APPLY)
        self.sweep_script: AsyncScript = client.register_script(_SWEEP)
        self.read_script: AsyncScript = client.register_script(_READ)
        self.task = asyncio.get_running_loop().create_task(self.run(), name="pingpong-topic-presence")

    def user_of(self, topic: str, client: str) -> tuple[bool, str | None]:
        key = (topic, client)
        return key in self.entries, self.entries.get(key)

    async def add(self, entry: Entry) -> None:
        """Record `entry` (with the next batch); PresenceUnavailable when Redis did not confirm it."""
        self.entries[(entry.topic, entry.client)] = entry.user
        try:
            await self.submit(ADD, entry)
        except presence.PresenceUnavailable:
            # The write may have landed before the answer was lost: undo it with the next batch.
            self.entries.pop((entry.topic, entry.client), None)
            self.retry_later(entry)
            raise

    async def remove(self, entry: Entry) -> None:
        """Remove `entry` (with the next batch); a failed write is retried at the next heartbeat."""
        self.entries.pop((entry.topic, entry.client), None)
        try:
            await self.submit(REMOVE, entry)
        except presence.PresenceUnavailable:
            self.retry_later(entry)

    def retry_later(self, entry: Entry) -> None:
        self.retry[entry] = None
        if len(self.retry) > MAX_RETRIES:
            dropped = next(iter(self.retry))
            del self.retry[dropped]
            logger.warning("topic presence: over %d removals to retry; dropping %s", MAX_RETRIES, dropped)

    def submit(self, op: str, entry: Entry) -> "asyncio.Future[None]":
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        done.add_done_callback(lambda future: future.cancelled() or future.exception())  # retrieved: no GC warning
        self.queue.append((op, entry, done))
        if self.flusher is None or self.flusher.done():
            self.flusher = loop.create_task(self.flush(), name="pingpong-topic-presence-flush")
        return done

    async def flush(self) -> None:
        """Write the queued changes, BATCH_OPS per script call, until the queue is empty."""
        while self.queue:
            batch, self.queue = self.queue[:BATCH_OPS], self.queue[BATCH_OPS:]
            changes = [(op, entry) for op, entry, _ in batch]
            try:
                await self.write(changes)
            except PRESENCE_ERRORS as error:
                failure = presence.PresenceUnavailable(
                    f"Redis did not record presence: {error or type(error).__name__}"
                )
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(failure)
                continue
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def write(self, changes: list[tuple[str, Entry]]) -> None:
        """One script call: refresh this instance's expiry and apply `changes` in order."""
        args: list[Any] = [self.prefix, self.instance, self.ttl, int(self.written)]
        for op, entry in changes:
            args += [op, entry.topic, entry.client, json.dumps(entry.user)]
        async with asyncio.timeout(2 * presence.REDIS_TIMEOUT_SECONDS):
            swept = await self.apply_script(args=args)
        self.written = True
        if swept:
            self.swept = True

    async def heartbeat(self) -> None:
        """Push this instance's expiry forward (one call), retry failed removals, rewrite all if it was swept."""
        retry, self.retry = self.retry, {}
        changes = [(REMOVE, entry) for entry in retry if (entry.topic, entry.client) not in self.entries]
        try:
            for start in range(0, max(len(changes), 1), BATCH_OPS):
                await self.write(changes[start : start + BATCH_OPS])
        except PRESENCE_ERRORS as error:
            logger.warning("topic presence: cannot refresh in Redis: %s", error or type(error).__name__)
            for entry in retry:
                self.retry_later(entry)
            return
        if self.swept:
            self.swept = False
            await self.rewrite()

    async def rewrite(self) -> None:
        """This process was taken for dead (and its subscribers told `leave`): record its entries again."""
        entries = [Entry(topic, client, user) for (topic, client), user in self.entries.items()]
        logger.warning("topic presence: this process expired in Redis while alive; rewriting %d entries", len(entries))
        try:
            for start in range(0, len(entries), BATCH_OPS):
                await self.write([(ADD, entry) for entry in entries[start : start + BATCH_OPS]])
        except PRESENCE_ERRORS as error:
            logger.warning("topic presence: rewrite failed, retrying: %s", error or type(error).__name__)
            self.swept = True
            return
        await send_events(protocol.EVENT_JOIN, entries)

    async def sweep(self) -> list[Entry]:
        """Remove the entries of processes that expired (at most SWEEP_BATCH); return them, for `leave`."""
        async with asyncio.timeout(2 * presence.REDIS_TIMEOUT_SECONDS):
            removed = await self.sweep_script(args=[self.prefix, SWEEP_BATCH])
        entries: list[Entry] = []
        for raw in removed:
            topic, client, user = (raw.decode() if isinstance(raw, bytes) else raw).split(" ", 2)
            entries.append(Entry(topic, client, json.loads(user)))
        return entries

    async def run(self) -> None:
        """Heartbeat every refresh interval and sweep every SWEEP_SECONDS (or interval, if shorter), until cancelled."""
        loop = asyncio.get_running_loop()
        interval = presence.refresh_interval(self.ttl)
        tick = min(SWEEP_SECONDS, interval)
        next_heartbeat = loop.time()
        while True:
            if loop.time() >= next_heartbeat:
                next_heartbeat = loop.time() + interval
                await self.heartbeat()
            for _ in range(SWEEPS_PER_TICK):
                try:
                    gone = await self.sweep()
                except PRESENCE_ERRORS as error:
                    logger.warning("topic presence: sweep failed: %s", error or type(error).__name__)
                    break
                await send_events(protocol.EVENT_LEAVE, gone)
                if len(gone) < SWEEP_BATCH:
                    break
            await asyncio.sleep(tick)

    async def read(self, topic: str, *, limit: int) -> tuple[int, int, list[Member]]:
        try:
            async with asyncio.timeout(2 * presence.REDIS_TIMEOUT_SECONDS):
                connections, users, members = await self.read_script(args=[self.prefix, topic, limit])
        except PRESENCE_ERRORS as error:
            raise presence.PresenceUnavailable(
                f"Redis is unreachable, so presence is unknown: {error or type(error).__name__}"
            ) from error
        listed: list[Member] = []
        for raw in members:
            client, user = (raw.decode() if isinstance(raw, bytes) else raw).split(" ", 1)
            listed.append(Member(client=client, user=json.loads(user)))
        return int(connections), int(users), listed

    async def close(self) -> None:
        """Stop, and mark this instance expired so that a sweep removes whatever it still holds."""
        self.task.cancel()
        if self.flusher is not None:
            self.flusher.cancel()
        try:
            async with asyncio.timeout(2 * presence.REDIS_TIMEOUT_SECONDS):
                await presence.redis_client().zadd(f"{self.prefix}:topicpresence:nodes", {self.instance: 0})
        except PRESENCE_ERRORS as error:
            logger.warning("topic presence: could not mark this process gone: %s", error or type(error).__name__)


Registry = MemoryRegistry | RedisRegistry

_registries: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Registry]" = weakref.WeakKeyDictionary()


def registry() -> Registry:
    """This loop's registry: in Redis when REDIS_URL is set, else in this process."""
    loop = asyncio.get_running_loop()
    found = _registries.get(loop)
    if found is None:
        if settings.REDIS_URL:
            found = RedisRegistry(prefix=presence.key_prefix(), ttl=presence.key_ttl())
        else:
            found = MemoryRegistry()
        _registries[loop] = found
    return found


def start() -> None:
    """Start this process's heartbeat and sweep (with Redis): a node sweeps dead ones even with no entries."""
    registry()


async def stop() -> None:
    """Stop heartbeat and sweep; with Redis, leave what remains to the other nodes' sweep."""
    found = _registries.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.close()


async def join(namespace: Namespace, *, topic: str, client: str, user: str | None) -> None:
    """Record a new subscription of a tracked namespace, then tell the topic's subscribers (`join`).

    Raises TopicRefused (unavailable) when Redis did not record it; nothing is announced then.
    """
    if not namespace.tracked:
        return
    entry = Entry(topic=topic, client=client, user=user)
    try:
        await registry().add(entry)
    except presence.PresenceUnavailable as error:
        raise TopicRefused(protocol.ERROR_UNAVAILABLE, f"{error}; retry.") from None
    if namespace.join_leave:
        await send_events(protocol.EVENT_JOIN, [entry])


async def leave(subscriptions: "set[str] | list[str]", *, client: str) -> None:
    """Forget `client`'s entries for `subscriptions`, then send `leave` where the namespace asks for it."""
    tracked = [topic for topic in subscriptions if is_tracked(topic)]
    if not tracked:
        return  # no registry made for connections that never held an entry
    found = registry()
    entries: list[Entry] = []
    for topic in tracked:
        held, user = found.user_of(topic, client)
        if held:
            entries.append(Entry(topic=topic, client=client, user=user))
    if not entries:
        return
    await asyncio.gather(*(found.remove(entry) for entry in entries))
    await send_events(protocol.EVENT_LEAVE, entries)


async def listing(topic: str) -> Listing:
    """Who is subscribed to `topic`: exact counts, and at most PRESENCE_LIST_MAX connections listed.

    Raises TopicRefused: bad_topic, unknown_namespace, bad_request (no presence in the namespace),
    unavailable (Redis did not answer).
    """
    if not topics.namespace_for(topic).presence:
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, f"The namespace of {topic} does not keep presence.")
    try:
        connections, users, members = await registry().read(topic, limit=protocol.PRESENCE_LIST_MAX)
    except presence.PresenceUnavailable as error:
        raise TopicRefused(protocol.ERROR_UNAVAILABLE, f"{error}; retry.") from None
    listed: list[Member] = []
    size = 0
    for member in members:
        size += len(member["client"]) + len(json.dumps(member["user"]))
        if size > protocol.PRESENCE_LIST_MAX_BYTES:
            break
        listed.append(member)
    return Listing(
        topic=topic, connections=connections, users=users, clients=listed, truncated=len(listed) < connections
    )


def is_tracked(topic: str) -> bool:
    """Whether subscriptions to `topic` are recorded (its namespace has presence or join_leave)."""
    try:
        return topics.namespace_for(topic).tracked
    except TopicRefused:
        return False


def event_message(kind: str, entry: Entry) -> dict[str, Any]:
    """The channel-layer message carrying a `join` or `leave` event to the topic's subscribers."""
    event = {"type": kind, "topic": entry.topic, "user": entry.user, "client": entry.client}
    return {
        "type": protocol.PRESENCE_MESSAGE,
        "topic": entry.topic,
        "client": entry.client,
        "event": protocol.encode_event(event),
    }


async def send_events(kind: str, entries: list[Entry]) -> None:
    """Send `kind` (join or leave) for each entry of a join_leave namespace; a failure is logged, not raised."""
    layer = layer_calls.get_layer()
    for entry in entries:
        try:
            if not topics.namespace_for(entry.topic).join_leave:
                continue
        except TopicRefused:  # a namespace removed from the configuration since
            continue
        try:
            await layer_calls.call(
                layer.group_send(topics.group_for(entry.topic), event_message(kind, entry)), operation="group_send"
            )
        except ChannelLayerUnavailable as error:
            logger.warning("topic presence: could not send %s for %s: %s", kind, entry.topic, error)
