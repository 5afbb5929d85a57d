"""Real processes for tests and the benchmark: daphne nodes, uvicorn, redis-server and a Redis Sentinel on loopback.

Every process is owned by whoever starts it (a fixture, a workload) and is killed when it ends.
Servers that can are bound to port 0 and the port they got is read back from their log, so
no port is probed free and then raced for. This module imports nothing from pytest at load
time: `bench/` uses it too.
"""

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ORIGIN = "http://127.0.0.1"
TEST_SECRET = "test-secret-key-for-pingpong-tests-only-0123456789-abcdefghijklmnop"
# `manage.py serve --server`: the servers a node can run on (daphne is the default).
SERVERS = ("daphne", "uvicorn")


def timeout_factor() -> float:
    """PINGPONG_TEST_TIMEOUT_FACTOR (default 1): every timeout in the toolkit is multiplied by it.

    As websockets' WEBSOCKETS_TESTS_TIMEOUT_FACTOR: a slow or busy machine (CI) sets 2 or more
    instead of every test growing its own slack.
    """
    value = float(os.environ.get("PINGPONG_TEST_TIMEOUT_FACTOR") or 1)
    if value <= 0:
        raise ValueError(f"PINGPONG_TEST_TIMEOUT_FACTOR must be positive, not {value}")
    return value


TIMEOUT_FACTOR = timeout_factor()


def scaled(seconds: float) -> float:
    """`seconds` times PINGPONG_TEST_TIMEOUT_FACTOR: use it for every wait that a slow machine makes longer."""
    return seconds * TIMEOUT_FACTOR


def wait_until(
    predicate: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds (scaled)."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {limit:g}s waiting for {what}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now.

    Only for what cannot bind port 0 and say which port it got (redis-server's `--port 0`
    turns TCP off), or for an address that must refuse connections. Racy by nature: a
    server started on it retries on another port if it was taken meanwhile.
    """
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 where /proc or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def healthy(http: str) -> bool:
    """True when GET {http}/healthz answers 200."""
    try:
        with urllib.request.urlopen(f"{http}/healthz", timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def redis_binary() -> str:
    """The redis-server binary; skips the test without one unless PINGPONG_REQUIRE_REDIS is set."""
    import pytest  # here, not at the top: bench/ imports this module without pytest's runner

    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("PINGPONG_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed and PINGPONG_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed")
    return found


# How daphne (`manage.py serve` and its own CLI) and uvicorn say which address they bound.
BOUND_PORT = re.compile(r"(?:listening on http://|Listening on TCP address |running on http://)127\.0\.0\.1:(\d+)")


class ServerProcess:
    """A server in its own process with its own log file.

    `command(port)` is its command line; with `port=0` (the default) the server binds an
    ephemeral port and `start` reads it back from the log (see BOUND_PORT). A given port lets
    a test restart a server where its clients expect it. `probe_port=True` is for servers that
    cannot report a port they bound (redis-server; daphne's CLI under Django's logging
    settings, which silence its "Listening on" line): a port probed free, and up to three
    attempts if another process took it in between.
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        *,
        name: str,
        env: dict[str, str],
        ready: Callable[["ServerProcess"], bool],
        port: int = 0,
        probe_port: bool = False,
        log_dir: Path | None = None,
    ) -> None:
        self.command, self.name, self.env, self.ready = command, name, env, ready
        self.probe_port = probe_port
        self.requested_port = port
        self.port = port
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", dir=log_dir, delete=False)
        self.log_path = Path(self.log.name)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30) -> "ServerProcess":
        """Start the process and wait (`timeout` s, scaled) until its port is known and it is ready."""
        if not self.probe_port or self.requested_port:  # port 0 read back, a given port, or a restart
            self._start_once(timeout)
            return self
        for attempt in range(3):
            self.requested_port = self.port = free_port()
            try:
                self._start_once(timeout)
                return self
            except AssertionError:
                if attempt == 2 or "Address already in use" not in self.output():
                    raise
        return self

    def _start_once(self, timeout: float) -> None:
        self.proc = subprocess.Popen(
            self.command(self.requested_port), cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        if not self.requested_port:
            self.port = 0
            wait_until(self._port_read, timeout=timeout, what=f"{self.name} to say which port it bound")
        wait_until(
            lambda: self.running() and self.ready(self),
            timeout=timeout,
            interval=0.1,
            what=f"{self.name} on port {self.port}",
        )

    def _port_read(self) -> bool:
        self.running()
        found = BOUND_PORT.search(self.output())
        if found:
            self.port = int(found.group(1))
        return found is not None

    def running(self) -> bool:
        """True while the process runs; fails with its log when it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting at most `timeout` s (scaled)."""
        assert self.proc is not None
        return self.proc.wait(timeout=scaled(timeout))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=scaled(10))

    def stop(self) -> None:
        """Kill the process and keep its log (the benchmark's logs stay in bench/results/logs/)."""
        self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident memory, from /proc."""
        return rss_bytes(self.pid)

    def close(self, *, keep_log: bool = False) -> None:
        """Kill the process; remove its log unless asked to keep it."""
        self.kill()
        self.log.close()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)


class RedisServer(ServerProcess):
    """A redis-server that keeps nothing on disk; restartable on the same port.

    redis-server cannot bind port 0 and report it (`--port 0` turns TCP off), so it gets a
    port probed free (see ServerProcess).
    """

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        args: tuple[str, ...] = (),
        prefix: Sequence[str] = (),
        log_dir: Path | None = None,
    ) -> None:
        self.password = password
        self.args = args  # more redis-server options, e.g. ("--maxmemory", "8mb")

        def command(port: int) -> list[str]:
            argv = [*prefix, binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
            return argv + (["--requirepass", password] if password else []) + list(args)

        super().__init__(
            command,
            name="redis",
            env=dict(os.environ),
            ready=lambda server: port_open(server.port),
            probe_port=True,
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def start(self, *, timeout: float = 10) -> "RedisServer":
        super().start(timeout=timeout)
        return self

    def kill(self) -> None:
        super().kill()
        if self.port:
            wait_until(lambda: not port_open(self.port), timeout=10, what="redis-server to stop")


class SentinelServer:
    """`redis-server --sentinel` on a free port, watching one master; its config lives in a temporary directory."""

    def __init__(self, binary: str, *, master: RedisServer, master_name: str, password: str | None = None) -> None:
        self.binary = binary
        self.port = free_port()
        self.master, self.master_name, self.password = master, master_name, password
        self.dir = tempfile.TemporaryDirectory(prefix="sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = Path(self.dir.name) / "sentinel.conf"  # Sentinel rewrites its config file: a writable one
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f"dir {self.dir.name}",
            f"sentinel monitor {self.master_name} {LOOPBACK} {self.master.port} 1",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [self.binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda: port_open(self.port), timeout=10, what="redis sentinel to listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.dir.cleanup()


_DATABASE_URL: list[str] = []


def database_url() -> str:
    """A migrated SQLite database that this process's test nodes share: made once, removed at exit."""
    if not _DATABASE_URL:
        directory = tempfile.mkdtemp(prefix="pingpong-db-")
        atexit.register(shutil.rmtree, directory, True)
        url = f"sqlite:///{directory}/db.sqlite3"
        done = manage("migrate", "--noinput", env={"DATABASE_URL": url})
        if done.returncode != 0:
            raise RuntimeError(f"manage.py migrate failed:\n{done.stdout}{done.stderr}")
        _DATABASE_URL.append(url)
    return _DATABASE_URL[0]


def node_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test node: production mode, loopback hosts, no REDIS_URL unless given, the test database."""
    inherited = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    environment = {
        **inherited,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": TEST_SECRET,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    environment.setdefault("DATABASE_URL", database_url())
    return environment


def serve_command(port: int, *, server: str = "daphne", workers: int = 1) -> list[str]:
    """`manage.py serve` on loopback: how `make run`, compose and the tests start the project."""
    command = [sys.executable, "manage.py", "serve", "--host", LOOPBACK, "--port", str(port), "--server", server]
    return command + (["--workers", str(workers)] if workers != 1 else [])


# How the supervisor of `serve --workers N` logs each worker it starts.
WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


class DaphneNode(ServerProcess):
    """`manage.py serve` in its own process, with its own environment and log file."""

    def __init__(
        self, *, env: dict[str, str] | None = None, port: int = 0, server: str = "daphne", workers: int = 1
    ) -> None:
        self.server, self.workers = server, workers
        super().__init__(
            lambda port: serve_command(port, server=server, workers=workers),
            name=server,
            env=node_env(env),
            # With workers, ready once every one of them listens (each logs its bound address).
            ready=lambda node: node.output().count("listening on http://") >= workers and healthy(node.http),
            port=port,
        )

    def worker_pids(self) -> dict[int, int]:
        """With `workers`: the pid of each worker index, the latest started (from the supervisor's log)."""
        return {int(index): int(pid) for index, pid in WORKER_STARTED.findall(self.output())}

    def kill(self) -> None:
        """Kill the process and, with `workers`, every worker it started (they are in their own process groups)."""
        super().kill()
        for pid in self.worker_pids().values():
            try:
                if b"--worker-index" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws/"

    def start(self, *, timeout: float = 30) -> "DaphneNode":
        super().start(timeout=timeout)
        return self

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("pingpong_limit_hits_total", 'limit="size"'); 0 if absent."""
        _, body = http_request(f"{self.http}/metrics")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == wanted:
                return float(value)
        return 0.0


class PeakRss:
    """Samples a node's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, node: "DaphneNode") -> None:
        self.node, self.peak, self.stopped = node, node.rss_bytes(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.1):
            self.peak = max(self.peak, self.node.rss_bytes())

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join(timeout=5)
        return self.peak


def http_request(
    url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for success and error statuses alike."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=scaled(10)) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def api_broadcast(node: DaphneNode, text: str, *, token: str | None = None, authorization: str | None = None) -> int:
    """POST /api/broadcast {"text": text} to `node` with a bearer `token` (or a raw header); the status."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        authorization = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    status, _ = http_request(
        f"{node.http}/api/broadcast", method="POST", body=json.dumps({"text": text}).encode(), headers=headers
    )
    return status


def api_publish(node: DaphneNode, topic: str, data: object, *, token: str, publication_id: str | None = None) -> int:
    """POST /api/publish {"topic", "data", "id"} to `node` with a bearer `token`; the status."""
    request = {"topic": topic, "data": data} | ({} if publication_id is None else {"id": publication_id})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, _ = http_request(
        f"{node.http}/api/publish", method="POST", body=json.dumps(request).encode(), headers=headers
    )
    return status


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a management command in a fresh process."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
