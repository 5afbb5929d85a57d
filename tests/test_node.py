"""The node's connection bookkeeping: the node cap, the per-address cap and their release."""

import asyncio
import json

import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from pingpong import protocol
from pingpong.node import Admission, Node, address_key
from tests.communicators import communicator, connected
from tests.processes import SERVERS, DaphneNode
from tests.wsclient import close_code, next_event, ping_pong, ws_connect


class Connection:
    """A stand-in for a consumer: the node only needs something it can close."""

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Nothing to close."""


# --- Node bookkeeping -----------------------------------------------------------------------


def test_an_address_at_its_cap_is_refused_while_another_address_is_admitted():
    """The per-address cap counts each address on its own."""
    node = Node()
    assert node.admit(Connection(), limit=0, address="10.0.0.1", address_limit=2) is Admission.ADMITTED
    assert node.admit(Connection(), limit=0, address="10.0.0.1", address_limit=2) is Admission.ADMITTED
    assert node.admit(Connection(), limit=0, address="10.0.0.1", address_limit=2) is Admission.ADDRESS_FULL
    assert node.admit(Connection(), limit=0, address="10.0.0.2", address_limit=2) is Admission.ADMITTED
    assert node.per_address == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert len(node.connections) == 3


def test_release_frees_the_address_slot_with_the_node_slot():
    """Releasing a connection counts it out of the node and its address at once."""
    node = Node()
    first, second = Connection(), Connection()
    node.admit(first, limit=0, address="10.0.0.1", address_limit=1)
    assert node.admit(second, limit=0, address="10.0.0.1", address_limit=1) is Admission.ADDRESS_FULL
    node.release(first)
    assert node.admit(second, limit=0, address="10.0.0.1", address_limit=1) is Admission.ADMITTED
    assert node.per_address == {"10.0.0.1": 1} and node.connections == {second}


def test_an_address_with_no_connections_left_has_no_entry():
    """Entries are removed at zero, so the map cannot grow with every address ever seen."""
    node = Node()
    connections = [Connection() for _ in range(100)]
    for number, connection in enumerate(connections):
        node.admit(connection, limit=0, address=f"10.0.{number // 10}.{number}", address_limit=5)
    for connection in connections:
        node.release(connection)
    assert node.per_address == {} and not node.connections


def test_a_refused_connection_is_not_counted_and_its_release_changes_nothing():
    """Only admitted connections count; releasing a refused or already released one is a no-op."""
    node = Node()
    admitted, refused = Connection(), Connection()
    node.admit(admitted, limit=1, address="10.0.0.1", address_limit=5)
    assert node.admit(refused, limit=1, address="10.0.0.9", address_limit=5) is Admission.FULL
    node.release(refused)
    node.release(admitted)
    node.release(admitted)
    assert node.per_address == {} and not node.connections


def test_cap_zero_and_an_unknown_address_are_not_capped():
    """Limit 0 means no cap; a connection without a client address is counted by the node only."""
    node = Node()
    assert all(node.admit(Connection(), limit=0, address="10.0.0.1", address_limit=0) for _ in range(50))
    assert all(node.admit(Connection(), limit=0, address=None, address_limit=1) for _ in range(5))
    assert node.per_address == {"10.0.0.1": 50}


def test_a_draining_node_refuses_before_counting_anything():
    """Draining is answered first; the refused connection leaves no trace."""
    node = Node()
    node.draining = True
    assert node.admit(Connection(), limit=0, address="10.0.0.1", address_limit=1) is Admission.DRAINING
    assert not Admission.DRAINING and Admission.ADMITTED
    assert node.per_address == {}


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("not-an-ip", "not-an-ip"),
        (None, None),
        ("", None),
    ],
)
def test_ipv4_is_counted_per_address_and_ipv6_per_64(host, key):
    """An IPv6 host may use any address of its /64, so the /64 is what counts."""
    assert address_key(host) == key


# --- the consumer, in process ---------------------------------------------------------------


def limit_hits(limit: str) -> float:
    return REGISTRY.get_sample_value("pingpong_limit_hits_total", {"limit": limit}) or 0.0


async def test_connection_over_the_per_address_cap_gets_an_error_event_and_4013(settings):
    """The refused client is told why, closed with 4013, and counted in the limit metric."""
    settings.PINGPONG_MAX_CONNECTIONS_PER_IP = 1
    before = limit_hits("connections_per_ip")
    first = await connected(client=("198.51.100.1", 5000))
    refused = communicator(client=("198.51.100.1", 5001))
    accepted, _ = await refused.connect()
    assert accepted
    event = json.loads(await refused.receive_from())
    assert event["error"] == protocol.ERROR_TOO_MANY_CONNECTIONS
    assert (await refused.receive_output())["code"] == protocol.CloseCode.TRY_AGAIN_LATER
    assert limit_hits("connections_per_ip") == before + 1
    other = await connected(client=("198.51.100.2", 5000))
    await other.send_to(text_data="ping")
    assert await other.receive_from() == "pong!"
    for ws in (first, refused, other):
        await ws.disconnect()


# --- real daphne processes ------------------------------------------------------------------

CAP = 3


async def open_from(node: DaphneNode, count: int, **options: object) -> list[ClientConnection]:
    """`count` websockets that each answered a ping (the server admitted them)."""
    clients = [await ws_connect(node.ws, **options) for _ in range(count)]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
    return clients


async def admitted(node: DaphneNode) -> ClientConnection | None:
    """A new websocket if the server admits it (answers a ping), else None."""
    ws = await ws_connect(node.ws)
    try:
        if await ping_pong(ws) == "pong!":
            return ws
    except ConnectionClosed:
        pass
    await ws.close()
    return None


async def refused_with(ws: ClientConnection) -> tuple[str, int | None]:
    """The error code of the first event and the close code that follows it."""
    return (await next_event(ws))["error"], await close_code(ws)


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_one_address_at_its_cap_is_refused_while_another_address_connects(daphne_nodes):
    """127.0.0.1 holds its cap and is refused with 4013; 127.0.0.2 still gets in; a close frees a slot."""
    node = daphne_nodes(env={"PINGPONG_MAX_CONNECTIONS_PER_IP": str(CAP)})
    held = await open_from(node, CAP)
    try:
        refused = await ws_connect(node.ws)
        assert await refused_with(refused) == (protocol.ERROR_TOO_MANY_CONNECTIONS, protocol.CloseCode.TRY_AGAIN_LATER)
        (other,) = await open_from(node, 1, local_addr=("127.0.0.2", 0))
        await other.close()
        await held.pop().close()
        # The server releases the slot when it handles the close; retry a bounded number of times.
        for _ in range(20):
            again = await admitted(node)
            if again is not None:
                held.append(again)
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the closed connection's slot was never released")
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_behind_the_proxy_header_two_client_addresses_are_counted_apart(daphne_nodes):
    """With PINGPONG_PROXY_HEADER=X-Real-IP the header's address is what counts, not the proxy's."""
    node = daphne_nodes(env={"PINGPONG_MAX_CONNECTIONS_PER_IP": str(CAP), "PINGPONG_PROXY_HEADER": "X-Real-IP"})
    first = {"additional_headers": {"X-Real-IP": "203.0.113.1"}}
    second = {"additional_headers": {"X-Real-IP": "203.0.113.2"}}
    held = await open_from(node, CAP, **first)
    try:
        refused = await ws_connect(node.ws, **first)
        assert await refused_with(refused) == (protocol.ERROR_TOO_MANY_CONNECTIONS, protocol.CloseCode.TRY_AGAIN_LATER)
        held += await open_from(node, CAP, **second)
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
