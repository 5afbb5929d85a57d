"""The baseline: a hand-written ASGI app, http to Django, `ping` -> `pong!` in a bare loop.

Same settings and same server as the project; what the project costs is measured against this.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()


async def application(scope, receive, send) -> None:
    if scope["type"] == "http":
        await django_asgi_app(scope, receive, send)
        return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "ping":
            await send({"type": "websocket.send", "text": "pong!"})
