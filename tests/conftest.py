"""Shared fixtures: real redis-server and daphne processes owned by the test."""

import os
from collections.abc import Callable, Iterator

import pytest

from tests.processes import DaphneNode, RedisServer, redis_binary

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
def server() -> str:
    """The server `daphne_nodes` runs; a test runs on both with `@pytest.mark.parametrize("server", SERVERS)`."""
    return "daphne"


@pytest.fixture
def daphne_nodes(server: str) -> Iterator[Callable[..., DaphneNode]]:
    """Start nodes with `start(env={...})` on `server`; every one is killed after the test."""
    started: list[DaphneNode] = []

    def start(env: dict[str, str] | None = None) -> DaphneNode:
        node = DaphneNode(env=env, server=server)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.close()
