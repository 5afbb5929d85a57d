"""Presence: how many websockets are open on each node, and in the whole cluster.

With Redis, every node keeps one key, `<prefix>:presence:<node id>`, holding its open
connection count. A refresher rewrites it every REFRESH_SECONDS with a TTL of
TTL_SECONDS, so a node that dies without a word (SIGKILL, lost host) drops out within
TTL_SECONDS, never more than 15 s. Reading sums the keys that are still alive.

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

from pingpong.layer import LAYER_ERRORS
from pingpong.node import node
from pingpong.pool import BoundedConnectionPool

logger = logging.getLogger(__name__)

REFRESH_SECONDS: Final = 5.0
# Two refreshes may fail (a Redis hiccup) before a live node blinks out; a dead one is gone in 12 s.
TTL_SECONDS: Final = 12
REDIS_TIMEOUT_SECONDS: Final = 1.0
# SCAN pages are bounded so a Redis full of other keys cannot stall a stats request.
SCAN_COUNT: Final = 500
MAX_NODES: Final = 10_000

PRESENCE_ERRORS = LAYER_ERRORS  # the same Redis failures the channel layer meets


class Stats(TypedDict):
    """The body of GET /api/stats."""

    connections: int
    nodes: dict[str, int]


class PresenceUnavailable(Exception):
    """Redis could not be reached in time, so the cluster count is unknown."""


def presence_node_id() -> str:
    """This process's name in the cluster: PINGPONG_NODE_ID, else `<hostname>-<pid>`."""
    return settings.PINGPONG_NODE_ID or f"{socket.gethostname()}-{os.getpid()}"


def presence_prefix() -> str:
    """The Redis key prefix, shared with the channel layer so deployments stay apart."""
    return str(settings.PINGPONG_REDIS_PREFIX)


def presence_key(*, prefix: str, node_id: str) -> str:
    return f"{prefix}:presence:{node_id}"


def presence_summary(nodes: dict[str, int]) -> Stats:
    """Total the per-node counts."""
    return {"connections": sum(nodes.values()), "nodes": dict(sorted(nodes.items()))}


async def presence_publish(client: Redis, *, prefix: str, node_id: str, count: int, ttl: int = TTL_SECONDS) -> None:
    """Write this node's count with a TTL; the node vanishes unless this runs again in time."""
    await client.set(presence_key(prefix=prefix, node_id=node_id), count, ex=ttl)


async def presence_read(client: Redis, *, prefix: str) -> dict[str, int]:
    """The count of every node whose key has not expired."""
    pattern = presence_key(prefix=prefix, node_id="*")
    keys: list[bytes | str] = []
    async for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        keys.append(key)
        if len(keys) >= MAX_NODES:
            break
    if not keys:
        return {}
    values = await client.mget(keys)
    start = len(presence_key(prefix=prefix, node_id=""))
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


def presence_client() -> Redis:
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


async def presence_stats() -> Stats:
    """Connections per live node and in total; this node's own count is always the live one.

    Raises PresenceUnavailable when Redis does not answer within a few seconds.
    """
    node_id = presence_node_id()
    here = len(node.connections)
    if not settings.REDIS_URL:
        return presence_summary({node_id: here})
    try:
        async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
            nodes = await presence_read(presence_client(), prefix=presence_prefix())
    except PRESENCE_ERRORS as error:
        raise PresenceUnavailable(str(error) or type(error).__name__) from error
    nodes[node_id] = here
    return presence_summary(nodes)


async def presence_refresh_forever(*, interval: float = REFRESH_SECONDS) -> None:
    """Publish this node's count every `interval` seconds until cancelled; survives Redis outages."""
    prefix, node_id = presence_prefix(), presence_node_id()
    failing = False
    while True:
        try:
            async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
                await presence_publish(presence_client(), prefix=prefix, node_id=node_id, count=len(node.connections))
            if failing:
                logger.info("presence: publishing to Redis again")
            failing = False
        except PRESENCE_ERRORS as error:
            if not failing:  # one line per outage, not one every few seconds
                logger.warning("presence: cannot publish to Redis: %s", error or type(error).__name__)
            failing = True
        await asyncio.sleep(interval)


def presence_start() -> None:
    """Start this process's refresher on the running loop, once; a no-op without Redis.

    Safe to call from every request or connection: it only starts a task the first time.
    """
    if not settings.REDIS_URL:
        return
    loop = asyncio.get_running_loop()
    task = _refreshers.get(loop)
    if task is None or task.done():
        _refreshers[loop] = loop.create_task(presence_refresh_forever(), name="pingpong-presence")


async def presence_stop() -> None:
    """Stop refreshing and remove this node's key, so a clean shutdown drops out at once."""
    loop = asyncio.get_running_loop()
    task = _refreshers.pop(loop, None)
    if task is not None:
        task.cancel()
    client = _clients.pop(loop, None)
    if client is None:
        return
    try:
        if task is not None:
            async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS):
                await client.delete(presence_key(prefix=presence_prefix(), node_id=presence_node_id()))
    except PRESENCE_ERRORS as error:
        logger.warning("presence: could not remove this node's key: %s", error or type(error).__name__)
    finally:
        await client.aclose()
