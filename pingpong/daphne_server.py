"""Daphne, configured from settings, with a graceful drain and exact empty frames.

Stock daphne on SIGTERM cancels every application at once, so clients see 1006 and
no close frame. `PingpongServer` first drains: /readyz turns 503, every websocket is
closed with 4012 and gets up to PINGPONG_DRAIN_SECONDS to finish its disconnect
(group memberships are cleaned), then daphne's own shutdown runs. Unlike uvicorn's, a websocket's
scope here has no `pingpong.send_nowait`: daphne's own tests, which run against this server, allow no
scope key daphne does not set. Broadcasts go through each consumer's task.
"""

import asyncio
import logging
import socket
from typing import Any

# daphne.server installs Twisted's asyncio reactor on import: import it before anything else
# touches twisted.internet.reactor.
from daphne.server import Server  # isort: skip
from daphne import ws_protocol
from daphne.endpoints import build_endpoint_description_strings
from django.conf import settings
from twisted.internet import defer, reactor

from pingpong import layer_calls, presence, protocol
from pingpong.node import node
from pingpong.serving import (
    LISTEN_BACKLOG,
    SLOW_CONSUMER_CLOSE_SECONDS,  # autobahn's own close timeout is 1 s
    frame_limit,
    slow_consumer_report,
)

logger = logging.getLogger("pingpong.server")

APPLICATION_CLOSE_SECONDS = 60.0


def pending_bytes(transport: Any) -> int:
    """Bytes written to a Twisted TCP transport that the kernel has not taken yet."""
    # Twisted's FileDescriptor keeps unsent data in dataBuffer (from offset on) plus a list of
    # later writes (_tempDataLen bytes); nothing else in the stack buffers outbound frames.
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class ExactWebSocketProtocol(ws_protocol.WebSocketProtocol):
    """Daphne's protocol with exact empty frames, close frames on protocol errors, a cap on
    bytes waiting for a slow client, and quiet drops of sends to a closing socket."""

    #: Set from PINGPONG_MAX_PENDING_BYTES when the server starts.
    max_pending_bytes = 256 * 1024
    #: Whether the application has been told the connection is gone.
    close_reported = False

    def _connectionMade(self) -> None:
        super()._connectionMade()
        # Autobahn's default (failByDrop) drops TCP on a protocol error, so clients see 1006;
        # RFC 6455 7.1.7 says SHOULD send the close frame: 1002, 1007 or 1009 with a reason.
        self.failByDrop = False

    def onOpenHandshakeTimeout(self) -> None:
        connecting = self.state == self.STATE_CONNECTING
        super().onOpenHandshakeTimeout()
        if connecting and not self.close_reported:
            # Autobahn has dropped the TCP connection, but that loss never reaches daphne's onClose:
            # the application, already sent `websocket.connect`, would wait forever and stay counted
            # open (5,358 of 6,000 in a burst on a starved node). Tell it now.
            self.onClose(False, 1006, "opening handshake timeout")

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        if self.close_reported:  # once: the connection's loss may still arrive later
            return
        self.close_reported = True
        super().onClose(wasClean, code, reason)

    def handle_reply(self, message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.send" and self.state != self.STATE_CONNECTING:
            if self.state != self.STATE_OPEN:
                # The client closed first, or we did: nothing more can reach it. Autobahn would
                # raise Disconnected into the application and skip its disconnect.
                return
            text, data = message.get("text"), message.get("bytes")
            if text is not None and data is not None:
                raise ValueError("a websocket.send message carries both text and bytes")
            pending = pending_bytes(self.transport)
            if pending > self.max_pending_bytes:
                self.close_slow_consumer(pending)
                return
            if data is not None:
                self.serverSend(data, True)
            elif text is not None:
                self.serverSend(text, False)
            return
        super().handle_reply(message)

    def close_slow_consumer(self, pending: int) -> None:
        """Close a client that does not read: its unsent bytes would otherwise grow without bound.

        The error event and close frame queue behind what is pending; TCP is aborted when the
        client has not answered the close within SLOW_CONSUMER_CLOSE_SECONDS.
        """
        client = self.client_addr[0] if self.client_addr else None
        event = slow_consumer_report(client=client, pending=pending, limit=self.max_pending_bytes)
        self.sendMessage(event.encode())
        self.closeHandshakeTimeout = SLOW_CONSUMER_CLOSE_SECONDS
        self.sendClose(code=int(protocol.CloseCode.SLOW_CONSUMER), reason="slow consumer")  # autobahn wants a plain int


class PingpongServer(Server):
    """A daphne Server that drains websockets before it stops."""

    warm_up: "asyncio.Task[None] | None" = None

    def run(self) -> None:
        ws_protocol.WebSocketFactory.protocol = ExactWebSocketProtocol
        ExactWebSocketProtocol.max_pending_bytes = settings.PINGPONG_MAX_PENDING_BYTES
        reactor.callLater(0, presence.start)  # type: ignore[arg-type]  # publish this node's count from boot
        reactor.callLater(0, self.layer_warm_up_start)  # type: ignore[arg-type]
        super().run()

    def layer_warm_up_start(self) -> None:
        """Subscribe the broadcast group at boot, so a burst of first connections needs no Redis call."""
        self.warm_up = asyncio.ensure_future(layer_calls.warm_up(groups=[protocol.BROADCAST_GROUP]))

    def listen_success(self, port: Any) -> None:
        # Twisted's HTTP idle timeout is 12 hours: a client that never finishes its request or
        # handshake would hold a socket that long. Established websockets are not affected.
        self.http_factory.timeOut = settings.PINGPONG_HTTP_IDLE_TIMEOUT
        super().listen_success(port)
        # The bound address, so `--port 0` (an ephemeral port, as tests and the benchmark use) can be read back.
        bound = port.getHost() if hasattr(port, "getHost") else None
        if bound is not None and hasattr(bound, "port"):
            logger.info("listening on http://%s:%s", bound.host, bound.port)

    def kill_all_applications(self) -> defer.Deferred:
        drained = defer.Deferred.fromFuture(
            asyncio.ensure_future(
                node.drain(code=protocol.CloseCode.SERVICE_RESTART, timeout=settings.PINGPONG_DRAIN_SECONDS)
            )
        )
        drained.addBoth(lambda _: defer.Deferred.fromFuture(asyncio.ensure_future(presence.stop())))
        drained.addBoth(lambda _: Server.kill_all_applications(self))
        return drained


def build(
    *, application: Any, host: str, port: int, verbosity: int = 1, sock: socket.socket | None = None
) -> PingpongServer:
    """A PingpongServer whose websocket limits and timeouts come from settings; on `sock` (a listening
    socket, which it takes over) when given, else on host:port."""
    limit = frame_limit()
    proxy_header = settings.PINGPONG_PROXY_HEADER or None
    if sock is not None:
        # daphne's `fd:` endpoint parser passes a `domain=` option on as a string, which Twisted refuses:
        # only its default, AF_INET, works (the serve command says so for an IPv6 host).
        if sock.family != socket.AF_INET:
            raise ValueError("daphne takes an IPv4 listening socket only")
        endpoints = [f"fd:fileno={sock.detach()}"]  # Twisted adopts (dups) the descriptor, then closes ours
    else:
        endpoints = [
            f"{endpoint}:backlog={LISTEN_BACKLOG}"
            for endpoint in build_endpoint_description_strings(host=host, port=port)
        ]
    return PingpongServer(
        application=application,
        endpoints=endpoints,
        ping_interval=settings.PINGPONG_PING_INTERVAL,
        ping_timeout=settings.PINGPONG_PING_TIMEOUT,
        websocket_timeout=-1,  # connection lifetime is not capped; dead peers are found by pings
        # From the upgrade request to the application's accept (see PINGPONG_HANDSHAKE_TIMEOUT).
        websocket_handshake_timeout=settings.PINGPONG_HANDSHAKE_TIMEOUT,
        websocket_connect_timeout=settings.PINGPONG_HANDSHAKE_TIMEOUT,
        # daphne cancels an application still running this long after its client left, with a WARNING
        # each. 12,000 clients leaving at once kept a busy node's loop over daphne's 10 s: 10,690 lines.
        # A consumer's own finish is bounded by PINGPONG_LAYER_TIMEOUT per group, so this only waits out
        # a saturated loop.
        application_close_timeout=APPLICATION_CLOSE_SECONDS,
        websocket_max_message_size=limit,
        websocket_max_frame_size=limit,
        proxy_forwarded_address_header=proxy_header,
        proxy_forwarded_port_header=None,
        proxy_forwarded_proto_header="X-Forwarded-Proto" if proxy_header else None,
        verbosity=verbosity,
    )
