"""The raw fan-out ceiling: one Redis pub/sub subscription per process, local fan-out.

POST /api/broadcast publishes the same event the project sends (same token, same shape);
every other http request goes to Django. No channel layer, no groups, no per-connection
Redis state: the fastest a Python process behind Redis pub/sub can deliver a broadcast.
"""

import asyncio
import json
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

import redis.asyncio as aioredis  # noqa: E402
from django.conf import settings  # noqa: E402

from pingpong import protocol  # noqa: E402
from pingpong.broadcast import make_event  # noqa: E402

CHANNEL = "bench.fanout"
clients: set = set()
_state: dict = {}


def redis_client() -> aioredis.Redis:
    if "redis" not in _state:
        _state["redis"] = aioredis.from_url(settings.REDIS_URL)
    return _state["redis"]


async def subscriber() -> None:
    pubsub = redis_client().pubsub()
    await pubsub.subscribe(CHANNEL)
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        frame = {"type": "websocket.send", "text": message["data"].decode()}
        for send in list(clients):
            try:
                await send(frame)
            except Exception:
                clients.discard(send)


async def broadcast_api(scope, receive, send) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    if headers.get(b"authorization", b"").decode() != f"Bearer {settings.PINGPONG_BROADCAST_TOKEN}":
        status, answer = 401, {"error": "unauthorized"}
    else:
        event = make_event(text=json.loads(body)["text"])
        await redis_client().publish(CHANNEL, protocol.encode_event(event))
        status, answer = 202, event
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def application(scope, receive, send) -> None:
    if scope["type"] == "http":
        if scope["path"] == "/api/broadcast" and scope["method"] == "POST":
            await broadcast_api(scope, receive, send)
        else:
            await django_asgi_app(scope, receive, send)
        return
    if scope["type"] != "websocket":
        return
    if "subscriber" not in _state:
        _state["subscriber"] = asyncio.ensure_future(subscriber())
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    clients.add(send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "ping":
                await send({"type": "websocket.send", "text": "pong!"})
    finally:
        clients.discard(send)
