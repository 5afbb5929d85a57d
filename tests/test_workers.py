"""`manage.py serve --workers N`: the count, the supervisor, and two real workers on one port with Redis."""

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from pingpong import protocol, workers
from tests.processes import (
    SERVERS,
    DaphneNode,
    RedisServer,
    api_broadcast,
    http_request,
    manage,
    redis_binary,
    wait_until,
)
from tests.wsclient import broadcasts_within, close_code, ping_pong, ws_connect

TOKEN = "workers-test-token"
# Enough connections that SO_REUSEPORT's hash puts some on each of two workers (each lands on one
# worker with probability 1/2: all of 40 on one has odds of 2 in 10^12).
MAX_CLIENTS = 40


def test_workers_takes_auto_or_a_whole_number_of_at_least_one():
    assert workers.count_parse("auto") == "auto"
    assert workers.count_parse("3") == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError):
            workers.count_parse(bad)


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("max 100000\n", None), ("150000 100000\n", 2), ("100000 100000\n", 1), ("", None)]
)
def test_a_cgroup_v2_cpu_quota_is_read_as_whole_cpus_rounded_up(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert workers.cgroup_cpu_limit(v2=tmp_path / "cpu.max", v1=tmp_path / "none") == expected


def test_a_cgroup_v1_cpu_quota_counts_too(tmp_path):
    (tmp_path / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.cgroup_cpu_limit(v2=tmp_path / "none", v1=tmp_path) == 2


def test_auto_is_never_more_than_the_cpus_this_process_may_run_on():
    assert 1 <= workers.cpus_available() <= len(os.sched_getaffinity(0))


def test_more_than_one_worker_without_redis_is_refused_in_one_sentence():
    result = manage("serve", "--port", "0", "--workers", "2", env={"REDIS_URL": ""})
    assert result.returncode != 0
    assert "--workers 2 needs REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_supervisor_restarts_a_dying_worker_a_bounded_number_of_times_then_exits_1(caplog):
    """Workers that exit at once are restarted `count` times in the window, then the supervisor gives up."""
    supervisor = workers.Supervisor(
        count=2,
        command=lambda index: [sys.executable, "-c", "raise SystemExit(3)"],
        env=lambda index: {},
        drain_seconds=1,
    )
    assert supervisor.run() == 1
    assert caplog.text.count("restarting it") == 2
    assert "giving up" in caplog.text


# --- two real workers on one port, with Redis ---


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One redis-server for the module's shared two-worker node."""
    server = RedisServer(redis_binary()).start()
    try:
        yield server
    finally:
        server.close()


def workers_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    # A 3 s presence TTL: each worker rewrites its count every 0.5 s.
    return {"REDIS_URL": redis.url, "PINGPONG_BROADCAST_TOKEN": TOKEN, "PINGPONG_PRESENCE_TTL": "3", **extra}


@pytest.fixture(scope="module", params=SERVERS)
def two_workers(request, redis_module) -> Iterator[DaphneNode]:
    """`serve --workers 2` on daphne and on uvicorn, shared by the tests that leave it as they found it."""
    node = DaphneNode(env=workers_env(redis_module), server=request.param, workers=2).start(timeout=60)
    try:
        yield node
    finally:
        node.close()


def worker_connections(node: DaphneNode) -> dict[str, float]:
    """pingpong_worker_connections_open per worker, from /metrics."""
    _, body = http_request(f"{node.http}/metrics")
    found = {}
    for line in body.decode().splitlines():
        if line.startswith("pingpong_worker_connections_open{"):
            sample, _, value = line.rpartition(" ")
            found[sample.split('worker="')[1].split('"')[0]] = float(value)
    return found


async def clients_on_every_worker(node: DaphneNode, *, count: int = 2) -> list[ClientConnection]:
    """Open websockets until `count` workers hold at least one (each answers `ping` first)."""
    clients: list[ClientConnection] = []
    while len(clients) < MAX_CLIENTS:
        clients.append(ws := await ws_connect(node.ws))
        assert await ping_pong(ws) == "pong!"
        holding = await asyncio.to_thread(worker_connections, node)
        if len(clients) >= 2 and sum(1 for n in holding.values() if n > 0) >= count:
            return clients
    raise AssertionError(f"{MAX_CLIENTS} connections did not land on {count} workers: {holding}")


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in clients))


@pytest.mark.redis
async def test_connections_land_on_both_workers_and_stats_lists_each_worker(two_workers):
    clients = await clients_on_every_worker(two_workers)
    try:
        holding = await asyncio.to_thread(worker_connections, two_workers)

        def stats_match() -> bool:
            _, body = http_request(f"{two_workers.http}/api/stats")
            stats = json.loads(body)
            return stats["connections"] == len(clients) and stats["nodes"] == holding

        await asyncio.to_thread(wait_until, stats_match, timeout=5, what="/api/stats to list both workers' counts")
    finally:
        await close_all(clients)


@pytest.mark.redis
async def test_a_broadcast_reaches_the_clients_of_both_workers_once(two_workers):
    clients = await clients_on_every_worker(two_workers)
    try:
        assert await asyncio.to_thread(api_broadcast, two_workers, "to every worker", token=TOKEN) == 202
        for ws in clients:
            assert [e["text"] for e in await broadcasts_within(ws, seconds=1)] == ["to every worker"]
    finally:
        await close_all(clients)


@pytest.mark.redis
async def test_metrics_on_the_shared_port_report_the_sum_of_both_workers(two_workers):
    """Whichever worker answers /metrics, the connections gauge and the loop-local counters are the group's."""
    before = await asyncio.to_thread(two_workers.metric, "pingpong_messages_received_total", 'kind="ping"')
    clients = await clients_on_every_worker(two_workers)  # one ping each
    try:
        for _ in range(4):  # several scrapes, so both workers are likely to answer one
            holding = await asyncio.to_thread(worker_connections, two_workers)
            assert sum(holding.values()) == len(clients)
            assert await asyncio.to_thread(two_workers.metric, "pingpong_connections_open") == len(clients)

        def pings_counted() -> bool:
            after = two_workers.metric("pingpong_messages_received_total", 'kind="ping"')
            return after - before == len(clients)

        await asyncio.to_thread(wait_until, pings_counted, timeout=5, what="every worker's pings in /metrics")
    finally:
        await close_all(clients)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_sigterm_drains_every_worker_with_4012_and_exits_0(redis_server, server):
    node = DaphneNode(env=workers_env(redis_server, PINGPONG_DRAIN_SECONDS="5"), server=server, workers=2)
    try:
        node.start(timeout=60)
        clients = await clients_on_every_worker(node)
        node.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(close_code(ws) for ws in clients))
        assert codes == [protocol.CloseCode.SERVICE_RESTART] * len(clients)
        assert await asyncio.to_thread(node.wait, 5 + workers.EXIT_MARGIN_SECONDS + 5) == 0
        assert node.output().count("drained ") == 2
        assert "all workers stopped (exit 0)" in node.output()
    finally:
        node.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_a_worker_killed_with_sigkill_is_restarted_and_the_other_keeps_its_clients(redis_server, server):
    node = DaphneNode(env=workers_env(redis_server), server=server, workers=2)
    try:
        node.start(timeout=60)
        clients = await clients_on_every_worker(node)
        pids = node.worker_pids()
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        await asyncio.to_thread(
            wait_until,
            lambda: node.worker_pids()[0] != victim and node.output().count("listening on http://") == 3,
            timeout=60,
            what="worker 0 to be restarted and listen",
        )
        survivors = []
        for ws in clients:
            try:
                survivors.append(await ping_pong(ws))
            except ConnectionClosed:  # the victim's clients lost their TCP connection (1006)
                pass
        assert survivors and all(answer == "pong!" for answer in survivors)
        # The dead worker's series left /metrics; the restarted one is there.
        holding = await asyncio.to_thread(worker_connections, node)
        assert len(holding) == 2
        assert sum(holding.values()) == len(survivors)
        assert "exited with -9; restarting it" in node.output()
        await close_all(clients)
    finally:
        node.close()
