"""Shared fixtures: real redis-server and daphne processes owned by the test."""

import os
from collections.abc import Callable, Iterator

import pytest

from tests.processes import DaphneNode, RedisServer, SentinelServer, redis_binary

# Unit tests run on the embedded layer whatever the developer's shell says.
os.environ.pop("REDIS_URL", None)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, killed after the test."""
    server = RedisServer(redis_binary())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_sentinel(redis_server: RedisServer) -> Iterator[SentinelServer]:
    """A Sentinel watching `redis_server` as master "sentinel", password "channels_redis" (channels-redis' test setup)."""
    sentinel = SentinelServer(redis_binary(), master=redis_server, master_name="sentinel", password="channels_redis")
    sentinel.start()
    yield sentinel
    sentinel.kill()


@pytest.fixture
def daphne_nodes() -> Iterator[Callable[..., DaphneNode]]:
    """Start daphne nodes with `start(env={...})`; every one is killed after the test."""
    started: list[DaphneNode] = []

    def start(env: dict[str, str] | None = None) -> DaphneNode:
        node = DaphneNode(env=env)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.close()
