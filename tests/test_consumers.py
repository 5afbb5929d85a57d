"""The websocket protocol through WebsocketCommunicator and the in-memory channel layer."""

import json

import pytest
from channels.layers import get_channel_layer

from pingpong import broadcast, protocol
from pingpong.node import node
from tests.communicators import communicator, connected


@pytest.fixture
async def client():
    """A connected /ws/ client, disconnected after the test."""
    ws = await connected()
    yield ws
    await ws.disconnect()


async def test_ping_is_answered_with_pong(client):
    await client.send_to(text_data="ping")
    assert await client.receive_from() == "pong!"


async def test_other_text_gets_an_error_event_and_the_connection_stays_open(client):
    await client.send_to(text_data="PING")
    event = json.loads(await client.receive_from())
    assert event["type"] == "error"
    assert event["error"] == protocol.ERROR_UNKNOWN_MESSAGE
    assert event["detail"]
    await client.send_to(text_data="ping")
    assert await client.receive_from() == "pong!"


@pytest.mark.parametrize("text", ["", " ping", "ping ", "pong!", "{}", "[1]", '{"type": "pong"}', "{not json"])
async def test_near_misses_get_an_error_event(client, text):
    await client.send_input({"type": "websocket.receive", "text": text})  # send_to refuses ""
    assert json.loads(await client.receive_from())["type"] == "error"


async def test_json_ping_is_answered_with_a_json_pong_carrying_the_same_id(client):
    await client.send_to(text_data=json.dumps({"type": "ping", "id": [1, "a"]}))
    event = json.loads(await client.receive_from())
    assert event["type"] == "pong"
    assert event["id"] == [1, "a"]
    assert isinstance(event["server_time"], float)


async def test_binary_frame_closes_with_4003(client):
    await client.send_to(bytes_data=b"ping")
    event = json.loads(await client.receive_from())
    assert event["error"] == "unsupported_data"
    assert await client.receive_output() == {
        "type": "websocket.close",
        "code": protocol.CloseCode.UNSUPPORTED_DATA,
        "reason": event["detail"],
    }


@pytest.mark.parametrize(
    "headers",
    [
        [(b"origin", b"http://evil.example")],
        [(b"origin", b"null")],
        [],
    ],
    ids=["foreign", "null", "missing"],
)
async def test_handshake_without_an_allowed_origin_is_rejected(headers):
    accepted, _ = await communicator(headers=headers).connect()
    assert not accepted


async def test_unknown_websocket_path_is_rejected_at_the_handshake():
    accepted, _ = await communicator("/nowhere/").connect()
    assert not accepted


async def test_broadcast_reaches_every_connected_client_once():
    clients = [await connected() for _ in range(3)]
    event = await broadcast.send(text="hello everyone")
    for ws in clients:
        received = json.loads(await ws.receive_from())
        assert received == {**event, "type": "broadcast", "text": "hello everyone"}
        assert await ws.receive_nothing(timeout=0.1)
        await ws.disconnect()


async def test_channel_layer_message_of_unknown_type_is_dropped_and_the_connection_stays_open(client):
    layer = get_channel_layer()
    await layer.group_send(protocol.BROADCAST_GROUP, {"type": "no.such.handler"})
    await layer.group_send(protocol.BROADCAST_GROUP, {"type": "websocket.disconnect", "code": 1000})
    await client.send_to(text_data="ping")
    assert await client.receive_from() == "pong!"


async def test_disconnect_leaves_the_broadcast_group_and_the_node_count():
    before = len(node.connections)
    ws = await connected()
    await ws.send_to(text_data="ping")
    await ws.receive_from()
    assert len(node.connections) == before + 1
    await ws.disconnect()
    assert len(node.connections) == before
    layer = get_channel_layer()
    assert not layer.groups.get(protocol.BROADCAST_GROUP)


async def test_echo_returns_text_and_binary_frames_exactly_empty_ones_included():
    ws = await connected("/ws/echo/")
    for frame in ["", "ping", "ünïcödé"]:
        await ws.send_input({"type": "websocket.receive", "text": frame})
        assert (await ws.receive_output())["text"] == frame
    for data in [b"", b"\x00\xff"]:
        await ws.send_input({"type": "websocket.receive", "bytes": data})
        assert (await ws.receive_output())["bytes"] == data
    await ws.disconnect()
