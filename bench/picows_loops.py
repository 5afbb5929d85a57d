"""The closed loops of bench/loadgen.py on picows: the same pings, counts and closes at half the client CPU.

Why a second client: a server that answers 50,000 pings/s on one core (uvicorn) saturates the
`websockets` client's core first (about 30 µs of client CPU per message here, a task and a future
per frame), so the figure measured the client. picows parses frames in Cython and calls back per
frame, with no task per connection: about 14 µs per message on the same machine. `run_part` picks
this module's `Loops` and `connections_open` for `client="picows"`; the probe, the options, the
merge and the report are shared.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from picows import WSCloseCode, WSFrame, WSInvalidStatusError, WSListener, WSMsgType, WSTransport, ws_connect

from bench import loadgen
from pingpong import protocol

# picows logs every connection and disconnection at INFO: thousands of lines per run.
logging.getLogger("picows").setLevel(logging.WARNING)

PING = protocol.PING.encode()
PONG = protocol.PONG.encode()


class Connection(WSListener):
    """One client connection: sends `ping`, hands every answer and close to its Loops."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.loops: Loops | None = None
        self.sent = 0.0
        self.next_at = 0.0
        self.waiting = False
        self.close_seen = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def ping(self) -> None:
        if self.transport is None or self.loops is None or self.loops.stop or self.transport.is_disconnected:
            return
        self.waiting = True
        self.loops.waiting += 1
        self.sent = time.perf_counter()
        self.transport.send(WSMsgType.TEXT, PING)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code()
            if self.loops is not None and not transport.is_close_frame_sent:
                self.close_seen = True  # the server closed: counted (the answer to our own close is not)
                self.loops.close_codes[str(code.value)] += 1
                transport.send_close(code)
            transport.disconnect()
        elif self.loops is None:
            return
        elif frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if payload == PONG:  # compared first, so only the rare event is decoded
                self.loops.answered(self, time.perf_counter())
            else:
                self.loops.event(payload.decode("utf-8", "replace"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.loops is not None:
            self.loops.gone(self)


class Loops(loadgen.LoopCounters):
    """The closed loops of one process, driven by frame callbacks; the interface of loadgen.Loops."""

    def __init__(self, *, rate: float) -> None:
        super().__init__(rate=rate)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.connections: list[Connection] = []
        self.open = 0
        self.waiting = 0
        self.all_gone = asyncio.Event()  # every connection closed
        self.idle = asyncio.Event()  # stopping, and no ping is waiting for its answer

    @property
    def opened(self) -> int:
        return len(self.connections)

    def cancel(self) -> None:
        """Nothing to cancel: callbacks, not tasks."""

    def start(self, connection: Connection) -> None:
        """Start the loop on a connection that just opened."""
        connection.loops = self
        connection.next_at = time.perf_counter()
        self.connections.append(connection)
        self.open += 1
        self.all_gone.clear()
        connection.ping()

    def answered(self, connection: Connection, now: float) -> None:
        if not connection.waiting:
            return
        self.settle(connection)
        if connection.sent >= self.measuring_from:
            self.messages += 1
            self.rtts.append(now - connection.sent)
        if self.stop:
            return
        if not self.interval:
            connection.ping()
            return
        connection.next_at = max(connection.next_at + self.interval, now)
        asyncio.get_running_loop().call_later(connection.next_at - now, connection.ping)

    def settle(self, connection: Connection) -> None:
        connection.waiting = False
        self.waiting -= 1
        if self.stop and self.waiting == 0:
            self.idle.set()

    def event(self, text: str) -> None:
        """A frame other than `pong!`: broadcasts are read past, errors counted, anything else ends the run."""
        kind = protocol.event_type(text)
        if kind == protocol.EVENT_BROADCAST:
            return
        if kind == protocol.EVENT_ERROR:
            # An explained refusal (rate limit, node full...): count it, the close follows.
            self.errors[loadgen.error_name(text)] += 1
            return
        self.wrong = text
        self.errors["wrong_answer"] += 1
        self.stop = True
        self.stopped.set()

    def gone(self, connection: Connection) -> None:
        if not connection.close_seen and not self.stop:
            self.close_codes["1006"] += 1
        if connection.waiting:
            self.settle(connection)
        self.open -= 1
        if self.open == 0:
            self.all_gone.set()

    async def measure(self, duration: float) -> tuple[float, float, bool]:
        """Count answers for `duration` s, or until a wrong answer or every connection closed."""
        started = time.perf_counter()
        self.measuring_from = started
        cpu_started = loadgen.cpu_seconds()
        early = True
        if self.open:
            waits = {asyncio.ensure_future(self.stopped.wait()), asyncio.ensure_future(self.all_gone.wait())}
            done, pending = await asyncio.wait(waits, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
            early = bool(done)
            for task in waits:
                task.cancel()
        return min(duration, time.perf_counter() - started), loadgen.cpu_seconds() - cpu_started, early

    async def finish(self) -> None:
        """Stop every loop: in-flight pings get FINISH_TIMEOUT s to be answered."""
        self.stop = True
        if self.waiting > 0:
            try:
                async with asyncio.timeout(loadgen.FINISH_TIMEOUT):
                    await self.idle.wait()
            except TimeoutError:
                pass


def failure_name(error: BaseException) -> str:
    if isinstance(error, WSInvalidStatusError) and error.response is not None:
        return f"http_{int(error.response.status)}"
    return loadgen.failure_name(error)


async def connection_open(url: str, *, origin: str, source: str | None = None) -> Connection:
    """One picows connection with the options of loadgen.connection_open (no compression, no keepalive)."""
    extra: dict[str, Any] = {"local_addr": (source, 0)} if source is not None else {}
    _, connection = await ws_connect(
        Connection, url, extra_headers={"Origin": origin}, max_frame_size=2**20,
        websocket_handshake_timeout=loadgen.OPEN_TIMEOUT, **extra,
    )  # fmt: skip
    assert isinstance(connection, Connection)
    return connection


#: loadgen.connections_open with picows connections: the same spread, gate and source addresses.
connections_open = functools.partial(loadgen.connections_open, opener=connection_open, failure=failure_name)


async def connections_close(connections: Sequence[Connection], *, within: float = loadgen.FINISH_TIMEOUT) -> None:
    """Close every connection with 1000 and wait for the server's answer, aborting after `within` seconds."""
    transports = [c.transport for c in connections if c.transport is not None and not c.transport.is_disconnected]
    for transport in transports:
        transport.send_close(WSCloseCode.OK)
    waits = [asyncio.ensure_future(transport.wait_disconnected()) for transport in transports]
    if waits:
        await asyncio.wait(waits, timeout=within)
    for transport in transports:
        transport.disconnect(graceful=False)
    await asyncio.gather(*waits, return_exceptions=True)
