"""Broadcasts are safe to retry: ids, "not sent" versus "unknown", and at most once per client per id."""

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection

from pingpong import broadcast, metrics, protocol
from pingpong.broadcast import BroadcastInvalid, SeenBroadcasts
from pingpong.serving import SEND_NOWAIT
from tests.communicators import ask, communicator, connected
from tests.processes import LOOPBACK, SERVERS, DaphneNode, RedisServer, http_request, manage, wait_until
from tests.wsclient import broadcasts_on_each, next_event, ping_pong, ws_connect

TOKEN = "broadcast-test-token"


# --- the request ---------------------------------------------------------------------------


def test_a_request_without_an_id_gets_a_new_one():
    """Two requests without an id get two different, valid ids."""
    first, second = broadcast.request_from({"text": "a"}), broadcast.request_from({"text": "a"})
    assert first.id != second.id
    assert broadcast.request_from({"text": "a", "id": first.id}).id == first.id


@pytest.mark.parametrize(
    "broadcast_id",
    ["", "x" * (protocol.BROADCAST_ID_MAX_CHARS + 1), "has space", "a/b", "caf\u00e9", "new\nline", 5, None, ["x"]],
    ids=["empty", "too-long", "space", "slash", "non-ascii", "newline", "number", "null", "list"],
)
def test_an_id_outside_the_charset_or_length_is_refused(broadcast_id: Any):
    """An id must be a string of 1-64 characters from A-Z a-z 0-9 . _ : -."""
    with pytest.raises(BroadcastInvalid, match='"id"'):
        broadcast.request_from({"text": "hi", "id": broadcast_id})


def test_an_id_of_the_longest_length_from_every_allowed_character_is_accepted():
    """The whole charset, at the length limit, is a valid id."""
    broadcast_id = ("AZaz09._:-" * 7)[: protocol.BROADCAST_ID_MAX_CHARS]
    assert broadcast.request_from({"text": "hi", "id": broadcast_id}).id == broadcast_id


# --- the per-node record of first attempts --------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_copy_of_the_first_attempt_is_admitted_and_no_copy_of_a_retry():
    """Each consumer's copy of the first attempt passes; every copy of a later attempt is dropped."""
    seen = SeenBroadcasts(window=300, limit=10)
    assert [seen.admit("x", "first") for _ in range(3)] == [True, True, True]
    assert [seen.admit("x", "retry") for _ in range(3)] == [False, False, False]
    assert seen.admit("y", "retry")


def test_an_id_is_remembered_for_the_window_and_forgotten_after_it():
    """A retry inside the window is dropped; after the window the id is delivered anew."""
    clock = Clock()
    seen = SeenBroadcasts(window=300, limit=10, clock=clock)
    seen.admit("x", "first")
    clock.now = 299.9
    assert not seen.admit("x", "retry")
    clock.now = 300.0
    assert seen.admit("x", "late retry")
    clock.now = 700.0
    seen.admit("y", "first")
    assert len(seen) == 1, "expired ids are forgotten as new ones arrive"


def test_the_record_stops_at_its_limit_and_forgets_the_oldest_ids_first():
    """Past the limit the record does not grow: the oldest ids go first and are counted."""
    limit = 100
    seen = SeenBroadcasts(window=300, limit=limit)
    for number in range(limit * 10):
        seen.admit(f"id-{number}", "a")
        assert len(seen) <= limit
    assert len(seen) == limit
    assert seen.evicted == limit * 9
    assert not seen.admit(f"id-{limit * 10 - 1}", "retry"), "the newest ids are still remembered"
    assert seen.admit("id-0", "retry"), "the oldest were forgotten early"


def test_the_node_record_keeps_ids_for_at_least_five_minutes():
    """The window promised to callers; the limit bounds it at 33 broadcasts/s."""
    assert protocol.BROADCAST_DEDUP_SECONDS >= 300
    assert protocol.BROADCAST_DEDUP_MAX_IDS / protocol.BROADCAST_DEDUP_SECONDS >= 30


def test_a_message_from_a_sender_without_ids_is_delivered():
    """A broadcast message without id and attempt (an older node) is always delivered."""
    message = {"type": protocol.BROADCAST_MESSAGE, "event": "{}"}
    assert broadcast.deliverable(message) and broadcast.deliverable(message)


# --- through consumers on the in-memory layer ---------------------------------------------


async def test_two_attempts_of_one_id_reach_each_client_once():
    """A retry (same id, a new attempt) is dropped by every consumer that had the first attempt."""
    clients = [await connected() for _ in range(3)]
    broadcast_id = f"retry-{uuid.uuid4().hex}"
    first = await broadcast.send(text="once", broadcast_id=broadcast_id)
    await broadcast.send(text="once", broadcast_id=broadcast_id)
    for ws in clients:
        assert json.loads(await ws.receive_from()) == first
        assert await ws.receive_nothing(timeout=0.1)
        await ws.disconnect()


async def test_distinct_ids_are_all_delivered_in_order():
    """Broadcasts with different ids, and the same text, all reach every client."""
    clients = [await connected() for _ in range(2)]
    ids = [f"distinct-{number}-{uuid.uuid4().hex}" for number in range(5)]
    for broadcast_id in ids:
        await broadcast.send(text="same text", broadcast_id=broadcast_id)
    for ws in clients:
        assert [json.loads(await ws.receive_from())["id"] for _ in ids] == ids
        assert await ws.receive_nothing(timeout=0.1)
        await ws.disconnect()


async def test_with_the_servers_send_nowait_a_broadcast_is_sent_from_the_layer_without_the_consumers_task():
    """Given `pingpong.send_nowait` in the scope (uvicorn adds it), the consumer takes broadcasts
    straight from the layer: the frame goes through send_nowait, once, and a retry is still dropped."""
    sent: list[dict[str, Any]] = []
    ws = communicator("/ws/")
    ws.scope["extensions"] = {SEND_NOWAIT: sent.append}
    assert (await ws.connect())[0]
    try:
        before = metrics.DIRECT_BROADCAST.value
        broadcast_id = f"direct-{uuid.uuid4().hex}"
        first = await broadcast.send(text="straight", broadcast_id=broadcast_id)
        await broadcast.send(text="straight", broadcast_id=broadcast_id)  # a retry
        assert [json.loads(message["text"]) for message in sent] == [first]
        assert metrics.DIRECT_BROADCAST.value - before == 2
        assert await ws.receive_nothing(timeout=0.1)  # nothing went through the consumer's async send
        assert (await ask(ws, type="ping", id=1))["type"] == "pong"  # the client side works as before
    finally:
        await ws.disconnect()


# --- real processes: a redis-server that pauses or dies, nodes on daphne and on uvicorn, websocket clients

on_both_servers = pytest.mark.parametrize("server", SERVERS)


def redis_env(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "PINGPONG_BROADCAST_TOKEN": TOKEN, **extra}


def post_broadcast(node: DaphneNode, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /api/broadcast with the token; the status and the JSON answer."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    status, answer = http_request(
        f"{node.http}/api/broadcast", method="POST", body=json.dumps(body).encode(), headers=headers
    )
    return status, json.loads(answer)


def pause_redis(redis_server: RedisServer, *, milliseconds: int, mode: str) -> None:
    """CLIENT PAUSE from a connection made first: a new connection would itself wait out the pause."""
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as admin:
        admin.ping()
        admin.execute_command("CLIENT", "PAUSE", milliseconds, mode)


def node_ready(node: DaphneNode) -> bool:
    return http_request(f"{node.http}/readyz")[0] == 200


async def warm_up_received(clients: list[ClientConnection]) -> None:
    """Every client's next event is the "warm up" broadcast.

    Taken as it arrives, not over a window per client: the broadcast under test must follow within
    the layer's health_check_interval (10 s), or its connection first sends a PING, which a paused
    Redis or held replies stop before the PUBLISH is written (503, nothing sent, rightly). A second
    copy of the warm-up would still show in the window after that broadcast.
    """
    for ws in clients:
        assert (await next_event(ws))["text"] == "warm up"


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_broadcast_cut_off_by_a_redis_pause_is_504_and_its_retry_arrives_once(redis_server, daphne_nodes):
    """Unknown outcome: 504 outcome_unknown; after Redis wakes a retry with the id is 202; each client gets it once."""
    node = daphne_nodes(redis_env(redis_server, PINGPONG_LAYER_TIMEOUT="0.5", PINGPONG_PUBLISH_TIMEOUT="0.5"))
    clients = [await ws_connect(node.ws) for _ in range(3)]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
    assert (await asyncio.to_thread(post_broadcast, node, {"text": "warm up"}))[0] == 202
    await warm_up_received(clients)

    await asyncio.to_thread(pause_redis, redis_server, milliseconds=2000, mode="ALL")
    body = {"text": "exactly once", "id": "paused-1"}
    status, answer = await asyncio.to_thread(post_broadcast, node, body)
    assert (status, answer["error"], answer["id"]) == (504, protocol.ERROR_OUTCOME_UNKNOWN, "paused-1")
    await asyncio.to_thread(wait_until, lambda: node_ready(node), timeout=10, what="Redis to wake up")
    assert await asyncio.to_thread(post_broadcast, node, body) == (202, {"status": "accepted", "id": "paused-1"})

    for events in await broadcasts_on_each(clients, seconds=1.5):
        assert [event["id"] for event in events] == ["paused-1"]
    await asyncio.gather(*(ws.close() for ws in clients))
    assert "Traceback" not in node.output()


class ReplyHoldingProxy:
    """A loopback TCP proxy in front of Redis that can hold Redis's replies.

    Commands still reach Redis and run; only their answers wait. That is the unclear case
    exactly: a PUBLISH delivered to every subscriber while its sender times out.
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.open = asyncio.Event()
        self.open.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.pipes: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(LOOPBACK, self.redis_port)
        self.writers += [client_writer, redis_writer]
        self.pipes += [
            asyncio.ensure_future(self._pipe(client_reader, redis_writer, gated=False)),
            asyncio.ensure_future(self._pipe(redis_reader, client_writer, gated=True)),
        ]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool) -> None:
        try:
            while data := await reader.read(65536):
                if gated:
                    await self.open.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        for pipe in self.pipes:
            pipe.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_retry_of_a_broadcast_that_did_arrive_is_dropped_by_every_node(redis_server, daphne_nodes):
    """PUBLISH ran but its reply was held: 504, clients on both nodes got it, and the 202 retry reaches no one again."""
    proxy = ReplyHoldingProxy(redis_server.port)
    await proxy.start()
    clients: list[ClientConnection] = []
    try:
        sender_env = {
            **redis_env(redis_server, PINGPONG_LAYER_TIMEOUT="0.5", PINGPONG_PUBLISH_TIMEOUT="0.5"),
            "REDIS_URL": proxy.url,
        }
        sender = await asyncio.to_thread(daphne_nodes, sender_env)
        other = await asyncio.to_thread(daphne_nodes, redis_env(redis_server))
        clients += [await ws_connect(node.ws) for node in (sender, other) for _ in range(2)]
        for ws in clients:
            assert await ping_pong(ws) == "pong!"
        assert (await asyncio.to_thread(post_broadcast, sender, {"text": "warm up"}))[0] == 202
        await warm_up_received(clients)

        proxy.open.clear()
        body = {"text": "exactly once", "id": "held-1"}
        status, answer = await asyncio.to_thread(post_broadcast, sender, body)
        assert (status, answer["error"]) == (504, protocol.ERROR_OUTCOME_UNKNOWN)
        proxy.open.set()
        for events in await broadcasts_on_each(clients, seconds=1):
            assert [event["id"] for event in events] == ["held-1"]
        assert await asyncio.to_thread(post_broadcast, sender, body) == (202, {"status": "accepted", "id": "held-1"})
        assert await broadcasts_on_each(clients, seconds=1.5) == [[]] * len(clients)
        for node in (sender, other):  # on uvicorn, 3 broadcasts x 2 clients, each taken straight from the layer
            direct = node.metric("pingpong_layer_messages_direct_total", 'kind="broadcast"')
            assert direct == (6 if node.server == "uvicorn" else 0)
    finally:  # closed on a failure too: a socket left to the garbage collector fails a later test
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
        await proxy.close()


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_a_broadcast_while_redis_is_down_is_503_and_never_delivered(redis_server, daphne_nodes):
    """Not sent: 503 unavailable while Redis is killed, and nothing arrives after it restarts."""
    node = daphne_nodes(redis_env(redis_server))
    clients = [await ws_connect(node.ws) for _ in range(2)]
    for ws in clients:
        assert await ping_pong(ws) == "pong!"
    assert (await asyncio.to_thread(post_broadcast, node, {"text": "warm up"}))[0] == 202
    redis_server.kill()

    status, answer = await asyncio.to_thread(post_broadcast, node, {"text": "never", "id": "down-1"})
    assert (status, answer["error"], answer["id"]) == (503, protocol.ERROR_UNAVAILABLE, "down-1"), answer
    redis_server.start()
    await asyncio.to_thread(wait_until, lambda: node_ready(node), timeout=10, what="the node to be ready again")

    for events in await broadcasts_on_each(clients, seconds=1.5):
        assert [event["text"] for event in events] == ["warm up"]
    await asyncio.gather(*(ws.close() for ws in clients))


@pytest.mark.redis
def test_the_command_says_nothing_was_sent_when_redis_is_down(redis_server):
    """`manage.py broadcast --id` exits 1 with the "nothing was sent" line when Redis is unreachable."""
    redis_server.kill()
    result = manage("broadcast", "unheard", "--id", "cmd-down", env=redis_env(redis_server))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("nothing was sent")
    assert "Traceback" not in result.stderr


@pytest.mark.redis
def test_the_command_says_retry_with_the_same_id_when_the_outcome_is_unknown(redis_server):
    """`manage.py broadcast --id` exits 1 with a "retry with --id" line when PUBLISH went unanswered."""
    # WRITE pauses PUBLISH but lets the command's new connection say hello.
    pause_redis(redis_server, milliseconds=3000, mode="WRITE")
    result = manage(
        "broadcast",
        "maybe",
        "--id",
        "cmd-unknown",
        env=redis_env(redis_server, PINGPONG_LAYER_TIMEOUT="0.5", PINGPONG_PUBLISH_TIMEOUT="0.5"),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("retry with --id cmd-unknown")
    assert "Traceback" not in result.stderr


@pytest.mark.redis
@pytest.mark.slow
def test_the_command_sends_with_the_given_id(redis_server):
    """`manage.py broadcast --id X` reports X as the id it sent."""
    result = manage("broadcast", "hello", "--id", "cmd-1", env=redis_env(redis_server))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "broadcast cmd-1 sent"


def test_the_command_refuses_a_bad_id():
    """`manage.py broadcast --id 'a b'` exits 1 naming the id rule."""
    result = manage("broadcast", "hello", "--id", "a b", env={})
    assert result.returncode == 1
    assert '"id"' in result.stderr
