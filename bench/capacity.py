"""W4 capacity: idle connections held by one `manage.py serve --workers N` process group, from several
client processes and loopback source addresses, then one `ping` on every one of them.

The plan follows the per-process open-file limit (`RLIMIT_NOFILE`, 20,000 soft and hard on the
benchmark machine): every connection is one descriptor in a server worker and one in a client
process, so each holds at most `PROCESS_SHARE` of the limit in connections (16,000 of 20,000; the
rest is for its other descriptors and for SO_REUSEPORT's uneven spread), and each loopback source
address connects at most `CONNECTIONS_PER_SOURCE` times (about 28,000 ephemeral ports towards one
server port). The client is `HoldClient`, the fan-out workloads' protocol client with a `pong!`
flag instead of a frame list: a few KB per connection, where a full client library costs tens.
"""

import asyncio
import errno
import math
import multiprocessing
import os
import queue
import re
import resource
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.fanclient import FanoutClient
from bench.loadgen import cpu_seconds, event_loop_factory, source_addresses_for
from pingpong import protocol
from tests.processes import rss_bytes

#: Share of RLIMIT_NOFILE one process (a server worker or a client process) holds in connections.
PROCESS_SHARE = 0.8
#: Connections from one loopback source address (about 28,000 ephemeral ports each towards one server port).
CONNECTIONS_PER_SOURCE = 20_000
#: Descriptors a process needs besides its connections (listening socket, Redis, logs, epoll, pipes).
OTHER_DESCRIPTORS = 200
#: Handshakes in flight per client process, as W2's client (daphne's own backlog is 50; the project listens with 1,024).
CONCURRENCY = 50
#: Seconds one handshake may take (the server is busy with the others meanwhile).
OPEN_TIMEOUT = 30.0
#: Seconds a client process or the run waits for a phase before giving up on it (the connect phase: by default).
PHASE_TIMEOUT = 900.0
PONG = protocol.PONG.encode()
#: Linux's IP_BIND_ADDRESS_NO_PORT (4.2+), which the socket module does not name.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class PlanError(ValueError):
    """The connections cannot be held with these workers, client processes or source addresses here."""


@dataclass(frozen=True)
class Plan:
    """Who holds what: server workers, client processes, source addresses, handshakes in flight."""

    connections: int
    workers: int
    client_processes: int
    source_addresses: int
    concurrency: int  # handshakes in flight per client process
    open_files_limit: int
    per_process_limit: int  # floor(PROCESS_SHARE x open_files_limit)


def open_files_limit() -> int:
    """This process's soft RLIMIT_NOFILE, which the server group and the client processes inherit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1_048_576


def plan_make(
    *,
    connections: int,
    open_files: int,
    workers: int | None = None,
    client_processes: int | None = None,
    source_addresses: int | None = None,
    concurrency: int = CONCURRENCY,
    ports: int = 28_232,
) -> Plan:
    """The W4 plan; a None count is computed from the limits:

    per-process = floor(0.8 x RLIMIT_NOFILE), workers = client processes = ceil(connections / per-process),
    source addresses = ceil(connections / 20,000). PlanError when a given count cannot hold its share.
    """
    if connections < 1:
        raise PlanError("W4 needs at least one connection")
    per_process = math.floor(PROCESS_SHARE * open_files)
    if per_process < 1:
        raise PlanError(f"an open-file limit of {open_files} leaves no room for connections")
    workers = workers or math.ceil(connections / per_process)
    client_processes = client_processes or math.ceil(connections / per_process)
    source_addresses = source_addresses or math.ceil(connections / CONNECTIONS_PER_SOURCE)
    for name, count in (("workers", workers), ("client processes", client_processes)):
        share = math.ceil(connections / count)
        if share > open_files - OTHER_DESCRIPTORS:
            raise PlanError(
                f"{count} {name} would hold {share:,} connections each, over the open-file limit of {open_files:,} "
                f"less {OTHER_DESCRIPTORS} for other descriptors: use at least {math.ceil(connections / per_process)}"
            )
    per_source = math.ceil(connections / source_addresses)
    if per_source > ports:
        raise PlanError(
            f"{source_addresses} source addresses would need {per_source:,} ports each, more than the "
            f"{ports:,} of net.ipv4.ip_local_port_range: use at least {math.ceil(connections / CONNECTIONS_PER_SOURCE)}"
        )
    return Plan(
        connections=connections,
        workers=workers,
        client_processes=min(client_processes, connections),
        source_addresses=source_addresses,
        concurrency=concurrency,
        open_files_limit=open_files,
        per_process_limit=per_process,
    )


def sysctl(name: str) -> str | None:
    """A kernel setting from /proc/sys (`net.core.somaxconn`), or None where it cannot be read."""
    try:
        return Path("/proc/sys", *name.split(".")).read_text().split("\n")[0].strip()
    except OSError:
        return None


def kernel_limits() -> dict[str, Any]:
    """The kernel settings W4 runs within (it changes none): ports, backlogs, descriptors."""
    names = (
        "net.ipv4.ip_local_port_range",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "fs.file-max",
        "fs.file-nr",
        "fs.nr_open",
    )
    return {name: sysctl(name) for name in names}


def ephemeral_ports() -> int:
    """How many ports net.ipv4.ip_local_port_range gives one source address (28,232 by default)."""
    value = sysctl("net.ipv4.ip_local_port_range")
    try:
        low, high = (int(part) for part in (value or "").split())
    except ValueError:
        return 28_232
    return high - low + 1


def memory(pid: int) -> tuple[int, int | None]:
    """(RSS, PSS) of a process in bytes; PSS None where /proc/PID/smaps_rollup cannot be read."""
    pss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    return rss_bytes(pid), pss


def group_memory(pids: Sequence[int]) -> dict[str, Any]:
    """Sum of VmRSS (and of PSS, when every process's is readable) over a process group, with each process's RSS."""
    readings = {pid: memory(pid) for pid in pids}
    pss = [reading[1] for reading in readings.values()]
    return {
        "rss": sum(reading[0] for reading in readings.values()),
        "pss": sum(value for value in pss if value is not None) if all(value is not None for value in pss) else None,
        "rss_by_pid": {pid: reading[0] for pid, reading in readings.items()},
    }


WORKER_SERIES = re.compile(r'^pingpong_worker_connections_open\{worker="([^"]+)"\} ([0-9.e+]+)$', re.MULTILINE)


def worker_connections(port: int, *, within: float = 10.0) -> dict[str, int]:
    """Connections open per worker (node id) from the supervisor's aggregated /metrics; {} when unanswered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=within) as response:
            body = response.read().decode()
    except OSError:
        return {}
    return {worker: int(float(value)) for worker, value in WORKER_SERIES.findall(body)}


def failure_kind(error: BaseException) -> str:
    """A countable name for a failed connection: timeout, an errno name (EADDRNOTAVAIL, EMFILE), http_<status>."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, OSError) and error.errno:
        return errno.errorcode.get(error.errno, f"errno_{error.errno}")
    text = str(error)
    if text.startswith("HTTP/"):
        return "http_" + (text.split()[1] if len(text.split()) > 1 else "?")
    return type(error).__name__


class HoldClient(FanoutClient):
    """One idle connection: the fan-out client, keeping only whether `pong!` came and what else did."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answered = False
        self.other: str | None = None  # the first text frame that was not `pong!` (an error event)
        # Done at `pong!` or when the connection is lost: what the ping phase waits for.
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def text_received(self, arrived: float, payload: bytes) -> None:
        if payload == PONG:
            self.answered = True
            self.settle()
        elif self.other is None:
            self.other = protocol.event_type(payload.decode(errors="replace")) or "unparsable"

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.settle()

    def settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    def abort(self) -> None:
        """Drop the connection with a TCP RST: no TIME_WAIT left holding the source address's port."""
        if self.transport is not None:
            self.transport.abort()


def source_socket(source: str) -> socket.socket:
    """A non-blocking TCP socket bound to `source` with the port left to connect().

    bind(address, 0) makes the kernel search the port range for a port free on that address,
    walking each port's bind bucket on the way: at 20,000 ports taken per address that search,
    not the handshake, was most of the client's CPU (55 of 60 s per process in a 100,000 run,
    all system time). With IP_BIND_ADDRESS_NO_PORT the port is chosen at connect() by the
    4-tuple, from where the last connection to that destination left off.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def hold_open(
    *, host: str, port: int, path: str, origin: str, source: str | None, within: float = OPEN_TIMEOUT
) -> HoldClient:
    """Connect from `source` (None: the kernel's choice) and complete the handshake within `within` s."""
    loop = asyncio.get_running_loop()
    transport: asyncio.BaseTransport | None = None
    sock = source_socket(source) if source is not None else None
    try:
        async with asyncio.timeout(within):
            if sock is not None:
                await loop.sock_connect(sock, (host, port))
            transport, client = await loop.create_connection(
                lambda: HoldClient(host=host, port=port, path=path, origin=origin),
                host=None if sock is not None else host,
                port=None if sock is not None else port,
                sock=sock,
            )
            await client.opened
    except BaseException:
        if transport is not None:
            transport.abort()
        elif sock is not None:
            sock.close()
        raise
    return client


@dataclass
class PartPlan:
    """One client process's share (picklable: it crosses to a spawned process)."""

    host: str
    port: int
    path: str
    origin: str
    count: int
    first_index: int
    sources: list[str | None]
    concurrency: int
    answer_within: float
    connect_within: float = PHASE_TIMEOUT


@dataclass
class PartOpened:
    opened: int
    failures: dict[str, int]
    seconds: float
    cpu_seconds: float
    rss_before: int
    rss_after: int


@dataclass
class PartAnswered:
    pinged: int
    answered: int
    dropped: dict[str, int]  # closed by the server before the ping, by close code
    wrong: dict[str, int]  # answers other than `pong!`, by event type
    unanswered: int
    seconds: float
    cpu_seconds: float


async def event_wait(event: Any, *, within: float) -> bool:
    """Poll a multiprocessing.Event (not awaitable) every 20 ms; False after `within` s."""
    deadline = time.monotonic() + within
    while not event.is_set():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def part_run(plan: PartPlan, *, report: Callable[[str, Any], None], go_ping: Any, go_close: Any) -> None:
    """Open this process's connections, hold them, ping each when told, abort them all when told."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(plan.concurrency)
    held: list[HoldClient] = []
    failures: Counter[str] = Counter()

    async def one(index: int) -> None:
        async with gate:
            source = plan.sources[(plan.first_index + index) % len(plan.sources)]
            try:
                client = await hold_open(
                    host=plan.host, port=plan.port, path=plan.path, origin=plan.origin, source=source
                )
            except Exception as error:
                failures[failure_kind(error)] += 1
                return
        held.append(client)

    async def progress() -> None:
        while True:
            report("progress", (len(held), sum(failures.values())))
            await asyncio.sleep(0.5)

    rss_before, cpu_started, started = rss_bytes(os.getpid()), cpu_seconds(), loop.time()
    reporter = asyncio.ensure_future(progress())
    opening = [asyncio.ensure_future(one(index)) for index in range(plan.count)]
    try:
        _, late = await asyncio.wait(opening, timeout=plan.connect_within)
        for task in late:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        failures["not_attempted_in_time"] += len(late)
        report("progress", (len(held), sum(failures.values())))
        report(
            "opened",
            PartOpened(
                opened=len(held), failures=dict(failures), seconds=loop.time() - started,
                cpu_seconds=cpu_seconds() - cpu_started, rss_before=rss_before, rss_after=rss_bytes(os.getpid()),
            ),
        )  # fmt: skip
        reporter.cancel()
        if not await event_wait(go_ping, within=PHASE_TIMEOUT):
            return
        dropped = Counter(str(client.close_code) for client in held if client.close_code is not None)
        alive = [client for client in held if client.close_code is None]
        cpu_started, started = cpu_seconds(), loop.time()
        for client in alive:
            client.send_text(protocol.PING)
        if alive:
            await asyncio.wait([client.settled for client in alive], timeout=plan.answer_within)
        answered = sum(1 for client in alive if client.answered)
        report(
            "answered",
            PartAnswered(
                pinged=len(alive), answered=answered, dropped=dict(dropped),
                wrong=dict(Counter(client.other for client in alive if client.other and not client.answered)),
                unanswered=len(alive) - answered, seconds=loop.time() - started, cpu_seconds=cpu_seconds() - cpu_started,
            ),
        )  # fmt: skip
        await event_wait(go_close, within=PHASE_TIMEOUT)
    finally:
        reporter.cancel()
        for client in held:
            client.abort()
        await asyncio.sleep(0)  # let the transports run their aborts


def part_process(plan: PartPlan, index: int, messages: Any, go_ping: Any, go_close: Any) -> None:
    """A spawned client process: its share of the connections; everything it learns goes to `messages`."""

    def report(kind: str, value: Any) -> None:
        messages.put((kind, index, value))

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(part_run(plan, report=report, go_ping=go_ping, go_close=go_close))
    except Exception as error:
        report("error", f"client process {index} failed: {type(error).__name__}: {error}")
    else:
        report("done", None)


@dataclass
class ClientsResult:
    """What the client processes saw, merged, plus what the caller measured at each phase."""

    opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect_seconds: float = 0.0
    connect_cpu_seconds: list[float] = field(default_factory=list)
    client_rss_before: int = 0
    client_rss_after: int = 0
    pinged: int = 0
    answered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    wrong: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    answer_seconds: float = 0.0
    answer_cpu_seconds: list[float] = field(default_factory=list)
    held_measured: dict[str, Any] = field(default_factory=dict)
    answered_measured: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parts_plan(
    *,
    host: str,
    port: int,
    path: str,
    origin: str,
    plan: Plan,
    answer_within: float,
    connect_within: float = PHASE_TIMEOUT,
) -> list[PartPlan]:
    """Split the connections evenly over the client processes; connection i binds source i mod N."""
    sources = source_addresses_for(f"ws://{host}:{port}{path}", plan.source_addresses)
    share, extra = divmod(plan.connections, plan.client_processes)
    parts, first = [], 0
    for index in range(plan.client_processes):
        count = share + (1 if index < extra else 0)
        parts.append(
            PartPlan(
                host=host, port=port, path=path, origin=origin, count=count, first_index=first, sources=sources,
                concurrency=plan.concurrency, answer_within=answer_within, connect_within=connect_within,
            )
        )  # fmt: skip
        first += count
    return parts


def clients_run(
    parts: Sequence[PartPlan],
    *,
    say: Callable[[str], None],
    on_held: Callable[[], dict[str, Any]],
    on_answered: Callable[[], dict[str, Any]],
) -> ClientsResult:
    """Run every part in its own spawned process. When all hold their connections, `on_held()` measures
    the server (its dict is kept); then every connection pings; then `on_answered()`; then all abort."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    go_ping, go_close = context.Event(), context.Event()
    children = [
        context.Process(
            target=part_process, args=(part, index, messages, go_ping, go_close), name=f"w4-client-{index}", daemon=True
        )
        for index, part in enumerate(parts)
    ]
    total = sum(part.count for part in parts)
    result = ClientsResult()
    progress: dict[int, tuple[int, int]] = {}
    opened: dict[int, PartOpened] = {}
    answered: dict[int, PartAnswered] = {}
    done: set[int] = set()
    phases = max(part.connect_within for part in parts) + 2 * PHASE_TIMEOUT
    deadline = time.monotonic() + phases
    for child in children:
        child.start()
    try:
        while len(done) < len(children):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the W4 client processes did not finish within {phases:g} s")
            try:
                kind, index, value = messages.get(timeout=0.25)
            except queue.Empty:
                for number, child in enumerate(children):
                    if number not in done and child.exitcode not in (None, 0):
                        raise RuntimeError(f"W4 client process {number} exited with code {child.exitcode}") from None
                continue
            if kind == "progress":
                progress[index] = value
                held, failed = (sum(pair[i] for pair in progress.values()) for i in (0, 1))
                say(f"connecting {held:,}/{total:,} failed {failed:,}")
            elif kind == "opened":
                opened[index] = value
                if len(opened) == len(children):
                    say("holding: measuring the server")
                    result.held_measured = on_held()
                    say("pinging every connection")
                    go_ping.set()
            elif kind == "answered":
                answered[index] = value
                if len(answered) == len(children):
                    result.answered_measured = on_answered()
                    go_close.set()
            elif kind == "error":
                raise RuntimeError(value)
            else:
                done.add(index)
    finally:
        go_close.set()
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)
        messages.close()
    if len(answered) < len(children):
        raise RuntimeError(f"{len(children) - len(answered)} W4 client processes gave up before pinging")
    failures: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    for part in opened.values():
        failures.update(part.failures)
    for answer in answered.values():
        dropped.update(answer.dropped)
        wrong.update(answer.wrong)
    result.opened = sum(part.opened for part in opened.values())
    result.failures = {kind: count for kind, count in failures.items() if count}
    result.connect_seconds = max((part.seconds for part in opened.values()), default=0.0)
    result.connect_cpu_seconds = [part.cpu_seconds for part in opened.values()]
    result.client_rss_before = sum(part.rss_before for part in opened.values())
    result.client_rss_after = sum(part.rss_after for part in opened.values())
    result.pinged = sum(answer.pinged for answer in answered.values())
    result.answered = sum(answer.answered for answer in answered.values())
    result.unanswered = sum(answer.unanswered for answer in answered.values())
    result.dropped, result.wrong = dict(dropped), dict(wrong)
    result.answer_seconds = max((answer.seconds for answer in answered.values()), default=0.0)
    result.answer_cpu_seconds = [answer.cpu_seconds for answer in answered.values()]
    return result
