"""Prometheus metrics count what the node does."""

import pytest
from django.test import Client
from prometheus_client import REGISTRY

from tests.communicators import connected


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_endpoint_serves_the_prometheus_text_format():
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"pingpong_connections_open" in response.content


async def test_a_ping_counts_a_received_ping_a_sent_pong_and_a_handler_time():
    before = (
        sample("pingpong_messages_received_total", kind="ping"),
        sample("pingpong_messages_sent_total", kind="pong"),
        sample("pingpong_handler_seconds_count"),
    )
    ws = await connected()
    await ws.send_to(text_data="ping")
    await ws.receive_from()
    await ws.disconnect()
    after = (
        sample("pingpong_messages_received_total", kind="ping"),
        sample("pingpong_messages_sent_total", kind="pong"),
        sample("pingpong_handler_seconds_count"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


async def test_open_and_close_are_counted_with_the_close_code():
    opened = sample("pingpong_connections_opened_total", path="/ws/")
    closed = sample("pingpong_connections_closed_total", code="4321")
    ws = await connected()
    await ws.send_to(text_data="ping")
    await ws.receive_from()  # the connection is counted once connect() has run its course
    assert sample("pingpong_connections_open") >= 1
    await ws.disconnect(code=4321)
    assert sample("pingpong_connections_opened_total", path="/ws/") == opened + 1
    assert sample("pingpong_connections_closed_total", code="4321") == closed + 1


@pytest.mark.parametrize(
    ("limit", "setting", "value", "frames"),
    [("size", "PINGPONG_MAX_MESSAGE_BYTES", 16, ["x" * 17]), ("rate", "PINGPONG_RATE_BURST", 1, ["ping", "ping"])],
)
async def test_limit_hits_are_counted(settings, limit, setting, value, frames):
    setattr(settings, setting, value)
    settings.PINGPONG_RATE_PER_SECOND = 0.001
    before = sample("pingpong_limit_hits_total", limit=limit)
    ws = await connected()
    for frame in frames:
        await ws.send_to(text_data=frame)
    while (await ws.receive_output())["type"] != "websocket.close":
        pass
    await ws.disconnect()
    assert sample("pingpong_limit_hits_total", limit=limit) == before + 1
