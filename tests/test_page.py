"""The live page, end to end in headless Chromium against real daphne and uvicorn processes.

Debian's `chromium` package driven by Playwright through `executable_path`: no browser
download. Skipped without Chromium or Playwright unless PINGPONG_REQUIRE_BROWSER is set.
Screenshots (server down, and back) are left in artifacts/ for a human to look at.
"""

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings

from tests import processes
from tests.processes import ROOT, SERVERS, DaphneNode, RedisServer, api_broadcast, manage, node_env

# Every test runs against `manage.py serve --server daphne` and `--server uvicorn`; one browser serves both.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.parametrize("server", SERVERS, scope="module")]

TOKEN = "page-test-token"
NODE_ENV = {"PINGPONG_BROADCAST_TOKEN": TOKEN}
ARTIFACTS = ROOT / "artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Milliseconds, as Playwright counts them.
SHORT_WAIT = 10_000
# Backoff with full jitter: after a few failed attempts the next one may be up to 8 s away.
RECONNECT_WAIT = 30_000


def browser_missing(reason: str) -> None:
    if os.environ.get("PINGPONG_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} and PINGPONG_REQUIRE_BROWSER is set")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """The system Chromium, headless, shared by this module's tests."""
    executable = shutil.which("chromium")
    if executable is None:
        browser_missing("chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("the playwright package is not installed")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS, timeout=30_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(SHORT_WAIT)
    yield page
    context.close()
    assert errors == [], f"uncaught errors on the page: {errors}"


@pytest.fixture
def restart(daphne_nodes) -> Callable[[DaphneNode], DaphneNode]:
    """Start a fresh node on a dead node's port (where the page reconnects); killed after the test."""
    return lambda dead: daphne_nodes(env=NODE_ENV, port=dead.port)


def broadcast(node: DaphneNode, text: str) -> None:
    assert api_broadcast(node, text, token=TOKEN) == 202


def wait_for_fresh_rtt(page, *, samples: int = 1) -> None:
    """Wait until `samples` more pongs have been timed than when we started waiting."""
    count = page.evaluate("window.pingpong.samples.length")
    page.wait_for_function("n => window.pingpong.samples.length >= n", arg=count + samples)


def test_page_shows_the_round_trip_time_and_who_is_online(page, daphne_nodes):
    from playwright.sync_api import expect

    node = daphne_nodes(env=NODE_ENV)
    page.goto(f"{node.http}/")
    wait_for_fresh_rtt(page)
    expect(page.locator("#rtt")).to_have_text(re.compile(r"^\d+\.\d ms$"))
    expect(page.locator("#state")).to_have_attribute("data-state", "open")
    expect(page.locator("#online")).to_have_text("1 online")


def test_page_lists_a_broadcast_sent_through_the_api(page, daphne_nodes):
    from playwright.sync_api import expect

    node = daphne_nodes(env=NODE_ENV)
    page.goto(f"{node.http}/")
    page.wait_for_function("window.pingpong.state === 'open'")
    broadcast(node, "hello from the API")
    expect(page.locator("#broadcasts li").first).to_contain_text("hello from the API")


def test_page_reconnects_when_a_killed_server_returns_on_the_same_port(page, daphne_nodes, restart):
    from playwright.sync_api import expect

    node = daphne_nodes(env=NODE_ENV)
    page.goto(f"{node.http}/")
    wait_for_fresh_rtt(page, samples=3)  # the page pings every second: a short line on the chart
    broadcast(node, "before the crash")

    node.kill()  # SIGKILL: no close frame, the page must notice the dead socket itself
    expect(page.locator("#state")).to_have_attribute("data-state", re.compile("^(closed|connecting)$"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"page-server-down-{node.server}.png", full_page=True)

    returned = restart(node)
    page.wait_for_function("window.pingpong.state === 'open' && window.pingpong.reconnects > 0", timeout=RECONNECT_WAIT)
    wait_for_fresh_rtt(page, samples=3)
    broadcast(returned, "after the restart")
    expect(page.locator("#broadcasts li").first).to_contain_text("after the restart")
    page.screenshot(path=ARTIFACTS / f"page-{node.server}.png", full_page=True)


def test_page_stops_reconnecting_after_a_terminal_close_code(page, daphne_nodes):
    from playwright.sync_api import expect

    node = daphne_nodes(env=NODE_ENV)
    page.goto(f"{node.http}/")
    page.wait_for_function("window.pingpong.state === 'open'")
    page.evaluate("window.pingpong.socket.send(new Uint8Array([1, 2, 3]))")  # binary: closed with 4003
    expect(page.locator("#state")).to_have_attribute("data-state", "stopped")
    assert page.evaluate("window.pingpong.lastClose") == 4003
    page.wait_for_timeout(2_000)  # longer than the first backoff step could be
    assert page.evaluate("window.pingpong.reconnects") == 0
    expect(page.locator("#state")).to_have_attribute("data-state", "stopped")


# Run by `manage.py shell -c` against the test nodes' database: a user, and a session of theirs made by
# Django's own login (Client.force_login); prints the user's id and the session key.
NEW_USER_WITH_SESSION = """
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
user = get_user_model().objects.create_user({username!r})
client = Client()
client.force_login(user)
print(user.pk, client.cookies[settings.SESSION_COOKIE_NAME].value)
"""


def new_user_with_session() -> tuple[str, str]:
    """A new user in the nodes' test database (tests.processes.database_url) and a session of theirs: (id, key)."""
    code = NEW_USER_WITH_SESSION.format(username=f"page-{uuid.uuid4().hex[:12]}")
    done = manage("shell", "-c", code, env=node_env())
    assert done.returncode == 0, done.stderr
    user_id, session_key = done.stdout.split()[-2:]
    return user_id, session_key


def publish_from_another_process(redis: RedisServer, topic: str, data: object) -> None:
    """Publish with `topics.apublish` from a process of its own, through the nodes' Redis."""
    # Until POST /api/publish lands on main: then this becomes one call to it.
    code = f"import asyncio; from pingpong import topics; asyncio.run(topics.apublish({topic!r}, {data!r}))"
    done = manage("shell", "-c", code, env=node_env({"REDIS_URL": redis.url}))
    assert done.returncode == 0, done.stderr


def subscribe_on_the_page(page, topic: str) -> None:
    page.fill("#topic", topic)
    page.click("#topic-form button[type=submit]")


@pytest.mark.redis
def test_a_logged_in_user_sees_their_publications_live_and_is_refused_another_users_topic(
    page, daphne_nodes, redis_server
):
    from playwright.sync_api import expect

    node = daphne_nodes(env={**NODE_ENV, "REDIS_URL": redis_server.url})
    user_id, session_key = new_user_with_session()
    other_id, _ = new_user_with_session()
    page.context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": session_key, "url": node.http}])
    page.goto(f"{node.http}/")
    expect(page.locator("#user-id")).to_have_text(user_id)
    page.wait_for_function("window.pingpong.state === 'open'")

    mine, theirs = f"user:{user_id}", f"user:{other_id}"
    subscribe_on_the_page(page, mine)
    expect(page.locator(f'#subscriptions li[data-topic="{mine}"]')).to_have_attribute("data-state", "subscribed")
    publish_from_another_process(redis_server, mine, {"text": "for you only"})
    expect(page.locator("#publications li").first).to_contain_text(mine)
    expect(page.locator("#publications li").first).to_contain_text("for you only")

    subscribe_on_the_page(page, theirs)
    expect(page.locator("#topic-status")).to_contain_text(f"{theirs}: forbidden")
    expect(page.locator(f'#subscriptions li[data-topic="{theirs}"]')).to_have_attribute("data-state", "refused")
    # Refused by the server, not only on the page: their publication never arrives, ours after it does.
    publish_from_another_process(redis_server, theirs, {"text": "not for you"})
    publish_from_another_process(redis_server, mine, {"text": "still yours"})
    expect(page.locator("#publications li").first).to_contain_text("still yours")
    assert "not for you" not in page.locator("#publications").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"page-topics-{node.server}.png", full_page=True)


# pingpong.js on its own: a second client on the page (for its origin), driven from the test.
TOKEN_SECRET = "page-test-token-secret-0123456789abcdef"
ROOM_ENV = {**NODE_ENV, "PINGPONG_NAMESPACES": '{"room": {"subscribe": "anyone", "publish": "anyone"}}'}


def test_pingpong_js_subscribes_again_to_every_topic_after_a_reconnect(page, daphne_nodes):
    node = daphne_nodes(env=ROOM_ENV)
    page.goto(f"{node.http}/")
    page.evaluate("""() => {
        window.got = [];
        window.client = new PingPong("/ws/");
        return window.client.subscribe("room:1", data => window.got.push(data.n));
    }""")
    page.evaluate("window.client.socket.close(1000)")  # a clean close: not terminal, so the client comes back
    page.wait_for_function("window.client.state === 'open' && window.client.reconnects === 1", timeout=RECONNECT_WAIT)
    # The server delivers a publication to its own publisher too, when it is subscribed.
    assert page.evaluate("window.client.publish('room:1', {n: 2}).then(reply => reply.type)") == "published"
    page.wait_for_function("window.got.includes(2)")
    assert page.evaluate("window.client.lastClose") == 1000


def test_pingpong_js_subscribes_again_within_the_servers_rate_limit(page, daphne_nodes):
    # 40 topics subscribed at once would be 40 requests in a burst of 20: closed with 4008.
    node = daphne_nodes(env={**ROOM_ENV, "PINGPONG_RATE_BURST": "20"})
    page.goto(f"{node.http}/")
    replies = page.evaluate("""() => {
        window.client = new PingPong("/ws/", {autoConnect: false});
        const waiting = [];
        for (let n = 0; n < 40; n++) waiting.push(window.client.subscribe("room:" + n).then(reply => reply.type));
        window.client.connect();  // the 40 parked subscribes go out on open
        return Promise.all(waiting);
    }""")
    assert replies == ["subscribed"] * 40
    assert page.evaluate("[window.client.state, window.client.lastClose]") == ["open", None]


def test_pingpong_js_stops_on_4401_without_a_way_to_get_a_token(page, daphne_nodes):
    node = daphne_nodes(env={**NODE_ENV, "PINGPONG_TOKEN_SECRET": TOKEN_SECRET})
    page.goto(f"{node.http}/")
    page.evaluate("window.client = new PingPong('/ws/', {token: 'not-a-token'})")
    page.wait_for_function("window.client.state === 'stopped'")
    assert page.evaluate("window.client.lastClose") == 4401
    page.wait_for_timeout(2_000)  # longer than the first backoff step could be
    assert page.evaluate("[window.client.state, window.client.reconnects]") == ["stopped", 0]


def test_pingpong_js_gets_a_new_token_after_4401_and_reconnects_as_its_user(page, daphne_nodes, settings):
    from pingpong import tokens

    settings.PINGPONG_TOKEN_SECRET = TOKEN_SECRET
    good = tokens.issue("42", ttl=3600)
    node = daphne_nodes(env={**NODE_ENV, "PINGPONG_TOKEN_SECRET": TOKEN_SECRET})
    page.goto(f"{node.http}/")
    page.evaluate(
        "good => { window.client = new PingPong('/ws/', {token: 'not-a-token', getToken: () => good}); }", good
    )
    page.wait_for_function("window.client.lastClose === 4401 && window.client.state === 'open'", timeout=RECONNECT_WAIT)
    # user:42 is only for user 42: the new token is the one in use.
    assert page.evaluate("window.client.subscribe('user:42').then(reply => reply.type)") == "subscribed"


def test_pingpong_js_refreshes_an_expiring_token_and_is_not_closed_at_its_exp(page, daphne_nodes, settings):
    from pingpong import tokens

    settings.PINGPONG_TOKEN_SECRET = TOKEN_SECRET
    node = daphne_nodes(env={**NODE_ENV, "PINGPONG_TOKEN_SECRET": TOKEN_SECRET})
    page.goto(f"{node.http}/")
    # Issued once the node and the page are up (a slow start must not expire it first); under
    # TOKEN_WARNING_SECONDS, so token_expiring comes at once.
    short = tokens.issue("42", ttl=8)
    expires_at = tokens.verify(short).expires_at
    later = tokens.issue("42", ttl=3600)
    page.evaluate(
        """([short, later]) => {
            window.refreshed = null;
            window.client = new PingPong('/ws/', {token: short, getToken: () => later});
            window.client.on("authenticated", event => { window.refreshed = event.expires_at; });
        }""",
        [short, later],
    )
    page.wait_for_function("window.refreshed !== null")
    assert page.evaluate("window.refreshed") > expires_at
    page.wait_for_function("exp => Date.now() / 1000 > exp + 1", arg=expires_at, timeout=SHORT_WAIT + 8_000)
    assert page.evaluate("[window.client.state, window.client.lastClose]") == ["open", None]


# Topic history: what the page says after a reconnect, and what pingpong.js gives the application.


def api_publish(node: DaphneNode, topic: str, data: object) -> None:
    """POST /api/publish to `node` (NODE_ENV's token is the API token under its old name); it must be accepted."""
    assert processes.api_publish(node, topic, data, token=TOKEN) == 202


def listed_publications(page, topic: str) -> list[str]:
    """The data of the publications of `topic` the page lists, oldest first."""
    return page.locator(f'#publications li[data-topic="{topic}"] .data').all_inner_texts()[::-1]


def subscribed_on_the_page(page, topic: str) -> None:
    from playwright.sync_api import expect

    page.wait_for_function("window.pingpong.state === 'open'")
    subscribe_on_the_page(page, topic)
    expect(page.locator(f'#subscriptions li[data-topic="{topic}"]')).to_have_attribute("data-state", "subscribed")


def reconnected(page) -> None:
    page.wait_for_function("window.pingpong.state === 'open' && window.pingpong.reconnects > 0", timeout=RECONNECT_WAIT)


@pytest.mark.redis
def test_page_recovers_what_was_published_while_its_server_was_down_each_once_in_order(
    page, daphne_nodes, redis_server
):
    from playwright.sync_api import expect

    env = {**NODE_ENV, "REDIS_URL": redis_server.url}
    node, publisher = daphne_nodes(env=env), daphne_nodes(env=env)
    topic = f"public:page-{uuid.uuid4().hex[:8]}"
    page.goto(f"{node.http}/")
    subscribed_on_the_page(page, topic)
    api_publish(publisher, topic, {"n": 1})
    expect(page.locator(f'#publications li[data-topic="{topic}"]')).to_have_count(1)

    node.kill()  # the page is away while the other node publishes three times
    expect(page.locator("#state")).to_have_attribute("data-state", re.compile("^(closed|connecting)$"))
    for n in (2, 3, 4):
        api_publish(publisher, topic, {"n": n})
    daphne_nodes(env=env, port=node.port)
    reconnected(page)

    label = page.locator(f'#subscriptions li[data-topic="{topic}"] .topic-recovery')
    expect(label).to_have_text("recovered 3 missed")
    # A live one after the join: everything before it has arrived, so the list is complete here.
    api_publish(publisher, topic, {"n": 5})
    expect(page.locator(f'#publications li[data-topic="{topic}"]')).to_have_count(5)
    assert listed_publications(page, topic) == [json.dumps({"n": n}, separators=(",", ":")) for n in range(1, 6)]
    recoveries = page.evaluate("window.pingpong.recoveries")
    assert [(r["topic"], r["recovered"], r["missed"], r["offset"]) for r in recoveries] == [(topic, True, 3, 4)]


@pytest.mark.redis
def test_page_says_history_lost_when_redis_was_flushed_while_it_was_away(page, daphne_nodes, redis_server):
    from playwright.sync_api import expect
    from redis import Redis

    env = {**NODE_ENV, "REDIS_URL": redis_server.url}
    node = daphne_nodes(env=env)
    topic = f"public:page-{uuid.uuid4().hex[:8]}"
    page.goto(f"{node.http}/")
    subscribed_on_the_page(page, topic)
    api_publish(node, topic, "before")
    expect(page.locator(f'#publications li[data-topic="{topic}"]')).to_have_count(1)

    node.kill()
    with Redis.from_url(redis_server.url) as redis:
        redis.flushall()  # the history (and its epoch) is gone
    returned = daphne_nodes(env=env, port=node.port)
    reconnected(page)

    label = page.locator(f'#subscriptions li[data-topic="{topic}"] .topic-recovery')
    expect(label).to_have_text("history lost, reloaded")
    # Reloaded: what the page listed may have a gap after it, so it starts over from the new epoch.
    api_publish(returned, topic, "after")
    expect(page.locator(f'#publications li[data-topic="{topic}"]')).to_have_count(1)
    assert listed_publications(page, topic) == ['"after"']
    recovery = page.evaluate("window.pingpong.recoveries")[0]
    assert (recovery["recovered"], recovery["missed"]) == (False, None)


def test_pingpong_js_never_gives_the_application_a_publication_it_already_had(page, daphne_nodes):
    # The embedded layer keeps history too: one node, no Redis.
    node = daphne_nodes(env=NODE_ENV)
    page.goto(f"{node.http}/")
    page.evaluate("""() => {
        window.got = [];
        window.client = new PingPong("/ws/");
        window.client.on("publication", event => { window.last = event; });
        return window.client.subscribe("public:dedup", data => window.got.push(data));
    }""")
    api_publish(node, "public:dedup", 1)
    page.wait_for_function("window.got.length === 1")
    # The same offset again, as a server that sent it twice would: dropped. The next one is not.
    page.evaluate("window.client.socket.onmessage({data: JSON.stringify(window.last)})")
    api_publish(node, "public:dedup", 2)
    page.wait_for_function("window.got.length >= 2")
    assert page.evaluate("window.got") == [1, 2]
    assert page.evaluate("window.client.position('public:dedup').offset") == 2
