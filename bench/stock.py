"""The stock-Channels reference: a plain AsyncWebsocketConsumer with no tuning.

It joins the broadcast group like the project does, so it runs Channels' own receive loop
over the configured channel layer; the project's consumer is measured against it.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402


class StockConsumer(AsyncWebsocketConsumer):
    groups = ["broadcast"]

    async def receive(self, text_data=None, bytes_data=None) -> None:
        if text_data == "ping":
            await self.send(text_data="pong!")

    async def broadcast_message(self, event) -> None:
        await self.send(text_data=event["event"])


application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": URLRouter([path("ws/", StockConsumer.as_asgi())])}
)
