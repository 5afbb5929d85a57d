"""A table of hostile and malformed inputs against one real node, on daphne and on uvicorn.

Each row is one input and the outcome it must get: an HTTP status, a close code, an error
event, or a dropped TCP connection. Whatever the row, the node must not answer HTTP 500,
close anyone with 1011 or log a traceback, and a control client on the same node keeps
getting `pong!` (checked after every row). Inputs a client library refuses to send are
built by hand (tests/rawws.py).

Outcomes are short strings so the table reads like the README: `"http 400"`, `"close 1002"`,
`"error unknown_message, open"` (an error event and the connection still answers a ping),
`"dropped"` (the server ended TCP without a close frame). `" | "` separates outcomes that
are both acceptable, e.g. a protocol error may be failed with close 1002 or a plain drop
(RFC 6455 7.1.7 says SHOULD send the close frame; autobahn drops by default). A row whose
answer legitimately differs on uvicorn states uvicorn's outcomes apart (`on_uvicorn`); the
README's Servers table lists every such row.
"""

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from tests import rawws
from tests.processes import LOOPBACK, SERVERS, DaphneNode, http_request, scaled
from tests.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    RawClient,
    close_payload,
    frame_encode,
    handshake_request,
)
from tests.wsclient import ping_pong_sync, ws_connect_sync

TOKEN = "corpus-broadcast-token-7f3a9c"
MAX_MESSAGE_BYTES = 1024
# The app limit plus server.TRANSPORT_HEADROOM_BYTES: over this autobahn refuses the frame itself.
TRANSPORT_LIMIT = MAX_MESSAGE_BYTES + 4096
MAX_BROADCAST_BYTES = 512
RATE_PER_SECOND = 100
RATE_BURST = 40
# Low, so a row can reach it; the control client and every other row stay well below it.
MAX_CONNECTIONS_PER_IP = 12
# Proposed setting (see the report): Twisted keeps a stalled HTTP request open for 12 hours.
HTTP_IDLE_TIMEOUT = 3
TOKEN_SECRET = "corpus-token-secret-" + "0123456789abcdef" * 3
MAX_SUBSCRIPTIONS = 20
# A namespace with presence and join/leave events, beside the defaults (which keep neither).
NAMESPACES = {
    "room": {"subscribe": "anyone", "publish": "server", "presence": True, "join_leave": True},
    "plain": {"subscribe": "anyone", "publish": "anyone"},  # no history
}

Probe = Callable[[DaphneNode], str]

# The whole table runs against `manage.py serve --server daphne` and `--server uvicorn`, one node each.
pytestmark = pytest.mark.parametrize("server", SERVERS, scope="module")


@dataclass(frozen=True)
class Row:
    """One hostile input and the outcome(s) it must get; `on_uvicorn` where uvicorn's answer differs."""

    name: str
    probe: Probe
    expected: str
    on_uvicorn: str | None = None

    def expected_on(self, server: str) -> str:
        """The outcomes accepted from `server`."""
        return self.on_uvicorn if server == "uvicorn" and self.on_uvicorn is not None else self.expected

    def accepts(self, observed: str, *, server: str) -> bool:
        return observed in self.expected_on(server).split(" | ")


# --- how rows talk to the node ------------------------------------------------------------


def event_summary(text: str) -> str:
    """`pong!` as is, an error event as `error <code>`, other JSON events by their type."""
    if text == "pong!":
        return text
    try:
        event = json.loads(text)
    except ValueError:
        return f"text {text[:40]!r}"
    if isinstance(event, dict) and event.get("type") == "error":
        return f"error {event.get('error')}"
    return str(event.get("type")) if isinstance(event, dict) else "json"


def frames_summary(frames: list[rawws.Frame], *, closed: bool, skip_pongs: bool = False) -> str:
    """What the server sent, in order; `dropped` when it ended TCP without a close frame."""
    parts: list[str] = []
    for frame in frames:
        if frame.opcode == OP_CLOSE:
            parts.append(f"close {frame.close_code}")
        elif frame.opcode == OP_TEXT:
            summary = event_summary(frame.payload.decode("utf-8", "replace"))
            if not (skip_pongs and summary == "pong!"):
                parts.append(summary)
        elif frame.opcode == OP_BINARY:
            parts.append(f"binary {len(frame.payload)}")
    if closed and not (frames and frames[-1].opcode == OP_CLOSE):
        parts.append("dropped")
    return ", ".join(parts)


def raw_handshake(**request: object) -> Probe:
    """Send a hand-built upgrade request; the outcome is `http <status>` or `dropped`."""

    def probe(node: DaphneNode) -> str:
        with RawClient(node.port) as client:
            status = client.handshake(handshake_request(port=node.port, **request))  # type: ignore[arg-type]
            if status == 101 and b"sec-websocket-extensions" in client.response_head.lower():
                return "http 101 with extensions"
            return f"http {status}" if status else "dropped"

    return probe


def raw_frames(*frames: bytes, path: str = "/ws/", then_close: bool = False, skip_pongs: bool = False) -> Probe:
    """Open a websocket by hand, send `frames`, report everything the server sends until it closes.

    `then_close` waits for one data frame in answer, then sends a proper close frame: for rows
    where the server should answer and keep the connection open.
    """

    def probe(node: DaphneNode) -> str:
        with RawClient(node.port) as client:
            client.open(path=path)
            for frame in frames:
                try:
                    client.send(frame)
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server already failed the connection; read what it said
            received: list[rawws.Frame] = []
            if then_close:
                received.append(client.data_frame_read())
                client.send(frame_encode(opcode=OP_CLOSE, payload=close_payload(1000)))
            received += client.frames_until_close()
            return frames_summary(received, closed=True, skip_pongs=skip_pongs)

    return probe


def raw_pieces(*pieces: bytes, answers: int, path: str = "/ws/") -> Probe:
    """Open a websocket by hand, send `pieces` 50 ms apart (one TCP write each), read `answers` data
    frames; then `open` if the connection still answers a ping."""

    def probe(node: DaphneNode) -> str:
        with RawClient(node.port) as client:
            client.open(path=path)
            for piece in pieces:
                client.send(piece)
                time.sleep(0.05)
            parts = [frames_summary([client.data_frame_read()], closed=False) for _ in range(answers)]
            client.send(frame_encode(opcode=OP_TEXT, payload=b"ping"))
            parts.append("open" if client.data_frame_read().payload == b"pong!" else "not answered")
            return ", ".join(parts)

    return probe


def ws_client(node: DaphneNode, path: str = "/ws/") -> ClientConnection:
    return ws_connect_sync(f"ws://{LOOPBACK}:{node.port}{path}", close_timeout=2)


def ws_replies(ws: ClientConnection, count: int) -> list[str]:
    """Up to `count` replies; ends with `close <code>` if the server closes, `open` if it still pongs."""
    parts: list[str] = []
    try:
        for _ in range(count):
            parts.append(event_summary(str(ws.recv(timeout=scaled(5)))))
        if ping_pong_sync(ws) == "pong!":
            parts.append("open")
    except ConnectionClosed as closed:
        parts.append(f"close {closed.rcvd.code}" if closed.rcvd else "dropped")
    return parts


def ws_texts(*messages: str, path: str = "/ws/") -> Probe:
    """Send protocol-valid text messages with the websockets client, one reply expected each."""

    def probe(node: DaphneNode) -> str:
        with ws_client(node, path) as ws:
            for message in messages:
                ws.send(message)
            return ", ".join(ws_replies(ws, len(messages)))

    return probe


def ws_flood(count: int) -> Probe:
    """Send `count` pings at once; the pongs within the burst are left out of the outcome.

    The client's receive queue is unbounded: with websockets' default (16 messages) its reader
    stops at the unread pongs, and a server that closes before the sends end (uvicorn) leaves
    `send` waiting for an end of TCP the client itself no longer reads.
    """

    def probe(node: DaphneNode) -> str:
        with ws_connect_sync(f"ws://{LOOPBACK}:{node.port}/ws/", close_timeout=2, max_queue=None) as ws:
            for _ in range(count):
                try:
                    ws.send("ping")
                except ConnectionClosed:
                    break  # closed mid-burst: what it said is still read below
            parts: list[str] = []
            try:
                for _ in range(count + 1):
                    summary = event_summary(str(ws.recv(timeout=scaled(5))))
                    if summary != "pong!":
                        parts.append(summary)
            except ConnectionClosed as closed:
                parts.append(f"close {closed.rcvd.code}" if closed.rcvd else "dropped")
            return ", ".join(parts)

    return probe


def churn(*, rounds: int) -> Probe:
    """Open and close connections in every way a client can: clean, abrupt, and never upgraded."""

    def probe(node: DaphneNode) -> str:
        for _ in range(rounds):
            with ws_client(node):
                pass
            with RawClient(node.port) as raw:
                raw.open()  # then a TCP close with no close frame
            with socket.create_connection((LOOPBACK, node.port), timeout=5):
                pass  # TCP only, no request at all
        return f"churned {rounds * 3}"

    return probe


def address_flood(*, most: int) -> Probe:
    """Open connections from one address, keeping each, until one is refused (at most `most`)."""

    def probe(node: DaphneNode) -> str:
        with ExitStack() as held:  # every connection stays open until the probe returns
            for _ in range(most):
                ws = held.enter_context(ws_client(node))
                try:
                    ws.send("ping")
                except ConnectionClosed:
                    pass  # refused at once: what it said is still read below
                replies = ws_replies(ws, 1)
                if replies != ["pong!", "open"]:
                    return ", ".join(replies)
            return f"admitted {most}"

    return probe


def slow_handshake(*, seconds: float, pieces: int) -> Probe:
    """A valid upgrade request trickled in `pieces` over `seconds`, then a ping."""

    def probe(node: DaphneNode) -> str:
        request = handshake_request(port=node.port)
        step = -(-len(request) // pieces)
        with RawClient(node.port) as client:
            for start in range(0, len(request), step):
                client.send(request[start : start + step])
                time.sleep(seconds / pieces)
            if client.response_read() != 101:
                return f"http {client.status}"
            client.send(frame_encode(opcode=OP_TEXT, payload=b"ping"))
            frame = client.frame_read()
            return "http 101, pong!" if frame and frame.payload == b"pong!" else "http 101, no pong"

    return probe


def stalled_handshake(*, wait: float) -> Probe:
    """An upgrade request missing its final blank line; the server should give up on it."""

    def probe(node: DaphneNode) -> str:
        with RawClient(node.port) as client:
            client.send(handshake_request(port=node.port)[:-2])
            return "dropped" if client.server_closed(timeout=wait) else f"still open after {wait:g}s"

    return probe


def api(
    *, method: str = "POST", body: bytes | None = None, token: str | None = TOKEN, auth: str | None = None
) -> Probe:
    """One request to /api/broadcast; `auth` replaces the whole Authorization header."""

    def probe(node: DaphneNode) -> str:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        status, _ = http_request(f"{node.http}/api/broadcast", method=method, body=body, headers=headers)
        return f"http {status}"

    return probe


def api_presence(topic: str, *, method: str = "GET", token: str | None = TOKEN) -> Probe:
    """One request to /api/presence/<topic>."""

    def probe(node: DaphneNode) -> str:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        status, _ = http_request(f"{node.http}/api/presence/{topic}", method=method, headers=headers)
        return f"http {status}"

    return probe


def http_plain(path: str) -> Probe:
    """A plain HTTP GET, no upgrade."""

    def probe(node: DaphneNode) -> str:
        status, _ = http_request(f"{node.http}{path}")
        return f"http {status}"

    return probe


def api_broadcast(text: str) -> Probe:
    """POST a broadcast (JSON-escaped by hand, so lone surrogates survive) and see whether a listener gets it."""

    def probe(node: DaphneNode) -> str:
        body = ('{"text": ' + json.dumps(text) + "}").encode()
        with ws_client(node) as listener:
            assert ping_pong_sync(listener) == "pong!"  # joined the group
            status = api(body=body)(node)
            if status != "http 202":
                return status
            try:
                event = json.loads(listener.recv(timeout=scaled(2)))
            except TimeoutError:
                return f"{status}, not delivered"
            return f"{status}, delivered" if event.get("text") == text else f"{status}, wrong text"

    return probe


def subscribe_since(topic: str, since: object, *, raw: str | None = None) -> Probe:
    """Subscribe with `since` (or send `raw` as is); `recovered <bool>` or the error, then `open` if it still pongs."""

    def probe(node: DaphneNode) -> str:
        with ws_client(node) as ws:
            ws.send(raw if raw is not None else json.dumps({"type": "subscribe", "topic": topic, "since": since}))
            try:
                event = json.loads(str(ws.recv(timeout=scaled(5))))
            except ConnectionClosed as closed:
                return f"close {closed.rcvd.code}" if closed.rcvd else "dropped"
            if event.get("type") == "subscribed":
                summary = f"recovered {str(event.get('recovered')).lower()}"
            else:
                summary = event_summary(json.dumps(event))
            return f"{summary}, open" if ping_pong_sync(ws) == "pong!" else summary

    return probe


def ws_opened(path: str) -> Probe:
    """Connect to `path`, send `ping`, report the first answer (then `open`, or how it closed)."""

    def probe(node: DaphneNode) -> str:
        try:
            with ws_client(node, path) as ws:
                try:
                    ws.send("ping")
                except ConnectionClosed:
                    pass  # refused at once: what it said is still read below
                return ", ".join(ws_replies(ws, 1))
        except ConnectionClosed as closed:
            return f"close {closed.rcvd.code}" if closed.rcvd else "dropped"
        except Exception as error:  # the handshake itself was refused
            status = getattr(getattr(error, "response", None), "status_code", None)
            return f"http {status}" if status else "dropped"

    return probe


def api_history(query: str, *, topic: str = "public:corpus", token: str | None = TOKEN) -> Probe:
    """GET /api/history/<topic>?<query>; the status."""

    def probe(node: DaphneNode) -> str:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        status, _ = http_request(f"{node.http}/api/history/{topic}?{query}", headers=headers)
        return f"http {status}"

    return probe


def subscribe_flood(count: int) -> Probe:
    """`count` subscribe requests to distinct public topics at once: how many were subscribed, then every other answer once."""

    def probe(node: DaphneNode) -> str:
        with ws_connect_sync(f"ws://{LOOPBACK}:{node.port}/ws/", close_timeout=2, max_queue=None) as ws:
            for index in range(count):
                try:
                    ws.send(json.dumps({"type": "subscribe", "topic": f"public:flood{index}", "id": index}))
                except ConnectionClosed:
                    break  # closed mid-burst: what it said is still read below
            replies = ws_replies(ws, count)
            others = [summary for summary in dict.fromkeys(replies) if summary != "subscribed"]
            return ", ".join([f"subscribed {replies.count('subscribed')}", *others])

    return probe


def token(*, key: str = TOKEN_SECRET, algorithm: str = "HS256", **claims: object) -> str:
    """A JWT for the corpus node: `sub` "corpus" valid for a minute unless `claims` say otherwise."""
    return jwt.encode({"sub": "corpus", "exp": int(time.time()) + 86400, **claims}, key, algorithm=algorithm)


def request(**fields: object) -> str:
    return json.dumps(fields)


def split_at(data: bytes, at: int) -> tuple[bytes, bytes]:
    return data[:at], data[at:]


def deep_json(depth: int) -> str:
    return '{"a":' + "[" * depth + "]" * depth + "}"


# --- the table ----------------------------------------------------------------------------

PROTOCOL_ERROR = "close 1002 | dropped"


ROWS = [
    # The handshake.
    Row("version 99", raw_handshake(version="99"), "http 400"),
    Row("version not a number", raw_handshake(version="abc"), "http 400"),
    Row("version list", raw_handshake(version="13, 8"), "http 400"),
    Row("key too short", raw_handshake(key="c2hvcnQ="), "http 400"),
    Row("key empty", raw_handshake(key=""), "http 400"),
    Row("key not base64 of 16 bytes", raw_handshake(key="!" * 24), "http 400"),
    # uvicorn: httptools takes it, then websockets refuses a header line over 8 KiB or over 128 headers.
    Row(
        "one 20 KB header line",
        raw_handshake(extra={"X-Big": "a" * 20_000}),
        "dropped | http 400 | http 431",
        on_uvicorn="http 431",
    ),
    Row(
        "200 headers of 100 bytes",
        raw_handshake(extra={f"X-Filler-{i}": "a" * 100 for i in range(200)}),
        "http 400 | http 431 | dropped",
        on_uvicorn="http 431",
    ),
    Row("unknown path", raw_handshake(path="/nope/"), "http 403"),
    Row("path below /ws/echo/", raw_handshake(path="/ws/echo/extra"), "http 403"),
    Row("path traversal", raw_handshake(path="/ws/../ws/"), "http 403 | http 101"),
    Row("Origin: null", raw_handshake(origin="null"), "http 403"),
    Row(
        "permessage-deflate offered",
        raw_handshake(extra={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}),
        "http 101",
    ),
    Row("plain HTTP GET on /ws/", http_plain("/ws/"), "http 404"),
    Row("slow handshake, 2 s", slow_handshake(seconds=2, pieces=8), "http 101, pong!"),
    Row("stalled handshake", stalled_handshake(wait=HTTP_IDLE_TIMEOUT + 3), "dropped"),
    # Framing.
    Row("unmasked client frame", raw_frames(frame_encode(opcode=OP_TEXT, payload=b"ping", mask=False)), PROTOCOL_ERROR),
    Row("RSV1 without deflate", raw_frames(frame_encode(opcode=OP_TEXT, payload=b"ping", rsv=4)), PROTOCOL_ERROR),
    Row("RSV2 and RSV3", raw_frames(frame_encode(opcode=OP_TEXT, payload=b"ping", rsv=3)), PROTOCOL_ERROR),
    Row("reserved data opcode 3", raw_frames(frame_encode(opcode=0x3, payload=b"ping")), PROTOCOL_ERROR),
    Row("reserved control opcode 0xB", raw_frames(frame_encode(opcode=0xB, payload=b"ping")), PROTOCOL_ERROR),
    Row("ping with 126-byte payload", raw_frames(frame_encode(opcode=OP_PING, payload=b"x" * 126)), PROTOCOL_ERROR),
    Row("fragmented ping", raw_frames(frame_encode(opcode=OP_PING, payload=b"x", fin=False)), PROTOCOL_ERROR),
    Row(
        "continuation with nothing to continue",
        raw_frames(frame_encode(opcode=OP_CONTINUATION, payload=b"ping")),
        PROTOCOL_ERROR,
    ),
    Row(
        "new text frame inside a fragmented message",
        raw_frames(
            frame_encode(opcode=OP_TEXT, payload=b"pi", fin=False),
            frame_encode(opcode=OP_TEXT, payload=b"ng"),
        ),
        PROTOCOL_ERROR,
    ),
    Row(
        "invalid UTF-8 text", raw_frames(frame_encode(opcode=OP_TEXT, payload=b"\xff\xfeping")), "close 1007 | dropped"
    ),
    Row(
        "invalid UTF-8 split across fragments",
        raw_frames(
            frame_encode(opcode=OP_TEXT, payload=b"pi\xc3", fin=False),
            frame_encode(opcode=OP_CONTINUATION, payload=b"\x28ng"),
        ),
        "close 1007 | dropped",
    ),
    # Frames in one write, and one frame across writes (uvicorn reads whole frames itself between them).
    Row(
        "ten pings in one write",
        raw_pieces(frame_encode(opcode=OP_TEXT, payload=b"ping") * 10, answers=10),
        ", ".join(["pong!"] * 10 + ["open"]),
    ),
    Row(
        "a ping cut inside its header",
        raw_pieces(*split_at(frame_encode(opcode=OP_TEXT, payload=b"ping"), 1), answers=1),
        "pong!, open",
    ),
    Row(
        "a ping cut inside its mask",
        raw_pieces(*split_at(frame_encode(opcode=OP_TEXT, payload=b"ping"), 4), answers=1),
        "pong!, open",
    ),
    Row(
        "a 16-bit length cut in half, then a ping in the same write as its end",
        raw_pieces(
            *split_at(
                frame_encode(opcode=OP_TEXT, payload=request(type="ping", id="x" * 200).encode())
                + frame_encode(opcode=OP_TEXT, payload=b"ping"),
                3,
            ),
            answers=2,
        ),
        "pong, pong!, open",
    ),
    Row(
        "a protocol ping between two text pings in one write",
        raw_pieces(
            frame_encode(opcode=OP_TEXT, payload=b"ping")
            + frame_encode(opcode=OP_PING, payload=b"hi")
            + frame_encode(opcode=OP_TEXT, payload=b"ping"),
            answers=2,
        ),
        "pong!, pong!, open",
    ),
    # A bad close frame: autobahn (daphne) drops TCP; websockets (uvicorn) answers with a close frame.
    *(
        Row(name, raw_frames(frame_encode(opcode=OP_CLOSE, payload=payload)), PROTOCOL_ERROR, on_uvicorn="close 1002")
        for name, payload in [
            ("close code 999", close_payload(999)),
            ("close code 1005", close_payload(1005)),
            ("close code 1006", close_payload(1006)),
            ("close code 5000", close_payload(5000)),
            ("close payload of one byte", b"\x03"),
        ]
    ),
    Row(
        "close reason not UTF-8",
        raw_frames(frame_encode(opcode=OP_CLOSE, payload=close_payload(1000) + b"\xff")),
        "close 1007 | dropped",
        on_uvicorn="close 1007",
    ),
    # daphne answers 1000 (as the application's close); uvicorn echoes the client's code.
    Row(
        "client close 4999 is answered",
        raw_frames(frame_encode(opcode=OP_CLOSE, payload=close_payload(4999))),
        "close 4999 | close 1000",
        on_uvicorn="close 4999",
    ),
    Row(
        "frame declaring 1 TB",
        raw_frames(frame_encode(opcode=OP_TEXT, payload=b"x", length=1 << 40)),
        "close 1009 | dropped",
    ),
    Row(
        "frame over the transport limit",
        raw_frames(frame_encode(opcode=OP_TEXT, payload=b"x" * (TRANSPORT_LIMIT + 1))),
        "close 1009 | dropped",
    ),
    Row(
        "valid fragmented ping",
        raw_frames(
            frame_encode(opcode=OP_TEXT, payload=b"pi", fin=False),
            frame_encode(opcode=OP_PING, payload=b"interleaved"),
            frame_encode(opcode=OP_CONTINUATION, payload=b"ng"),
            then_close=True,
        ),
        "pong!, close 1000",
    ),
    Row(
        "fragments that add up to more than the app limit",
        raw_frames(
            frame_encode(opcode=OP_TEXT, payload=b"x" * 800, fin=False),
            frame_encode(opcode=OP_CONTINUATION, payload=b"x" * 800),
        ),
        "error message_too_big, close 4009",
    ),
    Row(
        "binary frame on /ws/",
        raw_frames(frame_encode(opcode=OP_BINARY, payload=b"ping")),
        "error unsupported_data, close 4003",
    ),
    # The application.
    *(
        Row(f"near miss {text!r}", ws_texts(text), "error unknown_message, open")
        for text in ["Ping", "PING", " ping", "ping\n", "ping\x00", "pong", "pin", "pingg", "p\u0456ng", "ping!"]
    ),
    Row("empty text message", ws_texts(""), "error unknown_message, open"),
    Row("JSON ping with the wrong type", ws_texts('{"type": "Ping", "id": 1}'), "error unknown_message, open"),
    Row("truncated JSON ping", ws_texts('{"type": "ping", "id": '), "error unknown_message, open"),
    Row("JSON array", ws_texts('[{"type": "ping"}]'), "error unknown_message, open"),
    Row("JSON ping with an object id", ws_texts('{"type": "ping", "id": {"a": [1, null]}}'), "pong, open"),
    Row(
        "JSON ping with a lone surrogate id",
        ws_texts('{"type": "ping", "id": "\\ud800"}'),
        "pong, open",
    ),
    Row(
        "JSON nested past the recursion limit",
        ws_texts('{"a":' + "[" * (MAX_MESSAGE_BYTES - 5)),
        "error unknown_message, open",
    ),
    Row("text at the app limit", ws_texts("x" * MAX_MESSAGE_BYTES), "error unknown_message, open"),
    Row(
        "text one byte over the app limit", ws_texts("x" * (MAX_MESSAGE_BYTES + 1)), "error message_too_big, close 4009"
    ),
    Row(
        "multi-byte text over the app limit",
        ws_texts("é" * (MAX_MESSAGE_BYTES // 2 + 1)),
        "error message_too_big, close 4009",
    ),
    Row(
        "binary over the app limit on /ws/echo/",
        raw_frames(frame_encode(opcode=OP_BINARY, payload=b"x" * (MAX_MESSAGE_BYTES + 1)), path="/ws/echo/"),
        "error message_too_big, close 4009",
    ),
    Row(
        "empty binary on /ws/echo/ is echoed",
        raw_frames(frame_encode(opcode=OP_BINARY), path="/ws/echo/", then_close=True),
        "binary 0, close 1000",
    ),
    Row(f"flood of {RATE_BURST * 3} pings", ws_flood(RATE_BURST * 3), "error rate_limited, close 4008"),
    Row(
        "raw flood of pings",
        raw_frames(*[frame_encode(opcode=OP_TEXT, payload=b"ping")] * (RATE_BURST * 3), skip_pongs=True),
        "error rate_limited, close 4008",
    ),
    Row("connect/disconnect churn", churn(rounds=25), "churned 75"),
    Row(
        "one address opens connections until refused",
        address_flood(most=MAX_CONNECTIONS_PER_IP + 1),
        "error too_many_connections, close 4013",
    ),
    # Topic history: `since` on subscribe, and the history API.
    Row(
        "since: negative offset",
        subscribe_since("public:corpus", {"offset": -1, "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset 2**53",
        subscribe_since("public:corpus", {"offset": 2**53, "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset of 400 digits",
        subscribe_since("public:corpus", {"offset": 10**400, "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset a float",
        subscribe_since("public:corpus", {"offset": 1.5, "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset a string",
        subscribe_since("public:corpus", {"offset": "1", "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset true",
        subscribe_since("public:corpus", {"offset": True, "epoch": "e"}),
        "error bad_request, open",
    ),
    Row(
        "since: offset NaN",
        subscribe_since(
            "", None, raw='{"type":"subscribe","topic":"public:corpus","since":{"offset":NaN,"epoch":"e"}}'
        ),
        "error bad_request, open",
    ),
    Row(
        "since: epoch a number", subscribe_since("public:corpus", {"offset": 1, "epoch": 5}), "error bad_request, open"
    ),
    Row(
        "since: epoch of 900 characters",
        subscribe_since("public:corpus", {"offset": 1, "epoch": "e" * 900}),
        "error bad_request, open",
    ),
    Row("since: epoch missing", subscribe_since("public:corpus", {"offset": 1}), "error bad_request, open"),
    Row("since: a list", subscribe_since("public:corpus", [1, "e"]), "error bad_request, open"),
    Row("since: a string", subscribe_since("public:corpus", "1"), "error bad_request, open"),
    Row(
        "since: a foreign epoch",
        subscribe_since("public:corpus", {"offset": 1, "epoch": "someone-elses"}),
        "recovered false, open",
    ),
    Row(
        "since: a far-future offset",
        subscribe_since("public:corpus", {"offset": 2**53 - 1, "epoch": "e"}),
        "recovered false, open",
    ),
    Row(
        "since: a topic without history",
        subscribe_since("plain:corpus", {"offset": 1, "epoch": "e"}),
        "recovered false, open",
    ),
    Row(
        "since: a forbidden topic",
        subscribe_since("user:someone", {"offset": 1, "epoch": "e"}),
        "error forbidden, open",
    ),
    Row("history API: valid", api_history("since=0&limit=10"), "http 200"),
    Row("history API: no token", api_history("since=0", token=None), "http 401"),
    Row("history API: wrong token", api_history("since=0", token="wrong"), "http 401"),
    Row("history API: negative since", api_history("since=-1"), "http 400"),
    Row("history API: since of 400 digits", api_history("since=" + "9" * 400), "http 400"),
    Row("history API: limit 0", api_history("limit=0"), "http 400"),
    Row("history API: limit huge", api_history("limit=99999999999"), "http 400"),
    Row("history API: since not a number", api_history("since=%00"), "http 400"),
    Row("history API: a topic without history", api_history("since=0", topic="plain:corpus"), "http 404"),
    Row("history API: an unknown namespace", api_history("since=0", topic="nowhere:x"), "http 404"),
    Row("history API: a topic of 300 characters", api_history("since=0", topic="public:" + "x" * 300), "http 400"),
    Row("history API: a topic with a bad character", api_history("since=0", topic="public:a%20b"), "http 400"),
    # Tokens: each refused one is answered `unauthorized` and close 4401, never a 500 or a 1011.
    Row("token: valid, then a ping", ws_opened(f"/ws/?token={token()}"), "pong!, open"),
    Row("token: garbage", ws_opened("/ws/?token=garbage"), "error unauthorized, close 4401"),
    Row("token: empty", ws_opened("/ws/?token="), "error unauthorized, close 4401"),
    Row(
        "token: alg none",
        ws_opened("/ws/?token=eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ."),
        "error unauthorized, close 4401",
    ),
    Row(
        "token: wrong signature",
        ws_opened(f"/ws/?token={token(key='not-the-secret-' + 'x' * 40)}"),
        "error unauthorized, close 4401",
    ),
    Row(
        "token: HS512",
        ws_opened(f"/ws/?token={token(key='k' * 64, algorithm='HS512')}"),
        "error unauthorized, close 4401",
    ),
    Row(
        "token: expired", ws_opened(f"/ws/?token={token(exp=int(time.time()) - 60)}"), "error unauthorized, close 4401"
    ),
    Row("token: no sub", ws_opened(f"/ws/?token={token(sub=None)}"), "error unauthorized, close 4401"),
    Row("token: sub is a number", ws_opened(f"/ws/?token={token(sub=5)}"), "error unauthorized, close 4401"),
    Row(
        "token: topics is a string", ws_opened(f"/ws/?token={token(topics='user:x')}"), "error unauthorized, close 4401"
    ),
    Row("token: 5 KB", ws_opened("/ws/?token=" + "a" * 5000), "error unauthorized, close 4401"),
    Row(
        "token: 100 KB in the URL",
        ws_opened("/ws/?token=" + "a" * 100_000),
        "http 400 | http 414 | http 431 | dropped | error unauthorized, close 4401",
    ),
    Row(
        "token: twice in the query", ws_opened(f"/ws/?token=garbage&token={token()}"), "error unauthorized, close 4401"
    ),
    Row("auth: token is a number", ws_texts(request(type="auth", token=5)), "error unauthorized, close 4401"),
    Row("auth: no token", ws_texts(request(type="auth")), "error unauthorized, close 4401"),
    Row("auth: valid", ws_texts(request(type="auth", token=token())), "authenticated, open"),
    Row("refresh: anonymous", ws_texts(request(type="refresh", token=token())), "error bad_request, open"),
    # Topics: every refusal is an error event; the connection stays open.
    Row("subscribe: public topic", ws_texts(request(type="subscribe", topic="public:corpus")), "subscribed, open"),
    Row(
        "subscribe: topic of 129 characters",
        ws_texts(request(type="subscribe", topic="public:" + "x" * 122)),
        "error bad_topic, open",
    ),
    Row(
        "subscribe: topic of 900 characters",
        ws_texts(request(type="subscribe", topic="x" * 900)),
        "error bad_topic, open",
    ),
    Row(
        "subscribe: topic with a newline",
        ws_texts(request(type="subscribe", topic="public:a\nb")),
        "error bad_topic, open",
    ),
    Row(
        "subscribe: topic with a lone surrogate",
        ws_texts('{"type": "subscribe", "topic": "public:\\ud800"}'),
        "error bad_topic, open",
    ),
    Row("subscribe: topic is null", ws_texts(request(type="subscribe", topic=None)), "error bad_topic, open"),
    Row("subscribe: topic is an object", ws_texts(request(type="subscribe", topic={"a": 1})), "error bad_topic, open"),
    Row("subscribe: no topic", ws_texts(request(type="subscribe")), "error bad_topic, open"),
    Row(
        "subscribe: unknown namespace",
        ws_texts(request(type="subscribe", topic="admin:all")),
        "error unknown_namespace, open",
    ),
    Row("subscribe: empty namespace", ws_texts(request(type="subscribe", topic=":x")), "error unknown_namespace, open"),
    Row(
        "subscribe: another user's topic, anonymous",
        ws_texts(request(type="subscribe", topic="user:corpus")),
        "error forbidden, open",
    ),
    Row(
        "subscribe: another user's topic, with a token",
        ws_texts(request(type="auth", token=token()), request(type="subscribe", topic="user:someone-else")),
        "authenticated, error forbidden, open",
    ),
    Row(
        "subscribe: over the subscription cap",
        subscribe_flood(MAX_SUBSCRIPTIONS + 10),
        f"subscribed {MAX_SUBSCRIPTIONS}, error too_many_subscriptions, open",
    ),
    Row(
        "subscribe: thousands of requests",
        subscribe_flood(2000),
        f"subscribed {MAX_SUBSCRIPTIONS}, error too_many_subscriptions, error rate_limited, close 4008",
    ),
    Row(
        "unsubscribe: not subscribed",
        ws_texts(request(type="unsubscribe", topic="public:never")),
        "error not_subscribed, open",
    ),
    Row(
        "publish: a server-only namespace",
        ws_texts(request(type="publish", topic="public:x", data=1)),
        "error forbidden, open",
    ),
    Row("publish: no data", ws_texts(request(type="publish", topic="public:x")), "error bad_request, open"),
    Row(
        "presence: a subscribed topic with presence",
        ws_texts(request(type="subscribe", topic="room:corpus"), request(type="presence", topic="room:corpus")),
        "subscribed, presence, open",
    ),
    Row(
        "presence: a topic it is not subscribed to",
        ws_texts(request(type="presence", topic="room:corpus")),
        "error not_subscribed, open",
    ),
    Row(
        "presence: a forbidden topic",
        ws_texts(request(type="subscribe", topic="user:other"), request(type="presence", topic="user:other")),
        "error forbidden, error not_subscribed, open",
    ),
    Row(
        "presence: an unknown namespace",
        ws_texts(request(type="presence", topic="admin:all")),
        "error not_subscribed, open",
    ),
    Row(
        "presence: a subscribed topic without presence",
        ws_texts(request(type="subscribe", topic="public:corpus"), request(type="presence", topic="public:corpus")),
        "subscribed, error bad_request, open",
    ),
    Row("presence: topic is a number", ws_texts(request(type="presence", topic=5)), "error bad_topic, open"),
    Row("presence: no topic", ws_texts(request(type="presence")), "error bad_topic, open"),
    Row("request: unknown type with an id", ws_texts(request(type="subscribe!", id=1)), "error unknown_message, open"),
    Row(
        "request: type is a list",
        ws_texts(request(type=["subscribe"], topic="public:x")),
        "error unknown_message, open",
    ),
    # The HTTP API.
    Row("broadcast: valid", api_broadcast("hello from the corpus"), "http 202, delivered"),
    Row("broadcast: not JSON", api(body=b"{"), "http 400"),
    Row("broadcast: not UTF-8", api(body=b'{"text": "\xff"}'), "http 400"),
    Row("broadcast: empty body", api(body=b""), "http 400"),
    Row("broadcast: text is a number", api(body=b'{"text": 5}'), "http 400"),
    Row("broadcast: text is null", api(body=b'{"text": null}'), "http 400"),
    Row("broadcast: text missing", api(body=b'{"message": "hi"}'), "http 400"),
    Row("broadcast: a JSON array", api(body=b'["hi"]'), "http 400"),
    Row("broadcast: nested past the recursion limit", api(body=deep_json(100_000).encode()), "http 400"),
    Row(
        "broadcast: text over the broadcast limit",
        api(body=b'{"text": "' + b"x" * (MAX_BROADCAST_BYTES + 1) + b'"}'),
        "http 400",
    ),
    Row("broadcast: 1 MB body", api(body=b'{"text": "' + b"x" * 1_000_000 + b'"}'), "http 413"),
    Row("broadcast: lone surrogate", api_broadcast("\ud800"), "http 400"),
    Row("broadcast: with a valid id", api(body=b'{"text": "hi", "id": "corpus-1:a_b.c-d"}'), "http 202"),
    Row("broadcast: id empty", api(body=b'{"text": "hi", "id": ""}'), "http 400"),
    Row("broadcast: id of 65 characters", api(body=b'{"text": "hi", "id": "' + b"x" * 65 + b'"}'), "http 400"),
    Row("broadcast: id of 200 KB", api(body=b'{"text": "hi", "id": "' + b"x" * 200_000 + b'"}'), "http 400"),
    Row("broadcast: id with a space", api(body=b'{"text": "hi", "id": "a b"}'), "http 400"),
    Row("broadcast: id with a newline", api(body=b'{"text": "hi", "id": "a\\nb"}'), "http 400"),
    Row("broadcast: id with a slash", api(body=b'{"text": "hi", "id": "../etc"}'), "http 400"),
    Row("broadcast: id non-ASCII", api(body='{"text": "hi", "id": "caf\u00e9"}'.encode()), "http 400"),
    Row("broadcast: id lone surrogate", api(body=b'{"text": "hi", "id": "\\ud800"}'), "http 400"),
    Row("broadcast: id is a number", api(body=b'{"text": "hi", "id": 5}'), "http 400"),
    Row("broadcast: id is null", api(body=b'{"text": "hi", "id": null}'), "http 400"),
    Row("broadcast: id is an object", api(body=b'{"text": "hi", "id": {"a": 1}}'), "http 400"),
    Row("broadcast: GET", api(method="GET"), "http 405"),
    Row("broadcast: PUT", api(method="PUT", body=b'{"text": "hi"}'), "http 405"),
    Row("broadcast: DELETE", api(method="DELETE"), "http 405"),
    Row("broadcast: no token", api(body=b'{"text": "hi"}', token=None), "http 401"),
    Row("broadcast: wrong token", api(body=b'{"text": "hi"}', token="wrong"), "http 401"),
    Row("broadcast: token minus its last character", api(body=b'{"text": "hi"}', token=TOKEN[:-1]), "http 401"),
    Row("broadcast: token with a suffix", api(body=b'{"text": "hi"}', token=TOKEN + "x"), "http 401"),
    Row("broadcast: empty bearer", api(body=b'{"text": "hi"}', auth="Bearer "), "http 401"),
    Row("broadcast: Basic scheme", api(body=b'{"text": "hi"}', auth=f"Basic {TOKEN}"), "http 401"),
    Row("broadcast: non-ASCII token", api(body=b'{"text": "hi"}', auth="Bearer t\xf6ken"), "http 401"),
    Row("presence API: a topic with presence", api_presence("room:corpus"), "http 200"),
    Row("presence API: no token", api_presence("room:corpus", token=None), "http 401"),
    Row("presence API: wrong token", api_presence("room:corpus", token="wrong"), "http 401"),
    Row("presence API: a topic without presence", api_presence("public:corpus"), "http 400"),
    Row("presence API: an unknown namespace", api_presence("admin:all"), "http 404"),
    Row("presence API: a bad topic", api_presence("room:" + "x" * 200), "http 400"),
    Row("presence API: a topic with a slash", api_presence("room:a/b"), "http 404"),
    Row("presence API: POST", api_presence("room:corpus", method="POST"), "http 405"),
]


def row_id(row: object) -> str:
    return row.name if isinstance(row, Row) else str(row)


# --- the node and the control client --------------------------------------------------------


@pytest.fixture(scope="module")
def node(module_daphne_nodes) -> DaphneNode:
    """One node per server for the whole table, with small limits so rows stay quick."""
    return module_daphne_nodes(
        env={
            "PINGPONG_BROADCAST_TOKEN": TOKEN,
            "PINGPONG_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
            "PINGPONG_MAX_BROADCAST_BYTES": str(MAX_BROADCAST_BYTES),
            "PINGPONG_RATE_PER_SECOND": str(RATE_PER_SECOND),
            "PINGPONG_RATE_BURST": str(RATE_BURST),
            "PINGPONG_HTTP_IDLE_TIMEOUT": str(HTTP_IDLE_TIMEOUT),
            "PINGPONG_MAX_CONNECTIONS_PER_IP": str(MAX_CONNECTIONS_PER_IP),
            "PINGPONG_TOKEN_SECRET": TOKEN_SECRET,
            "PINGPONG_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS),
            "PINGPONG_NAMESPACES": json.dumps(NAMESPACES),
        }
    )


class Control:
    """A well-behaved client that stays connected while every row runs.

    Its pings are spaced at least 1/RATE_PER_SECOND apart, so its own token bucket refills
    as fast as it spends and the rate limit never closes it, however quick the rows are.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_ping_at = 0.0

    def pongs(self) -> bool:
        """Ping and wait for `pong!`; broadcasts that arrive first are skipped."""
        time.sleep(max(0.0, self.next_ping_at - time.monotonic()))
        self.next_ping_at = time.monotonic() + 1 / RATE_PER_SECOND
        return ping_pong_sync(self.ws) == "pong!"


@pytest.fixture(scope="module")
def control(node: DaphneNode) -> Iterator[Control]:
    with ws_client(node) as ws:
        yield Control(ws)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_hostile_input_gets_its_stated_outcome_and_harms_no_one(
    row: Row, node: DaphneNode, control: Control, server: str
):
    """The row's outcome is one it allows; no 500, no 1011, no traceback; the control client still pongs."""
    log_start = len(node.output())
    observed = row.probe(node)
    assert control.pongs(), "the control client stopped getting pong!"
    log = node.output()[log_start:]
    assert "Traceback" not in log and "code=1011" not in log, f"{row.name}: the node logged:\n{log[-3000:]}"
    expected = row.expected_on(server)
    assert row.accepts(observed, server=server), f"{row.name} on {server}: expected {expected!r}, observed {observed!r}"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frame_encode(opcode=OP_TEXT, payload=b"ping", mask=False), 1002),
        (frame_encode(opcode=OP_TEXT, payload=b"\xff\xfeping"), 1007),
        (frame_encode(opcode=OP_TEXT, payload=b"x" * (TRANSPORT_LIMIT + 1)), 1009),
    ],
    ids=["unmasked", "invalid UTF-8", "over the transport limit"],
)
def test_protocol_error_is_failed_with_a_close_frame_that_names_it(node, frame, code):
    """RFC 6455 7.1.7: the server SHOULD send a close frame with the code before closing TCP."""
    assert raw_frames(frame)(node) == f"close {code}"
