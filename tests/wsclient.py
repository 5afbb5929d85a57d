"""A real websocket client (the `websockets` package) for end-to-end tests."""

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.processes import ORIGIN


async def ws_connect(url: str, *, origin: str | None = ORIGIN, **options: Any) -> ClientConnection:
    """Open a websocket with an allowed Origin (pass origin=None to send none)."""
    return await connect(url, origin=origin, open_timeout=10, **options)  # type: ignore[arg-type]


async def ping_pong(ws: ClientConnection, *, timeout: float = 5) -> str:
    """Send `ping` and return the next text frame that is not a broadcast."""
    await ws.send("ping")
    while True:
        reply = await asyncio.wait_for(ws.recv(), timeout)
        if not (isinstance(reply, str) and reply.startswith('{"type":"broadcast"')):
            return str(reply)


async def next_event(ws: ClientConnection, *, timeout: float = 5) -> dict[str, Any]:
    """The next JSON event from the server."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def close_code(ws: ClientConnection, *, timeout: float = 10) -> int | None:
    """Read until the server closes; the close code it sent (None if it sent no close frame)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def broadcasts_within(ws: ClientConnection, *, seconds: float) -> list[dict[str, Any]]:
    """Every broadcast event that arrives within `seconds`."""
    events: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(frame, str) and frame.startswith("{"):
            event = json.loads(frame)
            if event.get("type") == "broadcast":
                events.append(event)
    return events
