"""Every accepted connection is counted out exactly once, however abruptly it ends.

Raw clients against a real node capped at 100 connections, on daphne and uvicorn, on each channel
layer: 1,000 of each way of leaving. If a single one leaked, the node would end up full and refuse
everyone.
"""

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from pingpong import protocol
from tests import rawws
from tests.processes import ROOT, SERVERS, DaphneNode, http_request, scaled, wait_until
from tests.wsclient import ping_pong, ws_connect

TOKEN = "churn-token"
EACH = 1000
PING = rawws.frame_encode(opcode=rawws.OP_TEXT, payload=b"ping")
CLOSE = rawws.frame_encode(opcode=rawws.OP_CLOSE, payload=rawws.close_payload(1000))


def ping_close_fin(port: int) -> None:
    """`ping`, a close frame and FIN in one go: the `pong!` meets a closing socket."""
    client = rawws.RawClient(port).open()
    client.send(PING + CLOSE)
    client.close()


def ping_reset(port: int) -> None:
    """`ping`, then a TCP RST."""
    client = rawws.RawClient(port).open()
    client.send(PING)
    client.reset()


def read_then_leave(port: int) -> None:
    """Read a frame of the ongoing broadcast storm, then leave by FIN or RST, mid-stream."""
    client = rawws.RawClient(port).open()
    client.frame_read()
    if client.port % 2:
        client.reset()
    else:
        client.close()


def leave_in_handshake(port: int) -> None:
    """Send the upgrade request and close before reading the answer."""
    client = rawws.RawClient(port)
    client.send(rawws.handshake_request(port=port))
    client.reset()


def run_many(leave: Callable[[int], None], port: int, *, count: int = EACH) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        for result in pool.map(lambda _: leave(port), range(count)):
            assert result is None


class Storm:
    """Broadcasts posted back to back from a thread, until stopped (bounded in count)."""

    def __init__(self, node: DaphneNode) -> None:
        self.node, self.stopped, self.sent = node, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Storm":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        while not self.stopped.is_set() and self.sent < 100_000:
            body = json.dumps({"text": "storm"}).encode()
            status, _ = http_request(f"{self.node.http}/api/broadcast", method="POST", body=body, headers=headers)
            assert status == 202
            self.sent += 1


@pytest.fixture
def capped_node(layer, request, daphne_nodes):
    """A node capped at 100 connections, on the embedded layer or a real Redis."""
    env = {"PINGPONG_MAX_CONNECTIONS": "100", "PINGPONG_BROADCAST_TOKEN": TOKEN, "PINGPONG_RATE_PER_SECOND": "0"}
    if layer == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    return daphne_nodes(env)


# Both layers on daphne, and uvicorn on Redis (the layer its deployments use): the fourth pairing
# added a minute to CI and no path of its own.
@pytest.mark.slow
@pytest.mark.parametrize(("server", "layer"), [("daphne", "embedded"), ("daphne", "redis"), ("uvicorn", "redis")])
async def test_a_thousand_of_every_abrupt_ending_leave_nothing_counted(capped_node):
    """ping+close+FIN, ping+RST, leaving mid-storm and mid-handshake, 1,000 each: gauge 0, stats 0, no traceback."""
    node = capped_node
    run_many(ping_close_fin, node.port)
    run_many(ping_reset, node.port)
    with Storm(node) as storm:
        run_many(read_then_leave, node.port)
    assert storm.sent > 0
    run_many(leave_in_handshake, node.port)
    wait_until(lambda: node.metric("pingpong_connections_open") == 0, timeout=15, what="every connection counted out")
    assert node.metric("pingpong_connections_opened_total", 'path="/ws/"') >= 3 * EACH
    _, body = http_request(f"{node.http}/api/stats")
    assert json.loads(body)["connections"] == 0
    log = node.output()
    assert "Traceback" not in log
    assert " ERROR " not in log
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == protocol.PONG


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_a_drain_after_abrupt_endings_has_nothing_left_to_wait_for(daphne_nodes):
    """Connections that ended abruptly are not waited for when the node drains."""
    node = daphne_nodes({"PINGPONG_RATE_PER_SECOND": "0"})
    run_many(ping_close_fin, node.port, count=100)
    run_many(ping_reset, node.port, count=100)
    wait_until(lambda: node.metric("pingpong_connections_open") == 0, timeout=10, what="every connection counted out")
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=20) == 0
    assert "drained" not in node.output()  # logged only when there were connections to wait for


@pytest.mark.slow
def test_handshakes_dropped_by_the_handshake_timeout_are_counted_out(daphne_nodes):
    """2,000 handshakes at once against a 0.05 s handshake timeout: some are dropped, none stays counted open."""
    node = daphne_nodes({"PINGPONG_HANDSHAKE_TIMEOUT": "0.05", "PINGPONG_MAX_CONNECTIONS_PER_IP": "0"})
    burst = subprocess.run(
        [sys.executable, "-m", "tests.burst", node.ws, "2000", "--timeout", "30"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    report = json.loads(burst.stdout)
    assert report["opened"] < 2000  # the timeout did drop handshakes: the path under test ran
    wait_until(lambda: node.metric("pingpong_connections_open") == 0, timeout=30, what="every connection counted out")
    log = node.output()
    assert log.count(" open id=") == log.count(" close id=")
    assert "Traceback" not in log
