"""In-process websocket clients: Channels' WebsocketCommunicator on the project's ASGI app."""

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
