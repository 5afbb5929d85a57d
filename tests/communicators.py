"""In-process websocket clients: Channels' WebsocketCommunicator on the project's ASGI app."""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from channels.testing import WebsocketCommunicator

from project.asgi import application

ALLOWED_ORIGIN = [(b"origin", b"http://localhost")]


def communicator(
    path: str = "/ws/", headers: list[tuple[bytes, bytes]] | None = None, *, client: tuple[str, int] | None = None
) -> WebsocketCommunicator:
    """A client for `path` with an allowed Origin (or the given headers), not yet connected.

    `client` is the scope's peer address, as daphne would fill it in; by default there is none.
    """
    ws = WebsocketCommunicator(application, path, headers=ALLOWED_ORIGIN if headers is None else headers)
    if client is not None:
        ws.scope["client"] = list(client)  # read when the application starts, at connect()
    return ws


async def connected(path: str = "/ws/", *, client: tuple[str, int] | None = None) -> WebsocketCommunicator:
    """A client for `path` whose handshake was accepted."""
    ws = communicator(path, client=client)
    accepted, _ = await ws.connect()
    assert accepted
    return ws


async def ask(ws: WebsocketCommunicator, **request: Any) -> dict[str, Any]:
    """Send one JSON request; its answer (the next event)."""
    await ws.send_to(text_data=json.dumps(request))
    return json.loads(await ws.receive_from())


async def opened_clients() -> AsyncIterator[Callable[..., Awaitable[WebsocketCommunicator]]]:
    """`await connect()` or `await connect(token=...)` opens a /ws/ client; all are disconnected at the end."""
    opened: list[WebsocketCommunicator] = []

    async def connect(token: str | None = None) -> WebsocketCommunicator:
        ws = await connected(f"/ws/?token={token}" if token is not None else "/ws/")
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        await ws.disconnect()
