"""pingpong.uvicorn_server's own frame reader and writer: what websockets would have read and sent."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from pingpong.uvicorn_server import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    RECEIVE_QUEUE_MAX,
    PingpongHttpProtocol,
    PingpongWebSocketProtocol,
    client_messages,
    frame_header,
)
from tests.processes import LOOPBACK, scaled
from tests.rawws import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, close_payload, frame_encode


def websockets_frame(opcode: int, payload: bytes) -> bytes:
    connection = ServerProtocol()
    connection.state = State.OPEN
    (connection.send_text if opcode == OPCODE_TEXT else connection.send_binary)(payload)
    return b"".join(connection.data_to_send())


@pytest.mark.parametrize("opcode", [OPCODE_TEXT, OPCODE_BINARY])
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_a_frame_is_the_bytes_websockets_would_send(opcode, length):
    payload = b"x" * length
    assert frame_header(opcode, length) + payload == websockets_frame(opcode, payload)


# --- reading: client_messages against websockets' own client serializer ---

LENGTHS = [0, 1, 5, 125, 126, 127, 200, 65535]


def client_bytes(*messages: str | bytes) -> bytes:
    """What websockets' client sends for these messages: masked frames, a fresh mask each."""
    connection = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    connection.state = State.OPEN
    for message in messages:
        if isinstance(message, str):
            connection.send_text(message.encode())
        else:
            connection.send_binary(message)
    return b"".join(connection.data_to_send())


def texts_and_bytes(events: list[dict[str, Any]]) -> list[str | bytes]:
    return [event["text"] if "text" in event else event["bytes"] for event in events]


@pytest.mark.parametrize("length", LENGTHS)
def test_whole_frames_are_read_as_sent_text_and_binary(length):
    """Every text and binary frame up to a 16-bit length is read whole, in order, unmasked."""
    messages = [
        "é" * (length // 2) + "x" * (length % 2),
        bytes(range(256)) * (length // 256) + b"\x00" * (length % 256),
    ]
    data = client_bytes(*messages, *messages)
    events, taken = client_messages(data, 1 << 20)
    assert texts_and_bytes(events) == messages * 2
    assert taken == len(data)


STOPPERS = {
    "ping": frame_encode(opcode=OP_PING, payload=b"p"),
    "pong": frame_encode(opcode=OP_PONG, payload=b"p"),
    "close": frame_encode(opcode=OP_CLOSE, payload=close_payload(1000)),
    "first fragment": frame_encode(opcode=OP_TEXT, payload=b"part", fin=False),
    "continuation": frame_encode(opcode=OP_CONTINUATION, payload=b"rest"),
    "reserved bit": frame_encode(opcode=OP_TEXT, payload=b"x", rsv=4),
    "unmasked": frame_encode(opcode=OP_TEXT, payload=b"x", mask=False),
    "64-bit length": frame_encode(opcode=OP_BINARY, payload=b"y" * 70_000),
    "over the limit": frame_encode(opcode=OP_TEXT, payload=b"z" * 1001),
    "invalid UTF-8": frame_encode(opcode=OP_TEXT, payload=b"\xff\xfe"),
    "unknown opcode": frame_encode(opcode=0x3, payload=b"x"),
}


@pytest.mark.parametrize("stopper", STOPPERS.values(), ids=STOPPERS.keys())
def test_reading_stops_at_a_frame_only_websockets_may_parse(stopper):
    """A control frame, a fragment or a bad frame is left, with all after it, for websockets."""
    before, after = client_bytes("before"), client_bytes("after")
    events, taken = client_messages(before + stopper + after, 1000)
    assert texts_and_bytes(events) == ["before"]
    assert taken == len(before)


def test_without_a_limit_every_16_bit_length_is_read():
    data = client_bytes("x" * 65535)
    assert client_messages(data, None) == ([{"type": "websocket.receive", "text": "x" * 65535}], len(data))


def test_an_incomplete_frame_is_left_for_the_next_read():
    """Cut anywhere, the frames whole before the cut are read and the rest is left."""
    first, second = client_bytes("one"), client_bytes("x" * 130)
    data = first + second
    for cut in range(len(data)):
        events, taken = client_messages(data[:cut], 1000)
        whole = cut >= len(first)
        assert (texts_and_bytes(events), taken) == ((["one"], len(first)) if whole else ([], 0)), cut


# --- reading on a real uvicorn server with pingpong's protocol classes ---

App = Callable[[Any, Any, Any], Awaitable[None]]


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Accept, then send every text and binary message back as it came."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", **{k: v for k, v in message.items() if k in ("text", "bytes")}})


class Served:
    """A uvicorn server on a free loopback port in this test's loop, with pingpong's protocol classes."""

    def __init__(self, app: App) -> None:
        config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=0,
            http=PingpongHttpProtocol,
            ws=PingpongWebSocketProtocol,
            lifespan="off",
            log_config=None,
            log_level="warning",
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=1,  # an application a failed test left waiting is cancelled
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Served":
        self.task = asyncio.ensure_future(self.server.serve())
        async with asyncio.timeout(scaled(5)):
            while not self.server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"ws://{LOOPBACK}:{port}/"

    def protocol(self) -> PingpongWebSocketProtocol:
        """The server side of the one websocket open."""
        (connection,) = [c for c in self.server.server_state.connections if isinstance(c, PingpongWebSocketProtocol)]
        return connection


@pytest.fixture
async def echo_server() -> AsyncIterator[Served]:
    async with Served(echo) as served:
        yield served


async def replies(client: ClientConnection, count: int) -> list[str | bytes]:
    async with asyncio.timeout(scaled(5)):
        return [await client.recv() for _ in range(count)]


async def test_frames_cut_at_every_byte_arrive_whole_and_in_order(echo_server):
    """Text, binary, a ping and a fragmented message, fed in two reads cut at every byte: each answer is exact."""
    stream = (
        client_bytes("héllo", b"\x00\x01" * 100)
        + frame_encode(opcode=OP_PING, payload=b"are you there")
        + frame_encode(opcode=OP_TEXT, payload=b"frag", fin=False)
        + frame_encode(opcode=OP_CONTINUATION, payload=b"mented")
        + client_bytes("x" * 130)
    )
    expected: list[str | bytes] = ["héllo", b"\x00\x01" * 100, "fragmented", "x" * 130]
    async with connect(echo_server.url) as client:
        protocol = echo_server.protocol()
        for cut in range(len(stream) + 1):
            protocol.data_received(stream[:cut])
            protocol.data_received(stream[cut:])
            assert await replies(client, 4) == expected, cut


async def test_reading_is_done_here_between_frames_and_by_websockets_inside_one(echo_server):
    """After the handshake and after each frame websockets parses, the next whole frame is read here."""
    async with connect(echo_server.url) as client:
        protocol = echo_server.protocol()
        assert protocol.between_frames
        protocol.data_received(client_bytes("x" * 130)[:3])  # a 16-bit length cut in half
        assert not protocol.between_frames
        protocol.data_received(client_bytes("x" * 130)[3:])  # the rest: a different mask, the same length
        assert protocol.between_frames
        assert await replies(client, 1) == ["x" * 130]
        protocol.data_received(frame_encode(opcode=OP_TEXT, payload=b"a", fin=False))
        assert not protocol.between_frames  # inside a fragmented message
        protocol.data_received(frame_encode(opcode=OP_CONTINUATION, payload=b"b"))
        assert protocol.between_frames
        assert await replies(client, 1) == ["ab"]


async def test_invalid_utf8_is_closed_1007_and_the_frames_before_it_reach_the_application():
    """A bad text frame read with a good one: the application gets the good one, the client 1007."""
    received: list[Any] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                received.append(message)

    async with Served(recorder) as served, connect(served.url) as client:
        served.protocol().data_received(client_bytes("good") + frame_encode(opcode=OP_TEXT, payload=b"\xc3("))
        async with asyncio.timeout(scaled(5)):
            await client.wait_closed()
        assert client.close_code == 1007
    assert received == [{"type": "websocket.receive", "text": "good"}]


async def test_reading_pauses_at_the_queue_bound_and_every_message_arrives_after():
    """An application that does not take its messages: at RECEIVE_QUEUE_MAX waiting, the server stops
    reading and the rest stays in TCP; when it takes them, all arrive, in order."""
    release = asyncio.Event()

    async def slow_echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await release.wait()
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message["text"]})

    sent = [f"message {number}" for number in range(4 * RECEIVE_QUEUE_MAX)]
    async with Served(slow_echo) as served, connect(served.url) as client:
        protocol = served.protocol()
        try:
            for text in sent:
                await client.send(text)
                await asyncio.sleep(0.02)  # a read each, so the bound is met exactly
            assert protocol.read_paused
            assert RECEIVE_QUEUE_MAX <= protocol.queue.qsize() < len(sent)
        finally:
            release.set()
        assert await replies(client, len(sent)) == sent
        assert not protocol.read_paused
