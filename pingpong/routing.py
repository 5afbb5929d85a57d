"""Websocket routes. Paths are listed in the README's protocol table."""

from typing import Any

from django.urls import path, re_path

from pingpong.consumers import EchoConsumer, PingPongConsumer


async def reject_unknown_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Any other websocket path: refused at the handshake (HTTP 403) instead of an error."""
    await receive()
    await send({"type": "websocket.close"})


websocket_urlpatterns = [
    path("ws/", PingPongConsumer.as_asgi()),
    path("ws/echo/", EchoConsumer.as_asgi()),
    re_path(r"", reject_unknown_path),  # type: ignore[arg-type]  # an ASGI app, as URLRouter allows
]
