"""A channel layer in a process of its own, driven one JSON line at a time: the other process in interop tests.

`python -m tests.layer_peer REDIS_URL PREFIX [CLASS]` builds CLASS (default: channels-redis' stock
`RedisPubSubChannelLayer`), prints `{"layer": "<class>"}`, then answers each command read from stdin
with one line on stdout:

    {"op": "new_channel"}                                   -> {"channel": "..."}
    {"op": "group_add", "group": "g", "channel": "..."}     -> {"ok": true}
    {"op": "send", "channel": "...", "message": {...}}      -> {"ok": true}
    {"op": "group_send", "group": "g", "message": {...}}    -> {"ok": true}
    {"op": "receive", "channel": "...", "timeout": 5}       -> {"message": {...}} or {"timeout": true}
"""

import asyncio
import importlib
import json
import sys
from typing import Any


async def answer(layer: Any, command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    if op == "new_channel":
        return {"channel": await layer.new_channel()}
    if op == "group_add":
        await layer.group_add(command["group"], command["channel"])
    elif op == "send":
        await layer.send(command["channel"], command["message"])
    elif op == "group_send":
        await layer.group_send(command["group"], command["message"])
    elif op == "receive":
        try:
            async with asyncio.timeout(command["timeout"]):
                return {"message": await layer.receive(command["channel"])}
        except TimeoutError:
            return {"timeout": True}
    else:
        return {"error": f"unknown op {op!r}"}
    return {"ok": True}


async def main(url: str, prefix: str, class_path: str) -> None:
    module_name, _, class_name = class_path.rpartition(".")
    layer = getattr(importlib.import_module(module_name), class_name)(hosts=[url], prefix=prefix)
    print(json.dumps({"layer": f"{type(layer).__module__}.{type(layer).__qualname__}"}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps(await answer(layer, json.loads(line))), flush=True)
    finally:
        await layer.flush()


if __name__ == "__main__":
    url, prefix, *rest = sys.argv[1:]
    asyncio.run(main(url, prefix, rest[0] if rest else "channels_redis.pubsub.RedisPubSubChannelLayer"))
