"""pingpong.publish / pingpong.apublish: where the sync call runs, what it refuses, and the lazy import."""

import os
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async

import pingpong
from pingpong import protocol, publishing
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.topics import TopicRefused
from tests.communicators import connected
from tests.processes import ROOT, free_port, scaled


def test_importing_pingpong_needs_no_configured_settings():
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", "import pingpong; print(pingpong.publish.__name__, pingpong.apublish.__name__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert (done.returncode, done.stdout.strip()) == (0, "publish apublish"), done.stderr


async def test_publish_from_a_running_event_loop_is_refused_and_points_to_apublish():
    with pytest.raises(RuntimeError, match=r"await pingpong\.apublish"):
        pingpong.publish("public:x", 1)


def test_publish_from_plain_sync_code_answers_the_topic_and_the_id():
    sent = pingpong.publish("public:x", {"n": 1}, id="plain-1")
    assert (sent["topic"], sent["id"], type(sent["offset"])) == ("public:x", "plain-1", int)  # public keeps history


def test_publish_from_plain_sync_code_runs_on_one_publisher_loop_for_every_call():
    pingpong.publish("public:x", 1)
    first = publishing.publisher_loop()
    pingpong.publish("public:x", 2)
    assert publishing.publisher_loop() is first
    assert first.thread.is_alive()


def test_publish_after_the_publisher_loop_stopped_starts_a_new_one():
    pingpong.publish("public:x", 1)
    stopped = publishing.publisher_loop()
    stopped.stop()
    assert pingpong.publish("public:x", 2, id="after-stop")["id"] == "after-stop"
    assert publishing.publisher_loop() is not stopped


async def test_publish_from_a_sync_view_thread_runs_on_the_servers_loop_and_reaches_its_subscribers():
    """Django runs a sync view under ASGI through sync_to_async: the publication goes out on the server's loop."""
    ws = await connected()
    try:
        await ws.send_json_to({"type": "subscribe", "topic": "public:view"})
        assert (await ws.receive_json_from())["type"] == protocol.EVENT_SUBSCRIBED

        def view() -> tuple[dict, bool]:
            return pingpong.publish("public:view", ["from", "a", "view"], id="v1"), publishing.server_loop() is not None

        sent, on_server_loop = await sync_to_async(view)()
        assert (sent["topic"], sent["id"], on_server_loop) == ("public:view", "v1", True)
        event = await ws.receive_json_from()
        assert (event["type"], event["id"], event["data"]) == ("publication", "v1", ["from", "a", "view"])
    finally:
        await ws.disconnect()


async def test_apublish_reaches_a_subscriber_and_answers_the_topic_and_a_new_id():
    ws = await connected()
    try:
        await ws.send_json_to({"type": "subscribe", "topic": "user:7"})
        assert (await ws.receive_json_from())["type"] == protocol.EVENT_ERROR  # anonymous: forbidden
        await ws.send_json_to({"type": "subscribe", "topic": "public:a"})
        assert (await ws.receive_json_from())["type"] == protocol.EVENT_SUBSCRIBED
        sent = await pingpong.apublish("public:a", None)
        assert sent["topic"] == "public:a" and len(sent["id"]) == 32
        assert (await ws.receive_json_from())["id"] == sent["id"]
    finally:
        await ws.disconnect()


@pytest.mark.parametrize(
    ("topic", "data", "given_id", "error"),
    [
        ("no space", 1, None, protocol.ERROR_BAD_TOPIC),
        ("nowhere:x", 1, None, protocol.ERROR_UNKNOWN_NAMESPACE),
        ("public:x", float("nan"), None, protocol.ERROR_BAD_REQUEST),
        ("public:x", 1, "a b", protocol.ERROR_BAD_REQUEST),
    ],
    ids=["bad-topic", "unknown-namespace", "nan-data", "bad-id"],
)
def test_publish_refuses_a_bad_topic_namespace_data_or_id_before_sending(topic, data, given_id, error):
    with pytest.raises(TopicRefused) as refused:
        pingpong.publish(topic, data, id=given_id)
    assert refused.value.error == error


def test_publish_from_sync_code_says_nothing_was_sent_when_redis_is_unreachable(settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "pingpong.layers.PingpongPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": f"redis://127.0.0.1:{free_port()}/0", "socket_connect_timeout": 0.5}]},
        }
    }
    with pytest.raises(ChannelLayerUnavailable) as failed:
        pingpong.publish("public:x", 1)
    assert type(failed.value) is ChannelLayerUnavailable  # not BroadcastOutcomeUnknown: nothing was written
