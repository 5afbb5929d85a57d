"""The live page, end to end in headless Chromium against real daphne and uvicorn processes.

Debian's `chromium` package driven by Playwright through `executable_path`: no browser
download. Skipped without Chromium or Playwright unless PINGPONG_REQUIRE_BROWSER is set.
Screenshots (server down, and back) are left in artifacts/ for a human to look at.
"""

import os
import re
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.processes import ROOT, SERVERS, DaphneNode, api_broadcast

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
