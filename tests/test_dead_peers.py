"""Dead peers: a client that stops answering protocol pings is dropped; a live one is kept (daphne and uvicorn).

Daphne sends a ping once PINGPONG_PING_INTERVAL has passed since the last one, checking
every 2 s, and autobahn drops the connection when no pong arrives within
PINGPONG_PING_TIMEOUT. So a dead peer is gone within interval + timeout + that 2 s tick.
uvicorn pings every interval on a timer of its own and drops the peer (close 1011, then TCP)
once a ping goes unanswered for the timeout.
"""

import time

import pytest

from tests.processes import SERVERS, DaphneNode, scaled
from tests.rawws import OP_PING, RawClient
from tests.wsclient import ping_pong_sync, ws_connect_sync

# Each test waits out ping intervals and timeouts by design, on both servers.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("server", SERVERS, scope="module")]

PING_INTERVAL = 1.0
PING_TIMEOUT = 1.0
# Daphne's timeout checker runs every 2 s, so a ping can go out up to 2 s late; 1 s more for a busy machine.
SLACK = 3.0
DEADLINE = PING_INTERVAL + PING_TIMEOUT + scaled(SLACK)


@pytest.fixture(scope="module")
def node(module_daphne_nodes) -> DaphneNode:
    return module_daphne_nodes(
        env={"PINGPONG_PING_INTERVAL": str(PING_INTERVAL), "PINGPONG_PING_TIMEOUT": str(PING_TIMEOUT)}
    )


def pings_until_dropped(client: RawClient, *, timeout: float) -> tuple[int, float | None]:
    """Read (and never answer) frames; how many pings came, and when TCP ended (None: it did not)."""
    started = time.monotonic()
    pings = 0
    while (left := timeout - (time.monotonic() - started)) > 0:
        client.sock.settimeout(left)
        try:
            frame = client.frame_read()
        except TimeoutError:
            return pings, None
        if frame is None:
            return pings, time.monotonic() - started
        pings += frame.opcode == OP_PING
    return pings, None


def test_client_that_never_answers_pings_is_dropped_within_interval_plus_timeout(node):
    with RawClient(node.port) as client:
        client.open()
        pings, dropped_after = pings_until_dropped(client, timeout=DEADLINE)
    assert pings >= 1, "the server never pinged the silent client"
    assert dropped_after is not None, f"the silent client was still connected after {DEADLINE:g}s"


def test_client_that_answers_pings_stays_connected_past_the_deadline(node):
    with ws_connect_sync(node.ws, ping_interval=None) as ws:
        time.sleep(DEADLINE + 1)  # the server pings at least twice meanwhile; websockets answers each
        assert ping_pong_sync(ws) == "pong!"
