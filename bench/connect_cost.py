"""What accepting one websocket costs each layer of the stack, in-process (no server, no sockets).

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.connect_cost [--connections 3000]

Drives each ASGI app directly with in-memory queues, opens N connections one after the
other and reports microseconds per accepted connection: the raw baseline app, the
project's consumer alone, behind its URLRouter, and the full application (origin check
included). The server's own handshake cost, the same for every app, is not in these figures.
"""

import argparse
import asyncio
import logging
import os
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django

django.setup()

from channels.routing import URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from bench.baseline import application as baseline  # noqa: E402
from pingpong.consumers import PingPongConsumer  # noqa: E402
from pingpong.routing import websocket_urlpatterns  # noqa: E402
from project.asgi import application  # noqa: E402

SCOPE: dict[str, Any] = {
    "type": "websocket",
    "path": "/ws/",
    "raw_path": b"/ws/",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
    "subprotocols": [],
}
APPS = {
    "baseline": baseline,
    "consumer": PingPongConsumer.as_asgi(),
    "router + consumer": URLRouter(websocket_urlpatterns),
    "full application": application,
}


async def connect_cost(app: Any, connections: int) -> float:
    """Microseconds per connection from websocket.connect to websocket.accept, N in a row."""
    held = []
    started = time.perf_counter()
    for _ in range(connections):
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        inbox.put_nowait({"type": "websocket.connect"})
        task = asyncio.ensure_future(app(dict(SCOPE), inbox.get, outbox.put))
        accepted = await outbox.get()
        assert accepted["type"] == "websocket.accept", accepted
        held.append((inbox, task))
    elapsed = time.perf_counter() - started
    for inbox, _ in held:
        inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.gather(*(task for _, task in held))
    return elapsed / connections * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the open/close lines would go to the terminal
    settings.PINGPONG_MAX_CONNECTIONS = 0  # no per-node cap for the measurement
    results: dict[str, list[float]] = {name: [] for name in APPS}
    for _ in range(options.rounds):
        for name, app in APPS.items():
            results[name].append(await connect_cost(app, options.connections))
    layer = "redis" if os.environ.get("REDIS_URL") else "in-memory"
    print(f"µs per accepted connection (median of {options.rounds} x {options.connections}, {layer} layer):")
    for name, values in results.items():
        print(f"  {name:18s} {sorted(values)[len(values) // 2]:7.1f}")


if __name__ == "__main__":
    asyncio.run(main())
