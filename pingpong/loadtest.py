"""Closed-loop ping/pong load against any deployment: the `loadtest` command and the benchmark.

Each connection sends `ping`, waits for `pong!`, and sends again at once (or at `rate`
per second). Connections open first (spread over `ramp_up` seconds, at most
`CONNECT_CONCURRENCY` handshakes in flight so a small listen backlog is not overrun);
the measurement window is the `duration` seconds after the last one opened or failed.
"""

import asyncio
import json
import math
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from pingpong import protocol

#: Handshakes in flight at once; daphne (Twisted) listens with a backlog of 50.
CONNECT_CONCURRENCY = 50
#: Seconds a handshake or a single answer may take before it counts as failed.
OPEN_TIMEOUT = 10.0
ANSWER_TIMEOUT = 10.0
# Events a closed-loop client reads past while it waits for `pong!`.
SKIPPED_EVENTS = (protocol.EVENT_BROADCAST, protocol.EVENT_ERROR)
#: Seconds to wait for in-flight pings and the closing handshakes at the end.
FINISH_TIMEOUT = 5.0


class LoadtestError(Exception):
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
class LoadtestResult:
    """What one run measured; `rtt_ms` holds p50/p90/p99/max in milliseconds."""

    url: str
    connections: int
    duration: float
    opened: int
    failed: int
    messages: int
    messages_per_second: float
    rtt_ms: dict[str, float]
    close_codes: dict[str, int]
    errors: dict[str, int]
    connect_seconds: float
    client_cpu_percent: float
    failures: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


def loadtest_url(url: str) -> str:
    """The URL if it is a usable ws:// or wss:// URL with a host; LoadtestError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise LoadtestError(f"{url!r} is not a websocket URL: use ws://HOST:PORT/ws/ or wss://HOST/ws/.")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise LoadtestError(f"{url!r} has an invalid port.") from None
    if not parts.hostname:
        raise LoadtestError(f"{url!r} has no host: use ws://HOST:PORT/ws/.")
    return url


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
    """One sentence saying why the first connection failed, for LoadtestError."""
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


async def connection_open(url: str, *, origin: str) -> ClientConnection:
    """One client connection with the options the load test uses (no compression, no keepalive)."""
    return await connect(
        url,
        origin=origin,  # type: ignore[arg-type]
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


def wrong_answer(answer: str) -> LoadtestError:
    shown = answer if len(answer) <= 80 else answer[:77] + "..."
    return LoadtestError(
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


async def loadtest_probe(url: str, *, origin: str) -> None:
    """Open one connection and ping once, so a wrong URL or server fails with one clear sentence."""
    try:
        ws = await connection_open(url, origin=origin)
    except Exception as error:
        raise LoadtestError(explain_open_failure(url, origin, error)) from error
    try:
        answer = await ping_answer(ws)
    except ConnectionClosed as closed:
        explained = await explanation_before_close(ws)
        if explained is not None:
            raise LoadtestError(f"the server refused the first connection: {explained}") from None
        code = closed.rcvd.code if closed.rcvd else 1006
        reason = f" ({closed.rcvd.reason})" if closed.rcvd and closed.rcvd.reason else ""
        raise LoadtestError(
            f"the server closed the connection with code {code}{reason} instead of answering 'ping'."
        ) from None
    except TimeoutError:
        raise LoadtestError(f"the server did not answer 'ping' within {ANSWER_TIMEOUT:g}s.") from None
    finally:
        await ws.close()
    if protocol.event_type(answer) == protocol.EVENT_ERROR:
        # The node explained a refusal (full, draining, layer down) before closing.
        raise LoadtestError(f"the server refused the first connection: {answer}")
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
) -> tuple[list[ClientConnection], Counter[str]]:
    """Open `count` connections, spread over `ramp_up` seconds; the open ones and failure counts."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    started = loop.time()
    opened: list[ClientConnection] = []
    failures: Counter[str] = counters if counters is not None else Counter()

    async def one(index: int) -> None:
        if ramp_up > 0:
            await asyncio.sleep(max(0.0, started + ramp_up * index / count - loop.time()))
        async with gate:
            try:
                ws = await connection_open(url, origin=origin)
            except Exception as error:
                failures[failure_name(error)] += 1
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


class _Run:
    """Shared state of one run: counters the workers update and the progress task reads."""

    def __init__(self, *, rate: float) -> None:
        self.rate = rate
        self.measuring_from = math.inf
        self.stop = False
        self.rtts: list[float] = []
        self.messages = 0
        self.close_codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: str | None = None
        self.stopped = asyncio.Event()

    async def worker(self, ws: ClientConnection) -> None:
        """Closed loop on one connection until told to stop or the server closes it."""
        perf = time.perf_counter
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = perf()
        try:
            while not self.stop:
                sent = perf()
                # No per-message timer here (the load generator must stay cheap): the run's end
                # cancels a worker still waiting after FINISH_TIMEOUT.
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


async def loadtest_run(
    url: str,
    *,
    connections: int,
    duration: float,
    ramp_up: float = 0.0,
    origin: str | None = None,
    rate: float = 0.0,
    progress: ProgressCallback | None = None,
    probe: bool = True,
    window: Callable[[bool], None] | None = None,
    warmup: float = 0.0,
) -> LoadtestResult:
    """Run the closed loop and measure it; LoadtestError when the target cannot be tested at all.

    `window(True)` / `window(False)` are called as the measurement window opens and closes,
    so a caller can sample server counters over exactly the same interval. `warmup` seconds
    of load run before the window opens (the server may still be finishing connection setup).
    """
    loadtest_url(url)
    if connections < 1 or duration <= 0 or ramp_up < 0:
        raise LoadtestError("connections must be >= 1, duration > 0 and ramp-up >= 0.")
    origin = origin or origin_for(url)
    if probe:
        await loadtest_probe(url, origin=origin)
    loop = asyncio.get_running_loop()
    run = _Run(rate=rate)
    workers: list[asyncio.Task[None]] = []
    failures: Counter[str] = Counter()
    started = loop.time()
    phase = "connecting"
    measuring_started = math.inf
    connect_seconds = 0.0

    def report() -> None:
        if progress is None:
            return
        if phase == "connecting":
            elapsed, total = loop.time() - started, ramp_up
        elif phase == "warming up":
            elapsed, total = loop.time() - started - connect_seconds, warmup
        else:
            elapsed, total = loop.time() - measuring_started, duration
        progress(
            Progress(phase, min(elapsed, total), total, len(workers), sum(failures.values()), connections, run.messages)
        )

    async def report_every(seconds: float) -> None:
        while True:
            report()
            await asyncio.sleep(seconds)

    reporter = asyncio.ensure_future(report_every(0.25))
    try:
        opened, _ = await connections_open(
            url,
            count=connections,
            origin=origin,
            ramp_up=ramp_up,
            counters=failures,
            opened_callback=lambda ws: workers.append(asyncio.ensure_future(run.worker(ws))),
        )
        connect_seconds = loop.time() - started
        if warmup > 0:
            phase = "warming up"
            await asyncio.sleep(warmup)
        phase = "running"
        measuring_started = loop.time()
        run.measuring_from = time.perf_counter()
        cpu_measuring = cpu_seconds()
        if window is not None:
            window(True)
        if workers:
            # Until the time is up, a wrong answer stops the run, or every connection has closed.
            stopped = asyncio.ensure_future(run.stopped.wait())
            finished = asyncio.ensure_future(asyncio.wait(workers))
            await asyncio.wait({stopped, finished}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            finished.cancel()
        measured = min(duration, loop.time() - measuring_started)
        cpu_used = cpu_seconds() - cpu_measuring
        if window is not None:
            window(False)
        report()
        run.stop = True
        if workers:
            _, pending = await asyncio.wait(workers, timeout=FINISH_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await connections_close(opened)
    finally:
        reporter.cancel()
        for task in workers:
            task.cancel()
    if run.wrong is not None:
        raise wrong_answer(run.wrong)
    return LoadtestResult(
        url=url,
        connections=connections,
        duration=round(measured, 3),
        opened=len(opened),
        failed=sum(failures.values()),
        messages=run.messages,
        messages_per_second=round(run.messages / measured, 1) if measured > 0 else 0.0,
        rtt_ms={name: round(value * 1000, 3) for name, value in percentiles(run.rtts).items()},
        close_codes=dict(run.close_codes),
        errors=dict(run.errors),
        connect_seconds=round(connect_seconds, 3),
        client_cpu_percent=round(100 * cpu_used / measured, 1) if measured > 0 else 0.0,
        failures=dict(failures),
    )


def progress_bar(snapshot: Progress, *, width: int = 30) -> str:
    """One line for a terminal: phase, bar, connections and messages so far."""
    fraction = snapshot.elapsed / snapshot.duration if snapshot.duration > 0 else 1.0
    filled = int(width * min(1.0, fraction))
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"{snapshot.phase:<10} [{bar}] {snapshot.elapsed:5.1f}/{snapshot.duration:g}s "
        f"open {snapshot.opened}/{snapshot.connections} failed {snapshot.failed} msgs {snapshot.messages}"
    )


def result_text(result: LoadtestResult) -> str:
    """The human summary printed at the end of a run."""
    rtt = result.rtt_ms
    lines = [
        f"target       {result.url}",
        f"connections  {result.opened} opened, {result.failed} failed of {result.connections}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(result.failures.items()))})" if result.failures else "")
        + f", in {result.connect_seconds:.2f}s",
        f"messages     {result.messages} in {result.duration:.2f}s = {result.messages_per_second:,.0f} msg/s",
        f"rtt (ms)     p50 {rtt['p50']:.2f}  p90 {rtt['p90']:.2f}  p99 {rtt['p99']:.2f}  max {rtt['max']:.2f}",
        "close codes  " + (", ".join(f"{k}: {v}" for k, v in sorted(result.close_codes.items())) or "none"),
        f"client cpu   {result.client_cpu_percent:.0f}% of one core",
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


def loadtest_sync(url: str, **options: Any) -> LoadtestResult:
    """loadtest_run in a fresh event loop (uvloop when available)."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(loadtest_run(url, **options))
