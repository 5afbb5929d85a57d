"""Topic history: offsets, epochs, and reading back what a client missed.

A publication to a topic whose namespace keeps history gets the next **offset** of the topic
(1, 2, 3, ..., no gaps) and the topic's **epoch**, an opaque string that changes whenever the
history may have been lost (Redis restarted or flushed, the topic's keys expired). Both are
assigned where the publication is delivered live, in one step, so history and live delivery
never disagree:

- on Redis (`RedisHistory`), one Lua script per publication reads or creates the epoch,
  increments the offset, appends the event to a Stream trimmed to `history_size` (entry id
  `<offset>-0`), sets the keys' TTL to `history_ttl` and PUBLISHes the layer's message to the
  topic's group channel, in the layer's own wire format (msgpack), in the same round trip;
- in the embedded layer (`LocalHistory`), the same inside one process.

A publication id is remembered for `history_ttl` (`<prefix>:history:<topic>:id:<id>`): a retry
of an id already published returns the first offset and publishes nothing.

A read (`read`) answers the topic's current position and, given `since`, the publications after
it when every one of them is still retained, in the same epoch, and not more than `limit`.
Concurrent identical reads in one process share one Redis call (`ReadFlights`).
"""

import asyncio
import functools
import hashlib
import itertools
import secrets
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from channels.layers import BaseChannelLayer
from redis.exceptions import NoScriptError

from pingpong import metrics
from pingpong.layers import PingpongPubSubChannelLayer, PingpongPubSubLoopLayer, PingpongShard

#: Epochs are this many random hex digits: opaque to clients, safe in JSON without escaping.
EPOCH_HEX_DIGITS = 16
#: A topic's publication ids remembered for retries, at most (embedded layer; Redis keeps each for the TTL).
LOCAL_IDS_PER_TOPIC = 10_000

# One counter orders subscriptions and reads in this process (see ReadFlights).
_sequence = itertools.count(1)


def next_sequence() -> int:
    """A number larger than every one handed out before: call it once a subscription is live."""
    return next(_sequence)


def new_epoch() -> str:
    return secrets.token_hex(EPOCH_HEX_DIGITS // 2)


@dataclass(frozen=True)
class Published:
    """Where a publication landed: its offset and epoch; `duplicate` when its id was published before."""

    offset: int
    epoch: str
    duplicate: bool = False


@dataclass(frozen=True)
class Read:
    """A topic's position (`offset`, `epoch`), and the publications after `since` when `recovered`.

    `events` are the publications' event texts, offsets `first`, `first + 1`, ...; `recovered`
    is True only when they are every publication after `since` up to `offset`.
    """

    epoch: str
    offset: int
    recovered: bool = False
    first: int = 0
    events: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PublicationParts:
    """A publication's layer message and event text, with the offset and epoch still to be filled in.

    The event text is `event_head + <offset> + ',"epoch":"<epoch>"' + event_tail`; the message is
    `fields` plus "offset", "epoch" and "event".
    """

    topic: str
    group: str
    publication_id: str
    fields: dict[str, Any]
    event_head: str
    event_tail: str

    def event(self, offset: int, epoch: str) -> str:
        return f'{self.event_head}{offset},"epoch":"{epoch}"{self.event_tail}'


def read_decision(
    *, epoch: str, offset: int, since: int, want_epoch: str | None, limit: int, first: int, count: int
) -> bool:
    """Whether `count` publications starting at `first` are every publication after `since` (the recovery rule)."""
    if want_epoch is not None and want_epoch != epoch:
        return False
    if since > offset or offset - since > limit:
        return False
    return since == offset or (first == since + 1 and count == offset - since)


# The embedded layer


@dataclass
class TopicLog:
    """One topic's history in this process."""

    epoch: str
    offset: int = 0
    entries: deque[tuple[int, str]] = field(default_factory=deque)
    expires_at: float = 0.0
    ids: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)  # id -> (offset, expires at)


class LocalHistory:
    """The history of every topic in one process: the embedded layer's counterpart of the Redis keys.

    A topic's log lives `ttl` seconds after its last publication (or read, which keeps the
    epoch, as on Redis); then it is forgotten and the next use starts a new epoch.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.topics: OrderedDict[str, TopicLog] = OrderedDict()  # least recently used first

    def log(self, topic: str, *, ttl: float) -> TopicLog:
        """The topic's live log (a new epoch when it had none or it expired), its TTL renewed."""
        now = self.clock()
        while self.topics:  # forget expired logs from the least recently used end
            oldest = next(iter(self.topics.values()))
            if oldest.expires_at > now:
                break
            self.topics.popitem(last=False)
        log = self.topics.get(topic)
        if log is None or log.expires_at <= now:
            log = self.topics[topic] = TopicLog(epoch=new_epoch())
        log.expires_at = max(log.expires_at, now + ttl)
        self.topics.move_to_end(topic)
        return log

    def append(self, parts: PublicationParts, *, size: int, ttl: float) -> tuple[Published, str]:
        """Give the publication its offset and keep it: (where it landed, its event text)."""
        log = self.log(parts.topic, ttl=ttl)
        now = self.clock()
        while log.ids and next(iter(log.ids.values()))[1] <= now:
            log.ids.popitem(last=False)
        seen = log.ids.get(parts.publication_id)
        if seen is not None:
            return Published(seen[0], log.epoch, duplicate=True), ""
        log.offset += 1
        event = parts.event(log.offset, log.epoch)
        log.entries.append((log.offset, event))
        while len(log.entries) > size:
            log.entries.popleft()
        log.ids[parts.publication_id] = (log.offset, now + ttl)
        while len(log.ids) > LOCAL_IDS_PER_TOPIC:
            log.ids.popitem(last=False)
        return Published(log.offset, log.epoch), event

    def read(self, topic: str, *, ttl: float, since: int, want_epoch: str | None, limit: int, strict: bool) -> Read:
        log = self.log(topic, ttl=ttl)
        skip = strict and (
            (want_epoch is not None and want_epoch != log.epoch) or since > log.offset or log.offset - since > limit
        )
        picked = [] if skip or since < 0 else [entry for entry in log.entries if entry[0] > since][:limit]
        first = picked[0][0] if picked else 0
        recovered = since >= 0 and read_decision(
            epoch=log.epoch,
            offset=log.offset,
            since=since,
            want_epoch=want_epoch,
            limit=limit,
            first=first,
            count=len(picked),
        )
        return Read(log.epoch, log.offset, recovered, first, [event for _, event in picked])


# Redis

# KEYS: meta hash, stream, id key. ARGV: new epoch, history_size, ttl, event head, event tail,
# payload head (the msgpack message up to the "offset" key), group channel.
PUBLISH_SCRIPT = """
local meta, stream, idkey = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[3])
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
local seen = redis.call('GET', idkey)
if seen then
  local seen_epoch, seen_offset = string.match(seen, '^(%S+) (%d+)$')
  if seen_epoch == epoch then
    return {tonumber(seen_offset), epoch, 1}
  end
end
local offset = redis.call('HINCRBY', meta, 'offset', 1)
local event = ARGV[4] .. offset .. ',"epoch":"' .. epoch .. '"' .. ARGV[5]
redis.call('XADD', stream, 'MAXLEN', ARGV[2], offset .. '-0', 'e', event)
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', stream, ttl)
redis.call('SET', idkey, epoch .. ' ' .. offset, 'EX', ttl)
local payload = ARGV[6] .. cmsgpack.pack(offset) .. cmsgpack.pack('epoch') .. cmsgpack.pack(epoch)
  .. cmsgpack.pack('event') .. cmsgpack.pack(event)
redis.call('PUBLISH', ARGV[7], payload)
return {offset, epoch, 0}
"""

# KEYS: meta hash, stream. ARGV: new epoch, ttl, since, limit, wanted epoch ('' = any), strict (1/0).
# Returns {epoch, offset, first offset read, event, event, ...}; strict reads nothing that cannot recover.
READ_SCRIPT = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
redis.call('EXPIRE', meta, tonumber(ARGV[2]))
local offset = tonumber(redis.call('HGET', meta, 'offset'))
local since, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {epoch, offset, 0}
if since < 0 or since >= offset or limit <= 0 then
  return out
end
if ARGV[6] == '1' and ((ARGV[5] ~= '' and ARGV[5] ~= epoch) or offset - since > limit) then
  return out
end
local entries = redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', limit)
for i, entry in ipairs(entries) do
  if i == 1 then
    out[3] = tonumber(string.match(entry[1], '^(%d+)'))
  end
  out[#out + 1] = entry[2][2]
end
return out
"""


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL (which caches it) when Redis lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, shard: PingpongShard, keys: list[str], args: list[Any]) -> Any:
        try:
            return await shard.execute_batched("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # an error reply: the script did not run, so running it now is no retry
            return await shard.execute_batched("EVAL", self.source, len(keys), *keys, *args)


_publish_script = Script(PUBLISH_SCRIPT)
_read_script = Script(READ_SCRIPT)


def msgpack_head(fields: dict[str, Any], *, extra: int) -> bytes:
    """A msgpack map of `fields` plus `extra` more pairs, up to and including the key "offset".

    The script appends the offset, then "epoch" and "event" with their values: the layer's
    subscribers decode the whole as one map, as if `serialize` had packed it.
    """
    count = len(fields) + extra
    header = bytes([0x80 | count]) if count < 16 else b"\xde" + count.to_bytes(2, "big")
    body = b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in fields.items())
    return header + body + msgpack.packb("offset")


class RedisHistory:
    """History on the Redis shard that carries the topic's group channel (one per event loop's layer)."""

    def __init__(self, layer: PingpongPubSubLoopLayer) -> None:
        serializer = layer.channel_layer._serializer
        if getattr(serializer, "crypter", None) is not None or getattr(serializer, "random_prefix_length", 0) > 0:
            raise NotImplementedError("topic history needs the layer's plain msgpack serializer (no encryption)")
        self.layer = layer
        self.flights = ReadFlights()

    def keys(self, topic: str) -> tuple[str, str]:
        base = f"{self.layer.prefix}:history:{topic}"
        return f"{base}:meta", f"{base}:stream"

    def shard(self, group_channel: str) -> PingpongShard:
        shard = self.layer._get_shard(group_channel)
        assert isinstance(shard, PingpongShard)
        return shard

    async def publish(self, parts: PublicationParts, *, size: int, ttl: int) -> Published:
        group_channel = self.layer._get_group_channel_name(parts.group)
        meta, stream = self.keys(parts.topic)
        idkey = f"{self.layer.prefix}:history:{parts.topic}:id:{parts.publication_id}"
        args = [
            new_epoch(),
            size,
            ttl,
            parts.event_head,
            parts.event_tail,
            msgpack_head(parts.fields, extra=3),
            group_channel,
        ]
        offset, epoch, duplicate = await _publish_script.run(self.shard(group_channel), [meta, stream, idkey], args)
        return Published(int(offset), _text(epoch), bool(duplicate))

    async def read(
        self, topic: str, group: str, *, ttl: int, since: int, want_epoch: str | None, limit: int, strict: bool
    ) -> Read:
        group_channel = self.layer._get_group_channel_name(group)
        args = [new_epoch(), ttl, since, limit, want_epoch or "", "1" if strict else "0"]
        metrics.HISTORY_READS.inc()
        reply = await _read_script.run(self.shard(group_channel), list(self.keys(topic)), args)
        epoch, offset, first = _text(reply[0]), int(reply[1]), int(reply[2])
        events = [_text(event) for event in reply[3:]]
        recovered = since >= 0 and read_decision(
            epoch=epoch, offset=offset, since=since, want_epoch=want_epoch, limit=limit, first=first, count=len(events)
        )
        return Read(epoch, offset, recovered, first, events)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ReadFlights:
    """Concurrent identical reads share one call: a thousand clients recovering at once make a few Redis reads.

    A caller may only share a read that started after its subscription went live (`joined_at`,
    from `next_sequence`): an older read's snapshot may predate a publication the caller's
    subscription did not see live, and sharing it would leave a gap. So at most one read per
    key runs at a time, and the callers that arrive while it runs share the next one, started
    as soon as it ends: a burst of N identical recoveries costs about (burst length / read
    time) reads instead of N, and a caller waits at most two reads.
    """

    def __init__(self) -> None:
        self._current: dict[Any, tuple[int, asyncio.Task[Any]]] = {}  # key -> (started at, the read)
        self._next: dict[Any, asyncio.Task[Any]] = {}  # key -> the read that starts when the current one ends
        self.calls = 0  # reads actually made

    async def read(self, key: Any, *, joined_at: int, call: Callable[[], Awaitable[Any]]) -> Any:
        current = self._current.get(key)
        if current is None:
            current = self._start(key, call)
        elif current[0] <= joined_at:  # started too early for this caller: share the next one
            following = self._next.get(key)
            if following is None:
                following = self._next[key] = asyncio.ensure_future(self._after(key, current[1], call))
            return await asyncio.shield(following)
        return await asyncio.shield(current[1])

    def _start(self, key: Any, call: Callable[[], Awaitable[Any]]) -> tuple[int, "asyncio.Task[Any]"]:
        self.calls += 1
        flight = (next_sequence(), asyncio.ensure_future(call()))
        self._current[key] = flight
        flight[1].add_done_callback(functools.partial(self._land, key, flight))
        return flight

    async def _after(self, key: Any, running: "asyncio.Task[Any]", call: Callable[[], Awaitable[Any]]) -> Any:
        """Wait for the running read to end (however it ends), then share a read started after it."""
        await asyncio.wait({running})
        del self._next[key]
        # Any read started from now on began after every caller waiting here went live.
        flight = self._current.get(key) or self._start(key, call)
        return await flight[1]

    def _land(self, key: Any, flight: tuple[int, "asyncio.Task[Any]"], done: "asyncio.Task[Any]") -> None:
        if self._current.get(key) is flight:
            del self._current[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure whose callers all left is not logged as lost


# The entry points

_redis_histories: "weakref.WeakKeyDictionary[PingpongPubSubLoopLayer, RedisHistory]" = weakref.WeakKeyDictionary()


def supported(layer: BaseChannelLayer) -> bool:
    """Whether `layer` keeps topic history: the embedded layer and pingpong's Redis layer do."""
    return isinstance(layer, PingpongPubSubChannelLayer) or isinstance(getattr(layer, "history", None), LocalHistory)


def _redis(layer: PingpongPubSubChannelLayer) -> RedisHistory:
    loop_layer = layer._get_layer()
    history = _redis_histories.get(loop_layer)
    if history is None:
        history = _redis_histories[loop_layer] = RedisHistory(loop_layer)
    return history


async def publish(layer: BaseChannelLayer, parts: PublicationParts, *, size: int, ttl: int) -> Published:
    """Give the publication its offset, keep it and deliver it live to the topic's group, in one step.

    `layer` is one that `supported` accepts.
    """
    if isinstance(layer, PingpongPubSubChannelLayer):
        return await _redis(layer).publish(parts, size=size, ttl=ttl)
    local: LocalHistory = layer.history  # type: ignore[attr-defined]
    published, event = local.append(parts, size=size, ttl=ttl)
    if not published.duplicate:
        # LocalChannelLayer.group_send never yields: no other publication comes between append and delivery.
        message = {**parts.fields, "offset": published.offset, "epoch": published.epoch, "event": event}
        await layer.group_send(parts.group, message)
    return published


async def read(
    layer: BaseChannelLayer,
    topic: str,
    group: str,
    *,
    ttl: int,
    since: int = -1,
    want_epoch: str | None = None,
    limit: int = 0,
    strict: bool = True,
    joined_at: int | None = None,
) -> Read:
    """The topic's position and, with `since` >= 0, up to `limit` publications after it.

    `strict` (a recovery) reads nothing unless all of them can be returned. With `joined_at`
    (the caller's subscription went live then), identical concurrent reads share one call.
    """
    if isinstance(layer, PingpongPubSubChannelLayer):
        history = _redis(layer)

        def call() -> Awaitable[Read]:
            return history.read(topic, group, ttl=ttl, since=since, want_epoch=want_epoch, limit=limit, strict=strict)

        if joined_at is None:
            return await call()
        key = (topic, since, want_epoch, limit, strict)
        result: Read = await history.flights.read(key, joined_at=joined_at, call=call)
        return result
    local: LocalHistory = layer.history  # type: ignore[attr-defined]
    return local.read(topic, ttl=ttl, since=since, want_epoch=want_epoch, limit=limit, strict=strict)
