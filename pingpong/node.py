"""This process's websocket connections: the per-node and per-address caps, and the graceful drain."""

import asyncio
import enum
import ipaddress
import logging
import time
from typing import Protocol

from pingpong import protocol

logger = logging.getLogger(__name__)

# IPv6 clients are counted per /64: one host is usually given a whole /64 and may pick any
# address in it, so counting single addresses would let it open a fresh one per connection.
IPV6_PREFIX_LENGTH = 64


class Closable(Protocol):
    async def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Admission(enum.Enum):
    """The answer to a new connection; only ADMITTED counts it in."""

    ADMITTED = "admitted"
    DRAINING = protocol.ERROR_DRAINING
    FULL = protocol.ERROR_FULL  # PINGPONG_MAX_CONNECTIONS
    ADDRESS_FULL = protocol.ERROR_TOO_MANY_CONNECTIONS  # PINGPONG_MAX_CONNECTIONS_PER_IP

    def __bool__(self) -> bool:
        # `if not node.admit(...)` keeps reading as "refused".
        return self is Admission.ADMITTED


def address_key(host: str | None) -> str | None:
    """The key a client is counted under: the IPv4 address, or the IPv6 /64; None when unknown."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a unix socket, a proxy's odd header): counted as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_LENGTH), strict=False))
    return str(address)


class Node:
    """The connections open on this process, per client address, and whether it is draining."""

    def __init__(self) -> None:
        self.connections: set[Closable] = set()
        # Only addresses with at least one connection have an entry, so the map cannot grow
        # with every address ever seen.
        self.per_address: dict[str, int] = {}
        self._address_of: dict[Closable, str] = {}
        self.draining = False
        self._empty = asyncio.Event()

    def admit(
        self, connection: Closable, *, limit: int, address: str | None = None, address_limit: int = 0
    ) -> Admission:
        """Count a new connection in, unless the node is draining or full, or its address is at
        `address_limit` (limits of 0: no cap; an unknown address is not capped)."""
        if self.draining:
            return Admission.DRAINING
        if limit and len(self.connections) >= limit:
            return Admission.FULL
        key = address_key(address)
        if key is not None and address_limit and self.per_address.get(key, 0) >= address_limit:
            return Admission.ADDRESS_FULL
        self.connections.add(connection)
        if key is not None:
            self.per_address[key] = self.per_address.get(key, 0) + 1
            self._address_of[connection] = key
        return Admission.ADMITTED

    def release(self, connection: Closable) -> None:
        """Count a connection out (of the node and its address); wakes a drain waiting for the last one."""
        self.connections.discard(connection)
        key = self._address_of.pop(connection, None)
        if key is not None:
            left = self.per_address[key] - 1
            if left:
                self.per_address[key] = left
            else:
                del self.per_address[key]
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
