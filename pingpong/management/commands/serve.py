"""`manage.py serve`: run daphne (or uvicorn) with the project's limits, timeouts and graceful drain,
in one process or in `--workers N` supervised processes on one port (see pingpong.workers)."""

import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong import serving, workers

logger = logging.getLogger("pingpong.server")

SERVERS = ("daphne", "uvicorn")


def workers_arg(value: str) -> int | str:
    try:
        return workers.count_parse(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


class Command(BaseCommand):
    help = "Serve HTTP and websockets with daphne (the way `make run` and compose do) or uvicorn."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
        parser.add_argument(
            "--server",
            choices=SERVERS,
            default="daphne",
            help="daphne (default) or uvicorn with uvloop, httptools and websockets' sans-I/O protocol",
        )
        parser.add_argument(
            "--workers",
            type=workers_arg,
            default=1,
            help="server processes on the one port (default 1); auto: one per CPU this process may use "
            "(affinity, capped by a cgroup CPU quota). More than 1 needs REDIS_URL",
        )
        parser.add_argument(
            "--migrate",
            action="store_true",
            help="apply migrations first, waiting for the database to accept connections (up to 60 s); "
            "replicas starting together on PostgreSQL take turns",
        )
        # Set by the supervisor on the processes it starts: bind the port with SO_REUSEPORT.
        parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    def handle(self, *args: Any, **options: Any) -> None:
        count = self.workers_count(options["workers"])
        if options["migrate"] and options["worker_index"] is None:
            self.migrate()
        if count > 1 and options["worker_index"] is None:
            sys.exit(self.supervise(count, options))
        self.serve(options)

    def workers_count(self, wanted: int | str) -> int:
        """`--workers` as a number: auto resolved, and more than one refused without Redis."""
        from django.conf import settings

        if settings.REDIS_URL:
            return workers.cpus_available() if wanted == workers.AUTO else int(wanted)
        if wanted == workers.AUTO:
            return 1  # one process is all the embedded layer can serve; not an error, so the image runs anywhere
        if int(wanted) > 1:
            raise CommandError(
                f"--workers {wanted} needs REDIS_URL: without it each worker has its own embedded channel "
                "layer, so a broadcast would reach only the clients of the worker that took the API call."
            )
        return 1

    def migrate(self) -> None:
        """`--migrate`: the database migrated before any worker starts (pingpong.database)."""
        from django.db import DatabaseError

        from pingpong import database

        try:
            database.migrate(timeout=database.WAIT_SECONDS)
        except DatabaseError as error:
            raise CommandError(f"cannot migrate the database: {str(error).strip()}") from error

    def supervise(self, count: int, options: dict[str, Any]) -> int:
        """Reserve the port, start `count` workers on it and supervise them; the exit status."""
        from django.conf import settings
        from prometheus_client import multiprocess

        host, server_name = options["host"], options["server"]
        if server_name == "daphne" and ":" in host:
            raise CommandError(
                "daphne --workers binds IPv4 hosts only (0.0.0.0, 127.0.0.1); use --server uvicorn for IPv6"
            )
        try:
            reservation = workers.address_bind(host=host, port=options["port"], listen=False)
        except OSError as error:
            raise CommandError(f"cannot bind {host}:{options['port']}: {error}") from error
        port = reservation.getsockname()[1]
        metrics_dir = tempfile.mkdtemp(prefix="pingpong-metrics-")
        script = os.path.abspath(sys.argv[0])
        node_id = settings.PINGPONG_NODE_ID

        def command(index: int) -> list[str]:
            return [
                *(sys.executable, script, "serve", "--host", host, "--port", str(port)),
                *("--server", server_name, "--verbosity", str(options["verbosity"])),
                *("--worker-index", str(index)),
            ]

        def env(index: int) -> dict[str, str]:
            worker_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
            if node_id:
                worker_env["PINGPONG_NODE_ID"] = f"{node_id}-{index}"
            return worker_env

        logger.info("serving on http://%s:%s with %s, %d workers", host, port, server_name, count)
        supervisor = workers.Supervisor(
            count=count,
            command=command,
            env=env,
            drain_seconds=float(settings.PINGPONG_DRAIN_SECONDS),
            on_exit=lambda pid: multiprocess.mark_process_dead(pid, metrics_dir),
        )
        try:
            return supervisor.run()
        finally:
            reservation.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def serve(self, options: dict[str, Any]) -> None:
        """One server process: the only one, or worker `--worker-index` of a supervisor."""
        from channels.routing import get_default_application
        from django.conf import settings

        from pingpong import metrics, presence

        host, port, server_name, index = options["host"], options["port"], options["server"], options["worker_index"]
        sock = None
        if index is not None:
            sock = workers.address_bind(host=host, port=port, listen=True)
            metrics.worker_start(worker=presence.node_name())
        if server_name == "uvicorn":
            # Not pingpong.daphne_server: importing it installs Twisted's reactor.
            from pingpong import uvicorn_server

            server: Any = uvicorn_server.build(application=get_default_application(), host=host, port=port)
        else:
            from pingpong import daphne_server  # installs the asyncio reactor first

            server = daphne_server.build(
                application=get_default_application(),
                host=host,
                port=port,
                verbosity=options["verbosity"],
                sock=sock,
            )
        layer = "redis pub/sub" if settings.REDIS_URL else settings.CHANNEL_LAYERS["default"]["BACKEND"]
        worker = "" if index is None else f", worker {index}"
        logger.debug("%d startup objects frozen out of the cyclic GC", serving.startup_objects_frozen())
        logger.info("serving on http://%s:%s with %s (channel layer: %s%s)", host, port, server_name, layer, worker)
        if server_name == "uvicorn" and sock is not None:
            server.run(sockets=[sock])
        else:
            server.run()
