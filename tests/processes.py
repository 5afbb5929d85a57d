"""Real processes for tests: a redis-server and daphne nodes, each on a free loopback port.

Every process is owned by the test that starts it and is killed when the test ends.
"""

import json
import os
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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ORIGIN = "http://127.0.0.1"
TEST_SECRET = "test-secret-key-for-pingpong-tests-only-0123456789-abcdefghijklmnop"
# `manage.py serve --server`: the servers a node can run on (daphne is the default).
SERVERS = ("daphne", "uvicorn")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


def redis_binary() -> str | None:
    """The redis-server binary; skips the test without one unless PINGPONG_REQUIRE_REDIS is set."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("PINGPONG_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed and PINGPONG_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed")
    return found


class RedisServer:
    """A redis-server on a free port that keeps nothing on disk; restartable on the same port."""

    def __init__(self, binary: str, *, password: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.port = free_port()
        self.password = password
        self.args = args  # more redis-server options, e.g. ("--maxmemory", "8mb")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), timeout=10, what="redis-server to listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        wait_until(lambda: not port_open(self.port), timeout=10, what="redis-server to stop")

    def stop(self) -> None:
        self.kill()


class DaphneNode:
    """`manage.py serve` in its own process, with its own environment and log file."""

    def __init__(self, *, env: dict[str, str] | None = None, port: int | None = None, server: str = "daphne") -> None:
        # A given port lets a test restart a node where its clients expect it.
        self.port = free_port() if port is None else port
        self.server = server
        inherited = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
        self.env = {
            **inherited,
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": TEST_SECRET,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log = tempfile.NamedTemporaryFile(prefix="daphne-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws/"

    def start(self) -> "DaphneNode":
        serve = ["serve", "--host", LOOPBACK, "--port", str(self.port), "--server", self.server]
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", *serve],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.healthy, timeout=30, interval=0.1, what=f"daphne on port {self.port}")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daphne exited with {self.proc.returncode}:\n{self.output()}")
        try:
            with urllib.request.urlopen(f"{self.http}/healthz", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident memory, from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("pingpong_limit_hits_total", 'limit="size"'); 0 if absent."""
        _, body = http_request(f"{self.http}/metrics")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == wanted:
                return float(value)
        return 0.0

    def close(self) -> None:
        self.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


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
        with urllib.request.urlopen(request, timeout=10) as response:
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


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a management command in a fresh process."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
