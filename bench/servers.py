"""Server processes for the benchmark: redis-server, daphne and uvicorn, pinned to the server cores.

Every process is started and killed by the benchmark; logs go to bench/results/logs/. The
processes themselves are the tests' (tests/processes.py: port 0 read back from the log,
bounded start, one kill), so the benchmark and the suite start servers one way.
"""

import os
import resource
import shutil
import signal
import sys
from pathlib import Path

from tests.processes import LOOPBACK, WORKER_STARTED, RedisServer, ServerProcess, healthy, rss_bytes

__all__ = ["LOOPBACK", "ServerProcess", "rss_bytes"]  # re-exported for the workloads

SECRET = "bench-secret-key-not-for-deployment-0123456789-abcdefghijklmnopqrstuvwxyz"
TOKEN = "bench-broadcast-token"
#: PINGPONG_TOKEN_SECRET of every server: W5 signs its clients' connection tokens with it.
TOKEN_SECRET = "bench-token-secret-not-for-deployment-0123456789"

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
#: The cores this process could use when the benchmark started, before it pinned itself to the client core.
STARTING_CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0.0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


#: Settings module per app (default project.settings).
SETTINGS = {"project-channels-redis": "bench.settings_channels_redis"}


def server_env(*, redis_url: str | None, app: str = "project") -> dict[str, str]:
    """The same settings for every app: production mode, no rate limit, no connection caps (the load
    generator connects from one address unless told otherwise)."""
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env.update(
        DJANGO_SETTINGS_MODULE=SETTINGS.get(app, "project.settings"),
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        PINGPONG_RATE_PER_SECOND="0",
        PINGPONG_MAX_CONNECTIONS="0",
        PINGPONG_MAX_CONNECTIONS_PER_IP="0",
        PINGPONG_BROADCAST_TOKEN=TOKEN,
        PINGPONG_TOKEN_SECRET=TOKEN_SECRET,
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def server_argv(*, app: str, server: str, port: int, workers: int = 1) -> list[str]:
    """The command line serving `app` on `server`; the project is `manage.py serve [--server uvicorn]`
    (`--workers N` for more than one), the other apps run on the servers' own command lines (uvicorn
    with the project's choices)."""
    if workers != 1:
        if not app.startswith("project"):
            raise ValueError(f"only the project runs with --workers, not {app!r}")
        return [
            sys.executable, "manage.py", "serve", "--host", LOOPBACK, "--port", str(port), "--server", server,
            "--workers", str(workers),
        ]  # fmt: skip
    if server == "daphne":
        if app.startswith("project"):
            return [sys.executable, "manage.py", "serve", "--host", LOOPBACK, "--port", str(port)]
        return [sys.executable, "-m", "daphne", "-b", LOOPBACK, "-p", str(port), APPS[app]]
    if server == "uvicorn":
        if app.startswith("project"):
            return [
                sys.executable,
                "manage.py",
                "serve",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--server",
                "uvicorn",
            ]
        return [
            sys.executable, "-m", "uvicorn", APPS[app], "--host", LOOPBACK, "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--lifespan", "off", "--ws", "websockets-sansio",
            # info: the "running on" line carries the bound port; the access log stays off.
            "--no-access-log", "--log-level", "info", "--backlog", "4096",
        ]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


class ServerGroup(ServerProcess):
    """`manage.py serve --workers N`: the supervisor's process and the workers it logs starting.

    The workers are in process groups of their own, so killing the supervisor alone would leave them
    draining (their parent-death signal is SIGTERM): `kill` SIGKILLs every one of them too.
    """

    def __init__(self, *args, workers: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers

    def worker_pids(self) -> list[int]:
        """The pid of each worker index, the latest started (from the supervisor's log)."""
        return list({int(index): int(pid) for index, pid in WORKER_STARTED.findall(self.output())}.values())

    def pids(self) -> list[int]:
        """The supervisor and every worker."""
        return [self.pid, *self.worker_pids()]

    def kill(self) -> None:
        super().kill()
        for pid in self.worker_pids():
            try:
                if b"--worker-index" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def app_start(
    *,
    app: str,
    server: str,
    redis_url: str | None,
    cores: set[int] | None,
    log_dir: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> ServerProcess:
    """Start one app on one server on an ephemeral port, pinned to `cores`; ready when /healthz answers
    (with `workers` above 1, a ServerGroup, ready once every worker listens).

    `env` adds to (or overrides) the common settings, e.g. W6's namespaces.
    """

    def command(port: int) -> list[str]:
        return pin_prefix(cores) + server_argv(app=app, server=server, port=port, workers=workers)

    environment = {**server_env(redis_url=redis_url, app=app), **(env or {})}
    process: ServerProcess
    if workers != 1:
        process = ServerGroup(
            command,
            name=f"{server}-{app}",
            env=environment,
            ready=lambda started: (
                started.output().count("listening on http://") >= workers
                and healthy(f"http://{LOOPBACK}:{started.port}")
            ),
            log_dir=log_dir,
            workers=workers,
        )
        try:
            # Each worker imports Django and the server on its own: on two cores, seven of them take a while.
            process.start(timeout=30 + 10 * workers)
        except BaseException:
            process.stop()  # the supervisor may have started workers before one failed
            raise
        return process
    process = ServerProcess(
        command,
        name=f"{server}-{app}",
        env=environment,
        ready=lambda started: healthy(f"http://{LOOPBACK}:{started.port}"),
        # daphne's own CLI (baseline, stock, rawfanout) runs under the project's logging settings,
        # which silence its "Listening on" line: it gets a port probed free instead of port 0.
        probe_port=server == "daphne" and not app.startswith("project"),
        log_dir=log_dir,
    )
    process.start()
    return process


def redis_start(*, cores: set[int] | None, log_dir: Path) -> RedisServer | None:
    """A throwaway redis-server; None when redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    return RedisServer(binary, prefix=pin_prefix(cores), log_dir=log_dir).start()
