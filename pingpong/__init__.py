"""pingpong: websockets for Django on Channels. Publish to a topic from Django code with `publish` / `apublish`.

Both import their module on first call, so `import pingpong` needs no configured settings.
"""

from typing import Any


def publish(topic: str, data: Any, *, id: str | None = None) -> dict[str, Any]:
    """Send `data` (any JSON) to every subscriber of `topic` on every node, from sync code; `{"topic", "id"}`.

    For a sync view, a management command, a script or a worker process; not from a running
    event loop (use `apublish` there). Errors as `apublish`'s.
    """
    from pingpong import publishing

    return publishing.publish(topic, data, id=id)


async def apublish(topic: str, data: Any, *, id: str | None = None) -> dict[str, Any]:
    """Send `data` (any JSON) to every subscriber of `topic` on every node; `{"topic", "id"}`.

    Raises `pingpong.topics.TopicRefused` (bad topic, namespace, id or data), `ChannelLayerUnavailable`
    (nothing was sent) or `BroadcastOutcomeUnknown` (maybe sent: retry with the same `id`).
    """
    from pingpong import publishing

    return await publishing.apublish(topic, data, id=id)
