"""Presence: how many websockets are open on each node, and in the whole cluster.

With Redis, every node keeps one key, `<prefix>:presence:<node id>`, holding its open
connection count. A refresher rewrites it every (TTL - 2) / 2 seconds with a TTL of
PINGPONG_PRESENCE_TTL (12 s: every 5 s), so a node that dies without a word (SIGKILL,
lost host) drops out within the TTL. Reading sums the keys that are still alive.

When this node cannot write its own key (Redis at `maxmemory` with `noeviction` answers
writes with OOM while reads still work), the other nodes almost surely cannot either:
their keys expire and a sum of the survivors would be a wrong total that looks right.
So while this node's last write failed, the stats raise PresenceStale (503) instead.

Without Redis (the in-memory layer) there is no cluster to see: the answer is this
process alone.
"""

import asyncio
import logging
import os
import socket
import weakref
from typing import Final, TypedDict

from django.conf import settings
from redis.asyncio import Redis

from pingpong import layer_calls
from pingpong.node import node
from pingpong.pool import BoundedConnectionPool

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS: Final = 1.0
# SCAN pages are bounded so a Redis full of other keys cannot stall a stats request.
SCAN_COUNT: Final = 500
MAX_NODES: Final = 10_000

PRESENCE_ERRORS = layer_calls.REDIS_FAILURES  # the same Redis failures the channel layer meets


class Stats(TypedDict):
    """The body of GET /api/stats."""

    connections: int
    nodes: dict[str, int]


class PresenceUnavailable(Exception):
    """Redis could not be reached in time, so the cluster count is unknown."""


class PresenceStale(PresenceUnavailable):
    """This node cannot write its count, so other nodes' counts may have expired: the total may be wrong."""


def key_ttl() -> int:
    """Seconds a published count lives: PINGPONG_PRESENCE_TTL."""
    return int(settings.PINGPONG_PRESENCE_TTL)


def refresh_interval(ttl: int) -> float:
    """How often to rewrite the count: two writes may fail (a Redis hiccup) before the key expires."""
    return (ttl - 2) / 2


def node_name() -> str:
    """This process's name in the cluster: PINGPONG_NODE_ID, else `<hostname>-<pid>`."""
    return settings.PINGPONG_NODE_ID or f"{socket.gethostname()}-{os.getpid()}"


def key_prefix() -> str:
    """The Redis key prefix, shared with the channel layer so deployments stay apart."""
    return str(settings.PINGPONG_REDIS_PREFIX)


def node_key(*, prefix: str, node_id: str) -> str:
    return f"{prefix}:presence:{node_id}"


def summarise(nodes: dict[str, int]) -> Stats:
    """Total the per-node counts."""
    return {"connections": sum(nodes.values()), "nodes": dict(sorted(nodes.items()))}


async def publish(client: Redis, *, prefix: str, node_id: str, count: int, ttl: int) -> None:
    """Write this node's count with a TTL; the node vanishes unless this runs again in time."""
    await client.set(node_key(prefix=prefix, node_id=node_id), count, ex=ttl)


async def read(client: Redis, *, prefix: str) -> dict[str, int]:
    """The count of every node whose key has not expired."""
    pattern = node_key(prefix=prefix, node_id="*")
    keys: list[bytes | str] = []
    async for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        keys.append(key)
        if len(keys) >= MAX_NODES:
            break
    if not keys:
        return {}
    values = await client.mget(keys)
    start = len(node_key(prefix=prefix, node_id=""))
    nodes: dict[str, int] = {}
    for key, value in zip(keys, values, strict=True):
        if value is None:  # expired between SCAN and MGET
            continue
        name = key.decode() if isinstance(key, bytes) else key
        try:
            nodes[name[start:]] = int(value)
        except ValueError:
            logger.warning("presence: ignoring non-integer value under %s", name)
    return nodes


# One client per event loop: redis.asyncio connections belong to the loop that made them.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis]" = weakref.WeakKeyDictionary()
_refreshers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]]" = weakref.WeakKeyDictionary()
# Why this loop's last write of its count failed; no entry while writes succeed.
_write_errors: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, str]" = weakref.WeakKeyDictionary()


def redis_client() -> Redis:
    """This loop's Redis client for presence: one connection (of PINGPONG_REDIS_MAX_CONNECTIONS), short timeouts."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        pool = BoundedConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=1,  # the settings give the channel layer the rest of the node's cap
            timeout=REDIS_TIMEOUT_SECONDS,
            idle_seconds=settings.PINGPONG_REDIS_IDLE_SECONDS,
            client_name=settings.REDIS_CLIENT_NAME,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
        )
        client = Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
        _clients[loop] = client
    return client


async def write() -> bool:
    """Write this node's count now; remember whether it failed (see PresenceStale). True on success."""
    loop = asyncio.get_running_loop()
    prefix, node_id, ttl = key_prefix(), node_name(), key_ttl()
    try:
        async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
            await publish(redis_client(), prefix=prefix, node_id=node_id, count=len(node.connections), ttl=ttl)
    except PRESENCE_ERRORS as error:
        if loop not in _write_errors:  # one line per outage, not one every few seconds
            logger.warning("presence: cannot publish to Redis: %s", error or type(error).__name__)
        _write_errors[loop] = str(error) or type(error).__name__
        return False
    if _write_errors.pop(loop, None) is not None:
        logger.info("presence: publishing to Redis again")
    return True


async def stats() -> Stats:
    """Connections per live node and in total; this node's own count is always the live one.

    Raises PresenceUnavailable when Redis does not answer within a few seconds, and
    PresenceStale when this node cannot write its own count (one more try is made first).
    """
    node_id = node_name()
    here = len(node.connections)
    if not settings.REDIS_URL:
        return summarise({node_id: here})
    error = _write_errors.get(asyncio.get_running_loop())
    if error is not None and not await write():
        raise PresenceStale(
            f"This node cannot write its count to Redis ({error}), so other nodes' counts may have "
            "expired and the cluster total may be wrong."
        )
    try:
        async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
            nodes = await read(redis_client(), prefix=key_prefix())
    except PRESENCE_ERRORS as error:
        raise PresenceUnavailable(
            f"Redis is unreachable, so the cluster count is unknown: {str(error) or type(error).__name__}"
        ) from error
    nodes[node_id] = here
    return summarise(nodes)


async def refresh_forever() -> None:
    """Publish this node's count every refresh interval until cancelled; survives Redis outages."""
    interval = refresh_interval(key_ttl())
    while True:
        await write()
        await asyncio.sleep(interval)


def start() -> None:
    """Start this process's refresher on the running loop, once; a no-op without Redis.

    Safe to call from every request or connection: it only starts a task the first time.
    """
    if not settings.REDIS_URL:
        return
    loop = asyncio.get_running_loop()
    task = _refreshers.get(loop)
    if task is None or task.done():
        _refreshers[loop] = loop.create_task(refresh_forever(), name="pingpong-presence")
        from pingpong import topic_presence  # who is on which topic: it sweeps dead nodes from boot

        topic_presence.start()


async def stop() -> None:
    """Stop refreshing and remove this node's key, so a clean shutdown drops out at once."""
    loop = asyncio.get_running_loop()
    task = _refreshers.pop(loop, None)
    if task is not None:
        task.cancel()
        from pingpong import topic_presence

        await topic_presence.stop()
    _write_errors.pop(loop, None)
    client = _clients.pop(loop, None)
    if client is None:
        return
    try:
        if task is not None:
            async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
                await client.delete(node_key(prefix=key_prefix(), node_id=node_name()))
    except PRESENCE_ERRORS as error:
        logger.warning("presence: could not remove this node's key: %s", error or type(error).__name__)
    finally:
        await client.aclose()
