"""Per-connection and per-node limits, each with its close code."""

import json

import pytest
from channels.testing import WebsocketCommunicator

from pingpong import protocol
from pingpong.limits import TokenBucket, text_too_big
from pingpong.node import node
from tests.communicators import connected


async def closed_with(ws: WebsocketCommunicator, code: int, error: str) -> None:
    event = json.loads(await ws.receive_from())
    assert event["type"] == "error"
    assert event["error"] == error
    output = await ws.receive_output()
    assert output["type"] == "websocket.close"
    assert output["code"] == code


@pytest.mark.parametrize("path", ["/ws/", "/ws/echo/"])
async def test_message_over_the_size_limit_closes_with_4009(settings, path):
    settings.PINGPONG_MAX_MESSAGE_BYTES = 100
    ws = await connected(path)
    await ws.send_to(text_data="x" * 101)
    await closed_with(ws, protocol.CloseCode.MESSAGE_TOO_BIG, "message_too_big")


async def test_message_at_the_size_limit_is_accepted(settings):
    settings.PINGPONG_MAX_MESSAGE_BYTES = 100
    ws = await connected("/ws/echo/")
    await ws.send_to(text_data="é" * 50)  # 100 bytes of UTF-8
    assert await ws.receive_from() == "é" * 50
    await ws.disconnect()


async def test_messages_over_the_rate_limit_close_with_4008(settings):
    settings.PINGPONG_RATE_PER_SECOND = 1
    settings.PINGPONG_RATE_BURST = 3
    ws = await connected()
    for _ in range(3):
        await ws.send_to(text_data="ping")
        assert await ws.receive_from() == "pong!"
    await ws.send_to(text_data="ping")
    await closed_with(ws, protocol.CloseCode.POLICY_VIOLATION, "rate_limited")


async def test_connection_over_the_node_cap_closes_with_4013(settings):
    settings.PINGPONG_MAX_CONNECTIONS = len(node.connections) + 1
    first = await connected()
    second = await connected()
    await closed_with(second, protocol.CloseCode.TRY_AGAIN_LATER, "full")
    await first.send_to(text_data="ping")
    assert await first.receive_from() == "pong!"
    await first.disconnect()


def test_token_bucket_allows_the_burst_then_refuses():
    bucket = TokenBucket(rate=0.001, burst=2)
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_token_bucket_with_rate_zero_never_refuses():
    bucket = TokenBucket(rate=0, burst=1)
    assert all(bucket.take() for _ in range(1000))


@pytest.mark.parametrize(
    ("text", "limit", "too_big"),
    [("a" * 10, 10, False), ("a" * 11, 10, True), ("é" * 5, 10, False), ("é" * 6, 10, True), ("😀" * 3, 11, True)],
)
def test_text_size_is_measured_in_utf8_bytes(text, limit, too_big):
    assert text_too_big(text, limit) is too_big
