"""The `loadtest` command against a real daphne node: results, JSON, and one-line errors."""

import asyncio
import json

import pytest

from pingpong.loadtest import LoadtestError, loadtest_url, origin_for, percentiles
from tests.processes import free_port, manage
from tests.wsclient import ws_connect

# The node under load must not rate-limit the closed loop.
UNLIMITED = {"PINGPONG_RATE_PER_SECOND": "0"}


@pytest.fixture(scope="module")
def node(module_daphne_nodes):
    """One node for the module's tests that leave it as they found it."""
    return module_daphne_nodes(env=UNLIMITED)


def loadtest(*args: str):
    return manage("loadtest", *args, env={})


@pytest.mark.slow
def test_json_result_counts_every_connection_and_the_messages(node):
    run = loadtest(node.ws, "--connections", "2", "--duration", "1", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["opened"], result["failed"], result["connections"]) == (2, 0, 2)
    assert result["messages"] > 0
    assert set(result["rtt_ms"]) == {"p50", "p90", "p99", "max"}
    assert result["close_codes"] == {} and result["errors"] == {}


@pytest.mark.slow
def test_text_result_names_connections_rate_percentiles_and_close_codes(node):
    run = loadtest(node.ws, "--connections", "2", "--duration", "1", "--ramp-up", "0.2")
    assert run.returncode == 0, run.stderr
    for label in ("2 opened, 0 failed", "msg/s", "p50", "p90", "p99", "max", "close codes"):
        assert label in run.stdout


@pytest.mark.slow
def test_close_codes_from_the_server_are_reported(daphne_nodes):
    limited = daphne_nodes(env={"PINGPONG_RATE_PER_SECOND": "1", "PINGPONG_RATE_BURST": "2"})
    run = loadtest(limited.ws, "--connections", "2", "--duration", "1", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["close_codes"] == {"4008": 2}
    assert result["errors"] == {"error:rate_limited": 2}


def test_a_server_that_answers_something_else_is_one_line_error(node):
    run = loadtest(node.ws.replace("/ws/", "/ws/echo/"), "--connections", "1", "--duration", "1")
    assert run.returncode != 0
    assert "instead of 'pong!'" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
async def test_a_full_node_is_reported_with_its_own_explanation(daphne_nodes):
    full = daphne_nodes(env={"PINGPONG_MAX_CONNECTIONS": "1"})
    async with await ws_connect(full.ws):  # takes the only place
        run = await asyncio.to_thread(loadtest, full.ws, "--duration", "1")
    assert run.returncode != 0
    # Either the error event or the close frame arrives first; both name the reason.
    assert "refused the first connection" in run.stderr or "code 4013" in run.stderr
    assert "full" in run.stderr


def test_a_refused_connection_is_one_line_error():
    run = loadtest(f"ws://127.0.0.1:{free_port()}/ws/", "--duration", "1")
    assert run.returncode != 0
    assert "connection refused" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_url_that_is_not_a_websocket_url_is_one_line_error():
    run = loadtest("http://127.0.0.1:8000/ws/")
    assert run.returncode != 0
    assert "not a websocket URL" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_disallowed_origin_is_explained(node):
    run = loadtest(node.ws, "--origin", "http://elsewhere.example", "--duration", "1")
    assert "HTTP 403" in run.stderr and "--origin" in run.stderr


@pytest.mark.parametrize("url", ["ws://:80/ws/", "ws://host:notaport/", "ftp://host/"])
def test_loadtest_url_refuses_unusable_urls(url):
    with pytest.raises(LoadtestError):
        loadtest_url(url)


def test_default_origin_is_the_same_site_over_http():
    assert origin_for("ws://127.0.0.1:8000/ws/") == "http://127.0.0.1:8000"
    assert origin_for("wss://example.com/ws/") == "https://example.com"


def test_percentiles_use_the_nearest_rank():
    assert percentiles([float(n) for n in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
