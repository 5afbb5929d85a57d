"""In-process websocket clients: Channels' WebsocketCommunicator on the project's ASGI app."""

from channels.testing import WebsocketCommunicator

from project.asgi import application

ALLOWED_ORIGIN = [(b"origin", b"http://localhost")]


def communicator(path: str = "/ws/", headers: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    """A client for `path` with an allowed Origin (or the given headers), not yet connected."""
    return WebsocketCommunicator(application, path, headers=ALLOWED_ORIGIN if headers is None else headers)


async def connected(path: str = "/ws/") -> WebsocketCommunicator:
    """A client for `path` whose handshake was accepted."""
    ws = communicator(path)
    accepted, _ = await ws.connect()
    assert accepted
    return ws
