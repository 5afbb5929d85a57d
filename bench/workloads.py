"""The workloads. Each starts its own servers, measures, stops them, and returns one row.

W1 uses the `loadtest` command's own code (bench.loadgen); W2 reuses its connection
helpers; W4 is bench.capacity's client processes; W3 and W5 use bench.fanclient, a receive-mostly client cheap enough for 80,000 frames/s;
W6 is the delivery checker (bench.delivery), on the same client.
"""

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sized
from pathlib import Path
from typing import Any

from bench import capacity, delivery, loadgen
from bench.fanclient import FanoutClient, fanout_client_open
from bench.loadgen import (
    CONNECT_CONCURRENCY,
    Progress,
    connections_close,
    connections_open,
    cpu_seconds,
    event_loop_factory,
    failure_name,
    percentiles,
)
from bench.servers import (
    LOOPBACK,
    TOKEN,
    TOKEN_SECRET,
    ServerGroup,
    ServerProcess,
    app_start,
    process_cpu_seconds,
    rss_bytes,
)
from pingpong import protocol
from tests.processes import RedisServer

Say = Callable[[str], None]
Row = dict[str, Any]


def run_async(coroutine) -> Any:
    """Run the client side on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coroutine)


def ws_url(process: ServerProcess) -> str:
    return f"ws://{LOOPBACK}:{process.port}/ws/"


def origin(process: ServerProcess) -> str:
    return f"http://{LOOPBACK}:{process.port}"


def ms(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value * 1000, 3) for name, value in values.items()}


def w1_pingpong(
    *,
    app: str,
    server: str,
    connections: int,
    duration: float,
    redis_url: str | None,
    cores,
    log_dir: Path,
    say: Say,
    warmup: float = 2.0,
    processes: int | str = 1,
    source_addresses: int = 1,
    client: str = "picows",
) -> Row:
    """Closed-loop ping/pong: throughput and RTT percentiles, with client and server CPU.

    The client is `bench.loadgen.run` on `client` (picows by default: the websockets client
    saturates its core before uvicorn does), spread over `processes` and `source_addresses`.
    """
    process = app_start(app=app, server=server, redis_url=redis_url, cores=cores, log_dir=log_dir)
    try:
        server_cpu = {True: 0.0, False: 0.0}

        def window(opening: bool) -> None:
            server_cpu[opening] = process_cpu_seconds(process.pid)

        def progress(snapshot: Progress) -> None:
            say(
                f"{snapshot.phase} {snapshot.elapsed:4.1f}/{snapshot.duration:g}s "
                f"open {snapshot.opened}/{snapshot.connections} msgs {snapshot.messages:,}"
            )

        result = loadgen.run(
            ws_url(process),
            connections=connections,
            duration=duration,
            rate=0,
            progress=progress,
            window=window,
            warmup=warmup,
            processes=processes,
            source_addresses=source_addresses,
            client=client,
        )
        server_seconds = server_cpu[False] - server_cpu[True]
    finally:
        process.stop()
    return {
        "workload": "w1",
        "app": app,
        "server": server,
        "connections": connections,
        "opened": result.opened,
        "failed": result.failed,
        "messages": result.messages,
        # A run a server limit cut short keeps its rate here, marked "cut short" in the tables: the
        # benchmark compares apps, and a layer that refuses connections (4013) is part of that picture.
        "messages_per_second": result.messages_per_second
        if result.messages_per_second is not None
        else (round(result.messages / result.duration, 1) if result.duration else 0.0),
        "rtt_ms": result.rtt_ms,
        "errors": sum(result.errors.values()) + sum(result.close_codes.values()) + result.failed,
        "client_cpu_percent": result.client_cpu_percent,
        "client_cpu_machine_percent": result.client_cpu_machine_percent,
        "client_processes": result.processes,
        "client": result.client,
        "client_bound": result.client_bound,
        "cut_short": result.cut_short,
        # Server CPU over the measurement window: the cost of the app's structure per message,
        # which other load on a shared machine does not inflate the way it does throughput.
        "server_cpu_percent": round(100 * server_seconds / result.duration, 1) if result.duration else 0.0,
        "server_us_per_message": round(1e6 * server_seconds / result.messages, 1) if result.messages else 0.0,
        "duration": result.duration,
    }


async def reporting(what: Callable[[], str], say: Callable[[str], None]) -> None:
    """Say `what()` every 0.25 s until cancelled: a workload's progress line."""
    while True:
        say(what())
        await asyncio.sleep(0.25)


async def all_connected(
    one: Callable[[int], Awaitable[None]], *, clients: int, opened: Sized, say: Callable[[str], None]
) -> float:
    """Run `one(index)` for every client at once, saying how many are open every 0.25 s; the seconds it took."""
    loop = asyncio.get_running_loop()
    reporter = asyncio.ensure_future(reporting(lambda: f"connecting {len(opened):,}/{clients:,}", say))
    started = loop.time()
    try:
        await asyncio.gather(*(one(index) for index in range(clients)))
    finally:
        reporter.cancel()
    return loop.time() - started


async def _w2_client(process: ServerProcess, connections: int, say: Say) -> Row:
    url, allowed = ws_url(process), origin(process)
    await loadgen.probe(url, origin=allowed)  # warm up: imports, first handshake
    await asyncio.sleep(0.5)
    rss_before = rss_bytes(process.pid)
    loop = asyncio.get_running_loop()
    opened_count = [0]
    failures: Counter[str] = Counter()

    reporter = asyncio.ensure_future(
        reporting(lambda: f"connecting {opened_count[0]:,}/{connections:,} failed {sum(failures.values())}", say)
    )
    started = loop.time()
    cpu_started = cpu_seconds()
    try:
        opened, _ = await connections_open(
            url,
            count=connections,
            origin=allowed,
            counters=failures,
            opened_callback=lambda ws: opened_count.__setitem__(0, opened_count[0] + 1),
        )
    finally:
        reporter.cancel()
    connect_seconds = loop.time() - started
    client_cpu = cpu_seconds() - cpu_started
    await asyncio.sleep(1.0)  # let the server settle before reading its RSS
    rss_after = rss_bytes(process.pid)
    say(f"pinging {len(opened):,} connections")

    async def answer(ws) -> str:
        try:
            await ws.send(protocol.PING)
            async with asyncio.timeout(30):
                return str(await ws.recv())
        except Exception as error:
            return failure_name(error)

    answers = Counter(await asyncio.gather(*(answer(ws) for ws in opened)))
    say("closing")
    await connections_close(opened, within=30)
    answered = answers.pop(protocol.PONG, 0)
    return {
        "workload": "w2",
        "app": process.name.split("-", 1)[1],
        "server": process.name.split("-", 1)[0],
        "connections": connections,
        "opened": len(opened),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "connect_seconds": round(connect_seconds, 3),
        "connect_rate": round(len(opened) / connect_seconds, 1) if connect_seconds else 0.0,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_per_connection_kb": round((rss_after - rss_before) / 1024 / max(1, len(opened)), 2),
        "answered": answered,
        "errors": sum(failures.values()) + sum(answers.values()),
        "client_cpu_percent": round(100 * client_cpu / connect_seconds, 1) if connect_seconds else 0.0,
        # One process, one core: the connect rate measured the client past CLIENT_BOUND_PERCENT of it.
        "client_bound": bool(connect_seconds) and 100 * client_cpu / connect_seconds > loadgen.CLIENT_BOUND_PERCENT,
    }


def w2_capacity(
    *, app: str, server: str, connections: int, redis_url: str | None, cores, log_dir: Path, say: Say
) -> Row:
    """Hold `connections` on one node: connect rate, server RSS per connection, all still answer."""
    process = app_start(app=app, server=server, redis_url=redis_url, cores=cores, log_dir=log_dir)
    try:
        return run_async(_w2_client(process, connections, say))
    finally:
        process.stop()


async def _w4_warm_up(process: ServerProcess, count: int) -> None:
    """A few connections that each ping once, then abort: every worker's handshake path imported before RSS is read."""
    clients = []
    try:
        for _ in range(count):
            clients.append(
                await capacity.hold_open(
                    host=LOOPBACK, port=process.port, path="/ws/", origin=origin(process), source=None
                )
            )
        for client in clients:
            client.send_text(protocol.PING)
        if clients:
            await asyncio.wait([client.settled for client in clients], timeout=30)
    finally:
        for client in clients:
            client.abort()


def w4_capacity(
    *,
    server: str,
    connections: int,
    redis_url: str,
    cores,
    log_dir: Path,
    say: Say,
    workers: int | None = None,
    client_processes: int | None = None,
    source_addresses: int | None = None,
    concurrency: int = capacity.CONCURRENCY,
    answer_within: float = 60.0,
    connect_within: float = capacity.PHASE_TIMEOUT,
    settle: float = 2.0,
) -> Row:
    """Hold `connections` idle on one `manage.py serve --workers N` process group (the project on `server`,
    pinned to `cores`, None: not pinned) from several client processes and loopback source addresses:
    connect rate, the group's RSS (and PSS) per connection, every connection's `ping` answered within
    `answer_within` s, the spread over the workers. A client process stops opening after `connect_within` s. Counts left None are planned from RLIMIT_NOFILE
    (bench.capacity.plan_make)."""
    plan = capacity.plan_make(
        connections=connections, open_files=capacity.open_files_limit(), workers=workers,
        client_processes=client_processes, source_addresses=source_addresses, concurrency=concurrency,
        ports=capacity.ephemeral_ports(),
    )  # fmt: skip
    load = [os.getloadavg()]
    say(f"starting {plan.workers} workers")
    process = app_start(
        app="project", server=server, redis_url=redis_url, cores=cores, log_dir=log_dir, workers=plan.workers
    )
    try:
        pids = process.pids() if isinstance(process, ServerGroup) else [process.pid]
        run_async(_w4_warm_up(process, 2 * plan.workers))
        time.sleep(settle)
        before = capacity.group_memory(pids)
        cpu = {"start": sum(process_cpu_seconds(pid) for pid in pids)}
        wall = {"start": time.monotonic()}

        def on_held() -> dict[str, Any]:
            cpu["held"], wall["held"] = sum(process_cpu_seconds(pid) for pid in pids), time.monotonic()
            time.sleep(settle)  # let the workers settle before reading their RSS
            # What holding idle connections costs: the group's CPU over the settle window (server pings, timers).
            cpu["settled"], wall["settled"] = sum(process_cpu_seconds(pid) for pid in pids), time.monotonic()
            load.append(os.getloadavg())
            return {"memory": capacity.group_memory(pids), "spread": capacity.worker_connections(process.port)}

        def on_answered() -> dict[str, Any]:
            cpu["answered"], wall["answered"] = sum(process_cpu_seconds(pid) for pid in pids), time.monotonic()
            return {}

        parts = capacity.parts_plan(
            host=LOOPBACK, port=process.port, path="/ws/", origin=origin(process), plan=plan,
            answer_within=answer_within, connect_within=connect_within,
        )  # fmt: skip
        result = capacity.clients_run(parts, say=say, on_held=on_held, on_answered=on_answered)
        load.append(os.getloadavg())
        restarted = isinstance(process, ServerGroup) and sorted(process.worker_pids()) != sorted(pids[1:])
    finally:
        process.stop()
    after, spread = result.held_measured["memory"], result.held_measured["spread"]
    dropped = sum(result.dropped.values())
    held = result.opened - dropped
    grown = max(1, result.opened)
    of_cores, _, _, bound = loadgen.client_load(
        cpu_seconds=result.connect_cpu_seconds, seconds=result.connect_seconds, cpus=loadgen.usable_cpus(),
        machine_cpus=os.cpu_count() or 1,
    )  # fmt: skip
    connect_wall = wall["held"] - wall["start"]
    rss_by_worker = {pid: rss for pid, rss in after["rss_by_pid"].items() if pid != pids[0]}
    workers_detail = [
        {
            "pid": pid,
            "rss_mb": round(rss / 2**20, 1),
            "connections": next((n for name, n in spread.items() if name.endswith(f"-{pid}")), None),
        }
        for pid, rss in rss_by_worker.items()
    ]
    counts = [worker["connections"] for worker in workers_detail if worker["connections"] is not None]
    return {
        "workload": "w4",
        "app": "project",
        "server": server,
        "connections": connections,
        "workers": plan.workers,
        "client_processes": plan.client_processes,
        "source_addresses": plan.source_addresses,
        "concurrency": plan.concurrency * plan.client_processes,  # handshakes in flight, every client process
        "connect_within": connect_within,
        "open_files_limit": plan.open_files_limit,
        "per_process_limit": plan.per_process_limit,
        "kernel": capacity.kernel_limits(),
        "opened": result.opened,
        "held": held,
        "failed": sum(result.failures.values()),
        "failures": result.failures,
        "connect_seconds": round(result.connect_seconds, 3),
        "connect_rate": round(result.opened / result.connect_seconds, 1) if result.connect_seconds else 0.0,
        "rss_before_mb": round(before["rss"] / 2**20, 1),
        "rss_after_mb": round(after["rss"] / 2**20, 1),
        "pss_before_mb": round(before["pss"] / 2**20, 1) if before["pss"] is not None else None,
        "pss_after_mb": round(after["pss"] / 2**20, 1) if after["pss"] is not None else None,
        "rss_per_connection_kb": round((after["rss"] - before["rss"]) / 1024 / grown, 2),
        "pss_per_connection_kb": round((after["pss"] - before["pss"]) / 1024 / grown, 2)
        if before["pss"] is not None and after["pss"] is not None
        else None,
        "supervisor_rss_mb": round(after["rss_by_pid"].get(pids[0], 0) / 2**20, 1),
        "worker_detail": workers_detail,
        "worker_connections_min": min(counts, default=None),
        "worker_connections_max": max(counts, default=None),
        "worker_restarted": restarted,
        "pinged": result.pinged,
        "answered": result.answered,
        "unanswered": result.unanswered,
        "dropped": result.dropped,
        "wrong_answers": result.wrong,
        "answer_seconds": round(result.answer_seconds, 3),
        "errors": sum(result.failures.values()) + dropped + result.unanswered,
        "client_cpu_percent": of_cores,  # of the cores the client could use
        "client_bound": bound,
        "client_rss_mb": round(result.client_rss_after / 2**20, 1),
        "client_rss_per_connection_kb": round((result.client_rss_after - result.client_rss_before) / 1024 / grown, 2),
        # The group's CPU while connecting, as a share of one core (up to 100 x cores), and per connection.
        "server_cpu_percent": round(100 * (cpu["held"] - cpu["start"]) / connect_wall, 1) if connect_wall else 0.0,
        "server_us_per_connection": round(1e6 * (cpu["held"] - cpu["start"]) / grown, 1),
        "server_idle_cpu_percent": round(100 * (cpu["settled"] - cpu["held"]) / (wall["settled"] - wall["held"]), 1),
        "server_cpu_ping_seconds": round(cpu["answered"] - cpu["settled"], 2),
        "load_average": [[round(value, 2) for value in reading] for reading in load],
        "server_cores": sorted(cores) if cores else None,
        "client_cores": sorted(os.sched_getaffinity(0)),
    }


async def api_post(port: int, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    """POST `payload` as JSON to `path` with the bench's bearer token; (HTTP status, body)."""
    return await delivery.api_post(port, path, payload, token=TOKEN, within=30.0)


async def broadcast_post(port: int, text: str) -> int:
    """POST /api/broadcast with the bench token; the HTTP status."""
    status, _ = await api_post(port, "/api/broadcast", {"text": text})
    return status


async def _w3_client(
    nodes: list[ServerProcess], clients: int, rate: float, seconds: float, drain: float, say: Say
) -> Row:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    opened: list[FanoutClient] = []
    failures: Counter[str] = Counter()

    async def one(index: int) -> None:
        node = nodes[index % len(nodes)]
        async with gate:
            try:
                client = await fanout_client_open(host=LOOPBACK, port=node.port, path="/ws/", origin=origin(node))
            except Exception as error:
                failures[failure_name(error)] += 1
                return
        opened.append(client)

    connect_seconds = await all_connected(one, clients=clients, opened=opened, say=say)
    await asyncio.sleep(1.0)

    count = int(rate * seconds)
    statuses: list[int] = []
    cpu_started = cpu_seconds()
    sending_started = loop.time()

    def received() -> int:
        return sum(len(client.frames) for client in opened)

    reporter = asyncio.ensure_future(
        reporting(lambda: f"broadcasting {len(statuses)}/{count} delivered {received():,}/{len(opened) * count:,}", say)
    )
    try:

        async def post(index: int) -> None:
            await asyncio.sleep(max(0.0, sending_started + index / rate - loop.time()))
            try:
                statuses.append(await broadcast_post(nodes[index % len(nodes)].port, f"bench-{index}"))
            except OSError:
                statuses.append(0)

        await asyncio.gather(*(post(index) for index in range(count)))
        expected = len(opened) * sum(1 for status in statuses if status == 202)
        for _ in range(int(drain / 0.1)):
            if received() >= expected:
                break
            await asyncio.sleep(0.1)
    finally:
        reporter.cancel()
    window = loop.time() - sending_started
    client_cpu = cpu_seconds() - cpu_started
    closed_by_server = sum(1 for client in opened if client.close_code is not None)
    latencies: list[float] = []
    delivered = 0
    for client in opened:
        seen: set[str] = set()
        for arrived, payload in client.frames:
            event = json.loads(payload)
            if event.get("type") == "broadcast" and event["id"] not in seen:
                seen.add(event["id"])
                latencies.append(arrived - event["sent_at"])
        delivered += len(seen)
        client.close()
    return {
        "clients": clients,
        "opened": len(opened),
        "failed": sum(failures.values()),
        "connect_seconds": round(connect_seconds, 3),
        "broadcasts": count,
        "accepted": sum(1 for status in statuses if status == 202),
        "expected": expected,
        "delivered": delivered,
        "delivered_percent": round(100 * delivered / expected, 2) if expected else 0.0,
        "latency_ms": ms(percentiles(latencies)),
        "client_cpu_percent": round(100 * client_cpu / window, 1) if window else 0.0,
        "client_bound": bool(window) and 100 * client_cpu / window > loadgen.CLIENT_BOUND_PERCENT,
        "closed_by_server": closed_by_server,
    }


def w3_fanout(
    *,
    app: str,
    server: str = "daphne",
    clients: int,
    nodes: int,
    rate: float,
    seconds: float,
    drain: float,
    redis_url: str,
    cores,
    log_dir: Path,
    say: Say,
) -> Row:
    """Broadcast through the API to clients split over `nodes` nodes of `server` behind one Redis."""
    started: list[ServerProcess] = []
    try:
        for _ in range(nodes):
            started.append(app_start(app=app, server=server, redis_url=redis_url, cores=cores, log_dir=log_dir))
        cpu_before = sum(process_cpu_seconds(p.pid) for p in started)
        began = time.monotonic()
        row = run_async(_w3_client(started, clients, rate, seconds, drain, say))
        row["server_cpu_percent"] = round(
            100 * (sum(process_cpu_seconds(p.pid) for p in started) - cpu_before) / (time.monotonic() - began), 1
        )
    finally:
        for process in started:
            process.stop()
    return {"workload": "w3", "app": app, "server": server, "nodes": nodes, **row}


#: W5: every client subscribes to its own user topic and to this one.
W5_PUBLIC_TOPIC = "public:all"
#: Seconds for every client's two `subscribed` replies once all are connected.
W5_SUBSCRIBE_WITHIN = 30.0
#: Subscribe requests per topic: `unavailable` says "nothing changed, retry", and the client does.
W5_SUBSCRIBE_ATTEMPTS = 3


def user_topic(user: int) -> str:
    """The topic only user `user` may subscribe to (the `user` namespace's `owner` rule)."""
    return f"user:{user}"


def tokens_issue(user_ids: list[str]) -> list[str]:
    """A connection token per user, from the project's own `pingpong.tokens.issue` and the servers' secret."""
    from django.conf import settings
    from django.test import override_settings

    from pingpong import tokens

    if not settings.configured:
        settings.configure()  # the benchmark runs no Django project: issue() reads one setting
    with override_settings(PINGPONG_TOKEN_SECRET=TOKEN_SECRET):
        return [tokens.issue(user_id) for user_id in user_ids]


class W5Deliveries:
    """What the W5 clients received, parsed as it arrives: each publication once per connection.

    A publication is keyed "topic id". Per client: the first arrival's latency (arrival -
    `sent_at`), how many arrived again (duplicates), how many were for a topic the client never
    asked for (misrouted), the topics it was told it is subscribed to and the errors it got
    as (code, request id).
    """

    def __init__(self, clients: dict[int, FanoutClient]) -> None:
        self.clients = clients
        self.parsed = dict.fromkeys(clients, 0)
        self.first: dict[int, dict[str, float]] = {user: {} for user in clients}
        self.subscribed: dict[int, set[str]] = {user: set() for user in clients}
        self.errors: dict[int, list[tuple[str, Any]]] = {user: [] for user in clients}
        self.duplicates = 0
        self.misrouted = 0

    def update(self) -> None:
        """Parse every frame that arrived since the last call."""
        for user, client in self.clients.items():
            frames, start = client.frames, self.parsed[user]
            if start == len(frames):
                continue
            self.parsed[user] = len(frames)
            own = (user_topic(user), W5_PUBLIC_TOPIC)
            first = self.first[user]
            for arrived, payload in frames[start:]:
                event = json.loads(payload)
                kind = event.get("type")
                if kind == protocol.EVENT_PUBLICATION:
                    if event["topic"] not in own:
                        self.misrouted += 1
                        continue
                    key = f"{event['topic']} {event['id']}"
                    if key in first:
                        self.duplicates += 1
                    else:
                        first[key] = arrived - event["sent_at"]
                elif kind == protocol.EVENT_SUBSCRIBED:
                    self.subscribed[user].add(event["topic"])
                elif kind == protocol.EVENT_ERROR:
                    self.errors[user].append((str(event.get("error")), event.get("id")))

    def delivered(self, accepted: set[str], users: Iterable[int]) -> int:
        """First arrivals of the `accepted` publication keys at the clients of `users`."""
        return sum(1 for user in users for key in self.first[user] if key in accepted)


async def _w5_client(
    nodes: list[ServerProcess],
    clients: int,
    rate: float,
    public_rate: float,
    seconds: float,
    drain: float,
    say: Say,
    seed: int,
) -> Row:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    say(f"issuing {clients:,} tokens")
    user_tokens = tokens_issue([str(user) for user in range(clients)])
    opened: dict[int, FanoutClient] = {}
    failures: Counter[str] = Counter()
    attempts: dict[int, Counter[str]] = {}

    def subscribe(user: int, topic: str) -> None:
        attempts.setdefault(user, Counter())[topic] += 1
        opened[user].send_text(json.dumps({"type": protocol.REQUEST_SUBSCRIBE, "topic": topic, "id": topic}))

    async def one(user: int) -> None:
        node = nodes[user % len(nodes)]
        async with gate:
            try:
                client = await fanout_client_open(
                    host=LOOPBACK, port=node.port, path=f"/ws/?token={user_tokens[user]}", origin=origin(node)
                )
            except Exception as error:
                failures[failure_name(error)] += 1
                return
        opened[user] = client
        for topic in (user_topic(user), W5_PUBLIC_TOPIC):
            subscribe(user, topic)

    connect_seconds = await all_connected(one, clients=clients, opened=opened, say=say)

    deliveries = W5Deliveries(opened)
    refused: dict[int, str] = {}
    retries: Counter[str] = Counter()
    handled = dict.fromkeys(opened, 0)
    waiting = list(opened)
    for _ in range(int(W5_SUBSCRIBE_WITHIN / 0.1)):
        deliveries.update()
        for user in waiting:
            errors = deliveries.errors[user]
            for code, topic in errors[handled[user] :]:
                kind = "public:all" if topic == W5_PUBLIC_TOPIC else "user:<i>"
                if code == protocol.ERROR_UNAVAILABLE and attempts[user][topic] < W5_SUBSCRIBE_ATTEMPTS:
                    retries[f"error:{code} on {kind}"] += 1
                    subscribe(user, topic)
                else:
                    refused[user] = f"error:{code} on {kind}"
            handled[user] = len(errors)
            if opened[user].close_code is not None:
                refused[user] = f"closed:{opened[user].close_code}"
        waiting = [user for user in waiting if len(deliveries.subscribed[user]) < 2 and user not in refused]
        say(f"subscribing {len(opened) - len(waiting) - len(refused):,}/{len(opened):,}")
        if not waiting:
            break
        await asyncio.sleep(0.1)
    subscribe_failures = Counter(refused.values()) + Counter("no answer" for _ in waiting)
    subscribed = sorted(user for user in opened if len(deliveries.subscribed[user]) == 2 and user not in refused)
    await asyncio.sleep(1.0)

    # The schedule: user publications at `rate`, public ones at `public_rate` (offset by half a
    # period), each with its own id; alternating nodes in the order they are sent.
    chooser = random.Random(seed)
    # Ids unique to this run: a topic with history remembers ids in Redis (a repeated id is a retry,
    # not published again), and the runs of one bench share a Redis.
    run = uuid.uuid4().hex[:8]
    plan: list[tuple[float, str, str]] = []  # (offset s, topic, id)
    if subscribed:
        for index in range(int(rate * seconds)):
            plan.append((index / rate, user_topic(chooser.choice(subscribed)), f"w5-{run}-user-{index}"))
    for index in range(int(public_rate * seconds)):
        plan.append(((index + 0.5) / public_rate, W5_PUBLIC_TOPIC, f"w5-{run}-public-{index}"))
    plan.sort()
    statuses: Counter[str] = Counter()
    accepted: set[str] = set()
    accepted_public = [0]
    cpu_started = cpu_seconds()
    sending_started = loop.time()

    async def publish(position: int) -> None:
        offset, topic, publication_id = plan[position]
        await asyncio.sleep(max(0.0, sending_started + offset - loop.time()))
        payload = {"topic": topic, "data": {"n": position}, "id": publication_id}
        try:
            status, body = await api_post(nodes[position % len(nodes)].port, "/api/publish", payload)
        except (OSError, TimeoutError):
            status, body = 0, b""
        statuses[str(status)] += 1
        if status == 202:
            try:
                publication_id = json.loads(body).get("id", publication_id)
            except ValueError:
                pass
            accepted.add(f"{topic} {publication_id}")
            accepted_public[0] += topic == W5_PUBLIC_TOPIC

    def expected() -> int:
        return len(accepted) - accepted_public[0] + accepted_public[0] * len(subscribed)

    reporter = asyncio.ensure_future(
        reporting(lambda: f"publishing {sum(statuses.values())}/{len(plan)} accepted {len(accepted)}", say)
    )
    try:
        await asyncio.gather(*(publish(position) for position in range(len(plan))))
        reporter.cancel()
        delivered = 0
        for _ in range(int(drain / 0.1)):
            deliveries.update()
            delivered = deliveries.delivered(accepted, subscribed)
            say(f"draining: delivered {delivered:,}/{expected():,}")
            if delivered >= expected():
                break
            await asyncio.sleep(0.1)
    finally:
        reporter.cancel()
    window = loop.time() - sending_started
    client_cpu = cpu_seconds() - cpu_started
    deliveries.update()
    delivered = deliveries.delivered(accepted, subscribed)
    # Accepted publications that reached a connection never told it is subscribed to their topic.
    delivered_unsubscribed = sum(
        1
        for user in opened
        for key in deliveries.first[user]
        if key in accepted and key.partition(" ")[0] not in deliveries.subscribed[user]
    )
    closed_by_server = sum(1 for client in opened.values() if client.close_code is not None)
    latencies: dict[str, list[float]] = {"user": [], "public": []}
    unaccepted = 0
    for user in subscribed:
        for key, latency in deliveries.first[user].items():
            if key in accepted:
                latencies["public" if key.startswith(W5_PUBLIC_TOPIC + " ") else "user"].append(latency)
            else:
                unaccepted += 1
    for client in opened.values():
        client.close()
    sent_user = sum(1 for _, topic, _ in plan if topic != W5_PUBLIC_TOPIC)
    return {
        "clients": clients,
        "opened": len(opened),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "subscribed": len(subscribed),
        "subscribe_failures": dict(subscribe_failures),
        "subscribe_retries": dict(retries),
        "connect_seconds": round(connect_seconds, 3),
        "rate": rate,
        "public_rate": public_rate,
        "seconds": seconds,
        "sent": len(plan),
        "sent_user": sent_user,
        "sent_public": len(plan) - sent_user,
        "accepted": len(accepted),
        "accepted_public": accepted_public[0],
        "statuses": dict(sorted(statuses.items())),
        "expected": expected(),
        "delivered": delivered,
        "delivered_percent": round(100 * delivered / expected(), 2) if expected() else 0.0,
        "duplicates": deliveries.duplicates,
        "misrouted": deliveries.misrouted,
        # Publications the API did not answer 202 (504: outcome unknown) that arrived anyway.
        "delivered_unaccepted": unaccepted,
        "delivered_unsubscribed": delivered_unsubscribed,
        "latency_ms": ms(percentiles(latencies["user"] + latencies["public"])),
        "latency_user_ms": ms(percentiles(latencies["user"])),
        "latency_public_ms": ms(percentiles(latencies["public"])),
        "client_cpu_percent": round(100 * client_cpu / window, 1) if window else 0.0,
        "client_bound": bool(window) and 100 * client_cpu / window > loadgen.CLIENT_BOUND_PERCENT,
        "closed_by_server": closed_by_server,
    }


def w5_topics(
    *,
    server: str = "daphne",
    clients: int,
    nodes: int,
    rate: float,
    public_rate: float,
    seconds: float,
    drain: float,
    redis_url: str,
    cores,
    log_dir: Path,
    say: Say,
    seed: int = 5,
) -> Row:
    """Topics fan-out: `clients` token users over `nodes` nodes of the project, each subscribed to its own
    `user:<i>` and to `public:all`; publications through POST /api/publish to random users at `rate`
    and to `public:all` at `public_rate`, for `seconds`."""
    started: list[ServerProcess] = []
    try:
        for _ in range(nodes):
            started.append(app_start(app="project", server=server, redis_url=redis_url, cores=cores, log_dir=log_dir))
        cpu_before = sum(process_cpu_seconds(p.pid) for p in started)
        began = time.monotonic()
        row = run_async(_w5_client(started, clients, rate, public_rate, seconds, drain, say, seed))
        row["server_cpu_percent"] = round(
            100 * (sum(process_cpu_seconds(p.pid) for p in started) - cpu_before) / (time.monotonic() - began), 1
        )
    finally:
        for process in started:
            process.stop()
    return {"workload": "w5", "app": "project", "server": server, "nodes": nodes, **row}


#: W6 keeps every publication of a run (50/s for 30 s is 1,500): a client away longer than the default
#: 100 would be told `recovered: false` legitimately, and W6 expects none while Redis keeps its data.
W6_NAMESPACES = {"public": {"subscribe": "anyone", "publish": "server", "history_size": 10_000, "history_ttl": 600}}


#: With --w6-redis-restart: seconds between Redis' kill and its restart.
W6_REDIS_DOWN_SECONDS = 1.5


def w6_delivery(
    *,
    server: str = "daphne",
    clients: int,
    nodes: int,
    rate: float,
    seconds: float,
    publishers: int,
    node_kills: int,
    drain: float,
    redis_url: str,
    cores,
    log_dir: Path,
    say: Say,
    redis: RedisServer | None = None,
    redis_restart_at: float | None = None,
    seed: int = 6,
) -> Row:
    """The delivery checker (bench.delivery): `clients` on one `public:` topic over `nodes` nodes, `rate`
    publications/s for `seconds` from `publishers` through POST /api/publish, clients dropping (clean,
    abort) and `node_kills` SIGKILLs of a node, restarted on its port; every client's offsets checked.
    With `redis` and `redis_restart_at`, Redis is restarted that many seconds in (`recovered: false` expected then)."""
    started: list[ServerProcess] = []
    env = {"PINGPONG_NAMESPACES": json.dumps(W6_NAMESPACES)}
    try:
        for _ in range(nodes):
            started.append(
                app_start(app="project", server=server, redis_url=redis_url, cores=cores, log_dir=log_dir, env=env)
            )
        cpu_before = sum(process_cpu_seconds(p.pid) for p in started)
        began = time.monotonic()
        row = run_async(
            delivery.delivery_run(
                nodes=started,
                token=TOKEN,
                clients=clients,
                rate=rate,
                seconds=seconds,
                publishers=publishers,
                node_kills=node_kills,
                drain=drain,
                redis=redis,
                redis_restart_at=redis_restart_at,
                redis_down_seconds=W6_REDIS_DOWN_SECONDS,
                seed=seed,
                say=say,
            )
        )
        # The nodes' CPU over the run; a killed node's CPU was read just before its kill.
        spent = sum(process_cpu_seconds(p.pid) for p in started) + row.pop("killed_nodes_cpu_seconds") - cpu_before
        row["server_cpu_percent"] = round(100 * spent / (time.monotonic() - began), 1)
    finally:
        for process in started:
            process.stop()
    return {"workload": "w6", "app": "project", "server": server, "nodes": nodes, **row}
