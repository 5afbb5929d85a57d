"""channels-redis' own pub/sub tests, run against PingpongPubSubChannelLayer on a real Redis and Sentinel.

The tests come from the sdist of the installed channels-redis (`tests/upstream.py`, fetched at test
time) and run in a pytest subprocess inside it with `tests/channels_redis_plugin.py`, which makes
every layer they build a PingpongPubSubChannelLayer on this test's redis-server (or, for the Sentinel
suite, this test's Sentinel watching it), and fails any upstream test whose layers were not ours.
"""

import re
import subprocess
from pathlib import Path

import pytest
import redis

from tests import channels_redis_plugin
from tests.processes import LOOPBACK, RedisServer, SentinelServer
from tests.upstream import RUN_TIMEOUT_SECONDS, deselected_are_covered, pytest_in_sdist, upstream_sdist

pytestmark = pytest.mark.redis

UPSTREAM_FILES = ("tests/test_pubsub.py", "tests/test_pubsub_sentinel.py")

# Upstream tests of a behaviour we change on purpose: node id -> (why, our test that covers ours).
# None as of channels-redis 4.3.0: every pub/sub and pub/sub-over-Sentinel test passes on our layer.
DESELECTED: dict[str, tuple[str, str]] = {}


def upstream_run(
    tmp_path: Path, redis_server: RedisServer, *args: str, sentinel: SentinelServer | None = None, stock: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run pytest in channels-redis' sdist with our plugin; `stock` leaves upstream's layer class in place."""
    env = {"PINGPONG_UPSTREAM_REDIS_URL": redis_server.url}
    if sentinel is not None:
        env["PINGPONG_UPSTREAM_SENTINEL"] = f"{LOOPBACK}:{sentinel.port}"
    if stock:
        env["PINGPONG_UPSTREAM_STOCK"] = "1"
    return pytest_in_sdist(
        upstream_sdist("channels-redis"),
        *args,
        config="setup.cfg",
        plugins=("tests.channels_redis_plugin",),
        env=env,
        # Not the sdist's own copy of channels_redis (the run's cwd): the installed one, as ours uses.
        python_flags=("-P",),
    )


def redis_info(server_url: str, section: str) -> dict:
    """One INFO section of the Redis (or Sentinel) at `server_url`."""
    client = redis.Redis.from_url(server_url)
    try:
        return client.info(section)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 30)
def test_channels_redis_own_pubsub_tests_pass_on_our_layer_through_redis_and_sentinel(
    tmp_path, redis_server, redis_sentinel
):
    """Every upstream pub/sub test, bar the deselected, passes with PingpongPubSubChannelLayer as the layer."""
    deselect = [arg for node_id in DESELECTED for arg in ("--deselect", node_id)]
    result = upstream_run(tmp_path, redis_server, *UPSTREAM_FILES, *deselect, sentinel=redis_sentinel)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if DESELECTED:
        assert f"{len(DESELECTED)} deselected" in output, f"a deselected node id no longer exists:\n{output}"
    for path in UPSTREAM_FILES:
        assert re.search(rf"^{re.escape(path)}::\S+ PASSED", output, re.MULTILINE), f"nothing of {path} ran"
    summary = re.search(rf"{channels_redis_plugin.SUMMARY_PREFIX} (\d+)/(\d+) \S+, (\d+)/(\d+) ", output)
    assert summary is not None, output
    ours, layers, ours_loop, loop_layers = map(int, summary.groups())
    assert ours == layers > 0, summary.group(0)
    assert ours_loop == loop_layers > 0, summary.group(0)
    # The hosts were ours too: our Redis saw our layer's process pattern (the stock layer never
    # PSUBSCRIBEs), and our Sentinel was asked for the master.
    assert redis_info(redis_server.url, "commandstats")["cmdstat_psubscribe"]["calls"] > 0
    sentinel_url = f"redis://:{redis_sentinel.password}@{LOOPBACK}:{redis_sentinel.port}/0"
    assert redis_info(sentinel_url, "stats")["total_connections_received"] > 1  # Sentinel keeps no commandstats


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 30)
def test_an_upstream_test_fails_when_the_stock_layer_runs_it(tmp_path, redis_server):
    """The plugin's check is live: with channels-redis' own class left in place, a passing upstream test fails."""
    result = upstream_run(tmp_path, redis_server, "tests/test_pubsub.py::test_send_receive", stock=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "not our layer: ['channels_redis.pubsub.RedisPubSubChannelLayer']" in output, output


def test_every_deselected_upstream_test_names_one_of_ours_that_exists():
    """Each deselected upstream test has a reason and a test of ours, in this repo, covering our behaviour."""
    deselected_are_covered(DESELECTED)
