"""Server processes for the benchmark: redis-server, daphne and uvicorn, pinned to the server cores.

Every process is started and killed by the benchmark; logs go to bench/results/logs/.
"""

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SECRET = "bench-secret-key-not-for-deployment-0123456789-abcdefghijklmnopqrstuvwxyz"
TOKEN = "bench-broadcast-token"

#: The ASGI application of each app under test; "project" is served by `manage.py serve` on daphne.
APPS = {
    "project": "project.asgi:application",
    # The project with channels_redis' RedisPubSubChannelLayer instead of its own (bench/settings_channels_redis.py).
    "project-channels-redis": "project.asgi:application",
    "baseline": "bench.baseline:application",
    "stock": "bench.stock:application",
    "rawfanout": "bench.fanout:application",
}
SERVERS = ("daphne", "uvicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, client cores): the last core for the load generator, the rest for servers."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return set(cores[:-1]), {cores[-1]}


def pin_prefix(cores: set[int] | None) -> list[str]:
    """`taskset -c ...` in front of a server command, where taskset exists."""
    if cores is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", ",".join(str(core) for core in sorted(cores))]


def open_files_raise() -> int:
    """Raise this process's open-files limit to the hard limit (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1_048_576
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 where /proc is missing)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0.0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


@dataclass
class Process:
    """One server process with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"

    def start(self, *, ready, timeout: float = 30) -> "Process":
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            return ready()

        wait_for(up, timeout=timeout, what=f"{self.name} on port {self.port}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


#: Settings module per app (default project.settings).
SETTINGS = {"project-channels-redis": "bench.settings_channels_redis"}


def server_env(*, redis_url: str | None, app: str = "project") -> dict[str, str]:
    """The same settings for every app: production mode, no rate limit, no connection cap."""
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env.update(
        DJANGO_SETTINGS_MODULE=SETTINGS.get(app, "project.settings"),
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        PINGPONG_RATE_PER_SECOND="0",
        PINGPONG_MAX_CONNECTIONS="0",
        PINGPONG_BROADCAST_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def server_argv(*, app: str, server: str, port: int) -> list[str]:
    """The command line serving `app` on `server`; the project on daphne is `manage.py serve`."""
    if server == "daphne":
        if app.startswith("project"):
            return [sys.executable, "manage.py", "serve", "--host", LOOPBACK, "--port", str(port)]
        return [sys.executable, "-m", "daphne", "-b", LOOPBACK, "-p", str(port), APPS[app]]
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", APPS[app], "--host", LOOPBACK, "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
            "--no-access-log", "--log-level", "warning", "--backlog", "4096",
        ]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


def app_start(*, app: str, server: str, redis_url: str | None, cores: set[int] | None, log_dir: Path) -> Process:
    """Start one app on one server, pinned to `cores`, and wait until /healthz answers."""
    port = free_port()
    argv = pin_prefix(cores) + server_argv(app=app, server=server, port=port)
    process = Process(f"{server}-{app}", argv, server_env(redis_url=redis_url, app=app), port, log_dir)
    return process.start(ready=lambda: healthy(port))


def redis_start(*, cores: set[int] | None, log_dir: Path) -> Process | None:
    """A throwaway redis-server on a free port; None when redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    argv = pin_prefix(cores) + [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    return Process("redis", argv, dict(os.environ), port, log_dir).start(ready=lambda: port_open(port), timeout=10)
