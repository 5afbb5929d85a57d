"""This process's websocket connections: the per-node cap and the graceful drain."""

import asyncio
import logging
import time
from typing import Protocol

logger = logging.getLogger(__name__)


class Closable(Protocol):
    async def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Node:
    """The connections open on this process, and whether it is draining."""

    def __init__(self) -> None:
        self.connections: set[Closable] = set()
        self.draining = False
        self._empty = asyncio.Event()

    def admit(self, connection: Closable, *, limit: int) -> bool:
        """Count a new connection in; False when the node is draining or full (limit 0: no cap)."""
        if self.draining or (limit and len(self.connections) >= limit):
            return False
        self.connections.add(connection)
        return True

    def release(self, connection: Closable) -> None:
        """Count a connection out; wakes a drain waiting for the last one."""
        self.connections.discard(connection)
        if not self.connections:
            self._empty.set()

    async def drain(self, *, code: int, timeout: float) -> int:
        """Stop admitting, close every connection with `code`, wait up to `timeout` s.

        Returns how many connections were still open when the time ran out.
        """
        self.draining = True
        self._empty = asyncio.Event()
        if not self.connections:
            return 0
        started = time.monotonic()
        count = len(self.connections)
        # Kept, so none is garbage-collected mid-close, and cancelled if the time runs out.
        closing = [asyncio.ensure_future(connection.close(code=code)) for connection in list(self.connections)]
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            pass
        for task in closing:
            task.cancel()
        left = len(self.connections)
        logger.info("drained %d of %d connections in %.2fs", count - left, count, time.monotonic() - started)
        return left


node = Node()
