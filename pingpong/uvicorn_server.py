"""Uvicorn (uvloop, httptools, websockets' sans-I/O protocol), configured to keep daphne's promises.

`manage.py serve --server uvicorn` runs the same ASGI application here. Where stock uvicorn differs,
and what this module does about it:

- SIGTERM: uvicorn closes websockets with 1012 and cancels the applications, then re-raises the
  signal. `PingpongServer` first drains (/readyz 503 at once, 4012 to every client, their
  disconnects and close handshakes within PINGPONG_DRAIN_SECONDS) and exits 0.
- A client that does not read: uvicorn makes `send` wait while the write buffer is full, which parks
  the consumer (and the broadcasts queued for it). `PingpongWebSocketProtocol` never waits: past
  PINGPONG_MAX_PENDING_BYTES it closes with 4100, as daphne does.
- A send after the client left raises ClientDisconnected into the consumer; here it is dropped.
- Invalid UTF-8 is answered with 1007 by both; uvicorn also logs it as an ERROR with a traceback.
- A close the client never answers: uvicorn's `transport.close()` waits for a non-reader's buffer
  forever; here TCP is aborted after CLOSE_HANDSHAKE_SECONDS.
- HTTP idle timeout: uvicorn times only the idle gap after a response, so a client that stalls
  mid-request or mid-handshake is held forever; `PingpongHttpProtocol` times the client's turn too.
- A handshake websockets refuses to parse (a header line over 8 KiB, more than 128 headers) after
  httptools took it: websockets queues 431 and uvicorn never writes it, so the socket hangs with no
  answer and no timer; here the 431 is sent and TCP closed.
- A frame to send is one header and the payload in one write: websockets' `send_text` builds a
  Frame object and a list of chunks per message, a seventh of the CPU a `pong!` costs uvicorn here.
- Whole, unfragmented text and binary frames (the every-message case) are unmasked and queued here
  while websockets' parser waits between frames; everything else (control frames, fragments, bad
  frames, invalid UTF-8) goes to websockets, as before. Its generator parser cost about a tenth of
  the CPU a `ping` takes.
- uvicorn stops reading after every client message and starts again when the application takes it:
  two epoll changes per message (about 5% of a `ping`'s CPU). Here reading stops when
  RECEIVE_QUEUE_MAX messages wait, which a client that waits for its answers never reaches.
- A websocket's scope carries `pingpong.send_nowait` (`pingpong.serving.SEND_NOWAIT`), `send` as a
  plain call, so a consumer can deliver a broadcast from the channel layer without waking its task.
- Proxy headers: uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; here that is off and
  PINGPONG_PROXY_HEADER alone names the client (`ProxyHeaderMiddleware`).

It subclasses uvicorn's protocol classes, so `pyproject.toml` pins uvicorn to one minor version.
"""

import asyncio
import contextlib
import logging
import math
import signal
import struct
from collections.abc import Iterator
from types import FrameType
from typing import Any, Final

import uvicorn
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

from pingpong import layer_calls, presence, protocol
from pingpong.node import node
from pingpong.serving import (
    LISTEN_BACKLOG,
    SEND_NOWAIT,
    SLOW_CONSUMER_CLOSE_SECONDS,
    frame_limit,
    slow_consumer_report,
)

logger = logging.getLogger("pingpong.server")

# How long any client has to answer a close frame before TCP is aborted (autobahn: 1 s, or
# SLOW_CONSUMER_CLOSE_SECONDS for a slow consumer; uvicorn: 10 s, then a close that may never finish).
CLOSE_HANDSHAKE_SECONDS: Final = SLOW_CONSUMER_CLOSE_SECONDS
# After the drain, what is left (HTTP requests in flight) gets this long before uvicorn cancels it.
SHUTDOWN_GRACE_SECONDS: Final = 1


def frame_header(opcode: int, length: int) -> bytes:
    """RFC 6455 header of a final, unmasked (server-to-client) frame carrying `length` bytes."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2

#: Client messages waiting for the application before the server stops reading the socket (stock
#: uvicorn: 1, so two epoll changes per message); more wait in TCP's buffers. One read's frames may
#: go past it. 2: a client that waits for each answer never reaches it.
RECEIVE_QUEUE_MAX: Final = 2

# Where websockets' frame parser waits when it is between frames with nothing buffered.
_PARSER_LOOP: Final = Protocol.parse.__code__
_PARSER_IDLE: Final = StreamReader.at_eof.__code__


def client_messages(data: bytes, max_size: int | None) -> tuple[list[Any], int]:
    """The ASGI receive events of the whole, final, masked text and binary frames at the front of
    `data`, and the bytes they took.

    Stops at the first frame that is anything else (a control frame, a fragment, reserved bits set,
    unmasked, a 64-bit length, over `max_size` (None: no limit), incomplete, or text that is not
    UTF-8), so websockets parses it and answers as it always has.
    """
    messages: list[Any] = []  # websocket.receive events
    at, end = 0, len(data)
    while end - at >= 6:  # the smallest masked frame: 2 bytes of header, 4 of mask
        first, second = data[at], data[at + 1]
        if (first != 0x81 and first != 0x82) or second < 0x80:  # FIN + text/binary, no RSV; MASK set
            break
        length, mask_at = second & 0x7F, at + 2
        if length == 126:
            length, mask_at = int.from_bytes(data[at + 2 : at + 4]), at + 4
        elif length == 127:
            break
        payload_at = mask_at + 4
        if end - payload_at < length or (max_size is not None and length > max_size):
            break
        payload = apply_mask(data[payload_at : payload_at + length], data[mask_at:payload_at])
        if first == 0x81:
            try:
                messages.append({"type": "websocket.receive", "text": payload.decode()})
            except UnicodeDecodeError:
                break
        else:
            messages.append({"type": "websocket.receive", "bytes": payload})
        at = payload_at + length
    return messages, at


class PingpongWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a cap on bytes waiting for a slow client, quiet drops
    of sends to a closing socket, and TCP aborted when a close is not answered in time."""

    #: Set from PINGPONG_MAX_PENDING_BYTES when the server is built.
    max_pending_bytes = 256 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = CLOSE_HANDSHAKE_SECONDS
        self.between_frames = False  # websockets' parser waits for a new frame, nothing buffered

    def data_received(self, data: bytes) -> None:
        if self.between_frames and self.conn.state is State.OPEN and not self.close_sent:
            messages, taken = client_messages(data, self.conn.max_message_size)
            if messages:
                for message in messages:
                    self.queue.put_nowait(message)
                self.pause_if_full()
            if taken == len(data):
                return
            data = data[taken:]
        super().data_received(data)
        self.between_frames = self.parser_between_frames()
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the request (431 or 414) and queued its answer; uvicorn only writes
            # a response for a request that parsed, so this one would wait forever. Send it and close.
            self.handshake_complete = self.close_sent = True
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def parser_between_frames(self) -> bool:
        """Whether websockets' parser waits for the first byte of a frame, outside a fragmented
        message, with nothing buffered: then the next bytes may be parsed here instead."""
        conn = self.conn
        if conn.reader.buffer or conn.current_size is not None or conn.parser_exc is not None:
            return False
        parser: Any = conn.parser  # a generator: typeshed's Generator has no gi_yieldfrom
        outer, inner = parser, parser.gi_yieldfrom
        while inner is not None and inner.gi_yieldfrom is not None:
            outer, inner = inner, inner.gi_yieldfrom
        return inner is not None and inner.gi_code is _PARSER_IDLE and outer.gi_code is _PARSER_LOOP

    def pause_if_full(self) -> None:
        """Stop reading the socket while RECEIVE_QUEUE_MAX messages wait; `receive` reads on when
        the application has taken them all."""
        if not self.read_paused and self.queue.qsize() >= RECEIVE_QUEUE_MAX:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # none for a refused handshake
        if scope is not None:  # read by the application task, which has not run yet
            scope["extensions"][SEND_NOWAIT] = self.send_nowait

    def send_nowait(self, message: Any) -> None:
        """`websocket.send` after the handshake, as a plain call: `send` uses it, and so may an
        application through the `pingpong.send_nowait` extension."""
        if self.disconnected or self.close_sent or self.transport.is_closing():
            return  # gone or closing: nothing more can reach the client (uvicorn would raise)
        self.frame_send(message)

    def pause_writing(self) -> None:
        # No back-pressure on the application: the pending-bytes cap bounds the buffer instead. A
        # paused `send` would hold the consumer's layer task, and every broadcast behind it.
        pass

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if self.disconnected:
            return  # the client is gone; uvicorn would raise ClientDisconnected into the consumer
        if self.handshake_complete and self.initial_response is None and kind in ("websocket.send", "websocket.close"):
            if kind == "websocket.send":
                self.send_nowait(message)
                return
            if self.close_sent or self.transport.is_closing():
                return  # closing: nothing more can reach the client (uvicorn raises RuntimeError)
        await super().send(message)
        if kind == "websocket.close" and self.close_timer is not None:
            self.abort_later(self.close_timeout)

    def frame_send(self, message: Any) -> None:
        """Write one text or binary frame, empty ones included, unless the client is over the cap."""
        text, data = message.get("text"), message.get("bytes")
        if text is not None and data is not None:
            raise ValueError("a websocket.send message carries both text and bytes")
        pending = self.transport.get_write_buffer_size()
        if pending > self.max_pending_bytes:
            self.close_slow_consumer(pending)
            return
        if self.conn.state is not State.OPEN:
            return  # the peer's close or a protocol error got there first
        if data is not None:
            payload, opcode = data, OPCODE_BINARY
        elif text is not None:
            payload, opcode = text.encode(), OPCODE_TEXT
        else:
            return
        # Uncompressed (RSV1 clear) even if permessage-deflate were ever negotiated: RFC 7692 lets a
        # sender leave any message uncompressed. As built, no extension is (the corpus checks it).
        self.transport.write(frame_header(opcode, len(payload)) + payload)

    def close_slow_consumer(self, pending: int) -> None:
        """Close a client that does not read: its unsent bytes would otherwise grow without bound.

        The error event and close frame queue behind what is pending; TCP is aborted when the
        client has not answered the close within SLOW_CONSUMER_CLOSE_SECONDS.
        """
        client = self.client[0] if self.client else None
        event = slow_consumer_report(client=client, pending=pending, limit=self.max_pending_bytes)
        self.conn.send_text(event.encode())
        self.conn.send_close(int(protocol.CloseCode.SLOW_CONSUMER), "slow consumer")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # As uvicorn does for an application's close: the consumer finishes now, not at TCP's end.
        self.queue.put_nowait({"type": "websocket.disconnect", "code": int(protocol.CloseCode.SLOW_CONSUMER)})
        if self.read_paused:  # so the client's close frame can be read
            self.read_paused = False
            self.transport.resume_reading()
        self.abort_later(SLOW_CONSUMER_CLOSE_SECONDS)

    def send_receive_event_to_app(self) -> None:
        # uvicorn's, without the ERROR and traceback it logs for invalid UTF-8: a client's bad input
        # is answered with 1007, as daphne does, not reported as a server error.
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past our close: read on only for the client's answer
        message: Any
        if self.curr_msg_data_type == "text":
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self.conn.send_close(CloseCode.INVALID_DATA, "invalid UTF-8")
                self.handle_parser_exception()
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.put_nowait(message)
        self.pause_if_full()

    def keepalive_timeout(self) -> None:
        # uvicorn sends 1011 and closes; a dead peer never takes the frame, so abort unless it does.
        super().keepalive_timeout()
        self.abort_later(self.close_timeout)

    def abort_later(self, seconds: float) -> None:
        """Abort TCP unless the connection ends within `seconds` (the client's close answer cancels it)."""
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(seconds, self.transport.abort)


class PingpongHttpProtocol(HttpToolsProtocol):
    """httptools with PINGPONG_HTTP_IDLE_TIMEOUT on the client's turn too: a request head, body or
    websocket handshake that stalls is dropped, as Twisted does (uvicorn times only keep-alive gaps)."""

    #: Set from PINGPONG_HTTP_IDLE_TIMEOUT when the server is built.
    idle_timeout = 75.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_turn = True  # the client owes us the rest of a request

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_timer_arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.client_turn:
            self.idle_timer_arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.client_turn = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.client_turn = False

    def idle_timer_arm(self) -> None:
        """(Re)start the timer that closes the connection; not once it became a websocket."""
        self._unset_keepalive_if_required()
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.idle_timeout, self.timeout_keep_alive_handler)


class ProxyHeaderMiddleware:
    """Take the client's address from one header set by the load balancer, as daphne's
    `proxy_forwarded_address_header` does: its first comma-separated value, port 0."""

    def __init__(self, app: Any, *, header: str) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            for name, value in scope["headers"]:
                if name.lower() == self.header:
                    address = value.decode("latin-1").split(",")[0].strip()
                    scope = {**scope, "client": (address, 0)}
                    break
        await self.app(scope, receive, send)


class PingpongServer(uvicorn.Server):
    """A uvicorn Server that drains websockets before it stops, and exits 0 after SIGTERM."""

    warm_up: "asyncio.Task[None] | None" = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        # The bound address, so `--port 0` (an ephemeral port, as tests and the benchmark use) can be read back.
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("listening on http://%s:%s", host, port)
        presence.start()  # publish this node's count from boot
        # Subscribe the broadcast group at boot, so a burst of first connections needs no Redis call.
        self.warm_up = asyncio.ensure_future(layer_calls.warm_up(groups=[protocol.BROADCAST_GROUP]))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # /readyz answers 503 and new websockets 4013 from this moment; the drain runs on the loop
        # at uvicorn's next tick (0.1 s).
        node.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own re-raises the signal after shutdown, so the process would die of SIGTERM
        # (exit -15); a node that drained exits 0, as under daphne.
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: Any = None) -> None:
        await self.drain()
        await super().shutdown(sockets=sockets)

    async def drain(self) -> None:
        """Close every websocket with 4012 and wait for the disconnects, then for the clients'
        close answers, all within PINGPONG_DRAIN_SECONDS; abort what is left; leave presence."""
        loop = asyncio.get_running_loop()
        timeout = float(settings.PINGPONG_DRAIN_SECONDS)
        deadline = loop.time() + timeout
        await node.drain(code=protocol.CloseCode.SERVICE_RESTART, timeout=timeout)
        # uvicorn hands a consumer its disconnect as soon as it sends its close; the client's
        # answer comes after, and the listener stays open (for /readyz) until it has. Polled, as
        # uvicorn's own shutdown polls its connections: a protocol does not know its server.
        while (websockets := self.websockets()) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for connection in websockets:
            connection.transport.abort()
        await presence.stop()
        if self.warm_up is not None:
            self.warm_up.cancel()

    def websockets(self) -> list[PingpongWebSocketProtocol]:
        """The websocket connections still open."""
        return [c for c in self.server_state.connections if isinstance(c, PingpongWebSocketProtocol)]


def build(*, application: Any, host: str, port: int) -> PingpongServer:
    """A PingpongServer whose websocket limits and timeouts come from settings."""
    PingpongWebSocketProtocol.max_pending_bytes = settings.PINGPONG_MAX_PENDING_BYTES
    PingpongHttpProtocol.idle_timeout = settings.PINGPONG_HTTP_IDLE_TIMEOUT
    if settings.PINGPONG_PROXY_HEADER:
        application = ProxyHeaderMiddleware(application, header=settings.PINGPONG_PROXY_HEADER)
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        loop="uvloop",
        http=PingpongHttpProtocol,
        ws=PingpongWebSocketProtocol,
        ws_max_size=frame_limit(),
        ws_ping_interval=settings.PINGPONG_PING_INTERVAL,
        ws_ping_timeout=settings.PINGPONG_PING_TIMEOUT,
        ws_per_message_deflate=False,  # daphne offers none; zlib state would cost far more per connection
        lifespan="off",  # Channels' router has no lifespan; startup and drain are done by PingpongServer
        proxy_headers=False,
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=math.ceil(settings.PINGPONG_HTTP_IDLE_TIMEOUT),
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        server_header=False,
        log_config=None,  # Django's LOGGING stays in charge
        log_level=logging.WARNING,  # no per-connection "[accepted]" line: the consumer logs its own
        access_log=False,
    )
    return PingpongServer(config)
