"""The delivery checker: issue 11's proof that a topic with history loses nothing, with real processes.

Nodes behind one Redis, clients on one topic with history, publications at a fixed rate through
`POST /api/publish` from concurrent publishers, while clients drop at random (a clean close, an
abrupt TCP close without a close frame, the node they are on SIGKILLed and restarted on its port)
and reconnect to any node with `since` = the last offset and epoch they got. Redis itself may be
restarted mid-run (its history lost). Each client's offsets go through a `SequenceCheck`:

- after `"recovered": true` the offsets continue exactly where the client left them: last + 1,
  last + 2, ..., in order, none twice, none missing (across every reconnect);
- `"recovered": false` (counted; 0 expected while Redis keeps its data) and a publication in a new
  epoch start over from the offset they give: the client was told, so that is not a silent gap.

Anything else is a violation: a gap, a duplicate, an offset going back, a `recovered: true` in
another epoch, an epoch coming back. The test (`tests/test_delivery.py`) and the benchmark (W6)
run `delivery_run`; the checker is a plain class so a test can prove it fails on a bad sequence.
"""

import asyncio
import functools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.fanclient import FanoutClient
from bench.loadgen import CLIENT_BOUND_PERCENT, cpu_seconds, percentiles
from bench.servers import process_cpu_seconds
from pingpong import protocol
from tests.processes import LOOPBACK, RedisServer, ServerProcess

Say = Callable[[str], None]

#: Drop kinds a client goes through (`node_killed` comes from the run's node kills, not from the client).
DROP_CLEAN, DROP_ABORT, DROP_NODE_KILLED = "clean", "abort", "node_killed"
#: Seconds one connection attempt (TCP + handshake) may take.
CONNECT_WITHIN = 5.0
#: Connections one client may open in a run, at most: every loop here is bounded in count as well as time.
MAX_CONNECTIONS_PER_CLIENT = 500
#: Rounds over the nodes one reconnect may make before it gives up (it also stops at the run's end).
MAX_CONNECT_ROUNDS = 200
#: Subscribe requests per connection when the answer is `unavailable` (nothing changed: retry).
SUBSCRIBE_ATTEMPTS = 5
#: Attempts per publication (the same id each time: a topic with history publishes an id once).
PUBLISH_ATTEMPTS = 3
#: Seconds an API request may take before it counts as unanswered (status 0).
PUBLISH_WITHIN = 10.0
#: Violations kept verbatim per run (all are counted).
VIOLATIONS_KEPT = 20


@dataclass(frozen=True)
class Violation:
    """A broken promise: `kind` is gap, duplicate, backwards, epoch; offsets as expected and as received."""

    kind: str
    expected: int
    received: int
    epoch: str


@dataclass
class SequenceCheck:
    """One client's view of one topic across its connections, checked against the delivery guarantee.

    Feed it every `subscribed` reply (`subscribed`) and every publication (`publication`) in the
    order the client received them. `last` is the offset a reconnect sends as `since`.
    """

    epoch: str | None = None
    last: int = 0
    received: int = 0
    recovered: Counter[str] = field(default_factory=Counter)  # "true" / "false"
    recovered_false_same_epoch: int = 0  # told false although the epoch had not changed
    epoch_changes_live: int = 0  # a publication in a new epoch, without a resubscribe
    violations: list[Violation] = field(default_factory=list)
    epochs: list[str] = field(default_factory=list)  # every epoch seen, in order

    def position(self) -> tuple[int, str] | None:
        """(offset, epoch) for `since`, or None before the first `subscribed` reply."""
        return None if self.epoch is None else (self.last, self.epoch)

    def subscribed(self, *, offset: int, epoch: str, recovered: bool | None, since_epoch: str | None = None) -> None:
        """A `subscribed` reply: `recovered` None for a subscribe without `since`, `since_epoch` the epoch it sent."""
        if recovered is None:
            if self.epoch is None:
                self._enter(epoch, offset)
            return  # a plain resubscribe changes nothing the client was promised
        self.recovered[str(recovered).lower()] += 1
        if recovered:
            if epoch != self.epoch or (since_epoch is not None and epoch != since_epoch):
                self.violations.append(Violation("epoch", self.last, offset, epoch))
                self._enter(epoch, offset)
            elif offset < self.last:
                self.violations.append(Violation("backwards", self.last, offset, epoch))
            return  # the replay continues from self.last + 1
        if epoch == (since_epoch if since_epoch is not None else self.epoch):
            self.recovered_false_same_epoch += 1
        self._enter(epoch, offset)

    def publication(self, *, offset: int, epoch: str) -> None:
        """A publication: the next offset, or a violation (a new epoch starts over: the client can tell)."""
        self.received += 1
        if epoch != self.epoch:
            if epoch in self.epochs:  # an old epoch after a newer one: out of order
                self.violations.append(Violation("epoch", self.last + 1, offset, epoch))
                return
            self.epoch_changes_live += self.epoch is not None
            self._enter(epoch, offset)
            return
        if offset == self.last + 1:
            self.last = offset
        elif offset <= self.last:
            self.violations.append(Violation("duplicate", self.last + 1, offset, epoch))
        else:
            self.violations.append(Violation("gap", self.last + 1, offset, epoch))
            self.last = offset

    def _enter(self, epoch: str, offset: int) -> None:
        self.epoch, self.last = epoch, offset
        if epoch not in self.epochs:
            self.epochs.append(epoch)


class CheckedConnection(FanoutClient):
    """One connection of a checked client: frames go to the client as they arrive."""

    def __init__(self, *, owner: "CheckedClient", node: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner, self.node = owner, node
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dropped_by_us = False
        self.node_killed = False

    def text_received(self, arrived: float, payload: bytes) -> None:
        if not self.dropped_by_us:  # nothing read after the client let go of the connection counts
            self.owner.frame(self, arrived, payload)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def abort(self) -> None:
        """End the TCP connection at once, without a close frame (an RST)."""
        self.dropped_by_us = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.dropped_by_us = True
        super().close()


@dataclass
class RecoveryWait:
    """A reconnect in progress: when it started and, once answered `recovered: true`, the offset to reach."""

    started: float
    target: int | None = None


class CheckedClient:
    """One logical client: connects, subscribes (with `since` after the first time), drops, reconnects."""

    def __init__(self, index: int, *, run: "DeliveryRun") -> None:
        self.index, self.run = index, run
        self.check = SequenceCheck()
        self.connection: CheckedConnection | None = None
        self.connections = 0
        self.drops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []  # arrival - sent_at of live publications
        self.recovery_seconds: list[float] = []
        self.waiting: RecoveryWait | None = None
        self.subscribe_attempts = 0
        self.resubscribe: asyncio.Event = asyncio.Event()
        # Every subscribe with `since`, answered: (the since's epoch, the answer's epoch, recovered, arrival).
        self.answers: list[tuple[str, str, bool, float]] = []
        self.pending_since: tuple[int, str] | None = None

    # Frames

    def frame(self, connection: CheckedConnection, arrived: float, payload: bytes) -> None:
        """One server event, in arrival order: checked, timed, and answered where a client must act."""
        event = json.loads(payload)
        kind = event.get("type")
        if kind == protocol.EVENT_PUBLICATION:
            before = self.check.position()
            self.check.publication(offset=event[protocol.FIELD_OFFSET], epoch=event[protocol.FIELD_EPOCH])
            waiting = self.waiting
            if waiting is not None and waiting.target is not None:
                if self.check.last >= waiting.target:
                    self.recovered_at(arrived)
            else:
                self.latencies.append(arrived - event["sent_at"])
            if before is not None and self.check.epoch != before[1]:
                # The README's rule: a publication in a new epoch says "subscribe again with since, or reload".
                self.send_subscribe(connection, before)
        elif kind == protocol.EVENT_SUBSCRIBED:
            recovered = event.get(protocol.FIELD_RECOVERED)
            since, self.pending_since = self.pending_since, None
            if since is not None and recovered is not None:
                self.answers.append((since[1], event[protocol.FIELD_EPOCH], bool(recovered), arrived))
            self.check.subscribed(
                offset=event[protocol.FIELD_OFFSET],
                epoch=event[protocol.FIELD_EPOCH],
                recovered=recovered,
                since_epoch=since[1] if since is not None else None,
            )
            if self.waiting is not None:
                if recovered:
                    self.waiting.target = event[protocol.FIELD_OFFSET]
                    if self.check.last >= self.waiting.target:
                        self.recovered_at(arrived)
                else:
                    self.waiting = None
        elif kind == protocol.EVENT_ERROR:
            self.errors[str(event.get("error"))] += 1
            if event.get("error") == protocol.ERROR_UNAVAILABLE and self.subscribe_attempts < SUBSCRIBE_ATTEMPTS:
                self.resubscribe.set()

    def recovered_at(self, arrived: float) -> None:
        """The replay of the current reconnect is complete: time it."""
        assert self.waiting is not None
        self.recovery_seconds.append(arrived - self.waiting.started)
        self.waiting = None

    # Requests

    def send_subscribe(self, connection: CheckedConnection, since: tuple[int, str] | None) -> None:
        """Subscribe to the run's topic, with `since` = (offset, epoch) when given."""
        self.subscribe_attempts += 1
        request: dict[str, Any] = {"type": protocol.REQUEST_SUBSCRIBE, "topic": self.run.topic, "id": "sub"}
        if since is not None:
            request[protocol.FIELD_SINCE] = {protocol.FIELD_OFFSET: since[0], protocol.FIELD_EPOCH: since[1]}
        self.pending_since = since
        connection.send_text(json.dumps(request))

    async def open(self) -> CheckedConnection | None:
        """A new connection to the first node (in random order) that takes it; None when none did."""
        loop = asyncio.get_running_loop()
        order = list(range(len(self.run.nodes)))
        self.run.random.shuffle(order)
        for node in order:
            port = self.run.nodes[node].port
            try:
                _, connection = await asyncio.wait_for(
                    loop.create_connection(
                        functools.partial(
                            CheckedConnection,
                            owner=self,
                            node=node,
                            host=LOOPBACK,
                            port=port,
                            path="/ws/",
                            origin=f"http://{LOOPBACK}:{port}",
                        ),
                        LOOPBACK,
                        port,
                    ),
                    CONNECT_WITHIN,
                )
                await asyncio.wait_for(connection.opened, CONNECT_WITHIN)
            except (OSError, TimeoutError, ConnectionError) as error:
                self.errors[f"connect:{type(error).__name__}"] += 1
                continue
            self.connections += 1
            return connection
        return None

    async def connect(self, *, until: float) -> bool:
        """Open a connection (retrying, bounded by `until`) and subscribe, with `since` when the client has a position."""
        loop = asyncio.get_running_loop()
        since = self.check.position()
        # Timed from here, over every node tried, to the end of the replay; a recovery that a drop
        # interrupts is not timed (the next reconnect is timed on its own).
        self.waiting = RecoveryWait(started=time.time()) if since is not None else None
        delay = 0.1
        for _ in range(MAX_CONNECT_ROUNDS):
            if loop.time() >= until or self.connections >= MAX_CONNECTIONS_PER_CLIENT:
                break
            connection = await self.open()
            if connection is not None:
                self.connection = connection
                self.subscribe_attempts = 0
                self.resubscribe.clear()
                self.send_subscribe(connection, since)
                return True
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        self.waiting = None
        return False

    async def hold(self, seconds: float) -> bool:
        """Keep the connection for `seconds`, resubscribing after `unavailable`; False when it was lost."""
        connection = self.connection
        assert connection is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self.resubscribe.wait())
            await asyncio.wait({connection.lost, waiter}, timeout=left)
            waiter.cancel()
            if connection.lost.done():
                return False
            if self.resubscribe.is_set():
                self.resubscribe.clear()
                await asyncio.sleep(0.2)
                self.send_subscribe(connection, self.check.position())
        return True

    def lost(self) -> None:
        """Count how the current connection ended, when the client did not end it."""
        connection = self.connection
        assert connection is not None
        if connection.node_killed:
            self.drops[DROP_NODE_KILLED] += 1
        else:
            self.drops[f"closed:{connection.close_code}"] += 1
        self.connection = None

    def drop(self) -> None:
        """End the current connection one of the two ways a client does: a close frame, or an abort."""
        connection = self.connection
        assert connection is not None
        kind = self.run.random.choice((DROP_CLEAN, DROP_ABORT))
        self.drops[kind] += 1
        connection.close() if kind == DROP_CLEAN else connection.abort()
        self.connection = None

    async def life(self, *, churn_until: float, stay_until: float) -> None:
        """Drop and reconnect until `churn_until`, then stay connected (reconnecting if lost) until `stay_until`."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_CONNECTIONS_PER_CLIENT):
            now = loop.time()
            if now >= stay_until:
                return
            if self.connection is None and not await self.connect(until=stay_until):
                return
            now = loop.time()
            churning = now < churn_until
            hold = (
                min(self.run.random.uniform(*self.run.hold_seconds), churn_until - now)
                if churning
                else stay_until - now
            )
            if not await self.hold(hold):
                self.lost()
            elif loop.time() < churn_until:
                self.drop()
            if self.connection is None:
                await asyncio.sleep(self.run.random.uniform(0.0, 0.2))

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@dataclass
class PublishLog:
    """Every publication's outcome: the last answer's status, and (time, status) of every attempt."""

    sent: int = 0
    accepted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # final answers
    attempts: list[tuple[float, int]] = field(default_factory=list)  # (time.time() when answered, status)
    retried: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # epoch -> highest offset answered 202
    last_epoch: str | None = None
    sending_seconds: float = 0.0  # from the first publication sent to the last (the schedule is `seconds`)


async def api_post(
    port: int, path: str, payload: dict[str, Any], *, token: str, within: float = PUBLISH_WITHIN
) -> tuple[int, bytes]:
    """POST `payload` as JSON to `path` with a bearer `token`; (HTTP status, body); raises OSError/TimeoutError."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    body = json.dumps(payload).encode()
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body
    )
    try:
        status_line = await asyncio.wait_for(reader.readline(), within)
        answer = await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
    return (int(status_line.split()[1]) if status_line else 0), answer.partition(b"\r\n\r\n")[2]


@dataclass
class DeliveryRun:
    """What one run needs: the nodes (restartable `ServerProcess`es), the topic, the API token, the pacing."""

    nodes: Sequence[ServerProcess]
    topic: str
    token: str
    random: random.Random
    hold_seconds: tuple[float, float]  # how long a client keeps a connection before dropping it


def node_restart(node: ServerProcess) -> None:
    """Start a killed node again on the port its clients know (blocking: run it in a thread)."""
    node.requested_port = node.port
    node.start()


async def delivery_run(
    *,
    nodes: Sequence[ServerProcess],
    token: str,
    clients: int,
    rate: float,
    seconds: float,
    publishers: int = 4,
    node_kills: int = 1,
    hold_seconds: tuple[float, float] = (1.0, 6.0),
    redis: RedisServer | None = None,
    redis_restart_at: float | None = None,
    redis_down_seconds: float = 1.0,
    drain: float = 15.0,
    subscribe_within: float = 30.0,
    seed: int = 6,
    topic: str | None = None,
    say: Say = lambda _: None,
) -> dict[str, Any]:
    """Run the checker for `seconds` of publishing; the report as a dict (see `delivery_report`).

    `node_kills` SIGKILLs spread over the run, alternating nodes, each node restarted on its port at
    once; with `redis` and `redis_restart_at` (seconds into publishing), Redis is killed then and
    started again on its port `redis_down_seconds` later.
    """
    loop = asyncio.get_running_loop()
    run = DeliveryRun(
        nodes=nodes,
        topic=topic or f"public:w6-{uuid.uuid4().hex[:8]}",
        token=token,
        random=random.Random(seed),
        hold_seconds=hold_seconds,
    )
    checked = [CheckedClient(index, run=run) for index in range(clients)]
    gate = asyncio.Semaphore(50)
    connect_started = loop.time()

    async def first_connect(client: CheckedClient) -> None:
        async with gate:
            await client.connect(until=loop.time() + subscribe_within)

    await asyncio.gather(*(first_connect(client) for client in checked))
    for _ in range(int(subscribe_within / 0.1)):
        subscribed = sum(1 for client in checked if client.check.epoch is not None)
        say(f"subscribing {subscribed}/{clients}")
        if subscribed == clients:
            break
        await asyncio.sleep(0.1)
    connect_seconds = loop.time() - connect_started

    log = PublishLog()
    started = loop.time()
    churn_until = started + seconds
    stay_until = churn_until + drain
    events: dict[str, Any] = {"node_kills": [], "redis_down": None, "redis_back": None}
    killed_cpu = [0.0]
    cpu_started = cpu_seconds()
    wall_started = time.time()

    async def publish(index: int, number: int) -> None:
        """One publication, on the publisher's next node; retried with the same id on the next one after
        no answer, 503 or 504 (a topic with history publishes an id once)."""
        log.sent += 1
        publication_id = f"{run.topic}-{index}-{number}"
        payload = {"topic": run.topic, "data": {"publisher": index, "n": number}, "id": publication_id}
        status = 0
        for attempt in range(PUBLISH_ATTEMPTS):
            node = nodes[(index + number + attempt) % len(nodes)]
            try:
                status, body = await api_post(node.port, "/api/publish", payload, token=token)
            except (OSError, TimeoutError):
                status, body = 0, b""
            log.attempts.append((time.time(), status))
            if status == 202:
                answer = json.loads(body)
                epoch, offset = answer.get("epoch"), answer.get("offset")
                if isinstance(epoch, str) and isinstance(offset, int):
                    log.offsets[epoch] = max(offset, log.offsets.get(epoch, 0))
                    log.last_epoch = epoch
                log.accepted += 1
                break
            if status not in (0, 503, 504):
                break
            log.retried += 1
            await asyncio.sleep(0.2)
        log.statuses[str(status)] += 1

    async def publisher(index: int) -> None:
        """`rate / publishers` publications a second, each sent on time whatever the earlier ones wait for
        (open loop: a slow answer does not lower the rate)."""
        per_publisher = rate / publishers
        sending: list[asyncio.Task[None]] = []
        try:
            for number in range(int(rate * seconds / publishers)):
                at = started + (number + index / publishers) / per_publisher
                await asyncio.sleep(max(0.0, at - loop.time()))
                sending.append(asyncio.ensure_future(publish(index, number)))
            log.sending_seconds = max(log.sending_seconds, loop.time() - started)
            await asyncio.gather(*sending)
        finally:
            for task in sending:
                task.cancel()

    async def killer() -> None:
        for number in range(node_kills):
            await asyncio.sleep(max(0.0, started + seconds * (number + 1) / (node_kills + 1) - loop.time()))
            target = number % len(nodes)
            for client in checked:
                if client.connection is not None and client.connection.node == target:
                    client.connection.node_killed = True
            killed_cpu[0] += process_cpu_seconds(nodes[target].pid)  # read just before it is lost with the process
            await asyncio.to_thread(nodes[target].kill)
            killed_at = loop.time() - started
            await asyncio.to_thread(node_restart, nodes[target])
            events["node_kills"].append(
                {"node": target, "at": round(killed_at, 2), "back_after": round(loop.time() - started - killed_at, 2)}
            )

    async def redis_restarter() -> None:
        assert redis is not None and redis_restart_at is not None
        await asyncio.sleep(max(0.0, started + redis_restart_at - loop.time()))
        events["old_epochs"] = set(log.offsets)
        await asyncio.to_thread(redis.kill)
        events["redis_down"] = time.time()
        await asyncio.sleep(redis_down_seconds)
        await asyncio.to_thread(redis.start)  # on its port, ready once the port takes connections
        events["redis_back"] = time.time()

    async def report_progress() -> None:
        while True:
            say(
                f"publishing {log.sent}/{int(rate * seconds)} accepted {log.accepted}, "
                f"recoveries {sum(c.check.recovered['true'] for c in checked)} true / "
                f"{sum(c.check.recovered['false'] for c in checked)} false, "
                f"violations {sum(len(c.check.violations) for c in checked)}"
            )
            await asyncio.sleep(0.5)

    reporter = asyncio.ensure_future(report_progress())
    side = [asyncio.ensure_future(killer())]
    if redis is not None and redis_restart_at is not None:
        side.append(asyncio.ensure_future(redis_restarter()))
    lives = [asyncio.ensure_future(client.life(churn_until=churn_until, stay_until=stay_until)) for client in checked]
    try:
        await asyncio.gather(*(publisher(index) for index in range(publishers)), *side)
        publish_window = loop.time() - started
        # Drain: every client that is connected reaches the last accepted offset, within `drain`.
        final = log.offsets.get(log.last_epoch, 0) if log.last_epoch else 0
        for _ in range(int(drain / 0.1)):
            if loop.time() >= churn_until and all(
                c.check.epoch == log.last_epoch and c.check.last >= final for c in checked
            ):
                break
            await asyncio.sleep(0.1)
    finally:
        reporter.cancel()
        for task in lives + side:
            task.cancel()
        await asyncio.gather(*lives, *side, return_exceptions=True)
        for client in checked:
            client.close()
    window = loop.time() - started
    client_cpu = cpu_seconds() - cpu_started
    return delivery_report(
        checked,
        log,
        events=events,
        clients=clients,
        rate=rate,
        seconds=seconds,
        publishers=publishers,
        connect_seconds=connect_seconds,
        publish_window=publish_window,
        window=window,
        client_cpu=client_cpu,
        wall_started=wall_started,
        topic=run.topic,
        killed_nodes_cpu_seconds=round(killed_cpu[0], 3),
    )


def delivery_report(
    checked: list[CheckedClient], log: PublishLog, *, events: dict[str, Any], **figures: Any
) -> dict[str, Any]:
    """The run's figures: publications, deliveries, recoveries, violations, latencies, drops, client CPU."""
    window, client_cpu = figures.pop("window"), figures.pop("client_cpu")
    wall_started = figures.pop("wall_started")
    final = log.offsets.get(log.last_epoch, 0) if log.last_epoch else 0
    violations = [violation for client in checked for violation in client.check.violations]
    drops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for client in checked:
        drops.update(client.drops)
        errors.update(client.errors)
    latencies = [value for client in checked for value in client.latencies]
    recoveries = [value for client in checked for value in client.recovery_seconds]
    statuses_by_attempt = Counter(str(status) for _, status in log.attempts)
    redis_back = events.get("redis_back")
    resumed = None
    if redis_back is not None:
        after = [at for at, status in log.attempts if status == 202 and at >= redis_back]
        resumed = round(min(after) - redis_back, 3) if after else None
    # Subscribes with `since` answered after Redis came back, whose `since` was from before it went down.
    old_epochs: set[str] = events.get("old_epochs", set())
    after_restart = [
        (since_epoch, epoch, recovered)
        for client in checked
        for since_epoch, epoch, recovered, at in client.answers
        if redis_back is not None and at >= redis_back and since_epoch in old_epochs
    ]
    return {
        **figures,
        "subscribed": sum(1 for client in checked if client.check.epochs),
        "sent": log.sent,
        "accepted": log.accepted,
        "statuses": dict(sorted(log.statuses.items())),
        "statuses_by_attempt": dict(sorted(statuses_by_attempt.items())),
        "publish_retries": log.retried,
        "sending_seconds": round(log.sending_seconds, 2),
        "final_offset": final,
        "epochs": len(log.offsets),
        "deliveries": sum(client.check.received for client in checked),
        "caught_up": sum(1 for c in checked if c.check.epoch == log.last_epoch and c.check.last >= final),
        "connections": sum(client.connections for client in checked),
        "drops": dict(sorted(drops.items())),
        "client_errors": dict(sorted(errors.items())),
        "recovered_true": sum(client.check.recovered["true"] for client in checked),
        "recovered_false": sum(client.check.recovered["false"] for client in checked),
        "recovered_false_same_epoch": sum(client.check.recovered_false_same_epoch for client in checked),
        "epoch_changes_live": sum(client.check.epoch_changes_live for client in checked),
        "violations": len(violations),
        "clients_with_violations": sum(1 for client in checked if client.check.violations),
        "violation_examples": [vars(violation) for violation in violations[:VIOLATIONS_KEPT]],
        "latency_ms": ms(percentiles(latencies)),
        "recovery_ms": ms(percentiles(recoveries)),
        "recoveries_timed": len(recoveries),
        "node_kills": events["node_kills"],
        "redis_restart": None
        if redis_back is None
        else {
            "down_at": round(events["redis_down"] - wall_started, 2),
            "back_at": round(redis_back - wall_started, 2),
            "first_202_after_back_s": resumed,
            "old_since_answers": len(after_restart),
            "old_since_recovered_true": sum(1 for _, _, recovered in after_restart if recovered),
        },
        "client_cpu_percent": round(100 * client_cpu / window, 1) if window else 0.0,
        "client_bound": bool(window) and 100 * client_cpu / window > CLIENT_BOUND_PERCENT,
    }


def ms(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value * 1000, 3) for name, value in values.items()}
