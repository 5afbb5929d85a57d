"""HTTP: the page, health and readiness probes, and every status of the broadcast API."""

import json
import re
from pathlib import Path

import pytest
from django.test import AsyncClient, Client

from pingpong import protocol
from pingpong.node import node
from tests.communicators import connected
from tests.processes import free_port

TOKEN = "s3cret-token"


@pytest.fixture
def api(settings):
    """A client for the broadcast API with the token configured."""
    settings.PINGPONG_BROADCAST_TOKEN = TOKEN
    return AsyncClient()


@pytest.fixture
def unreachable_redis(settings):
    """The Redis channel layer pointed at a loopback port nothing listens on."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "pingpong.layers.PingpongPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": f"redis://127.0.0.1:{free_port()}/0", "socket_connect_timeout": 0.5}]},
        }
    }


async def post(client: AsyncClient, body: object, token: str | None = TOKEN, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    return await client.post("/api/broadcast", data=data, content_type="application/json", headers=headers)


def test_the_page_config_is_json_with_the_terminal_close_codes_as_numbers():
    """The page reads its close-code policy from a JSON block: numbers, not enum reprs."""
    config = page_config(Client())
    assert config["terminal_codes"] == sorted(int(code) for code in protocol.TERMINAL_CLOSE_CODES)


def test_pingpong_js_falls_back_to_the_servers_terminal_close_codes():
    """pingpong.js on a page without the server's config stops on the same codes as protocol.TERMINAL_CLOSE_CODES."""
    source = (Path(__file__).resolve().parent.parent / "pingpong/static/pingpong/pingpong.js").read_text()
    listed = re.search(r"const TERMINAL_CODES = \[([\d, ]+)\];", source)
    assert listed is not None
    assert sorted(int(code) for code in listed.group(1).split(",")) == sorted(protocol.TERMINAL_CLOSE_CODES)


def page_config(client: Client) -> dict:
    html = client.get("/").content.decode()
    return json.loads(html.split('<script id="config" type="application/json">', 1)[1].split("</script>", 1)[0])


def test_the_page_shows_an_anonymous_visitor_a_login_link():
    """Without a session the page says anonymous and links to the login page, coming back to /."""
    html = Client().get("/").content.decode()
    assert page_config(Client())["user"] is None
    assert ">anonymous<" in html
    assert 'href="/accounts/login/?next=/"' in html


@pytest.mark.django_db
def test_the_page_names_the_session_user_in_its_config():
    """A logged-in visitor's page carries their id and name, which the topic box uses (user:<id>)."""
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("ada")
    client = Client()
    client.force_login(user)
    assert page_config(client)["user"] == {"id": str(user.pk), "name": "ada"}
    assert f'value="user:{user.pk}"' in client.get("/").content.decode()


def test_page_is_served_and_connects_to_the_websocket():
    response = Client().get("/")
    assert response.status_code == 200
    assert b"/ws/" in response.content or b"app.js" in response.content


def test_healthz_is_ok_without_touching_the_channel_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "no.such.Backend"}}
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_the_channel_layer_round_trips():
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


async def test_readyz_is_503_with_a_reason_when_the_channel_layer_is_unreachable(unreachable_redis):
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 503
    assert "channel layer" in response.json()["reason"]


async def test_readyz_is_503_while_the_node_drains(monkeypatch):
    monkeypatch.setattr(node, "draining", True)
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "draining"


async def test_broadcast_with_the_token_is_accepted_with_202(api):
    response = await post(api, {"text": "hello"})
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"


async def test_broadcast_answers_with_the_id_it_was_given(api):
    """A caller's id is the broadcast's id, so a retry can name it."""
    response = await post(api, {"text": "hello", "id": "order-42:v1"})
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "id": "order-42:v1"}


async def test_broadcast_without_an_id_answers_with_a_new_one(api):
    """Without an id the API makes one and returns it."""
    first, second = (await post(api, {"text": "hello"})).json()["id"], (await post(api, {"text": "hello"})).json()["id"]
    assert first and second and first != second


@pytest.mark.parametrize(
    "broadcast_id", ["", "x" * 65, "a b", 7, None], ids=["empty", "65-chars", "space", "number", "null"]
)
async def test_broadcast_with_a_bad_id_is_400(api, broadcast_id):
    """An id outside 1-64 of A-Z a-z 0-9 . _ : - is refused before anything is sent."""
    response = await post(api, {"text": "hello", "id": broadcast_id})
    assert response.status_code == 400
    assert '"id"' in response.json()["detail"]


@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["missing", "wrong", "empty"])
async def test_broadcast_without_the_right_token_is_401(api, token):
    response = await post(api, {"text": "hello"}, token=token)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


async def test_broadcast_with_another_auth_scheme_is_401(api):
    response = await api.post(
        "/api/broadcast",
        data={"text": "x"},
        content_type="application/json",
        headers={"Authorization": f"Basic {TOKEN}"},
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b'"just a string"',
        b"[]",
        b"{}",
        b'{"text": 5}',
        b'{"text": null}',
        b"[" * 100000,
    ],
    ids=["bad-json", "empty", "not-utf8", "string", "array", "no-text", "number", "null", "deeply-nested"],
)
async def test_broadcast_with_a_bad_body_is_400(api, raw):
    response = await post(api, None, raw=raw)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


async def test_broadcast_text_over_the_limit_is_400(api, settings):
    settings.PINGPONG_MAX_BROADCAST_BYTES = 10
    response = await post(api, {"text": "x" * 11})
    assert response.status_code == 400
    assert "10 bytes" in response.json()["detail"]


async def test_broadcast_body_over_the_upload_limit_is_413(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = await post(api, {"text": "x" * 2000})
    assert response.status_code == 413


async def test_broadcast_is_503_when_the_channel_layer_is_unreachable(api, unreachable_redis):
    response = await post(api, {"text": "hello", "id": "not-sent"})
    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
    assert response.json()["id"] == "not-sent"
    assert "nothing was sent" in response.json()["detail"]


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
async def test_broadcast_with_another_method_is_405(api, method):
    response = await getattr(api, method)("/api/broadcast")
    assert response.status_code == 405
    assert response["Allow"] == "POST"


async def test_broadcast_without_a_configured_token_is_403(settings):
    settings.PINGPONG_BROADCAST_TOKEN = ""
    response = await post(AsyncClient(), {"text": "hello"})
    assert response.status_code == 403
    assert "PINGPONG_BROADCAST_TOKEN" in response.json()["detail"]


async def test_broadcast_needs_no_csrf_cookie(settings):
    settings.PINGPONG_BROADCAST_TOKEN = TOKEN
    response = await post(AsyncClient(enforce_csrf_checks=True), {"text": "hello"})
    assert response.status_code == 202


# --- POST /api/publish ---


async def publish(client: AsyncClient, body: object, token: str | None = TOKEN, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    return await client.post("/api/publish", data=data, content_type="application/json", headers=headers)


async def test_publish_with_the_token_is_accepted_with_202_naming_the_topic_and_a_new_id(api):
    response = await publish(api, {"topic": "user:42", "data": {"n": 1}})
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["topic"]) == ("accepted", "user:42")
    assert len(body["id"]) == 32


async def test_publish_answers_with_the_id_it_was_given(api):
    response = await publish(api, {"topic": "public:x", "data": None, "id": "order-42:v1"})
    body = response.json()
    position = body.pop("offset"), body.pop("epoch")  # public keeps history: the publication's place in it
    assert body == {"status": "accepted", "topic": "public:x", "id": "order-42:v1"}
    assert isinstance(position[0], int) and isinstance(position[1], str)


async def test_a_publication_through_the_api_reaches_a_subscriber_of_its_topic(api):
    ws = await connected()
    try:
        await ws.send_json_to({"type": "subscribe", "topic": "public:news"})
        assert (await ws.receive_json_from())["type"] == "subscribed"
        assert (await publish(api, {"topic": "public:news", "data": {"a": [1, "b"]}, "id": "n1"})).status_code == 202
        event = await ws.receive_json_from()
        assert (event["type"], event["topic"], event["id"], event["data"]) == (
            "publication",
            "public:news",
            "n1",
            {"a": [1, "b"]},
        )
    finally:
        await ws.disconnect()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"topic": "no space", "data": 1}, "bad_topic"),
        ({"topic": "x" * 129, "data": 1}, "bad_topic"),
        ({"topic": 7, "data": 1}, "bad_topic"),
        ({"data": 1}, "bad_topic"),
        ({"topic": "nowhere:x", "data": 1}, "unknown_namespace"),
        ({"topic": "public:x"}, "bad_request"),
        ({"topic": "public:x", "data": 1, "id": "a b"}, "bad_request"),
        ({"topic": "public:x", "data": 1, "id": 7}, "bad_request"),
        ({"topic": "public:x", "data": "\ud800"}, "bad_request"),
        ("just a string", "bad_request"),
        ([], "bad_request"),
    ],
    ids=[
        "space",
        "129-chars",
        "number-topic",
        "no-topic",
        "unknown-namespace",
        "no-data",
        "bad-id",
        "number-id",
        "lone-surrogate",
        "string",
        "array",
    ],
)
async def test_publish_with_a_bad_topic_namespace_id_or_data_is_400_with_its_code(api, body, error):
    response = await publish(api, body)
    assert response.status_code == 400
    assert response.json()["error"] == error


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[" * 100000], ids=["bad", "empty", "utf8", "deep"])
async def test_publish_with_a_body_that_is_not_json_is_400(api, raw):
    response = await publish(api, None, raw=raw)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


async def test_publish_data_over_the_limit_is_400(api, settings):
    settings.PINGPONG_MAX_BROADCAST_BYTES = 10
    response = await publish(api, {"topic": "public:x", "data": "x" * 20})
    assert response.status_code == 400
    assert "10 bytes" in response.json()["detail"]


async def test_publish_body_over_the_upload_limit_is_413(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = await publish(api, {"topic": "public:x", "data": "x" * 2000})
    assert response.status_code == 413


@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["missing", "wrong", "empty"])
async def test_publish_without_the_right_token_is_401(api, token):
    response = await publish(api, {"topic": "public:x", "data": 1}, token=token)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
async def test_publish_with_another_method_is_405(api, method):
    response = await getattr(api, method)("/api/publish")
    assert response.status_code == 405
    assert response["Allow"] == "POST"


async def test_publish_without_a_configured_token_is_403_naming_both_settings(settings):
    settings.PINGPONG_API_TOKEN = ""
    settings.PINGPONG_BROADCAST_TOKEN = ""
    response = await publish(AsyncClient(), {"topic": "public:x", "data": 1})
    assert response.status_code == 403
    assert "PINGPONG_API_TOKEN" in response.json()["detail"]
    assert "PINGPONG_BROADCAST_TOKEN" in response.json()["detail"]


async def test_publish_is_503_with_its_id_when_the_channel_layer_is_unreachable(api, unreachable_redis):
    response = await publish(api, {"topic": "public:x", "data": 1, "id": "not-sent"})
    assert response.status_code == 503
    assert (response.json()["error"], response.json()["id"]) == ("unavailable", "not-sent")
    assert "nothing was sent" in response.json()["detail"]


async def test_publish_needs_no_csrf_cookie(api):
    response = await publish(AsyncClient(enforce_csrf_checks=True), {"topic": "public:x", "data": 1})
    assert response.status_code == 202


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast"])
async def test_the_api_token_is_accepted_by_both_endpoints(settings, path):
    settings.PINGPONG_API_TOKEN, settings.PINGPONG_BROADCAST_TOKEN = TOKEN, ""
    body = {"topic": "public:x", "data": 1} if path == "/api/publish" else {"text": "x"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await AsyncClient().post(path, data=body, content_type="application/json", headers=headers)
    assert response.status_code == 202


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast"])
async def test_the_api_token_wins_over_its_old_name_when_both_are_set(settings, path):
    settings.PINGPONG_API_TOKEN, settings.PINGPONG_BROADCAST_TOKEN = "new-token", "old-token"
    body = {"topic": "public:x", "data": 1} if path == "/api/publish" else {"text": "x"}
    client = AsyncClient()
    old = await client.post(
        path, data=body, content_type="application/json", headers={"Authorization": "Bearer old-token"}
    )
    new = await client.post(
        path, data=body, content_type="application/json", headers={"Authorization": "Bearer new-token"}
    )
    assert (old.status_code, new.status_code) == (401, 202)
