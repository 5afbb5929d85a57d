"""Websocket consumers: admission, limits and refusals over the lean base; thin endpoints over them."""

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs

from channels.exceptions import AcceptConnection, DenyConnection

from pingpong import broadcast, history, layer_calls, metrics, protocol, tokens, topic_presence, topics
from pingpong.auth import SESSION_UNAVAILABLE
from pingpong.broadcast import BroadcastOutcomeUnknown
from pingpong.conf import setting
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.limits import TokenBucket, text_too_big
from pingpong.logs import log_event
from pingpong.node import Admission, node
from pingpong.tokens import TokenInvalid
from pingpong.topics import Identity, TopicRefused
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
        if group in self.joined:
            await self._group_discard(group)

    async def _group_discard(self, group: str) -> None:
        """group_discard within the layer deadline, a failure logged; private, so no layer message type can name it."""
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
    """`/ws/`: answers `ping` with `pong!`, relays broadcasts, and serves topics to its identity.

    The identity is the session's user (AuthMiddlewareStack), or a token's subject from
    `?token=` or an `auth` request; a bad token is answered `unauthorized` and 4401.
    """

    groups = [protocol.BROADCAST_GROUP]
    direct_handlers = {"broadcast.message": "broadcast_message_now"}

    # Topic and token state, shared empty until a connection first subscribes (`topics_begin`) or
    # has a token: most connections never do, and W2 holds 10,000 of them.
    subscriptions: set[str] = frozenset()  # type: ignore[assignment]
    # Topics with history: (epoch, offset) of the last publication sent, and joins in progress.
    positions: dict[str, tuple[str, int]] = MappingProxyType({})  # type: ignore[assignment]
    joining: dict[str, "JoinBuffer"] = MappingProxyType({})  # type: ignore[assignment]
    token_timers: list[asyncio.TimerHandle] = ()  # type: ignore[assignment]
    tasks: set[asyncio.Task[None]] = frozenset()  # type: ignore[assignment]

    def topics_begin(self) -> None:
        """This connection's own topic state, made on its first subscribe."""
        if "positions" not in self.__dict__:
            self.subscriptions, self.positions, self.joining = set(), {}, {}

    async def connect(self) -> None:
        self.identity = session_identity(self.scope)
        token = query_token(self.scope)
        if token is not None:
            try:
                claims = tokens.verify(token)
            except TokenInvalid as error:
                await self.refuse_token(str(error))
                return
            self.identity = token_identity(claims)
        elif SESSION_UNAVAILABLE in self.scope:
            # The browser has a session, but its user could not be read: anonymous would be wrong.
            await self.refuse(
                protocol.CloseCode.TRY_AGAIN_LATER,
                protocol.ERROR_UNAVAILABLE,
                "The session could not be read (the database is unreachable); try again later.",
            )
            return
        await self.accept()
        self.watch_token()

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
        request = parse_request(text_data)
        kind = request.get("type") if request is not None else None
        if request is not None and kind == protocol.REQUEST_PING:
            metrics.RECEIVED_JSON_PING.inc()
            metrics.SENT_PONG.inc()
            await self.send(text_data=pong_event(request))
            return
        handler = self.request_handlers.get(kind) if isinstance(kind, str) else None
        if request is None or handler is None or not isinstance(kind, str):
            metrics.RECEIVED_OTHER.inc()
            metrics.SENT_ERROR.inc()
            await self.send(
                text_data=protocol.error_event(
                    protocol.ERROR_UNKNOWN_MESSAGE,
                    'Send the text "ping" (answered with "pong!") or a JSON request: {"type": "ping"}, '
                    '"subscribe", "unsubscribe", "publish", "presence", "auth" or "refresh" (see the README).',
                    request.get("id") if request is not None else None,
                )
            )
            return
        metrics.RECEIVED[kind].inc()
        try:
            await handler(self, request)
        except TopicRefused as refused:
            await self.send_error(refused.error, str(refused), request.get("id"))

    async def subscribe(self, request: Message) -> None:
        """Join the topic's group; with history, answer its position and recover what the client missed.

        With history the join is: subscribe live first (publications now go to a buffer), read
        the history, send the reply and the recovered publications, then the buffer, dropping by
        offset what the history already gave: no gap and no duplicate between history and live.
        """
        topic = topics.valid_topic(request.get("topic"))
        since = since_from(request)
        if topic in self.subscriptions and since is None:
            await self.reply(protocol.EVENT_SUBSCRIBED, request, topic=topic, **self.position_fields(topic))
            return
        namespace = await topics.authorize(self.identity, "subscribe", topic)
        self.topics_begin()
        limit = setting("PINGPONG_MAX_SUBSCRIPTIONS")
        if topic not in self.subscriptions and len(self.subscriptions) >= limit:
            raise TopicRefused(
                protocol.ERROR_TOO_MANY_SUBSCRIPTIONS,
                f"A connection may hold {limit} subscriptions; unsubscribe first.",
            )
        layer = self.channel_layer
        assert layer is not None
        group = topics.group_for(topic)
        keeps_history = namespace.has_history and history.supported(layer)
        joining = JoinBuffer() if keeps_history else None
        if joining is not None:
            self.joining[topic] = joining  # live publications wait here until the history is sent
        try:
            try:
                await layer_calls.call(layer.group_add(group, self.channel_name), operation="group_add")
                read = None
                if keeps_history:
                    joined_at = history.next_sequence()  # live from here: only reads started later may be shared
                    read = await layer_calls.call(
                        history.read(
                            layer,
                            topic,
                            group,
                            ttl=namespace.history_ttl,
                            since=since[0] if since else -1,
                            want_epoch=since[1] if since else None,
                            limit=setting("PINGPONG_MAX_RECOVER"),
                            joined_at=joined_at,
                        ),
                        operation="history_read",
                    )
            except ChannelLayerUnavailable as error:
                raise TopicRefused(
                    protocol.ERROR_UNAVAILABLE, f"The channel layer is unreachable ({error}); retry."
                ) from None
            if joining is not None and joining.overflowed:
                raise TopicRefused(
                    protocol.ERROR_UNAVAILABLE,
                    "Publications arrived faster than this subscription could join them with the history; retry.",
                )
            if topic not in self.subscriptions:  # a resubscribe with `since` is in the presence list already
                await topic_presence.join(namespace, topic=topic, client=self.connection_id, user=self.identity.user_id)
        except TopicRefused:
            self.joining.pop(topic, None)
            if topic not in self.subscriptions:
                await self.leave_topic(topic)
            raise
        self.subscriptions.add(topic)
        if read is None:
            fields: dict[str, Any] = {} if since is None else {protocol.FIELD_RECOVERED: False}
            await self.reply(protocol.EVENT_SUBSCRIBED, request, topic=topic, **fields)
            return
        self.positions[topic] = (read.epoch, read.offset)
        fields = {protocol.FIELD_OFFSET: read.offset, protocol.FIELD_EPOCH: read.epoch}
        if since is not None:
            fields[protocol.FIELD_RECOVERED] = read.recovered
            metrics.RECOVERIES.labels(str(read.recovered).lower()).inc()
        await self.reply(protocol.EVENT_SUBSCRIBED, request, topic=topic, **fields)
        if read.recovered:
            for event in read.events:
                metrics.SENT_PUBLICATION.inc()
                await self.send(text_data=event)
        await self.join_live(topic)

    async def join_live(self, topic: str) -> None:
        """Deliver what live delivery buffered while the history was read, then deliver live directly."""
        joining = self.joining[topic]
        # Bounded: publications may keep arriving while these are sent; a connection that has not
        # caught up after JOIN_BUFFER_MAX + 1 of them takes them slower than they come.
        for _ in range(protocol.JOIN_BUFFER_MAX + 1):
            if not joining.messages or joining.overflowed:
                break
            await self.deliver_publication(topic, joining.messages.popleft())
        del self.joining[topic]
        if joining.overflowed or joining.messages:
            metrics.LIMIT_HITS.labels("slow_consumer").inc()
            await self.refuse(
                protocol.CloseCode.SLOW_CONSUMER,
                protocol.ERROR_SLOW_CONSUMER,
                "Publications arrived faster than this connection could take them.",
            )

    def position_fields(self, topic: str) -> dict[str, Any]:
        """The offset and epoch of the last publication of `topic` this connection was given, if any."""
        position = self.positions.get(topic)
        if position is None:
            return {}
        return {protocol.FIELD_OFFSET: position[1], protocol.FIELD_EPOCH: position[0]}

    async def unsubscribe(self, request: Message) -> None:
        topic = request.get("topic")
        if topic not in self.subscriptions:
            raise TopicRefused(protocol.ERROR_NOT_SUBSCRIBED, "This connection is not subscribed to that topic.")
        self.subscriptions.discard(topic)
        self.positions.pop(topic, None)
        await self.leave_topic(topic)
        await topic_presence.leave([topic], client=self.connection_id)
        await self.reply(protocol.EVENT_UNSUBSCRIBED, request, topic=topic)

    async def publish(self, request: Message) -> None:
        topic = topics.valid_topic(request.get("topic"))
        if "data" not in request:
            raise TopicRefused(protocol.ERROR_BAD_REQUEST, 'A publish request carries "data": any JSON value.')
        await topics.authorize(self.identity, "publish", topic)
        try:
            await topics.apublish(topic, request["data"])
        except BroadcastOutcomeUnknown as error:
            raise TopicRefused(
                protocol.ERROR_OUTCOME_UNKNOWN, f"The publication may not have been sent ({error})."
            ) from None
        except ChannelLayerUnavailable as error:
            raise TopicRefused(
                protocol.ERROR_UNAVAILABLE, f"The channel layer is unreachable ({error}); retry."
            ) from None
        await self.reply(protocol.EVENT_PUBLISHED, request, topic=topic)

    async def presence(self, request: Message) -> None:
        """Who is subscribed to a topic this connection subscribes to (a namespace with presence)."""
        topic = topics.valid_topic(request.get("topic"))
        if topic not in self.subscriptions:
            raise TopicRefused(protocol.ERROR_NOT_SUBSCRIBED, "Subscribe to the topic first to see its presence.")
        await self.reply(protocol.EVENT_PRESENCE, request, **await topic_presence.listing(topic))

    async def auth(self, request: Message) -> None:
        if self.identity.is_authenticated:
            raise TopicRefused(protocol.ERROR_BAD_REQUEST, "This connection has a user already; send refresh.")
        await self.take_token(request)

    async def refresh(self, request: Message) -> None:
        if self.identity.via != "token":
            raise TopicRefused(protocol.ERROR_BAD_REQUEST, "This connection has no token to refresh; send auth.")
        await self.take_token(request)

    request_handlers = {
        protocol.REQUEST_SUBSCRIBE: subscribe,
        protocol.REQUEST_UNSUBSCRIBE: unsubscribe,
        protocol.REQUEST_PUBLISH: publish,
        protocol.REQUEST_PRESENCE: presence,
        protocol.REQUEST_AUTH: auth,
        protocol.REQUEST_REFRESH: refresh,
    }

    async def take_token(self, request: Message) -> None:
        """Become the token's user (auth), or extend the same user's token (refresh); a bad one closes 4401."""
        try:
            claims = tokens.verify(request.get("token"))
        except TokenInvalid as error:
            await self.refuse_token(str(error))
            return
        if self.identity.via == "token" and claims.user_id != self.identity.user_id:
            await self.refuse_token("A refresh token must be for the same user.")
            return
        self.identity = token_identity(claims)
        self.watch_token()
        await self.reply(protocol.EVENT_AUTHENTICATED, request, user=claims.user_id, expires_at=claims.expires_at)

    def watch_token(self) -> None:
        """Warn TOKEN_WARNING_SECONDS before the token's exp, and close 4401 at exp (until a refresh)."""
        for timer in self.token_timers:
            timer.cancel()
        expires_at = self.identity.expires_at
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        left = expires_at - time.time()
        self.token_timers = [
            loop.call_later(max(0.0, left - protocol.TOKEN_WARNING_SECONDS), self.spawn, self.token_expiring),
            loop.call_later(max(0.0, left), self.spawn, self.token_expired),
        ]

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work())
        if "tasks" not in self.__dict__:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def token_expiring(self) -> None:
        await self.send(
            text_data=protocol.encode_event(
                {
                    "type": protocol.EVENT_TOKEN_EXPIRING,
                    "expires_at": self.identity.expires_at,
                    "detail": 'The token expires at expires_at: send {"type": "refresh", "token": ...} before then.',
                }
            )
        )

    async def token_expired(self) -> None:
        await self.refuse_token("The token has expired.")

    async def refuse_token(self, detail: str) -> None:
        metrics.TOPIC_REFUSALS.labels(protocol.ERROR_UNAUTHORIZED).inc()
        await self.refuse(protocol.CloseCode.UNAUTHORIZED, protocol.ERROR_UNAUTHORIZED, detail)

    async def reply(self, kind: str, request: Message, **fields: Any) -> None:
        """An answer event of type `kind`, repeating the request's id when it had one."""
        event = {"type": kind, **fields}
        if request.get("id") is not None:
            event["id"] = request["id"]
        await self.send(text_data=protocol.encode_event(event))

    async def send_error(self, error: str, detail: str, request_id: Any) -> None:
        metrics.TOPIC_REFUSALS.labels(error).inc()
        metrics.SENT_ERROR.inc()
        await self.send(text_data=protocol.error_event(error, detail, request_id))

    async def broadcast_message(self, message: Message) -> None:
        """A broadcast from the group: its event was serialised once by the sender; a retry's copy is dropped."""
        if broadcast.deliverable(message):
            metrics.SENT_BROADCAST.inc()
            await self.send(text_data=message["event"])

    def broadcast_message_now(self, message: Message) -> None:
        """`broadcast_message` as the layer's direct receiver calls it (`direct_handlers`)."""
        metrics.DIRECT_BROADCAST.inc()
        if broadcast.deliverable(message):
            metrics.SENT_BROADCAST.inc()
            self.send_nowait({"type": "websocket.send", "text": message["event"]})

    async def topic_publication(self, message: Message) -> None:
        """A publication to a subscribed topic (groups are hashes: the topic itself is checked too)."""
        topic = message.get("topic")
        joining = self.joining.get(topic) if isinstance(topic, str) else None
        if joining is not None:
            joining.add(message)
        elif topic in self.subscriptions:
            await self.deliver_publication(topic, message)

    async def deliver_publication(self, topic: str, message: Message) -> None:
        """Send a publication once: by id without history; with history, by offset, filling a gap from it.

        A gap (an offset past the next one, in the same epoch: a queue that was full, a
        subscriber connection that reconnected) is filled from the history when it still holds
        the missing publications; otherwise the client sees the offsets jump, and resubscribes
        with `since` to learn that it must reload.
        """
        offset, epoch = message.get(protocol.FIELD_OFFSET), message.get(protocol.FIELD_EPOCH)
        if not (isinstance(offset, int) and isinstance(epoch, str)):
            if broadcast.deliverable(message):
                metrics.SENT_PUBLICATION.inc()
                await self.send(text_data=message["event"])
            return
        position = self.positions.get(topic)
        if position is not None and position[0] == epoch:
            if offset <= position[1]:
                return  # delivered already (from the history, or a duplicate)
            if offset > position[1] + 1:
                await self.fill_gap(topic, since=position[1], epoch=epoch, before=offset)
        self.positions[topic] = (epoch, offset)
        metrics.SENT_PUBLICATION.inc()
        await self.send(text_data=message["event"])

    async def fill_gap(self, topic: str, *, since: int, epoch: str, before: int) -> None:
        """Send the publications after `since` and before `before` from the history, when all are there."""
        namespace = topics.namespace_for(topic)
        assert self.channel_layer is not None
        try:
            read = await layer_calls.call(
                history.read(
                    self.channel_layer,
                    topic,
                    topics.group_for(topic),
                    ttl=namespace.history_ttl,
                    since=since,
                    want_epoch=epoch,
                    limit=setting("PINGPONG_MAX_RECOVER"),
                    strict=False,
                ),
                operation="history_read",
            )
        except ChannelLayerUnavailable as error:
            logger.warning("could not fill a gap in %s from its history: %s", topic, error)
            return
        if read.epoch != epoch or read.first != since + 1:
            return
        for event in read.events[: before - since - 1]:
            metrics.SENT_PUBLICATION.inc()
            await self.send(text_data=event)

    async def topic_join_leave(self, message: Message) -> None:
        """Another connection's join or leave on a subscribed topic; a connection's own join is not echoed."""
        if message.get("topic") in self.subscriptions and message.get("client") != self.connection_id:
            await self.send(text_data=message["event"])

    async def leave_topic(self, topic: str) -> None:
        await self._group_discard(topics.group_for(topic))

    async def finish(self, *, code: int) -> None:
        """Stop the token timers and leave every topic, as well as the base's groups."""
        await super().finish(code=code)
        for timer in self.token_timers:
            timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        subscriptions: set[str] = set(self.subscriptions) | set(self.joining)
        self.subscriptions, self.joining = set(), {}
        for topic in subscriptions:
            await self.leave_topic(topic)
        await topic_presence.leave(subscriptions, client=self.connection_id)


class EchoConsumer(GuardedWebsocketConsumer):
    """`/ws/echo/`: echoes every text and binary frame exactly, empty ones included."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        metrics.SENT_ECHO.inc()
        await self.send(text_data=text_data, bytes_data=bytes_data)


class JoinBuffer:
    """Live publications of a topic that arrive while its subscription reads the history (bounded)."""

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.overflowed = False

    def add(self, message: Message) -> None:
        if len(self.messages) >= protocol.JOIN_BUFFER_MAX:
            self.overflowed = True
            return
        self.messages.append(message)


def since_from(request: Message) -> tuple[int, str] | None:
    """The `since` of a subscribe request as (offset, epoch), None without one, or TopicRefused (bad_request)."""
    since = request.get(protocol.FIELD_SINCE)
    if since is None:
        return None
    offset = since.get(protocol.FIELD_OFFSET) if isinstance(since, dict) else None
    epoch = since.get(protocol.FIELD_EPOCH) if isinstance(since, dict) else None
    if not (
        isinstance(since, dict)
        and set(since) == {protocol.FIELD_OFFSET, protocol.FIELD_EPOCH}
        and isinstance(offset, int)
        and not isinstance(offset, bool)
        and 0 <= offset <= protocol.SINCE_MAX_OFFSET
        and isinstance(epoch, str)
        and 0 < len(epoch) <= protocol.SINCE_MAX_EPOCH_CHARS
    ):
        raise TopicRefused(
            protocol.ERROR_BAD_REQUEST,
            f'"since" is {{"offset": <0 to {protocol.SINCE_MAX_OFFSET}>, "epoch": "<the epoch it came with>"}}: '
            "the last publication of the topic this client received.",
        )
    return offset, epoch


def parse_request(text: str) -> dict[str, Any] | None:
    """A JSON object request, or None for any other text."""
    if not text.startswith("{"):
        return None
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter allows
        return None
    return request if isinstance(request, dict) else None


def pong_event(request: dict[str, Any]) -> str:
    """The answer to a JSON ping `{"type": "ping", "id": ...}`."""
    # ASCII-escaped: an id holding a lone surrogate ("\ud800") goes back as sent instead of
    # failing daphne's UTF-8 encode (UnicodeEncodeError, then 1011).
    pong = {"type": protocol.EVENT_PONG, "id": request.get("id"), "server_time": time.time()}
    return json.dumps(pong, separators=(",", ":"))


def query_token(scope: Message) -> str | None:
    """The `token` query parameter, when the connection URL has one."""
    query = scope.get("query_string", b"")
    if b"token=" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("token")
    return values[0] if values else ""


def session_identity(scope: Message) -> Identity:
    """The session's user (resolved once by AuthMiddlewareStack at the handshake), or anonymous."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return topics.ANONYMOUS
    return Identity(user_id=str(user.pk), via="session", user=user)


def token_identity(claims: tokens.Claims) -> Identity:
    return Identity(user_id=claims.user_id, via="token", topics=claims.topics, expires_at=claims.expires_at)
