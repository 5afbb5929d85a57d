"""The three workloads. Each starts its own servers, measures, stops them, and returns one row.

W1 uses the `loadtest` command's own code (bench.loadgen); W2 reuses its connection
helpers; W3 uses bench.fanclient, a receive-only client cheap enough for 80,000 frames/s.
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import loadgen
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
from bench.servers import LOOPBACK, TOKEN, ServerProcess, app_start, process_cpu_seconds, rss_bytes
from pingpong import protocol

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
) -> Row:
    """Closed-loop ping/pong: throughput and RTT percentiles, with client and server CPU.

    The client is `bench.loadgen.run`, spread over `processes` and `source_addresses`.
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
        "client_bound": result.client_bound,
        "cut_short": result.cut_short,
        # Server CPU over the measurement window: the cost of the app's structure per message,
        # which other load on a shared machine does not inflate the way it does throughput.
        "server_cpu_percent": round(100 * server_seconds / result.duration, 1) if result.duration else 0.0,
        "server_us_per_message": round(1e6 * server_seconds / result.messages, 1) if result.messages else 0.0,
        "duration": result.duration,
    }


async def _w2_client(process: ServerProcess, connections: int, say: Say) -> Row:
    url, allowed = ws_url(process), origin(process)
    await loadgen.probe(url, origin=allowed)  # warm up: imports, first handshake
    await asyncio.sleep(0.5)
    rss_before = rss_bytes(process.pid)
    loop = asyncio.get_running_loop()
    opened_count = [0]
    failures: Counter[str] = Counter()

    async def report() -> None:
        while True:
            say(f"connecting {opened_count[0]:,}/{connections:,} failed {sum(failures.values())}")
            await asyncio.sleep(0.25)

    reporter = asyncio.ensure_future(report())
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


async def broadcast_post(port: int, text: str) -> int:
    """POST /api/broadcast with the bench token; the HTTP status."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    body = json.dumps({"text": text}).encode()
    writer.write(
        (
            f"POST /api/broadcast HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body
    )
    try:
        status_line = await asyncio.wait_for(reader.readline(), 30)
        await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return int(status_line.split()[1]) if status_line else 0


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

    async def report(what: Callable[[], str]) -> None:
        while True:
            say(what())
            await asyncio.sleep(0.25)

    reporter = asyncio.ensure_future(report(lambda: f"connecting {len(opened):,}/{clients:,}"))
    started = loop.time()
    try:
        await asyncio.gather(*(one(index) for index in range(clients)))
    finally:
        reporter.cancel()
    connect_seconds = loop.time() - started
    await asyncio.sleep(1.0)

    count = int(rate * seconds)
    statuses: list[int] = []
    cpu_started = cpu_seconds()
    sending_started = loop.time()

    def received() -> int:
        return sum(len(client.frames) for client in opened)

    reporter = asyncio.ensure_future(
        report(lambda: f"broadcasting {len(statuses)}/{count} delivered {received():,}/{len(opened) * count:,}")
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
