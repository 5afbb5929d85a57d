"""Broadcasts: validate a text, serialise its event once, send it to every /ws/ client."""

import time
import uuid
from typing import Any

from django.conf import settings

from pingpong import metrics, protocol
from pingpong.layer import layer_call, layer_get


class BroadcastInvalid(ValueError):
    """The broadcast request is malformed; the message is a sentence for the client."""


def broadcast_text_from(payload: Any) -> str:
    """The text of a broadcast request body `{"text": "..."}`, or BroadcastInvalid."""
    if not isinstance(payload, dict):
        raise BroadcastInvalid('The body must be a JSON object: {"text": "..."}.')
    text = payload.get("text")
    if not isinstance(text, str):
        raise BroadcastInvalid('"text" is required and must be a string.')
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no client could be sent it
        raise BroadcastInvalid('"text" must be valid Unicode; it holds a lone surrogate.') from None
    limit = settings.PINGPONG_MAX_BROADCAST_BYTES
    if size > limit:
        raise BroadcastInvalid(f'"text" is limited to {limit} bytes of UTF-8.')
    return text


def broadcast_event(*, text: str) -> dict[str, Any]:
    """The event every client receives: {"type": "broadcast", "text", "id", "sent_at"}."""
    return {"type": "broadcast", "text": text, "id": uuid.uuid4().hex, "sent_at": time.time()}


async def broadcast_send(*, text: str) -> dict[str, Any]:
    """Send `text` to every client on every node; ChannelLayerUnavailable when Redis is down."""
    event = broadcast_event(text=text)
    layer = layer_get()
    await layer_call(
        layer.group_send(
            protocol.BROADCAST_GROUP,
            {"type": protocol.BROADCAST_MESSAGE, "event": protocol.encode_event(event)},
        ),
        operation="group_send",
    )
    metrics.BROADCASTS_SENT.inc()
    return event
