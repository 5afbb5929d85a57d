"""End to end over TCP: real server processes (embedded layer), daphne and uvicorn, and a real websocket client."""

import asyncio
import signal

import pytest
from websockets.exceptions import InvalidStatus

from pingpong import protocol
from tests.processes import SERVERS, api_broadcast, http_request, scaled, wait_until
from tests.rawws import OP_TEXT, RawClient, frame_encode, handshake_request
from tests.wsclient import close_code, next_event, ping_pong, ws_connect

# Every test here runs against `manage.py serve --server daphne` and `--server uvicorn`.
pytestmark = pytest.mark.parametrize("server", SERVERS, scope="module")


@pytest.fixture(scope="module")
def node(module_daphne_nodes):
    """One node for the module's tests that leave it as they found it."""
    return module_daphne_nodes()


async def test_ping_over_tcp_is_answered_with_pong(node):
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == "pong!"


async def test_binary_frame_over_tcp_closes_with_4003(node):
    async with await ws_connect(node.ws) as ws:
        await ws.send(b"ping")
        assert (await next_event(ws))["error"] == "unsupported_data"
        assert await close_code(ws) == protocol.CloseCode.UNSUPPORTED_DATA


async def test_unknown_path_is_rejected_with_403_and_no_traceback(node):
    with pytest.raises(InvalidStatus) as rejected:
        await ws_connect(node.ws.replace("/ws/", "/nowhere/"))
    assert rejected.value.response.status_code == 403
    assert "Traceback" not in node.output()


async def test_foreign_origin_is_rejected_with_403(node):
    with pytest.raises(InvalidStatus) as rejected:
        await ws_connect(node.ws, origin="http://evil.example")
    assert rejected.value.response.status_code == 403


async def test_echo_returns_empty_frames_through_daphne(node):
    async with await ws_connect(node.ws.replace("/ws/", "/ws/echo/")) as ws:
        for frame in ["", b"", "x", b"\x00"]:
            await ws.send(frame)
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == frame


async def test_message_over_daphne_limit_is_answered_by_the_app_with_4009(daphne_nodes):
    node = daphne_nodes({"PINGPONG_MAX_MESSAGE_BYTES": "1000"})
    async with await ws_connect(node.ws) as ws:
        await ws.send("x" * 1001)
        assert (await next_event(ws))["error"] == "message_too_big"
        assert await close_code(ws) == protocol.CloseCode.MESSAGE_TOO_BIG


async def test_connection_over_the_node_cap_is_closed_with_4013_and_the_first_keeps_working(daphne_nodes):
    node = daphne_nodes({"PINGPONG_MAX_CONNECTIONS": "1"})
    async with await ws_connect(node.ws) as first:
        assert await ping_pong(first) == "pong!"
        async with await ws_connect(node.ws) as second:
            assert (await next_event(second))["error"] == "full"
            assert await close_code(second) == protocol.CloseCode.TRY_AGAIN_LATER
        assert await ping_pong(first) == "pong!"


@pytest.mark.parametrize("sent", [b"", handshake_request(port=0)[:-2]], ids=["nothing", "half a handshake"])
def test_a_connection_that_stalls_before_its_request_ends_is_dropped_after_the_http_idle_timeout(daphne_nodes, sent):
    """PINGPONG_HTTP_IDLE_TIMEOUT covers the client's turn, not only the idle gap after a response."""
    node = daphne_nodes({"PINGPONG_HTTP_IDLE_TIMEOUT": "1"})
    with RawClient(node.port) as client:
        client.send(sent)
        assert client.server_closed(timeout=5)


def test_clients_that_vanish_right_after_a_ping_are_counted_out_once_without_a_traceback(daphne_nodes):
    """The pong goes to a socket that is closing: dropped quietly, and `disconnect` runs once per client."""
    node = daphne_nodes()
    for _ in range(20):
        client = RawClient(node.port).open()
        client.send(frame_encode(opcode=OP_TEXT, payload=b"ping"))
        client.reset()
    wait_until(lambda: node.metric("pingpong_connections_open") == 0, timeout=10, what="every client counted out")
    wait_until(lambda: node.output().count("pingpong.connections close") == 20, timeout=5, what="20 close lines")
    assert "Traceback" not in node.output()


def silent_websocket(port: int) -> RawClient:
    """A raw client that completes the handshake, then never reads or answers anything."""
    return RawClient(port).open()


async def test_sigterm_closes_every_client_with_4012_and_exits_0(daphne_nodes):
    node = daphne_nodes({"PINGPONG_DRAIN_SECONDS": "5"})
    clients = [await ws_connect(node.ws) for _ in range(3)]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
    node.signal(signal.SIGTERM)
    codes = await asyncio.gather(*(close_code(ws) for ws in clients))
    assert codes == [protocol.CloseCode.SERVICE_RESTART] * 3
    assert await asyncio.to_thread(node.wait, 15) == 0
    assert "drained 3 of 3" in node.output()


@pytest.mark.slow
def test_readyz_turns_503_as_soon_as_draining_starts(daphne_nodes):
    node = daphne_nodes({"PINGPONG_DRAIN_SECONDS": "5"})
    holder = silent_websocket(node.port)  # keeps the drain busy until its close handshake times out
    assert http_request(f"{node.http}/readyz")[0] == 200
    node.signal(signal.SIGTERM)
    status, body = http_request(f"{node.http}/readyz")
    assert status == 503
    assert b"draining" in body
    holder.close()
    assert node.wait(15) == 0


@pytest.mark.slow
def test_connection_during_drain_is_turned_away_with_4013(daphne_nodes):
    node = daphne_nodes({"PINGPONG_DRAIN_SECONDS": "5"})
    holder = silent_websocket(node.port)
    node.signal(signal.SIGTERM)
    wait_until(lambda: http_request(f"{node.http}/readyz")[0] == 503, timeout=5, what="drain to start")

    async def late_client() -> int | None:
        async with await ws_connect(node.ws) as ws:
            return await close_code(ws)

    assert asyncio.run(late_client()) == protocol.CloseCode.TRY_AGAIN_LATER
    holder.close()
    assert node.wait(15) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_two_thousand_clients_on_the_embedded_layer_answer_ping_and_get_a_broadcast_exactly_once(daphne_nodes):
    token = "e2e-broadcast-token"
    node = daphne_nodes({"PINGPONG_MAX_CONNECTIONS_PER_IP": "0", "PINGPONG_BROADCAST_TOKEN": token})
    gate = asyncio.Semaphore(50)

    async def connect_one():
        async with gate:
            return await ws_connect(node.ws)

    results = await asyncio.gather(*(connect_one() for _ in range(2000)), return_exceptions=True)
    clients = [ws for ws in results if not isinstance(ws, BaseException)]
    try:
        assert len(clients) == 2000
        assert await asyncio.gather(*(ping_pong(ws, timeout=60) for ws in clients)) == ["pong!"] * 2000
        assert await asyncio.to_thread(api_broadcast, node, "to everyone", token=token) == 202
        events = await asyncio.gather(*(next_event(ws, timeout=60) for ws in clients))
        assert {(event["type"], event["text"]) for event in events} == {("broadcast", "to everyone")}
        # On uvicorn every copy was taken straight from the layer, no consumer task woke for it;
        # daphne offers no send_nowait, so there each went through its consumer's task.
        direct = node.metric("pingpong_layer_messages_direct_total", 'kind="broadcast"')
        assert direct == (2000 if node.server == "uvicorn" else 0)

        async def reply_after_ping(ws):
            await ws.send("ping")  # a second copy of the broadcast would arrive before this answer
            return await asyncio.wait_for(ws.recv(), 60)

        assert await asyncio.gather(*(reply_after_ping(ws) for ws in clients)) == ["pong!"] * 2000
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
