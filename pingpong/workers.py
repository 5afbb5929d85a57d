"""`manage.py serve --workers N`: N server processes on one port, supervised by the process that started them.

One port, N listeners: every worker binds its own listening socket to the same address with
SO_REUSEPORT, and the kernel spreads new connections over them by a hash of the client's address and
port. The parent binds the address first (with SO_REUSEPORT, never listening, so it takes no
connections): `--port 0` gets its port there, the workers bind that port, and no other program can
take it between a worker's death and its restart. Why not one socket inherited by every worker (as
gunicorn does): Twisted and uvloop both accept in batches on each wake-up, so in a burst the first
worker awake takes most of it, and `PINGPONG_MAX_CONNECTIONS` is per worker: one worker would refuse
with 4013 while the others idle. SO_REUSEPORT spreads evenly; its cost is that connections still in a
dead worker's accept queue (not yet accepted) are reset. Both servers take a socket we made: daphne as
a Twisted `fd:` endpoint, uvicorn as `sockets=[...]`.

Each worker is `manage.py serve --worker-index I` in a fresh interpreter (not a fork: settings,
node id and Redis client names are computed per process, and no event loop is inherited). It is a
node of its own for presence, the caps and the drain. The parent restarts a worker that exits
unexpectedly, at most N times in any RESTART_WINDOW_SECONDS, and otherwise exits 1; on SIGTERM or
SIGINT it sends the same signal to every worker once and exits 0 when all of them drained and
exited 0 within PINGPONG_DRAIN_SECONDS + EXIT_MARGIN_SECONDS.
"""

import collections
import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Final

from pingpong.serving import LISTEN_BACKLOG

logger = logging.getLogger("pingpong.server")

AUTO: Final = "auto"
# A worker may die and be restarted this many times per worker in any window before the parent gives up.
RESTART_WINDOW_SECONDS: Final = 60.0
# After the drain, a worker's own shutdown (daphne's application cancel, uvicorn's 1 s grace) gets this long.
EXIT_MARGIN_SECONDS: Final = 5.0
POLL_SECONDS: Final = 0.1
CGROUP_V2_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU: Final = Path("/sys/fs/cgroup/cpu")
PR_SET_PDEATHSIG: Final = 1


def cgroup_cpu_limit(*, v2: Path = CGROUP_V2_CPU_MAX, v1: Path = CGROUP_V1_CPU) -> int | None:
    """The CPUs a cgroup CPU quota allows (a container's `cpus:`), rounded up; None without a quota."""
    try:
        quota, period = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def cpus_available() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    Docker's `--cpus` and compose's `cpus:` set a quota and leave the affinity at every host CPU,
    so the affinity alone would start a worker per host CPU in a one-CPU container.
    """
    count = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return min(count, limit) if limit else count


def count_parse(value: str) -> int | str:
    """`--workers`: `auto` or a whole number of at least 1 (argparse type)."""
    if value == AUTO:
        return AUTO
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--workers takes {AUTO} or a whole number of at least 1, not {value!r}")
    return count


def address_bind(*, host: str, port: int, listen: bool) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT; listening (non-blocking) for a worker,
    only bound for the parent's reservation of the port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def parent_death_signal_set() -> None:
    """In a worker, before exec: SIGTERM (a drain) when the parent dies, even of SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Runs `count` workers, restarts the ones that die, and forwards SIGTERM/SIGINT to all of them."""

    def __init__(
        self,
        *,
        count: int,
        command: Callable[[int], list[str]],
        env: Callable[[int], dict[str, str]],
        drain_seconds: float,
        on_exit: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.count, self.command, self.env, self.on_exit = count, command, env, on_exit
        self.drain_seconds = drain_seconds
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: collections.deque[float] = collections.deque()
        self.stop_signal: int | None = None

    def run(self) -> int:
        """Start every worker and supervise them until a signal or too many deaths; the exit status."""
        original = {sig: signal.signal(sig, self.signal_handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self.spawn(index)
            while self.stop_signal is None:
                time.sleep(POLL_SECONDS)
                for index, process in list(self.workers.items()):
                    if self.stop_signal is None and process.poll() is not None and not self.respawn(index):
                        return self.stop(signal.SIGTERM, status=1)
            return self.stop(self.stop_signal)
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def signal_handle(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
        else:
            logger.info("already stopping: signal %d ignored (every worker got the first one)", sig)

    def spawn(self, index: int) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the parent alone, which forwards it once
        # (a second SIGINT would make uvicorn skip the drain).
        process = subprocess.Popen(
            self.command(index), env=self.env(index), process_group=0, preexec_fn=parent_death_signal_set
        )
        self.workers[index] = process
        logger.info("worker %d started (pid %d)", index, process.pid)

    def respawn(self, index: int) -> bool:
        """Restart a worker that exited on its own; False when the restart budget is spent."""
        process = self.workers[index]
        self.on_exit(process.pid)
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_SECONDS:
            self.restarts.popleft()
        if len(self.restarts) >= self.count:
            logger.error(
                "worker %d (pid %d) exited with %s: %d restarts in %.0f s already, giving up",
                index,
                process.pid,
                process.returncode,
                len(self.restarts),
                RESTART_WINDOW_SECONDS,
            )
            del self.workers[index]
            return False
        self.restarts.append(now)
        logger.warning("worker %d (pid %d) exited with %s; restarting it", index, process.pid, process.returncode)
        self.spawn(index)
        return True

    def stop(self, sig: int, *, status: int = 0) -> int:
        """Send `sig` to every worker, wait for them to drain and exit; 0 when all exited 0 in time."""
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(sig)
        deadline = time.monotonic() + self.drain_seconds + EXIT_MARGIN_SECONDS
        for index, process in self.workers.items():
            try:
                code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d (pid %d) did not exit within the drain; killed", index, process.pid)
                process.kill()
                code = process.wait()
            self.on_exit(process.pid)
            if code != 0:
                status = 1
        logger.info("all workers stopped (exit %d)", status)
        return status
