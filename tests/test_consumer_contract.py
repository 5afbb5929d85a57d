"""`AsyncWebsocketConsumer`'s contract, run on the stock class and on the project's bases.

Every behaviour a Channels user relies on is one test, parametrised over the stock class,
`LeanWebsocketConsumer` and `GuardedWebsocketConsumer` (and their JSON variants), so a
difference is a failing test rather than a surprise for someone who copies the class. The
deliberate differences are tested at the end, on the project's classes only.
"""

import logging
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.exceptions import AcceptConnection, DenyConnection
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from pingpong.consumers import GuardedWebsocketConsumer
from pingpong.websocket import LeanJsonWebsocketConsumer, LeanWebsocketConsumer


@pytest.fixture(autouse=True)
def database_allowed(django_db_blocker):
    """The stock consumer closes stale database connections around every message: part of its contract."""
    with django_db_blocker.unblock():
        yield


class GuardedJsonWebsocketConsumer(GuardedWebsocketConsumer, AsyncJsonWebsocketConsumer):
    """What a project writes to get JSON on the guarded consumer."""


BASES = [AsyncWebsocketConsumer, LeanWebsocketConsumer, GuardedWebsocketConsumer]
JSON_BASES = [AsyncJsonWebsocketConsumer, LeanJsonWebsocketConsumer, GuardedJsonWebsocketConsumer]
OURS = [LeanWebsocketConsumer, GuardedWebsocketConsumer]


@pytest.fixture(params=BASES, ids=lambda base: base.__name__)
def base(request) -> type:
    return request.param


@pytest.fixture(params=JSON_BASES, ids=lambda base: base.__name__)
def json_base(request) -> type:
    return request.param


def probe(base: type, **body: Any) -> type:
    """A consumer class on `base` with `body` as its attributes and a fresh `calls` record."""
    return type(f"Probe{base.__name__}", (base,), {"calls": [], **body})


async def open_client(consumer: type, **options: Any) -> WebsocketCommunicator:
    ws = WebsocketCommunicator(consumer.as_asgi(), "/contract/", **options)
    connected, _ = await ws.connect()
    assert connected
    return ws


async def test_connect_is_called_and_accepting_there_opens_the_connection(base):
    async def connect(self):
        self.calls.append("connect")
        await self.accept()

    consumer = probe(base, connect=connect)
    ws = await open_client(consumer)
    assert consumer.calls == ["connect"]
    await ws.disconnect()


async def test_close_in_connect_before_accept_refuses_the_handshake(base):
    async def connect(self):
        await self.close()

    ws = WebsocketCommunicator(probe(base, connect=connect).as_asgi(), "/contract/")
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


async def test_deny_connection_raised_in_connect_refuses_the_handshake(base):
    async def connect(self):
        raise DenyConnection()

    ws = WebsocketCommunicator(probe(base, connect=connect).as_asgi(), "/contract/")
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


async def test_accept_connection_raised_in_connect_accepts(base):
    async def connect(self):
        raise AcceptConnection()

    ws = await open_client(probe(base, connect=connect))
    await ws.disconnect()


async def test_accept_sends_the_chosen_subprotocol(base):
    async def connect(self):
        await self.accept(subprotocol="v2.pingpong")

    ws = WebsocketCommunicator(probe(base, connect=connect).as_asgi(), "/contract/", subprotocols=["v1", "v2.pingpong"])
    connected, subprotocol = await ws.connect()
    assert connected
    assert subprotocol == "v2.pingpong"
    await ws.disconnect()


async def test_accept_sends_extra_headers(base):
    async def connect(self):
        await self.accept(headers=[(b"x-pingpong", b"yes")])

    app = ApplicationCommunicator(
        probe(base, connect=connect).as_asgi(),
        {"type": "websocket", "path": "/contract/", "headers": [], "subprotocols": []},
    )
    await app.send_input({"type": "websocket.connect"})
    accept = await app.receive_output(timeout=1)
    assert accept["type"] == "websocket.accept"
    assert accept["headers"] == [(b"x-pingpong", b"yes")]
    await app.send_input({"type": "websocket.disconnect", "code": 1000})
    await app.wait(timeout=1)


async def test_receive_gets_a_text_frame_as_text_data(base):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=f"text={text_data!r} bytes={bytes_data!r}")

    ws = await open_client(probe(base, receive=receive))
    await ws.send_to(text_data="hello")
    assert await ws.receive_from() == "text='hello' bytes=None"
    await ws.disconnect()


async def test_receive_gets_a_binary_frame_as_bytes_data(base):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(bytes_data=bytes_data[::-1])

    ws = await open_client(probe(base, receive=receive))
    await ws.send_to(bytes_data=b"\x01\x02")
    assert await ws.receive_from() == b"\x02\x01"
    await ws.disconnect()


async def test_send_with_close_sends_the_frame_then_closes_with_the_code(base):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data="bye", close=4321)

    ws = await open_client(probe(base, receive=receive))
    await ws.send_to(text_data="x")
    assert await ws.receive_from() == "bye"
    assert await ws.receive_output() == {"type": "websocket.close", "code": 4321}
    await ws.disconnect()


async def test_close_with_a_code_and_reason_sends_both(base):
    async def receive(self, text_data=None, bytes_data=None):
        await self.close(code=4444, reason="done")

    ws = await open_client(probe(base, receive=receive))
    await ws.send_to(text_data="x")
    assert await ws.receive_output() == {"type": "websocket.close", "code": 4444, "reason": "done"}
    await ws.disconnect()


async def test_disconnect_is_called_with_the_close_code(base):
    async def disconnect(self, code):
        self.calls.append(code)

    consumer = probe(base, disconnect=disconnect)
    ws = await open_client(consumer)
    await ws.disconnect(code=4321)
    assert consumer.calls == [4321]


async def test_groups_are_joined_before_connect_and_deliver_group_messages(base):
    async def connect(self):
        self.calls.append(sorted(get_channel_layer().groups.get("contract-room", {})))
        await self.accept()

    async def room_message(self, message):
        await self.send(text_data=message["text"])

    consumer = probe(base, groups=["contract-room"], connect=connect, room_message=room_message)
    ws = await open_client(consumer)
    assert len(consumer.calls[0]) == 1  # this consumer's channel was in the group when connect ran
    await get_channel_layer().group_send("contract-room", {"type": "room.message", "text": "to the room"})
    assert await ws.receive_from() == "to the room"
    await ws.disconnect()


async def test_groups_are_left_on_disconnect(base):
    ws = await open_client(probe(base, groups=["contract-leave"]))
    assert get_channel_layer().groups.get("contract-leave")
    await ws.disconnect()
    assert not get_channel_layer().groups.get("contract-leave")


async def test_a_consumer_without_groups_has_a_channel_name_for_direct_sends(base):
    async def connect(self):
        await self.accept()
        await self.send(text_data=self.channel_name)

    async def direct_message(self, message):
        await self.send(text_data=message["text"])

    ws = await open_client(probe(base, connect=connect, direct_message=direct_message))
    channel_name = await ws.receive_from()
    await get_channel_layer().send(channel_name, {"type": "direct.message", "text": "just you"})
    assert await ws.receive_from() == "just you"
    await ws.disconnect()


async def test_channel_layer_alias_picks_the_layer(base, settings):
    settings.CHANNEL_LAYERS = {**settings.CHANNEL_LAYERS, "other": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

    async def connect(self):
        await self.accept()
        await self.send(text_data=str(self.channel_layer is get_channel_layer("other")))

    ws = await open_client(probe(base, channel_layer_alias="other", connect=connect))
    assert await ws.receive_from() == "True"
    await ws.disconnect()


async def test_json_consumers_decode_receive_json_and_encode_send_json(json_base):
    async def receive_json(self, content, **kwargs):
        await self.send_json({"echo": content})

    ws = await open_client(probe(json_base, receive_json=receive_json))
    await ws.send_json_to({"n": [1, 2]})
    assert await ws.receive_json_from() == {"echo": {"n": [1, 2]}}
    await ws.disconnect()


# Deliberate differences: the project's classes only.


@pytest.mark.parametrize("ours", OURS, ids=lambda base: base.__name__)
async def test_a_layer_message_without_a_handler_is_logged_and_dropped(ours, caplog):
    """Stock Channels raises ValueError and the connection dies; ours logs one line and stays open."""

    async def connect(self):
        await self.accept()
        await self.send(text_data=self.channel_name)

    ws = await open_client(probe(ours, connect=connect))
    channel_name = await ws.receive_from()
    with caplog.at_level(logging.WARNING):
        await get_channel_layer().send(channel_name, {"type": "nobody.handles"})
        await ws.send_to(text_data="still open?")
        assert await ws.receive_nothing(timeout=0.2)
    assert "unknown type 'nobody.handles'" in caplog.text
    await ws.disconnect()


@pytest.mark.parametrize("ours", OURS, ids=lambda base: base.__name__)
async def test_a_layer_message_posing_as_the_client_socket_is_refused(ours, caplog):
    """Only the server speaks for the client: a `websocket.*` message from the layer is never dispatched."""

    async def connect(self):
        await self.accept()
        await self.send(text_data=self.channel_name)

    async def websocket_receive(self, message):
        await self.send(text_data="handled " + message.get("text", ""))

    ws = await open_client(probe(ours, connect=connect, websocket_receive=websocket_receive))
    channel_name = await ws.receive_from()
    with caplog.at_level(logging.WARNING):
        await get_channel_layer().send(channel_name, {"type": "websocket.receive", "text": "forged"})
        assert await ws.receive_nothing(timeout=0.2)
    assert "posing as 'websocket.receive'" in caplog.text
    await ws.disconnect()


@pytest.mark.parametrize("ours", OURS, ids=lambda base: base.__name__)
async def test_disconnect_runs_once_even_when_the_server_cancels_the_consumer(ours):
    """A consumer cancelled by its server (daphne does, after its close timeout) still runs `disconnect`."""

    async def disconnect(self, code):
        self.calls.append(code)

    consumer = probe(ours, disconnect=disconnect)
    ws = await open_client(consumer)
    ws.future.cancel()
    with pytest.raises(BaseException):  # noqa: B017  # the cancellation itself
        await ws.future
    assert consumer.calls == [1006]
