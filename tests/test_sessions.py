"""Sessions: a browser logged in to the site is its user on /ws/, on SQLite and on a real PostgreSQL.

Real processes: `manage.py serve` nodes (daphne and uvicorn) on a migrated database, a login by
HTTP POST with the CSRF cookie and token, the `websockets` client sending the session cookie. Then
`serve --migrate` on PostgreSQL (replicas starting at once, a database that comes up late), and in
process: a session connection reads the database at the handshake and never per message.
"""

import json
import re
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.cookiejar import CookieJar
from typing import Any, NamedTuple

import pytest
from asgiref.sync import SyncToAsync
from channels.db import database_sync_to_async
from django.db.backends.utils import CursorWrapper

from pingpong import protocol
from tests.communicators import ALLOWED_ORIGIN, communicator
from tests.postgres import PostgresServer, postgres_required_bin_dir
from tests.processes import (
    LOOPBACK,
    SERVERS,
    DaphneNode,
    ServerProcess,
    database_url,
    free_port,
    healthy,
    manage,
    node_env,
    scaled,
    serve_command,
    wait_until,
)
from tests.wsclient import close_code, next_event, ws_connect

on_both_servers = pytest.mark.parametrize("server", SERVERS, scope="module")


class User(NamedTuple):
    username: str
    password: str
    pk: int


def users_create(database: str, count: int = 2) -> list[User]:
    """`count` users with random names and passwords, made in the database by `manage.py shell`."""
    wanted = [(f"user-{secrets.token_hex(4)}", secrets.token_urlsafe(12)) for _ in range(count)]
    code = (
        "from django.contrib.auth import get_user_model\n"
        f"for name, password in {wanted!r}:\n"
        "    print('pk', get_user_model().objects.create_user(name, password=password).pk)\n"
    )
    done = manage("shell", "-c", code, env={"DATABASE_URL": database})
    assert done.returncode == 0, done.stderr
    pks = re.findall(r"^pk (\d+)$", done.stdout, re.MULTILINE)  # the shell may print more (its auto-imports)
    return [User(name, password, int(pk)) for (name, password), pk in zip(wanted, pks, strict=True)]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # a 302 is the answer the test reads, not a page to follow


class Browser:
    """urllib with a cookie jar, as a browser: the CSRF cookie from a GET, the form posted back with its token."""

    def __init__(self, http: str) -> None:
        self.http, self.jar = http, CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def cookie(self, name: str) -> str | None:
        return next((cookie.value for cookie in self.jar if cookie.name == name), None)

    def request(self, path: str, fields: dict[str, str] | None = None) -> tuple[int, str, str]:
        """GET `path`, or POST `fields` with the CSRF token; (status, Location, body)."""
        body, headers = None, {}
        if fields is not None:
            body = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": self.cookie("csrftoken") or ""}).encode()
            headers["Origin"] = self.http  # as a browser sends with a form; Django's CSRF check compares it
        request = urllib.request.Request(f"{self.http}{path}", data=body, headers=headers)
        try:
            with self.opener.open(request, timeout=scaled(10)) as response:
                return response.status, "", response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Location", ""), error.read().decode()

    def login(self, user: User, password: str | None = None) -> tuple[int, str, str]:
        status, _, _ = self.request("/accounts/login/")
        assert status == 200 and self.cookie("csrftoken")
        fields = {"username": user.username, "password": user.password if password is None else password}
        return self.request("/accounts/login/", fields)


async def answer(ws: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Send a request and return the event that repeats its id (at most 20 other events are read past)."""
    await ws.send(json.dumps(request))
    for _ in range(20):
        event = await next_event(ws)
        if event.get("id") == request["id"]:
            return event
    raise AssertionError(f"no answer to {request}")


async def subscribe(node: DaphneNode, topic: str, *, session: str | None) -> dict[str, Any]:
    """Open /ws/ (with the session cookie, if any), subscribe to `topic`; the answer."""
    headers = {"Cookie": f"sessionid={session}"} if session else {}
    async with await ws_connect(node.ws, additional_headers=headers) as ws:
        return await answer(ws, {"type": protocol.REQUEST_SUBSCRIBE, "topic": topic, "id": 1})


# PostgreSQL's own cluster takes seconds to start: its half runs in `make test`, not `make test-fast`.
@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])]
)
def database(request) -> Iterator[str]:
    """A migrated database: the test nodes' shared SQLite, or a fresh PostgreSQL owned by the module."""
    if request.param == "sqlite":
        yield database_url()
        return
    server = PostgresServer(postgres_required_bin_dir()).start()
    try:
        url = server.database_create("pingpong")
        migrated = manage("migrate", "--noinput", env={"DATABASE_URL": url})
        assert migrated.returncode == 0, migrated.stderr
        yield url
    finally:
        server.close()


@pytest.fixture(scope="module")
def node(module_daphne_nodes, database) -> DaphneNode:
    return module_daphne_nodes(env={"DATABASE_URL": database})


@on_both_servers
async def test_a_logged_in_browser_may_subscribe_to_its_own_user_topic_and_not_to_another_users(node, database):
    user, other = users_create(database)
    browser = Browser(node.http)
    status, location, _ = browser.login(user)
    assert (status, location) == (302, "/")
    session = browser.cookie("sessionid")
    assert session
    headers = {"Cookie": f"sessionid={session}"}
    async with await ws_connect(node.ws, additional_headers=headers) as ws:
        own = await answer(ws, {"type": "subscribe", "topic": f"user:{user.pk}", "id": 1})
        assert (own["type"], own["topic"], own["id"]) == (protocol.EVENT_SUBSCRIBED, f"user:{user.pk}", 1)
        foreign = await answer(ws, {"type": "subscribe", "topic": f"user:{other.pk}", "id": 2})
        assert (foreign["type"], foreign["error"]) == (protocol.EVENT_ERROR, protocol.ERROR_FORBIDDEN)


@on_both_servers
async def test_an_anonymous_connection_is_refused_a_user_topic(node, database):
    (user,) = users_create(database, 1)
    refused = await subscribe(node, f"user:{user.pk}", session=None)
    assert refused["error"] == protocol.ERROR_FORBIDDEN


@on_both_servers
async def test_a_logged_out_session_is_anonymous(node, database):
    (user,) = users_create(database, 1)
    browser = Browser(node.http)
    assert browser.login(user)[0] == 302
    session = browser.cookie("sessionid")
    assert (await subscribe(node, f"user:{user.pk}", session=session))["type"] == protocol.EVENT_SUBSCRIBED
    status, location, _ = browser.request("/accounts/logout/", {})
    assert (status, location) == (302, "/")
    refused = await subscribe(node, f"user:{user.pk}", session=session)
    assert refused["error"] == protocol.ERROR_FORBIDDEN


@on_both_servers
def test_a_wrong_password_is_answered_with_the_form_and_no_session(node, database):
    (user,) = users_create(database, 1)
    browser = Browser(node.http)
    status, _, body = browser.login(user, password="not-" + user.password)
    assert status == 200
    assert 'class="errorlist' in body
    assert browser.cookie("sessionid") is None


@on_both_servers
def test_the_login_page_knows_the_logged_in_user(node, database):
    """request.user works over HTTP: the session middleware and the auth middleware read the same session."""
    (user,) = users_create(database, 1)
    browser = Browser(node.http)
    assert browser.login(user)[0] == 302
    status, _, body = browser.request("/accounts/login/")
    assert status == 200
    assert re.search(rf"Logged in as <strong>{re.escape(user.username)}</strong>", body)


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_session_handshake_while_the_database_is_down_gets_unavailable_and_4013_then_works_when_it_is_back(
    postgres, daphne_nodes
):
    postgres.start()
    database = postgres.database_create("outage")
    assert manage("migrate", "--noinput", env={"DATABASE_URL": database}).returncode == 0
    node = daphne_nodes(env={"DATABASE_URL": database})
    (user,) = users_create(database, 1)
    browser = Browser(node.http)
    assert browser.login(user)[0] == 302
    session = browser.cookie("sessionid")
    postgres.kill()
    async with await ws_connect(node.ws, additional_headers={"Cookie": f"sessionid={session}"}) as ws:
        assert (await next_event(ws))["error"] == protocol.ERROR_UNAVAILABLE
        assert await close_code(ws) == protocol.CloseCode.TRY_AGAIN_LATER
    # Anonymous connections read no database.
    assert (await subscribe(node, "public:news", session=None))["type"] == protocol.EVENT_SUBSCRIBED
    postgres.start()  # on the same port
    assert (await subscribe(node, f"user:{user.pk}", session=session))["type"] == protocol.EVENT_SUBSCRIBED
    assert "Traceback" not in node.output()


# --- serve --migrate: what the Docker image runs at start ---


def migrating_node(database: str) -> ServerProcess:
    """`manage.py serve --migrate` on daphne (not yet started), as the image runs it."""
    return ServerProcess(
        lambda port: [*serve_command(port), "--migrate"],
        name="daphne-migrate",
        env=node_env({"DATABASE_URL": database}),
        ready=lambda node: healthy(f"http://{LOOPBACK}:{node.port}"),
    )


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster, not started."""
    server = PostgresServer(postgres_required_bin_dir())
    try:
        yield server
    finally:
        server.close()


def started_together(nodes: list[ServerProcess]) -> list[Exception]:
    """Start every node from its own thread at once; the errors raised."""
    errors: list[Exception] = []

    def start(node: ServerProcess) -> None:
        try:
            node.start(timeout=90)
        except Exception as error:  # reported to the test, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=scaled(120))
    return errors


@pytest.mark.slow
@pytest.mark.postgres
def test_replicas_starting_at_once_on_a_fresh_postgres_migrate_it_once_and_all_serve(postgres):
    postgres.start()
    database = postgres.database_create("fresh")
    nodes = [migrating_node(database) for _ in range(3)]
    try:
        errors = started_together(nodes)
        assert not errors, [node.output()[-2000:] for node in nodes]
        assert all("database migrated" in node.output() for node in nodes)
        check = manage("migrate", "--check", env={"DATABASE_URL": database})
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        for node in nodes:
            node.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_serve_migrate_waits_for_a_database_that_is_not_up_yet(postgres):
    postgres.requested_port = postgres.port = free_port()
    node = migrating_node(postgres.url("postgres"))
    try:
        errors: list[Exception] = []
        starting = threading.Thread(target=lambda: errors.extend(started_together([node])))
        starting.start()
        wait_until(lambda: "database not ready" in node.output(), timeout=30, what="serve --migrate to retry")
        postgres.start()
        starting.join(timeout=scaled(120))
        assert not errors
        assert healthy(f"http://{LOOPBACK}:{node.port}"), node.output()[-2000:]
        assert "database migrated (postgresql)" in node.output()
    finally:
        node.close()


# --- no thread hop per message ---


@pytest.mark.django_db(transaction=True)
async def test_a_session_connection_reads_the_database_at_the_handshake_and_never_per_message(settings, monkeypatch):
    """Through project.asgi's websocket stack (origin check, AuthMiddlewareStack): every hop to a
    thread (asgiref's SyncToAsync, which database_sync_to_async is) and every SQL statement is counted."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    settings.PINGPONG_RATE_PER_SECOND = 0  # 200 messages at once, no rate limit in the way
    user = await database_sync_to_async(get_user_model().objects.create_user)("alice", password="pw")

    def session_key() -> str:
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    cookie = (b"cookie", f"sessionid={await database_sync_to_async(session_key)()}".encode())
    counts: Counter[str] = Counter()
    hop, execute = SyncToAsync.__call__, CursorWrapper._execute_with_wrappers

    async def counted_hop(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        counts["hops"] += 1
        return await hop(self, *args, **kwargs)

    def counted_execute(self: CursorWrapper, *args: Any, **kwargs: Any) -> Any:
        counts["queries"] += 1
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted_hop)
    monkeypatch.setattr(CursorWrapper, "_execute_with_wrappers", counted_execute)

    ws = communicator("/ws/", headers=[*ALLOWED_ORIGIN, cookie])
    accepted, _ = await ws.connect()
    assert accepted
    at_handshake = dict(counts)
    # The session and its user were read, and the counters saw it: a check that can fail.
    assert at_handshake["queries"] >= 2 and at_handshake["hops"] >= 1, at_handshake
    for _ in range(100):
        await ws.send_to(text_data=protocol.PING)
        assert await ws.receive_from() == protocol.PONG
    await ws.send_json_to({"type": "subscribe", "topic": f"user:{user.pk}", "id": 1})
    own = await ws.receive_json_from()
    assert (own["type"], own["topic"], own["id"]) == (protocol.EVENT_SUBSCRIBED, f"user:{user.pk}", 1)
    for index in range(100):
        await ws.send_json_to({"type": "ping", "id": index})
        assert (await ws.receive_json_from())["id"] == index
    assert dict(counts) == at_handshake
    await ws.disconnect()
