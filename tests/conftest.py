"""Shared fixtures: real redis-server and daphne processes owned by the test (or the module), and a clean node."""

import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from pingpong.node import node as this_node
from tests.communicators import opened_clients
from tests.processes import DaphneNode, RedisServer, SentinelServer, redis_binary

# Unit tests run on the embedded layer whatever the developer's shell says.
os.environ.pop("REDIS_URL", None)

StartNode = Callable[..., DaphneNode]


def nodes_started(server: str = "daphne") -> Iterator[StartNode]:
    """`start(env={...})` starts a node on `server` on an ephemeral port (or `port=`, to restart one where
    its clients expect it; `workers=` for `serve --workers`); every node started is closed when the scope ends."""
    started: list[DaphneNode] = []

    def start(env: dict[str, str] | None = None, *, port: int = 0, workers: int = 1) -> DaphneNode:
        node = DaphneNode(env=env, port=port, server=server, workers=workers)
        started.append(node)
        return node.start()

    try:
        yield start
    finally:
        for node in started:
            node.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable]:
    """In-process /ws/ clients: `await clients()`, `await clients(token=...)`; disconnected after the test."""
    async for connect in opened_clients():
        yield connect


@pytest.fixture(scope="module")
def server() -> str:
    """The server `daphne_nodes` runs; a test runs on both with `@pytest.mark.parametrize("server", SERVERS)`."""
    return "daphne"


@pytest.fixture
def daphne_nodes(server: str) -> Iterator[StartNode]:
    """Start nodes with `daphne_nodes(env={...})` on `server`; every one is killed after the test."""
    yield from nodes_started(server)


@pytest.fixture(scope="module")
def module_daphne_nodes(server: str) -> Iterator[StartNode]:
    """As `daphne_nodes`, for a node a whole module shares (its `node` fixture); killed after the module."""
    yield from nodes_started(server)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on its own port, killed after the test."""
    server = RedisServer(redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def node_registry_clean() -> Iterator[None]:
    """Each test starts with this process's connection registry (`pingpong.node.node`) empty, and
    leaves it empty.

    In-process consumers (WebsocketCommunicator) register with the module-level node. Every
    one a test opened must be counted out by the time its fixtures are torn down (this
    autouse fixture is torn down after them): a connection still registered is either a
    consumer that does not release on disconnect (the node's caps would leak) or a test
    that did not disconnect its communicator. Either fails here, and the registry is
    emptied anyway so the tests after it do not inherit the count. `draining` is only reset:
    tests set it with monkeypatch, whose undo may run after this check.
    """
    node_registry_reset()
    yield
    leaked = [type(connection).__name__ for connection in this_node.connections]
    node_registry_reset()
    assert not leaked, f"still registered with pingpong.node.node after the test: {leaked}"


def node_registry_reset() -> None:
    """Forget every connection and address, and stop draining."""
    this_node.connections.clear()
    this_node.per_address.clear()
    this_node._address_of.clear()
    this_node.draining = False


@pytest.fixture
def redis_sentinel(redis_server: RedisServer) -> Iterator[SentinelServer]:
    """A Sentinel watching `redis_server` as master "sentinel", password "channels_redis" (channels-redis' test setup)."""
    sentinel = SentinelServer(redis_binary(), master=redis_server, master_name="sentinel", password="channels_redis")
    sentinel.start()
    yield sentinel
    sentinel.kill()
