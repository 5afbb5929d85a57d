"""Closed-loop ping/pong load against any deployment: `manage.py loadtest` and the benchmark's W1.

Each connection sends `ping`, waits for `pong!`, and sends again at once (`rate` 0) or at
`rate` per second. Connections open first (spread over `ramp_up` seconds, at most
`CONNECT_CONCURRENCY` handshakes in flight per process so a small listen backlog is not
overrun); the measurement window is the `duration` seconds after the last one opened or failed.

`run` spreads the client over `processes` processes and `source_addresses` loopback source
addresses, and merges what they measured: counts summed, RTT percentiles over every sample.
Every result says how busy the client was; one above `CLIENT_BOUND_PERCENT` of its cores is
marked client-bound, because then the figure measures the client, not the server.

This is client code: it lives in `bench/`, outside the service package, and needs the `load`
extra (`pip install -e '.[load]'`).
"""

import asyncio
import ipaddress
import json
import math
import multiprocessing
import os
import queue
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from pingpong import protocol

#: Handshakes in flight at once (per process); daphne (Twisted) listens with a backlog of 50.
CONNECT_CONCURRENCY = 50
#: Seconds a handshake or a single answer may take before it counts as failed.
OPEN_TIMEOUT = 10.0
ANSWER_TIMEOUT = 10.0
# Events a closed-loop client reads past while it waits for `pong!`.
SKIPPED_EVENTS = (protocol.EVENT_BROADCAST, protocol.EVENT_ERROR)
#: Seconds to wait for in-flight pings and the closing handshakes at the end.
FINISH_TIMEOUT = 5.0
#: Above this share of its cores (or of one core, for its busiest process) the client limited the figure.
CLIENT_BOUND_PERCENT = 80.0
#: Source addresses 127.0.0.1 ... 127.0.0.254; each has about 28,000 ephemeral ports towards one server port.
MAX_SOURCE_ADDRESSES = 254
#: Close codes by which a server's limit ends a connection, and what to do about each.
LIMIT_CLOSES = {
    protocol.CloseCode.POLICY_VIOLATION: (
        "rate_limited",
        "pace the client with --rate (e.g. --rate 10) or raise the server's PINGPONG_RATE_PER_SECOND",
    ),
    protocol.CloseCode.SLOW_CONSUMER: (
        "slow_consumer",
        "lower --rate or raise the server's PINGPONG_MAX_PENDING_BYTES",
    ),
    protocol.CloseCode.TRY_AGAIN_LATER: (
        "full, draining or too many connections from one address",
        "open fewer connections, spread them with --source-addresses, or raise the server's "
        "PINGPONG_MAX_CONNECTIONS / PINGPONG_MAX_CONNECTIONS_PER_IP",
    ),
}


class LoadgenError(Exception):
    """The load test cannot run; the message is one sentence for the user."""


@dataclass
class Progress:
    """A snapshot for progress bars, taken while the test runs."""

    phase: str  # "connecting", "warming up" or "running"
    elapsed: float
    duration: float
    opened: int
    failed: int
    connections: int
    messages: int


@dataclass
class Part:
    """What one client process measured; `run` merges the parts into a Result."""

    opened: int
    failures: dict[str, int]
    messages: int
    rtts: bytes  # array("d") of RTT seconds: every sample, so percentiles can be taken over all parts
    close_codes: dict[str, int]
    errors: dict[str, int]
    seconds: float  # the measurement window this process saw
    connect_seconds: float
    cpu_seconds: float  # over the window
    stopped_early: bool  # every connection had closed before the window ended


@dataclass
class Result:
    """What one run measured; `rtt_ms` holds p50/p90/p99/max in milliseconds.

    `messages_per_second` is None when the run was `cut_short` by a server limit: those
    messages were not a measurement of anything but the limit.
    """

    url: str
    connections: int
    duration: float
    opened: int
    failed: int
    messages: int
    messages_per_second: float | None
    rtt_ms: dict[str, float]
    close_codes: dict[str, int]
    errors: dict[str, int]
    connect_seconds: float
    client_cpu_percent: float  # of the cores the client could use (one per process, at most the CPUs available)
    client_cpu_machine_percent: float  # of every CPU of the machine
    client_cores: int
    client_bound: bool
    processes: int = 1
    source_addresses: int = 1
    cut_short: str | None = None
    failures: dict[str, int] = field(default_factory=dict)
    client: str = "websockets"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]
#: Called with True as the measurement window opens and False as it closes.
WindowCallback = Callable[[bool], None]


def check_url(url: str) -> str:
    """The URL if it is a usable ws:// or wss:// URL with a host; LoadgenError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise LoadgenError(f"{url!r} is not a websocket URL: use ws://HOST:PORT/ws/ or wss://HOST/ws/.")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise LoadgenError(f"{url!r} has an invalid port.") from None
    if not parts.hostname:
        raise LoadgenError(f"{url!r} has no host: use ws://HOST:PORT/ws/.")
    return url


def source_addresses_for(url: str, count: int) -> list[str | None]:
    """The source address of each slot: [None] for one (the kernel picks), else 127.0.0.1 ... 127.0.0.N.

    Only a loopback target can be reached from every address on 127.0.0.0/8.
    """
    if count < 1 or count > MAX_SOURCE_ADDRESSES:
        raise LoadgenError(f"--source-addresses must be between 1 and {MAX_SOURCE_ADDRESSES}.")
    if count == 1:
        return [None]
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or (
            ipaddress.ip_address(host).version == 4 and ipaddress.ip_address(host).is_loopback
        )
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadgenError(
            f"--source-addresses above 1 needs a loopback target (127.x.x.x or localhost), not {host!r}: "
            "the extra source addresses are on 127.0.0.0/8."
        )
    return [f"127.0.0.{index}" for index in range(1, count + 1)]


def processes_for(processes: int | str, *, connections: int) -> int:
    """`processes` as a number: "auto" is the CPUs this process may run on; never more than the connections."""
    if processes == "auto":
        count = usable_cpus()
    else:
        try:
            count = int(processes)
        except ValueError:
            raise LoadgenError(f"--processes must be a number or 'auto', not {processes!r}.") from None
        if count < 1:
            raise LoadgenError("--processes must be at least 1.")
    return max(1, min(count, connections))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), which its child processes inherit."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def client_load(
    *, cpu_seconds: Sequence[float], seconds: float, cpus: int, machine_cpus: int
) -> tuple[float, float, int, bool]:
    """(% of the cores the client could use, % of the machine, those cores, client-bound?).

    Each process is one event loop, so it uses at most one core: the client's cores are its
    processes, at most `cpus`. It is client-bound above CLIENT_BOUND_PERCENT of those cores, or
    when its busiest process was above it on its one core (an uneven split still limits).
    """
    cores = max(1, min(len(cpu_seconds), cpus))
    if seconds <= 0:
        return 0.0, 0.0, cores, False
    of_cores = 100 * sum(cpu_seconds) / (seconds * cores)
    of_machine = 100 * sum(cpu_seconds) / (seconds * max(1, machine_cpus))
    busiest = 100 * max(cpu_seconds, default=0.0) / seconds
    bound = of_cores > CLIENT_BOUND_PERCENT or busiest > CLIENT_BOUND_PERCENT
    return round(of_cores, 1), round(of_machine, 1), cores, bound


def cut_short_reason(close_codes: dict[str, int], *, opened: int, seconds: float, stopped_early: bool) -> str | None:
    """One sentence when a server limit closed connections during the run (what happened, what to do); else None."""
    for code, (name, advice) in LIMIT_CLOSES.items():
        closed = close_codes.get(str(code), 0)
        if closed:
            when = f"after {seconds:.2f}s" if stopped_early else "during the run"
            return (
                f"the server's limit cut the run short: it closed {closed} of {opened} connections "
                f"with {code} ({name}) {when}; {advice}."
            )
    return None


def origin_for(url: str) -> str:
    """The Origin a browser on the same site would send: http(s)://host[:port]."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of `samples` (nearest rank); zeros when there are none."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)

    def rank(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1]}


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def failure_name(error: BaseException) -> str:
    """A short, countable name for why a connection failed."""
    if isinstance(error, InvalidStatus):
        return f"http_{error.response.status_code}"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def explain_open_failure(url: str, origin: str, error: BaseException) -> str:
    """One sentence saying why the first connection failed, for LoadgenError."""
    where = urlsplit(url).netloc
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {where}: is the server running and listening there?"
    if isinstance(error, InvalidStatus):
        status = error.response.status_code
        hint = f" (is the Origin {origin} allowed? pass --origin)" if status == 403 else ""
        return f"{where} refused the websocket handshake with HTTP {status}{hint}."
    if isinstance(error, InvalidURI):
        return f"{url!r} is not a valid websocket URL."
    if isinstance(error, TimeoutError):
        return f"{where} did not complete the websocket handshake within {OPEN_TIMEOUT:g}s."
    if isinstance(error, InvalidHandshake):
        return f"{where} did not complete a websocket handshake: {error}."
    if isinstance(error, OSError):
        return f"cannot connect to {where}: {error.strerror or error}."
    return f"cannot connect to {where}: {error}."


async def connection_open(url: str, *, origin: str, source: str | None = None) -> ClientConnection:
    """One client connection with the options the load test uses (no compression, no keepalive).

    `source` binds the client's end to that address (any free port), e.g. 127.0.0.2.
    """
    extra: dict[str, Any] = {"local_addr": (source, 0)} if source is not None else {}
    return await connect(
        url,
        origin=origin,  # type: ignore[arg-type]
        **extra,
        compression=None,
        ping_interval=None,
        open_timeout=OPEN_TIMEOUT,
        close_timeout=2,
        max_size=2**20,
    )


async def ping_answer(ws: ClientConnection, *, within: float = ANSWER_TIMEOUT) -> str:
    """Send `ping`; the next text frame that is not a broadcast."""
    await ws.send(protocol.PING)
    async with asyncio.timeout(within):
        while True:
            answer = await ws.recv()
            if protocol.event_type(answer) != protocol.EVENT_BROADCAST:
                return answer if isinstance(answer, str) else repr(answer)


def error_name(event_text: str) -> str:
    """`error:<code>` for a server error event, for the errors counter."""
    try:
        return f"error:{json.loads(event_text).get('error', 'unknown')}"
    except ValueError:
        return "error:unparsable"


def wrong_answer(answer: str) -> LoadgenError:
    shown = answer if len(answer) <= 80 else answer[:77] + "..."
    return LoadgenError(
        f"the server answered 'ping' with {shown!r} instead of {protocol.PONG!r}: is this a pingpong /ws/ URL?"
    )


async def explanation_before_close(ws: ClientConnection) -> str | None:
    """An error event the server sent before closing, still queued on the connection, if any."""
    try:
        async with asyncio.timeout(1):
            frame = await ws.recv()
    except (ConnectionClosed, TimeoutError):
        return None
    return frame if isinstance(frame, str) and protocol.event_type(frame) == protocol.EVENT_ERROR else None


async def probe(url: str, *, origin: str) -> None:
    """Open one connection and ping once, so a wrong URL or server fails with one clear sentence."""
    try:
        ws = await connection_open(url, origin=origin)
    except Exception as error:
        raise LoadgenError(explain_open_failure(url, origin, error)) from error
    try:
        answer = await ping_answer(ws)
    except ConnectionClosed as closed:
        explained = await explanation_before_close(ws)
        if explained is not None:
            raise LoadgenError(f"the server refused the first connection: {explained}") from None
        code = closed.rcvd.code if closed.rcvd else 1006
        reason = f" ({closed.rcvd.reason})" if closed.rcvd and closed.rcvd.reason else ""
        raise LoadgenError(
            f"the server closed the connection with code {code}{reason} instead of answering 'ping'."
        ) from None
    except TimeoutError:
        raise LoadgenError(f"the server did not answer 'ping' within {ANSWER_TIMEOUT:g}s.") from None
    finally:
        await ws.close()
    if protocol.event_type(answer) == protocol.EVENT_ERROR:
        # The node explained a refusal (full, draining, layer down) before closing.
        raise LoadgenError(f"the server refused the first connection: {answer}")
    if answer != protocol.PONG:
        raise wrong_answer(answer)


async def connections_open(
    url: str,
    *,
    count: int,
    origin: str,
    ramp_up: float = 0.0,
    concurrency: int = CONNECT_CONCURRENCY,
    opened_callback: Callable[[ClientConnection], None] | None = None,
    counters: Counter[str] | None = None,
    sources: Sequence[str | None] = (None,),
    first_index: int = 0,
    opener: Callable[..., Awaitable[Any]] | None = None,
    failure: Callable[[BaseException], str] = failure_name,
) -> tuple[list[Any], Counter[str]]:
    """Open `count` connections, spread over `ramp_up` seconds; the open ones and failure counts.

    Connection `first_index + i` binds to `sources[(first_index + i) % len(sources)]`, so the
    processes of one run share the source addresses evenly. `opener(url, origin=, source=)` opens
    one (`connection_open`, a websockets client, by default) and `failure` names why one failed.
    """
    opener = opener or connection_open
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    started = loop.time()
    opened: list[Any] = []
    failures: Counter[str] = counters if counters is not None else Counter()

    async def one(index: int) -> None:
        if ramp_up > 0:
            await asyncio.sleep(max(0.0, started + ramp_up * index / count - loop.time()))
        async with gate:
            try:
                source = sources[(first_index + index) % len(sources)]
                ws = await opener(url, origin=origin, source=source)
            except Exception as error:
                failures[failure(error)] += 1
                return
        opened.append(ws)
        if opened_callback is not None:
            opened_callback(ws)

    await asyncio.gather(*(one(index) for index in range(count)))
    return opened, failures


async def connections_close(connections: Sequence[ClientConnection], *, within: float = FINISH_TIMEOUT) -> None:
    """Close every connection with 1000, giving up after `within` seconds."""
    if not connections:
        return
    closing = [asyncio.ensure_future(ws.close()) for ws in connections]
    _, pending = await asyncio.wait(closing, timeout=within)
    for task in pending:
        task.cancel()
    for ws in connections:
        if not ws.transport.is_closing():
            ws.transport.abort()
    await asyncio.gather(*closing, return_exceptions=True)


#: The client libraries a run can use: `websockets` (the default, pure Python) or `picows` (Cython, bench/picows_loops.py).
CLIENTS = ("websockets", "picows")


def client_kit(client: str) -> Any:
    """The module whose `Loops`, `connections_open` and `connections_close` drive `client`'s connections."""
    if client == "websockets":
        return sys.modules[__name__]
    if client == "picows":
        try:
            from bench import picows_loops
        except ImportError:
            raise LoadgenError("--client picows needs picows: pip install -e '.[load]'.") from None
        return picows_loops
    raise LoadgenError(f"--client must be one of {', '.join(CLIENTS)}, not {client!r}.")


class LoopCounters:
    """What the closed loops of one process count and the flags the run sets (both clients' Loops)."""

    def __init__(self, *, rate: float) -> None:
        self.rate = rate
        self.measuring_from = math.inf
        self.stop = False
        self.rtts: array[float] = array("d")
        self.messages = 0
        self.close_codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: str | None = None
        self.stopped = asyncio.Event()  # a wrong answer: the run is over


class Loops(LoopCounters):
    """The closed loops of one process on `websockets`: a task per connection."""

    def __init__(self, *, rate: float) -> None:
        super().__init__(rate=rate)
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def opened(self) -> int:
        return len(self.tasks)

    def start(self, ws: ClientConnection) -> None:
        """Start the loop on a connection that just opened; the task is kept, to await or cancel."""
        self.tasks.append(asyncio.ensure_future(self.loop(ws)))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def loop(self, ws: ClientConnection) -> None:
        """Closed loop on one connection until told to stop or the server closes it."""
        perf = time.perf_counter
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = perf()
        try:
            while not self.stop:
                sent = perf()
                # No per-message timer here (the load generator must stay cheap): the run's end
                # cancels a loop still waiting after FINISH_TIMEOUT.
                await ws.send(protocol.PING)
                answer = await ws.recv()
                # `pong!` is compared first, so only the rare event is parsed.
                while answer != protocol.PONG and (kind := protocol.event_type(answer)) in SKIPPED_EVENTS:
                    if kind == protocol.EVENT_ERROR:
                        # An explained refusal (rate limit, node full...): count it, the close follows.
                        self.errors[error_name(str(answer))] += 1
                    answer = await ws.recv()
                now = perf()
                if not isinstance(answer, str):
                    answer = repr(answer)
                if answer != protocol.PONG:
                    self.wrong = answer
                    self.errors["wrong_answer"] += 1
                    self.stop = True
                    self.stopped.set()
                    return
                if sent >= self.measuring_from:
                    self.messages += 1
                    self.rtts.append(now - sent)
                if interval:
                    next_at = max(next_at + interval, now)
                    await asyncio.sleep(next_at - now)
        except ConnectionClosed as closed:
            if not self.stop or closed.rcvd is not None:
                self.close_codes[str(closed.rcvd.code if closed.rcvd else 1006)] += 1
        except TimeoutError:
            self.errors["answer_timeout"] += 1
        except OSError as error:
            self.errors[type(error).__name__] += 1

    async def measure(self, duration: float) -> tuple[float, float, bool]:
        """Count answers for `duration` s, or until a wrong answer or every connection closed.

        (seconds measured, CPU seconds this process used meanwhile, ended early?)
        """
        started = time.perf_counter()
        self.measuring_from = started
        cpu_started = cpu_seconds()
        early = False
        if self.tasks:
            stopped = asyncio.ensure_future(self.stopped.wait())
            finished = asyncio.ensure_future(asyncio.wait(self.tasks))
            done, _ = await asyncio.wait({stopped, finished}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
            early = bool(done)
            stopped.cancel()
            finished.cancel()
        else:
            early = True
        return min(duration, time.perf_counter() - started), cpu_seconds() - cpu_started, early

    async def finish(self) -> None:
        """Stop every loop: in-flight pings get FINISH_TIMEOUT s to be answered, then they are cancelled."""
        self.stop = True
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=FINISH_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class PartPlan:
    """One process's share of a run (picklable: it crosses to a child process)."""

    url: str
    origin: str
    connections: int
    first_index: int
    duration: float
    ramp_up: float
    warmup: float
    rate: float
    sources: list[str | None]
    total_connections: int
    client: str = "websockets"


#: Awaited with True just before the window opens (it may wait for the other processes) and False after it closes.
WindowEdge = Callable[[bool], Awaitable[None]]


async def progress_every(seconds: float, snapshot: Callable[[], Progress], progress: ProgressCallback) -> None:
    """Call `progress` with a fresh snapshot every `seconds` until cancelled."""
    while True:
        progress(snapshot())
        await asyncio.sleep(seconds)


async def run_part(plan: PartPlan, *, edge: WindowEdge, progress: ProgressCallback | None = None) -> Part:
    """This process's share of a run: open its connections and start their loops, warm up, measure, close."""
    loop = asyncio.get_running_loop()
    kit = client_kit(plan.client)
    loops = kit.Loops(rate=plan.rate)
    failures: Counter[str] = Counter()
    phase = Progress("connecting", 0.0, plan.ramp_up, 0, 0, plan.connections, 0)
    since = loop.time()

    def enter(name: str, duration: float) -> None:
        nonlocal since
        phase.phase, phase.duration, since = name, duration, loop.time()

    def snapshot() -> Progress:
        elapsed = min(loop.time() - since, phase.duration)
        return Progress(
            phase.phase, elapsed, phase.duration, loops.opened, sum(failures.values()), plan.connections,
            loops.messages,
        )  # fmt: skip

    reporter = asyncio.ensure_future(progress_every(0.25, snapshot, progress)) if progress else None
    opened: list[Any] = []
    try:
        started = loop.time()
        opened, _ = await kit.connections_open(
            plan.url, count=plan.connections, origin=plan.origin, ramp_up=plan.ramp_up, counters=failures,
            opened_callback=loops.start, sources=plan.sources, first_index=plan.first_index,
        )  # fmt: skip
        connect_seconds = loop.time() - started
        if plan.warmup > 0:
            enter("warming up", plan.warmup)
            await asyncio.sleep(plan.warmup)
        await edge(True)
        enter("running", plan.duration)
        seconds, cpu_used, early = await loops.measure(plan.duration)
        await edge(False)
        if progress:
            progress(snapshot())
        await loops.finish()
        await kit.connections_close(opened)
    finally:
        if reporter is not None:
            reporter.cancel()
        loops.cancel()
    if loops.wrong is not None:
        raise wrong_answer(loops.wrong)
    return Part(
        opened=len(opened), failures=dict(failures), messages=loops.messages, rtts=loops.rtts.tobytes(),
        close_codes=dict(loops.close_codes), errors=dict(loops.errors), seconds=seconds,
        connect_seconds=connect_seconds, cpu_seconds=cpu_used, stopped_early=early,
    )  # fmt: skip


def plans_for(
    url: str,
    *,
    connections: int,
    duration: float,
    ramp_up: float,
    warmup: float,
    origin: str | None,
    rate: float,
    processes: int | str,
    source_addresses: int,
    client: str = "websockets",
) -> list[PartPlan]:
    """Check the options and split the connections over the processes; LoadgenError for a bad option."""
    check_url(url)
    if connections < 1 or duration <= 0 or ramp_up < 0 or warmup < 0 or rate < 0:
        raise LoadgenError("connections must be >= 1, duration > 0, and ramp-up, warm-up and rate >= 0.")
    client_kit(client)
    sources = source_addresses_for(url, source_addresses)
    count = processes_for(processes, connections=connections)
    share, extra = divmod(connections, count)
    plans, first = [], 0
    for index in range(count):
        mine = share + (1 if index < extra else 0)
        plans.append(
            PartPlan(
                url=url, origin=origin or origin_for(url), connections=mine, first_index=first, duration=duration,
                ramp_up=ramp_up, warmup=warmup, rate=rate, sources=sources, total_connections=connections,
                client=client,
            )
        )  # fmt: skip
        first += mine
    return plans


def merge(
    parts: Sequence[Part], *, url: str, connections: int, source_addresses: int, client: str = "websockets"
) -> Result:
    """One Result from every process's Part: counts summed, percentiles over every RTT sample."""
    seconds = max(part.seconds for part in parts)
    rtts: array[float] = array("d")
    close_codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for part in parts:
        rtts.frombytes(part.rtts)
        close_codes.update(part.close_codes)
        errors.update(part.errors)
        failures.update(part.failures)
    opened = sum(part.opened for part in parts)
    messages = sum(part.messages for part in parts)
    cut_short = cut_short_reason(
        close_codes, opened=opened, seconds=seconds, stopped_early=all(part.stopped_early for part in parts)
    )
    of_cores, of_machine, cores, bound = client_load(
        cpu_seconds=[part.cpu_seconds for part in parts], seconds=seconds, cpus=usable_cpus(),
        machine_cpus=os.cpu_count() or 1,
    )  # fmt: skip
    return Result(
        url=url,
        connections=connections,
        duration=round(seconds, 3),
        opened=opened,
        failed=sum(failures.values()),
        messages=messages,
        messages_per_second=round(messages / seconds, 1) if seconds > 0 and cut_short is None else None,
        rtt_ms={name: round(value * 1000, 3) for name, value in percentiles(rtts).items()},
        close_codes=dict(close_codes),
        errors=dict(errors),
        connect_seconds=round(max(part.connect_seconds for part in parts), 3),
        client_cpu_percent=of_cores,
        client_cpu_machine_percent=of_machine,
        client_cores=cores,
        client_bound=bound,
        processes=len(parts),
        source_addresses=source_addresses,
        cut_short=cut_short,
        failures=dict(failures),
        client=client,
    )


def run(
    url: str,
    *,
    connections: int,
    duration: float,
    ramp_up: float = 0.0,
    warmup: float = 0.0,
    origin: str | None = None,
    rate: float = 0.0,
    processes: int | str = 1,
    source_addresses: int = 1,
    client: str = "websockets",
    progress: ProgressCallback | None = None,
    window: WindowCallback | None = None,
    probe_first: bool = True,
) -> Result:
    """Run the closed loop from `processes` processes and measure it; LoadgenError when it cannot run at all.

    `rate` is pings per second per connection, 0 for as fast as answers come. `window(True)` /
    `window(False)` are called as the measurement window opens and closes (in every process
    at once), so a caller can sample server counters over exactly the same interval. `warmup`
    seconds of load run before the window opens. A first connection pings once before any
    load (`probe_first`), so a wrong URL or server fails with one clear sentence.
    """
    plans = plans_for(
        url, connections=connections, duration=duration, ramp_up=ramp_up, warmup=warmup, origin=origin,
        rate=rate, processes=processes, source_addresses=source_addresses, client=client,
    )  # fmt: skip

    async def edge(opening: bool) -> None:
        if window is not None:
            window(opening)

    parts: list[Part] = []
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        if probe_first:
            runner.run(probe(url, origin=plans[0].origin))
        if len(plans) == 1:
            parts = [runner.run(run_part(plans[0], edge=edge, progress=progress))]
    if len(plans) > 1:
        parts = run_processes(plans, progress=progress, window=window)
    return merge(parts, url=url, connections=connections, source_addresses=source_addresses, client=client)


PHASES = ("connecting", "warming up", "running")


def progress_merged(latest: dict[int, Progress], *, connections: int) -> Progress:
    """One snapshot for every process: the least advanced phase, the counts summed."""
    behind = min(latest.values(), key=lambda snapshot: (PHASES.index(snapshot.phase), snapshot.elapsed))
    return Progress(
        behind.phase, behind.elapsed, behind.duration, sum(s.opened for s in latest.values()),
        sum(s.failed for s in latest.values()), connections, sum(s.messages for s in latest.values()),
    )  # fmt: skip


def part_process(plan: PartPlan, index: int, messages: Any, go: Any) -> None:
    """A child process's life: run its part, waiting at the window for the others; report on `messages`."""

    def progress(snapshot: Progress) -> None:
        messages.put(("progress", index, snapshot))

    async def edge(opening: bool) -> None:
        messages.put(("window", index, opening))
        # `go` is a multiprocessing.Event: polled, not waited on in a thread; 10 ms of skew at most.
        while opening and not go.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            part = runner.run(run_part(plan, edge=edge, progress=progress))
    except LoadgenError as error:
        messages.put(("error", index, str(error)))
    except Exception as error:
        messages.put(("error", index, f"client process {index} failed: {type(error).__name__}: {error}"))
    else:
        messages.put(("part", index, part))


def run_processes(
    plans: Sequence[PartPlan], *, progress: ProgressCallback | None, window: WindowCallback | None
) -> list[Part]:
    """Each plan in its own process (spawned: nothing of this process's state is shared); their Parts.

    The window opens when every process is ready and closes when every one has measured.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    go = context.Event()
    children = [
        context.Process(target=part_process, args=(plan, index, messages, go), name=f"loadgen-{index}", daemon=True)
        for index, plan in enumerate(plans)
    ]
    for child in children:
        child.start()
    latest: dict[int, Progress] = {}
    edges: dict[bool, set[int]] = {True: set(), False: set()}
    parts: dict[int, Part] = {}
    try:
        while len(parts) < len(children):
            try:
                kind, index, value = messages.get(timeout=0.25)
            except queue.Empty:
                for number, child in enumerate(children):
                    if number not in parts and child.exitcode not in (None, 0):
                        raise LoadgenError(f"client process {number} exited with code {child.exitcode}.") from None
                continue
            if kind == "progress":
                latest[index] = value
                if progress is not None:
                    progress(progress_merged(latest, connections=plans[0].total_connections))
            elif kind == "window":
                edges[value].add(index)
                if len(edges[value]) == len(children):
                    if window is not None:
                        window(value)
                    if value:
                        go.set()
            elif kind == "error":
                raise LoadgenError(value)
            else:
                parts[index] = value
    finally:
        if len(parts) < len(children):  # one failed: the others' connections are of no use
            for child in children:
                if child.is_alive():
                    child.terminate()
        for child in children:
            child.join(timeout=FINISH_TIMEOUT)
        messages.close()
    return [parts[index] for index in range(len(children))]


def progress_bar(snapshot: Progress, *, width: int = 30) -> str:
    """One line for a terminal: phase, bar, connections and messages so far."""
    fraction = snapshot.elapsed / snapshot.duration if snapshot.duration > 0 else 1.0
    filled = int(width * min(1.0, fraction))
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"{snapshot.phase:<10} [{bar}] {snapshot.elapsed:5.1f}/{snapshot.duration:g}s "
        f"open {snapshot.opened}/{snapshot.connections} failed {snapshot.failed} msgs {snapshot.messages}"
    )


def client_text(result: Result) -> str:
    """Client CPU in words, with the client-bound mark when it applies."""
    cores = f"{result.client_cores} core" + ("s" if result.client_cores != 1 else "")
    text = (
        f"{result.client_cpu_percent:.0f}% of {cores} ({result.processes} process"
        f"{'es' if result.processes != 1 else ''}), {result.client_cpu_machine_percent:.0f}% of the machine"
    )
    if result.client_bound:
        text += " -- CLIENT-BOUND: the client limited these figures; add --processes (or a client machine)"
    return text


def result_text(result: Result) -> str:
    """The human summary printed at the end of a run."""
    rtt = result.rtt_ms
    if result.cut_short is not None:
        rate = f"{result.messages} answered before the server cut the run short at {result.duration:.2f}s: no throughput figure"
    else:
        rate = f"{result.messages} in {result.duration:.2f}s = {result.messages_per_second or 0:,.0f} msg/s"
        rate += " (client-bound)" if result.client_bound else ""
    sources = f", from {result.source_addresses} source addresses" if result.source_addresses > 1 else ""
    lines = [
        f"target       {result.url}",
        f"connections  {result.opened} opened, {result.failed} failed of {result.connections}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(result.failures.items()))})" if result.failures else "")
        + f", in {result.connect_seconds:.2f}s{sources}",
        f"messages     {rate}",
        f"rtt (ms)     p50 {rtt['p50']:.2f}  p90 {rtt['p90']:.2f}  p99 {rtt['p99']:.2f}  max {rtt['max']:.2f}",
        "close codes  " + (", ".join(f"{k}: {v}" for k, v in sorted(result.close_codes.items())) or "none"),
        f"client cpu   {client_text(result)}",
    ]
    if result.errors:
        lines.append("errors       " + ", ".join(f"{k}: {v}" for k, v in sorted(result.errors.items())))
    return "\n".join(lines)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when it is installed (a faster load generator), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
