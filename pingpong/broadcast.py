"""Broadcasts: validate a request, serialise its event once, send it to every /ws/ client.

A broadcast is safe to retry. Every broadcast has an id (the caller's, or a generated one),
and every publish attempt carries its own nonce. Each node delivers, per id, only the first
attempt it sees (`SeenBroadcasts`): the copies of that attempt reach all of the node's
consumers, while a retry's copies are dropped. A failure is reported as "not sent"
(`ChannelLayerUnavailable`) only when the PUBLISH never reached Redis; after that point it is
`BroadcastOutcomeUnknown`, and the caller retries with the same id.
"""

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from channels.layers import BaseChannelLayer, InMemoryChannelLayer
from django.conf import settings

from pingpong import layer_calls, metrics, protocol
from pingpong.conf import setting
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.layers import PUBLISH_PROGRESS, PingpongPubSubChannelLayer, PublishProgress
from pingpong.local_layer import LocalChannelLayer

T = TypeVar("T")

_ID = re.compile(protocol.BROADCAST_ID_PATTERN)

# Layers that can say "nothing was sent": in-process (nothing half-sent), or marking the
# moment PUBLISH is written. On any other layer every failure is an unknown outcome.
_LAYERS_THAT_KNOW_NOTHING_WAS_SENT = (InMemoryChannelLayer, LocalChannelLayer, PingpongPubSubChannelLayer)


class BroadcastInvalid(ValueError):
    """The broadcast request is malformed; the message is a sentence for the client."""


class BroadcastOutcomeUnknown(ChannelLayerUnavailable):
    """The PUBLISH was written but not confirmed: it may reach clients; retry with the same id."""


@dataclass(frozen=True)
class BroadcastRequest:
    """A validated broadcast: its text and its id."""

    text: str
    id: str


def request_from(payload: Any) -> BroadcastRequest:
    """The request in a body `{"text": "...", "id": "..."}` (id optional), or BroadcastInvalid."""
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
    return BroadcastRequest(text=text, id=id_from(payload))


def id_from(payload: dict[str, Any]) -> str:
    """The request's `"id"` (optional, for retries; a new one when absent), or BroadcastInvalid.

    Broadcasts and publications from the server (`/api/publish`) share these rules.
    """
    if "id" not in payload:
        return uuid.uuid4().hex
    given = payload["id"]
    if not (isinstance(given, str) and _ID.fullmatch(given)):
        raise BroadcastInvalid(
            f'"id" is optional; when given it is a string of 1 to {protocol.BROADCAST_ID_MAX_CHARS} '
            "characters from A-Z, a-z, 0-9 and . _ : -"
        )
    return given


def make_event(*, text: str, broadcast_id: str | None = None) -> dict[str, Any]:
    """The event every client receives: {"type": "broadcast", "text", "id", "sent_at"}; a new id by default."""
    return {"type": "broadcast", "text": text, "id": broadcast_id or uuid.uuid4().hex, "sent_at": time.time()}


async def send(*, text: str, broadcast_id: str | None = None) -> dict[str, Any]:
    """Send `text` to every client on every node, as one new attempt of `broadcast_id`.

    Raises ChannelLayerUnavailable when nothing was sent, and its subclass
    BroadcastOutcomeUnknown when the PUBLISH was written but not confirmed.
    """
    event = make_event(text=text, broadcast_id=broadcast_id)
    message = {
        "type": protocol.BROADCAST_MESSAGE,
        "event": protocol.encode_event(event),
        "id": event["id"],
        "attempt": uuid.uuid4().hex,
    }
    await send_message(protocol.BROADCAST_GROUP, message)
    metrics.BROADCASTS_SENT.inc()
    return event


async def send_message(group: str, message: dict[str, Any]) -> None:
    """group_send one attempt of a retry-safe message (its "id" and "attempt" set), within the publish deadline.

    Raises ChannelLayerUnavailable when nothing was sent, and BroadcastOutcomeUnknown when
    the PUBLISH was written but not confirmed.
    """
    layer = layer_calls.get_layer()
    await send_call(layer.group_send(group, message), layer=layer, operation="group_send")


async def send_call(awaitable: Awaitable[T], *, layer: BaseChannelLayer, operation: str) -> T:
    """Await one publishing call on `layer` within PINGPONG_PUBLISH_TIMEOUT, telling "not sent" from "unknown".

    Raises ChannelLayerUnavailable when nothing was sent, and BroadcastOutcomeUnknown when
    the command was written but not confirmed.
    """
    progress = PublishProgress()
    reset = PUBLISH_PROGRESS.set(progress)
    try:
        return await layer_calls.call(awaitable, operation=operation, timeout=setting("PINGPONG_PUBLISH_TIMEOUT"))
    except ChannelLayerUnavailable as error:
        if progress.written or not isinstance(layer, _LAYERS_THAT_KNOW_NOTHING_WAS_SENT):
            raise BroadcastOutcomeUnknown(str(error)) from error
        raise
    finally:
        PUBLISH_PROGRESS.reset(reset)


class SeenBroadcasts:
    """The first attempt this node saw of each broadcast id, for `window` seconds, at most `limit` ids.

    Each consumer gets its own copy of a group message, so "seen before" cannot mean
    "deliver once": every consumer must deliver the first attempt, and none a later one.
    Past `limit` ids the oldest is forgotten before its window ends (and a retry of it
    would be delivered again): memory stays bounded whatever the broadcast rate.
    """

    def __init__(self, *, window: float, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.limit = limit
        self.clock = clock
        self.evicted = 0  # ids forgotten before their window ended
        self._first: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (attempt, first seen), oldest first

    def __len__(self) -> int:
        return len(self._first)

    def admit(self, broadcast_id: str, attempt: str) -> bool:
        """True when this copy belongs to the first attempt of `broadcast_id` seen in the window."""
        now = self.clock()
        first = self._first.get(broadcast_id)
        if first is not None and now - first[1] < self.window:
            return first[0] == attempt
        self._first.pop(broadcast_id, None)
        while self._first:  # forget expired ids, oldest first
            oldest_id, (_, seen_at) = next(iter(self._first.items()))
            if now - seen_at < self.window:
                break
            del self._first[oldest_id]
        self._first[broadcast_id] = (attempt, now)
        while len(self._first) > self.limit:
            self._first.popitem(last=False)
            self.evicted += 1
        return True


#: This node's record (one per process, shared by all its consumers).
seen_broadcasts = SeenBroadcasts(window=protocol.BROADCAST_DEDUP_SECONDS, limit=protocol.BROADCAST_DEDUP_MAX_IDS)


def deliverable(message: dict[str, Any]) -> bool:
    """Whether a consumer should deliver this broadcast message (not a retry of one already seen).

    A message without an id or attempt (from an older sender) is always delivered.
    """
    broadcast_id, attempt = message.get("id"), message.get("attempt")
    if not (isinstance(broadcast_id, str) and isinstance(attempt, str)):
        return True
    return seen_broadcasts.admit(broadcast_id, attempt)
