"""Websocket consumers: thin entry points that check limits and call plain functions."""

import asyncio
import functools
import json
import logging
import time
import uuid
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from pingpong import metrics, protocol
from pingpong.layer import ChannelLayerUnavailable, layer_call
from pingpong.limits import TokenBucket, text_too_big
from pingpong.logs import log_event
from pingpong.node import node

logger = logging.getLogger("pingpong.connections")

Message = dict[str, Any]


class LeanWebsocketConsumer(AsyncWebsocketConsumer):
    """An AsyncWebsocketConsumer without per-message overhead, with the node's limits.

    Channels' stock receive loop creates a task and runs `asyncio.wait` for every
    message, and its `dispatch` hops to a thread to close database connections we
    never open. Here one loop reads the client and, when the consumer joins groups,
    a second task reads the channel layer; both call the handlers directly.
    """

    #: Join the channel layer (and these groups) after accepting.
    groups: list[str] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:  # type: ignore[override]
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias) if self.groups else None
        self.connection_id = uuid.uuid4().hex[:12]
        self.opened_at = time.monotonic()
        self.admitted = False
        self.counted = False
        self.joined: list[str] = []
        self.closing = False
        self.layer_failed = False
        self.rate = TokenBucket(rate=settings.PINGPONG_RATE_PER_SECOND, burst=settings.PINGPONG_RATE_BURST)
        self.max_message_bytes = settings.PINGPONG_MAX_MESSAGE_BYTES  # read once: settings lookups cost per message
        layer_task: asyncio.Task[None] | None = None
        if self.channel_layer is not None:
            try:
                self.channel_name = await layer_call(self.channel_layer.new_channel(), operation="new_channel")
            except ChannelLayerUnavailable as error:
                logger.warning("channel layer unavailable at connect: %s", error)
                self.layer_failed = True
            else:
                self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
                layer_task = asyncio.ensure_future(self._read_layer())
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            if layer_task is not None:
                layer_task.cancel()
                try:
                    await layer_task
                except asyncio.CancelledError:
                    pass

    async def _read_layer(self) -> None:
        """Pass channel-layer messages to their handlers until cancelled."""
        while True:
            message = await self.channel_receive()
            kind = str(message.get("type", ""))
            if kind.startswith("websocket."):
                # Only the server may speak for the client's socket.
                logger.warning("dropped channel-layer message posing as %r", kind)
                continue
            try:
                await self.dispatch(message)
            except StopConsumer:
                raise
            except Exception:
                logger.exception("handler for %r failed; the connection stays open", kind)

    async def dispatch(self, message: Message) -> None:
        """Call the handler for the message type; log and drop types we have no handler for."""
        if message.get("type") == "websocket.receive":  # the per-message case, without the name lookup
            await self.websocket_receive(message)
            return
        try:
            handler = getattr(self, get_handler_name(message), None)
        except ValueError:
            handler = None
        if handler is None:
            logger.warning("dropped message of unknown type %r", message.get("type"))
            return
        await handler(message)

    async def websocket_connect(self, message: Message) -> None:
        """Accept, then turn away with 4013 when the node is full or the layer is down."""
        await self.accept()
        if self.layer_failed:
            await self.refuse_unavailable()
            return
        if not node.admit(self, limit=settings.PINGPONG_MAX_CONNECTIONS):
            reason = "draining" if node.draining else "full"
            metrics.LIMIT_HITS.labels("connections").inc()
            await self.refuse(protocol.CLOSE_TRY_AGAIN_LATER, reason, f"This node is {reason}; try again later.")
            return
        self.admitted = True
        try:
            if self.channel_layer is not None:
                for group in self.groups:
                    await layer_call(self.channel_layer.group_add(group, self.channel_name), operation="group_add")
                    self.joined.append(group)
        except ChannelLayerUnavailable as error:
            logger.warning("channel layer unavailable at group_add: %s", error)
            await self.refuse_unavailable()
            return
        self.counted = True
        metrics.CONNECTIONS_OPEN.inc()
        metrics.CONNECTIONS_OPENED.labels(self.scope.get("path", "")).inc()
        log_event(logger, "open", id=self.connection_id, path=self.scope.get("path"), client=self.client_ip)

    async def websocket_receive(self, message: Message) -> None:
        """Enforce the size and rate limits, then hand the frame to receive_text/receive_bytes."""
        if self.closing:
            return
        started = time.perf_counter()
        text = message.get("text")
        data = message.get("bytes") if text is None else None
        limit = self.max_message_bytes
        if (text is not None and text_too_big(text, limit)) or (data is not None and len(data) > limit):
            metrics.LIMIT_HITS.labels("size").inc()
            await self.refuse(
                protocol.CLOSE_MESSAGE_TOO_BIG, "message_too_big", f"Messages are limited to {limit} bytes."
            )
            return
        if not self.rate.take():
            metrics.LIMIT_HITS.labels("rate").inc()
            await self.refuse(
                protocol.CLOSE_POLICY_VIOLATION,
                "rate_limited",
                f"More than {settings.PINGPONG_RATE_PER_SECOND:g} messages per second "
                f"(burst {settings.PINGPONG_RATE_BURST}).",
            )
            return
        if text is not None:
            await self.receive_text(text)
        else:
            await self.receive_bytes(data or b"")
        metrics.HANDLER_SECONDS.observe(time.perf_counter() - started)

    async def websocket_disconnect(self, message: Message) -> None:
        """Leave groups and the node count, log the close, stop the consumer."""
        if self.admitted:
            node.release(self)
            layer = self.channel_layer
            for group in self.joined:
                try:
                    assert layer is not None  # only joined through a layer
                    await layer_call(layer.group_discard(group, self.channel_name), operation="group_discard")
                except ChannelLayerUnavailable as error:
                    logger.warning("group_discard failed: %s", error)
            log_event(
                logger,
                "close",
                id=self.connection_id,
                path=self.scope.get("path"),
                client=self.client_ip,
                code=message.get("code"),
                duration=round(time.monotonic() - self.opened_at, 3),
            )
        if self.counted:
            metrics.CONNECTIONS_OPEN.dec()
            metrics.CONNECTIONS_CLOSED.labels(str(message.get("code"))).inc()
        raise StopConsumer()

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        """Close once; later frames from the client are ignored."""
        if self.closing:
            return
        self.closing = True
        await super().close(code=code, reason=reason)

    async def refuse(self, code: int, error: str, detail: str) -> None:
        """Explain with an error event, then close with `code`."""
        if not self.closing:
            metrics.SENT_ERROR.inc()
            await self.send_text(protocol.error_event(error, detail))
        await self.close(code=code, reason=detail[:120])

    async def refuse_unavailable(self) -> None:
        """Close with 4013: without the channel layer this connection would miss broadcasts."""
        await self.refuse(
            protocol.CLOSE_TRY_AGAIN_LATER, "unavailable", "The channel layer is unreachable; try again later."
        )

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        await self.base_send({"type": "websocket.send", "text": text})

    async def receive_text(self, text: str) -> None:
        """Handle one text frame within the limits."""

    async def receive_bytes(self, data: bytes) -> None:
        """Handle one binary frame within the limits."""

    @property
    def client_ip(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else "-"


class PingPongConsumer(LeanWebsocketConsumer):
    """`/ws/`: answers `ping` with `pong!` and relays broadcasts."""

    groups = [protocol.BROADCAST_GROUP]

    async def receive_text(self, text: str) -> None:
        if text == protocol.PING:
            metrics.RECEIVED_PING.inc()
            metrics.SENT_PONG.inc()
            await self.send_text(protocol.PONG)
            return
        if text.startswith("{"):
            answer = json_ping_answer(text)
            if answer is not None:
                metrics.RECEIVED_JSON_PING.inc()
                metrics.SENT_PONG.inc()
                await self.send_text(answer)
                return
        metrics.RECEIVED_OTHER.inc()
        metrics.SENT_ERROR.inc()
        await self.send_text(
            protocol.error_event(
                protocol.ERROR_UNKNOWN_MESSAGE,
                'Send the text "ping" (answered with "pong!") or {"type": "ping", "id": ...}.',
            )
        )

    async def receive_bytes(self, data: bytes) -> None:
        metrics.RECEIVED_BINARY.inc()
        await self.refuse(
            protocol.CLOSE_UNSUPPORTED_DATA, "unsupported_data", "Binary frames are not accepted on /ws/; send text."
        )

    async def broadcast_message(self, message: Message) -> None:
        """A broadcast from the group: its event was serialised once by the sender."""
        if not self.closing:
            metrics.SENT_BROADCAST.inc()
            await self.send_text(message["event"])


class EchoConsumer(LeanWebsocketConsumer):
    """`/ws/echo/`: echoes every text and binary frame exactly, empty ones included."""

    async def receive_text(self, text: str) -> None:
        metrics.SENT_ECHO.inc()
        await self.send_text(text)

    async def receive_bytes(self, data: bytes) -> None:
        metrics.SENT_ECHO.inc()
        await self.base_send({"type": "websocket.send", "bytes": data})


def json_ping_answer(text: str) -> str | None:
    """The answer to a JSON ping `{"type": "ping", "id": ...}`, or None for any other text."""
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter allows
        return None
    if not isinstance(request, dict) or request.get("type") != "ping":
        return None
    # ASCII-escaped: an id holding a lone surrogate ("\ud800") goes back as sent instead of
    # failing daphne's UTF-8 encode (UnicodeEncodeError, then 1011).
    pong = {"type": "pong", "id": request.get("id"), "server_time": time.time()}
    return json.dumps(pong, separators=(",", ":"))
