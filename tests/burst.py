"""A burst client: open N websockets at once, ping each, report as JSON (`python -m tests.burst URL N`).

Every connection is opened before any is pinged, so all N are open together; then each sends
`ping` and must answer `pong!`. Each step is bounded by a timeout; the report counts what
happened: {"opened": int, "pongs": int, "failures": {"<what>": count}}.
"""

import argparse
import asyncio
import json
from collections import Counter

from websockets.asyncio.client import ClientConnection, connect

ORIGIN = "http://127.0.0.1"


async def burst(url: str, count: int, *, timeout: float) -> dict[str, object]:
    """Open `count` websockets at once, ping each, close them all; what happened, counted."""
    failures: Counter[str] = Counter()

    async def open_one() -> ClientConnection | None:
        try:
            return await connect(url, origin=ORIGIN, open_timeout=timeout, ping_interval=None)  # type: ignore[arg-type]
        except Exception as error:  # counted, not raised: the report names it
            failures[f"open:{type(error).__name__}"] += 1
            return None

    async def ping_one(ws: ClientConnection) -> bool:
        try:
            await ws.send("ping")
            answer = await asyncio.wait_for(ws.recv(), timeout)
        except Exception as error:
            code = getattr(getattr(error, "rcvd", None), "code", None)
            failures[f"ping:{type(error).__name__}:{code}"] += 1
            return False
        if answer != "pong!":
            failures[f"answer:{str(answer)[:80]}"] += 1
            return False
        return True

    opened = [ws for ws in await asyncio.gather(*(open_one() for _ in range(count))) if ws is not None]
    pongs = sum(await asyncio.gather(*(ping_one(ws) for ws in opened)))
    await asyncio.gather(*(asyncio.wait_for(ws.close(), timeout) for ws in opened), return_exceptions=True)
    return {"opened": len(opened), "pongs": pongs, "failures": dict(failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per handshake and per answer")
    options = parser.parse_args()
    print(json.dumps(asyncio.run(burst(options.url, options.count, timeout=options.timeout))))


if __name__ == "__main__":
    main()
