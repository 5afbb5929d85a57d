"""A Redis connection pool with a hard cap, a bounded wait and idle connections closed.

redis-py's default pool opens a connection for every concurrent command (up to 100, then
"Too many connections"), and keeps each open for good: a burst of broadcasts left a node
holding 101 connections, and with a small `maxclients` one node starved the others.
`BoundedConnectionPool` never holds more than `max_connections` (in use, idle or closing),
makes a caller wait up to `timeout` seconds for one to come free, and closes a connection
left idle for `idle_seconds`. `BoundedSentinelConnectionPool` does the same for the master that
a set of Redis Sentinels names.
"""

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError


class PoolExhausted(RedisConnectionError):
    """Every pooled connection stayed busy for the whole wait: Redis may well be healthy."""


class BoundedConnectionPool(BlockingConnectionPool):
    """BlockingConnectionPool that also closes connections idle for `idle_seconds`."""

    def __init__(self, *, max_connections: int, timeout: float, idle_seconds: float, **connection_kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, timeout=timeout, **connection_kwargs)
        self.idle_seconds = idle_seconds
        self._released_at: dict[AbstractConnection, float] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            return await super().get_connection()
        except RedisConnectionError as error:
            # redis-py says "No connection available." when its wait times out: name the cause.
            if isinstance(error.__cause__, asyncio.TimeoutError) and "No connection available" in str(error):
                raise PoolExhausted(
                    f"connection pool exhausted: all {self.max_connections} Redis connections "
                    f"stayed busy for {self.timeout:g} s"
                ) from error
            raise

    async def release(self, connection: AbstractConnection) -> None:
        self._released_at[connection] = asyncio.get_running_loop().time()
        await super().release(connection)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_idle())

    async def _reap_idle(self) -> None:
        """Close connections idle for `idle_seconds`; ends when none is left idle."""
        loop = asyncio.get_running_loop()
        while self._available_connections:
            oldest = min(self._released_at.get(c, loop.time()) for c in self._available_connections)
            await asyncio.sleep(max(0.0, oldest + self.idle_seconds - loop.time()))
            # Under the condition no caller takes or makes a connection, so the cap holds
            # while the idle ones close.
            async with self._condition:
                cutoff = loop.time() - self.idle_seconds
                idle = [c for c in self._available_connections if self._released_at.get(c, loop.time()) <= cutoff]
                for connection in idle:
                    self._available_connections.remove(connection)
                    self._released_at.pop(connection, None)
                await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
                self._condition.notify(len(idle))

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        await super().disconnect(inuse_connections)


class BoundedSentinelConnectionPool(SentinelConnectionPool, BoundedConnectionPool):
    """A BoundedConnectionPool to the master a set of Sentinels names (redis-py's SentinelConnectionPool).

    The cap, the wait and the idle release count connections to the master, as for a plain
    host. The pool asks the Sentinels for the master's address on every new connection (and
    reconnects to a new master after a failover, as redis-py's pool does), over one connection
    per Sentinel, capped and idle-released the same way; `disconnect` closes those too.
    """

    def __init__(
        self,
        service_name: str,
        *,
        sentinels: list[tuple[str, int]],
        sentinel_kwargs: dict[str, Any] | None,
        max_connections: int,
        timeout: float,
        idle_seconds: float,
        **connection_kwargs: Any,
    ) -> None:
        if sentinel_kwargs is None:  # as redis-py's Sentinel: the socket options of the master's connections
            sentinel_kwargs = {k: v for k, v in connection_kwargs.items() if k.startswith("socket_")}
        manager = Sentinel([], sentinel_kwargs=sentinel_kwargs)
        # redis-py's Sentinel opens a connection per concurrent query and keeps them: one each, bounded.
        manager.sentinels = [
            Redis(
                connection_pool=BoundedConnectionPool(
                    host=host,
                    port=port,
                    max_connections=1,
                    timeout=timeout,
                    idle_seconds=idle_seconds,
                    **sentinel_kwargs,
                )
            )
            for host, port in sentinels
        ]
        super().__init__(
            service_name,
            manager,
            max_connections=max_connections,
            timeout=timeout,
            idle_seconds=idle_seconds,
            **connection_kwargs,
        )

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close (not redis-py's "new master: drop idle ones"): the Sentinels' too
            await asyncio.gather(*(client.connection_pool.disconnect() for client in self.sentinel_manager.sentinels))
