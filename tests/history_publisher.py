"""Publish to a topic from a process of its own, as a second node or a worker would.

`python -m tests.history_publisher TOPIC WAVES PER_WAVE` (REDIS_URL in the environment) publishes
WAVES x PER_WAVE publications through `pingpong.topics.apublish`, PER_WAVE of them concurrently
at a time, and prints each result as one JSON line.
"""

import asyncio
import json
import os
import sys

import django


async def publish(topic: str, waves: int, per_wave: int) -> None:
    from pingpong import topics

    for wave in range(waves):
        results = await asyncio.gather(
            *(topics.apublish(topic, {"pid": os.getpid(), "n": wave * per_wave + n}) for n in range(per_wave))
        )
        for result in results:
            print(json.dumps(result), flush=True)
        await asyncio.sleep(0.01)  # let the other publisher's wave interleave with the next one


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    asyncio.run(publish(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
