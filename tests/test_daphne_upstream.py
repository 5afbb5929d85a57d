"""daphne's own websocket and HTTP tests, run against PingpongServer and ExactWebSocketProtocol.

The tests come from the sdist of the installed daphne (`tests/upstream.py`, fetched at test time)
and run in a pytest subprocess inside it with `tests/daphne_plugin.py`, which makes every server
they start a PingpongServer and fails any upstream test whose servers were not ours.
"""

import re
import subprocess
from pathlib import Path

import pytest

from tests import daphne_plugin
from tests.upstream import RUN_TIMEOUT_SECONDS, deselected_are_covered, pytest_in_sdist, upstream_sdist

UPSTREAM_FILES = (
    "tests/test_websocket.py",
    "tests/test_http_protocol.py",
    "tests/test_http_request.py",
    "tests/test_http_response.py",
)

# Upstream tests of a behaviour we change on purpose: node id -> (why, our test that covers ours).
# None as of daphne 4.2.3: no upstream test sends an empty frame, fills a client's pending bytes or
# stops a server with connections open, so every one of them passes on our classes.
DESELECTED: dict[str, tuple[str, str]] = {}


def upstream_run(tmp_path: Path, *args: str, stock: bool = False) -> subprocess.CompletedProcess[str]:
    """Run pytest in daphne's sdist with our plugin; `stock` leaves daphne's own Server in place."""
    env = {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        # daphne's TestApplication keeps its messages in gettempdir(): one directory per run, so
        # concurrent runs on this machine (other worktrees, CI jobs) never read each other's.
        "TMPDIR": str(tmp_path),
        "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis"),
        "PINGPONG_UPSTREAM_RECORD": str(tmp_path / "servers.record"),
    }
    if stock:
        env["PINGPONG_UPSTREAM_STOCK"] = "1"
    # no:django: the plugin sets Django up; daphne's tests run as upstream runs them.
    return pytest_in_sdist(
        upstream_sdist("daphne"), *args, config="pyproject.toml", plugins=("no:django", "tests.daphne_plugin"), env=env
    )


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 30)
def test_daphnes_own_websocket_and_http_tests_pass_on_our_server_classes(tmp_path):
    """Every upstream websocket and HTTP test, bar the deselected, passes with PingpongServer serving."""
    deselect = [arg for node_id in DESELECTED for arg in ("--deselect", node_id)]
    result = upstream_run(tmp_path, *UPSTREAM_FILES, *deselect)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if DESELECTED:
        assert f"{len(DESELECTED)} deselected" in output, f"a deselected node id no longer exists:\n{output}"
    summary = re.search(rf"{daphne_plugin.SUMMARY_PREFIX} (\d+)/(\d+) PingpongServer, (\d+)/(\d+) websockets", output)
    assert summary is not None, output
    ours_servers, servers, ours_websockets, websockets = map(int, summary.groups())
    assert ours_servers == servers > 0, summary.group(0)
    assert ours_websockets == websockets > 0, summary.group(0)


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 30)
def test_an_upstream_test_fails_when_stock_daphne_serves_it(tmp_path):
    """The plugin's check is live: with daphne's own Server left in place, a passing upstream test errors."""
    result = upstream_run(tmp_path, "tests/test_websocket.py::TestWebsocket::test_accept", stock=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "not our server: ['daphne.server.Server daphne.ws_protocol.WebSocketProtocol']" in output, output


def test_every_deselected_upstream_test_names_one_of_ours_that_exists():
    """Each deselected upstream test has a reason and a test of ours, in this repo, covering our behaviour."""
    deselected_are_covered(DESELECTED)
