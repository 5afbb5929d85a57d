"""Websocket consumers: admission, limits and refusals over the lean base; thin endpoints over them."""

import json
import logging
import time
import uuid
from typing import Any

from channels.exceptions import AcceptConnection, DenyConnection

from pingpong import broadcast, layer_calls, metrics, protocol
from pingpong.conf import setting
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.limits import TokenBucket, text_too_big
from pingpong.logs import log_event
from pingpong.node import Admission, node
from pingpong.websocket import LeanWebsocketConsumer, Message, State

logger = logging.getLogger("pingpong.connections")


class GuardedWebsocketConsumer(LeanWebsocketConsumer):
    """A lean consumer that no client can use to hurt the node.

    Before `connect` runs, a connection is admitted by the node (per-node and per-address caps,
    not draining) and the channel layer must answer within PINGPONG_LAYER_TIMEOUT; otherwise the
    handshake is accepted only to send an error event and close with 4013. Every client frame is
    held to the size and rate limits before `receive` sees it. An admitted connection is counted
    in and out exactly once: the node's count, the gauge and one log line each way.
    """

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:  # type: ignore[override]
        self.connection_id = uuid.uuid4().hex[:12]
        self.opened_at: float | None = None  # set when counted in
        self.layer_failed = False
        self.joined: list[str] = []
        self.rate = TokenBucket(rate=setting("PINGPONG_RATE_PER_SECOND"), burst=setting("PINGPONG_RATE_BURST"))
        self.max_message_bytes = setting("PINGPONG_MAX_MESSAGE_BYTES")  # read once: lookups cost per message
        await super().__call__(scope, receive, send)

    async def channel_open(self) -> bool:
        """A channel name within the layer deadline; an unreachable layer is refused at connect."""
        assert self.channel_layer is not None
        try:
            self.channel_name = await layer_calls.call(self.channel_layer.new_channel(), operation="new_channel")
        except ChannelLayerUnavailable as error:
            logger.warning("channel layer unavailable at connect: %s", error)
            self.layer_failed = True
            return False
        return True

    async def websocket_connect(self, message: Message) -> None:
        """Admit, join the groups within the deadline, then call `connect` (which accepts by default)."""
        if self.layer_failed:
            await self.refuse_unavailable()
            return
        admission = node.admit(
            self,
            limit=setting("PINGPONG_MAX_CONNECTIONS"),
            address=self.client_address,
            address_limit=setting("PINGPONG_MAX_CONNECTIONS_PER_IP"),
        )
        if admission is Admission.ADDRESS_FULL:
            metrics.LIMIT_HITS.labels("connections_per_ip").inc()
            await self.refuse(
                protocol.CloseCode.TRY_AGAIN_LATER,
                protocol.ERROR_TOO_MANY_CONNECTIONS,
                f"Your address has {setting('PINGPONG_MAX_CONNECTIONS_PER_IP')} connections open on this node "
                "already; close one or try again later.",
            )
            return
        if not admission:
            reason = admission.value  # protocol.ERROR_DRAINING or ERROR_FULL
            metrics.LIMIT_HITS.labels("connections").inc()
            await self.refuse(protocol.CloseCode.TRY_AGAIN_LATER, reason, f"This node is {reason}; try again later.")
            return
        self.count_in()
        try:
            for group in self.groups:
                assert self.channel_layer is not None, "groups need a channel layer"
                await layer_calls.call(self.channel_layer.group_add(group, self.channel_name), operation="group_add")
                self.joined.append(group)
        except ChannelLayerUnavailable as error:
            logger.warning("channel layer unavailable at group_add: %s", error)
            await self.refuse_unavailable()
            return
        try:
            await self.connect()
        except AcceptConnection:
            await self.accept()
        except DenyConnection:
            await self.close()

    async def websocket_receive(self, message: Message) -> None:
        """Enforce the size and rate limits, then hand the frame to `receive`."""
        if self.state >= State.CLOSING:
            return
        started = time.perf_counter()
        text = message.get("text")
        data = message.get("bytes") if text is None else None
        limit = self.max_message_bytes
        if (text is not None and text_too_big(text, limit)) or (data is not None and len(data) > limit):
            metrics.LIMIT_HITS.labels("size").inc()
            await self.refuse(
                protocol.CloseCode.MESSAGE_TOO_BIG,
                protocol.ERROR_MESSAGE_TOO_BIG,
                f"Messages are limited to {limit} bytes.",
            )
            return
        if not self.rate.take():
            metrics.LIMIT_HITS.labels("rate").inc()
            await self.refuse(
                protocol.CloseCode.POLICY_VIOLATION,
                protocol.ERROR_RATE_LIMITED,
                f"More than {self.rate.rate:g} messages per second (burst {self.rate.burst}).",
            )
            return
        if text is not None:
            await self.receive(text_data=text)
        else:
            await self.receive(bytes_data=data or b"")
        metrics.HANDLER_SECONDS.observe(time.perf_counter() - started)

    def count_in(self) -> None:
        """The one place a connection is counted open (the node has admitted it)."""
        self.opened_at = time.monotonic()
        metrics.connections_open_add(1)
        metrics.CONNECTIONS_OPENED.labels(self.scope.get("path", "")).inc()
        log_event(logger, "open", id=self.connection_id, path=self.scope.get("path"), client=self.client_ip)

    async def finish(self, *, code: int) -> None:
        """Count the connection out (node, gauge, log line) once, then leave groups and call `disconnect`."""
        if self.state is not State.CLOSED and self.opened_at is not None:
            node.release(self)
            metrics.connections_open_add(-1)
            metrics.CONNECTIONS_CLOSED.labels(str(code)).inc()
            log_event(
                logger,
                "close",
                id=self.connection_id,
                path=self.scope.get("path"),
                client=self.client_ip,
                code=code,
                duration=round(time.monotonic() - self.opened_at, 3),
            )
        await super().finish(code=code)

    async def group_leave(self, group: str) -> None:
        """Leave a group this connection joined, within the layer deadline."""
        if group not in self.joined:
            return
        assert self.channel_layer is not None
        try:
            await layer_calls.call(
                self.channel_layer.group_discard(group, self.channel_name), operation="group_discard"
            )
        except ChannelLayerUnavailable as error:
            logger.warning("group_discard failed: %s", error)

    async def refuse(self, code: int, error: str, detail: str) -> None:
        """Explain with an error event, then close with `code` (accepting first, so the event can be sent)."""
        if self.state is State.CONNECTING:
            await self.accept()
        if self.state is State.OPEN:
            metrics.SENT_ERROR.inc()
            await self.send(text_data=protocol.error_event(error, detail))
        await self.close(code=code, reason=detail[:120])

    async def refuse_unavailable(self) -> None:
        """Close with 4013: without the channel layer this connection would miss broadcasts."""
        await self.refuse(
            protocol.CloseCode.TRY_AGAIN_LATER,
            protocol.ERROR_UNAVAILABLE,
            "The channel layer is unreachable; try again later.",
        )

    @property
    def client_address(self) -> str | None:
        """The client's address: the peer's, or PINGPONG_PROXY_HEADER's as the server filled it in."""
        client = self.scope.get("client")
        return str(client[0]) if client else None

    @property
    def client_ip(self) -> str:
        return self.client_address or "-"


class PingPongConsumer(GuardedWebsocketConsumer):
    """`/ws/`: answers `ping` with `pong!` and relays broadcasts."""

    groups = [protocol.BROADCAST_GROUP]

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            metrics.RECEIVED_BINARY.inc()
            await self.refuse(
                protocol.CloseCode.UNSUPPORTED_DATA,
                protocol.ERROR_UNSUPPORTED_DATA,
                "Binary frames are not accepted on /ws/; send text.",
            )
            return
        if text_data == protocol.PING:
            metrics.RECEIVED_PING.inc()
            metrics.SENT_PONG.inc()
            await self.send(text_data=protocol.PONG)
            return
        if text_data.startswith("{"):
            answer = json_ping_answer(text_data)
            if answer is not None:
                metrics.RECEIVED_JSON_PING.inc()
                metrics.SENT_PONG.inc()
                await self.send(text_data=answer)
                return
        metrics.RECEIVED_OTHER.inc()
        metrics.SENT_ERROR.inc()
        await self.send(
            text_data=protocol.error_event(
                protocol.ERROR_UNKNOWN_MESSAGE,
                'Send the text "ping" (answered with "pong!") or {"type": "ping", "id": ...}.',
            )
        )

    async def broadcast_message(self, message: Message) -> None:
        """A broadcast from the group: its event was serialised once by the sender; a retry's copy is dropped."""
        if broadcast.deliverable(message):
            metrics.SENT_BROADCAST.inc()
            await self.send(text_data=message["event"])


class EchoConsumer(GuardedWebsocketConsumer):
    """`/ws/echo/`: echoes every text and binary frame exactly, empty ones included."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        metrics.SENT_ECHO.inc()
        await self.send(text_data=text_data, bytes_data=bytes_data)


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
    pong = {"type": protocol.EVENT_PONG, "id": request.get("id"), "server_time": time.time()}
    return json.dumps(pong, separators=(",", ":"))
