"""The session's user on a websocket: a logged-in browser is that user; no cookie costs no database thread."""

import json
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from pingpong import protocol
from tests.communicators import ALLOWED_ORIGIN, communicator

pytestmark = pytest.mark.django_db(transaction=True)  # the session is read in the database thread


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def subscribe(ws, topic: str) -> dict:
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": topic}))
    return json.loads(await ws.receive_from())


async def test_a_logged_in_browser_is_its_user_and_may_subscribe_to_its_user_topic_only():
    from asgiref.sync import sync_to_async

    user = await sync_to_async(get_user_model().objects.create_user)("ada", password="not-used-here")
    other = await sync_to_async(get_user_model().objects.create_user)("bob")
    cookie = await sync_to_async(session_cookie)(user)
    ws = communicator("/ws/", [*ALLOWED_ORIGIN, (b"cookie", cookie)])
    assert (await ws.connect())[0]
    assert (await subscribe(ws, f"user:{user.pk}"))["type"] == "subscribed"
    assert (await subscribe(ws, f"user:{other.pk}"))["error"] == protocol.ERROR_FORBIDDEN
    await ws.disconnect()


async def test_a_handshake_without_a_session_cookie_never_asks_the_database():
    with mock.patch("channels.auth.get_user", side_effect=AssertionError("asked the database")):
        ws = communicator("/ws/", [*ALLOWED_ORIGIN, (b"cookie", b"theme=dark")])
        assert (await ws.connect())[0]
        assert (await subscribe(ws, "user:1"))["error"] == protocol.ERROR_FORBIDDEN  # anonymous
        await ws.disconnect()


async def test_an_unknown_session_cookie_is_anonymous():
    ws = communicator("/ws/", [*ALLOWED_ORIGIN, (b"cookie", b"sessionid=no-such-session")])
    assert (await ws.connect())[0]
    assert (await subscribe(ws, "user:1"))["error"] == protocol.ERROR_FORBIDDEN
    await ws.disconnect()
