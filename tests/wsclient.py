"""Real websocket clients (the `websockets` package, asyncio and sync) for end-to-end tests.

Every wait here is scaled by PINGPONG_TEST_TIMEOUT_FACTOR (tests.processes.scaled).
"""

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncClientConnection
from websockets.sync.client import connect as connect_sync

from bench.loadgen import ping_answer
from pingpong import protocol
from tests.processes import ORIGIN, scaled

OPEN_TIMEOUT = 10.0
ANSWER_TIMEOUT = 5.0


async def ws_connect(url: str, *, origin: str | None = ORIGIN, **options: Any) -> ClientConnection:
    """Open a websocket with an allowed Origin (pass origin=None to send none)."""
    return await connect_async(url, origin=origin, open_timeout=scaled(OPEN_TIMEOUT), **options)  # type: ignore[arg-type]


def ws_connect_sync(url: str, *, origin: str | None = ORIGIN, **options: Any) -> SyncClientConnection:
    """`ws_connect` for tests that run no event loop; use it as a context manager."""
    return connect_sync(url, origin=origin, open_timeout=scaled(OPEN_TIMEOUT), **options)  # type: ignore[arg-type]


async def ping_pong(ws: ClientConnection, *, timeout: float = ANSWER_TIMEOUT) -> str:
    """Send `ping` and return the next text frame that is not a broadcast (the load generator's own helper)."""
    return await ping_answer(ws, within=scaled(timeout))


def ping_pong_sync(ws: SyncClientConnection, *, timeout: float = ANSWER_TIMEOUT, skip: int = 100) -> str:
    """`ping_pong` on a sync connection; at most `skip` broadcasts are read past."""
    ws.send(protocol.PING)
    for _ in range(skip):
        reply = ws.recv(timeout=scaled(timeout))
        if protocol.event_type(reply) != protocol.EVENT_BROADCAST:
            return reply if isinstance(reply, str) else repr(reply)
    raise AssertionError(f"only broadcasts in the {skip} frames after a ping")


async def next_event(ws: ClientConnection, *, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """The next JSON event from the server."""
    return json.loads(await asyncio.wait_for(ws.recv(), scaled(timeout)))


async def close_code(ws: ClientConnection, *, timeout: float = 10) -> int | None:
    """Read until the server closes; the close code it sent (None if it sent no close frame)."""
    try:
        async with asyncio.timeout(scaled(timeout)):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def broadcasts_within(ws: ClientConnection, *, seconds: float) -> list[dict[str, Any]]:
    """Every broadcast event that arrives within `seconds` (scaled)."""
    events: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(seconds)
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if protocol.event_type(frame) == protocol.EVENT_BROADCAST:
            events.append(json.loads(frame))
    return events


async def broadcasts_on_each(clients: list[ClientConnection], *, seconds: float) -> list[list[dict[str, Any]]]:
    """`broadcasts_within` on every client over one shared window, not one window after another."""
    return list(await asyncio.gather(*(broadcasts_within(ws, seconds=seconds) for ws in clients)))
