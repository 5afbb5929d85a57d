"""A real PostgreSQL for tests: initdb in a temporary directory, `postgres` on a loopback port, removed after.

The binaries come from PATH or Debian's `/usr/lib/postgresql/<version>/bin`. initdb and postgres
refuse to run as root, so as root both run as the `postgres` user (Debian's package creates it) or
`nobody`, through `setpriv`.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.processes import LOOPBACK, ServerProcess, port_open, scaled

SUPERUSER = "pingpong"


def postgres_bin_dir() -> Path | None:
    """The directory of `initdb` and `postgres`: on PATH, else Debian's newest installed version."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parent.parent.name.split(".")[0])
    )
    return versions[-1].parent if versions else None


def postgres_required_bin_dir() -> Path:
    """`postgres_bin_dir()`; skips the test without one unless PINGPONG_REQUIRE_POSTGRES is set."""
    import pytest  # here, as in tests.processes: nothing of pytest at import time

    found = postgres_bin_dir()
    if found is None:
        if os.environ.get("PINGPONG_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL (initdb, postgres) is not installed and PINGPONG_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL (initdb, postgres) is not installed")
    return found


def unprivileged_prefix(directory: Path) -> list[str]:
    """As root: the `setpriv` prefix that runs a command as `postgres` (or `nobody`), who then owns
    `directory`. Otherwise nothing: the current user runs PostgreSQL."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("running as root without setpriv (util-linux): cannot start PostgreSQL unprivileged")
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        account = pwd.getpwnam("nobody")
    os.chown(directory, account.pw_uid, account.pw_gid)
    return [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--"]


class PostgresServer(ServerProcess):
    """A throwaway cluster: trust authentication on loopback only, no fsync, superuser `pingpong`."""

    def __init__(self, bin_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pingpong-postgres-"))
        self.prefix = unprivileged_prefix(self.dir)
        data = self.dir / "data"
        initdb = subprocess.run(
            [*self.prefix, str(bin_dir / "initdb"), "--pgdata", str(data), "--username", SUPERUSER]
            + ["--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        if initdb.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")

        def command(port: int) -> list[str]:
            return [
                *self.prefix,
                *(str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(self.dir)),
                *("-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off", "-c", "full_page_writes=off"),
            ]

        super().__init__(
            command,
            name="postgres",
            env=dict(os.environ),
            # Counted: after a restart on the same port the log still holds the first start's line, and
            # a connection made while the server is starting up is refused.
            ready=lambda server: (
                server.output().count("ready to accept connections") >= self.starts and port_open(server.port)
            ),
            probe_port=True,
        )
        self.starts = 0

    def start(self, *, timeout: float = 30) -> "PostgresServer":
        self.starts += 1
        super().start(timeout=timeout)
        return self

    def url(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    def database_create(self, name: str) -> str:
        """CREATE DATABASE `name`; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=int(scaled(10))) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def kill(self) -> None:
        """A fast shutdown (SIGINT: backends end, no checkpoint wait); SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                super().kill()

    def close(self, *, keep_log: bool = False) -> None:
        super().close(keep_log=keep_log)
        shutil.rmtree(self.dir, ignore_errors=True)
