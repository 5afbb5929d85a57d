"""`manage.py serve`: run daphne (or uvicorn) with the project's limits, timeouts and graceful drain."""

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger("pingpong.server")

SERVERS = ("daphne", "uvicorn")


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

    def handle(self, *args: Any, **options: Any) -> None:
        from channels.routing import get_default_application
        from django.conf import settings

        host, port, server_name = options["host"], options["port"], options["server"]
        if server_name == "uvicorn":
            # Not pingpong.daphne_server: importing it installs Twisted's reactor.
            from pingpong import uvicorn_server

            server: Any = uvicorn_server.build(application=get_default_application(), host=host, port=port)
        else:
            from pingpong import daphne_server  # installs the asyncio reactor first

            server = daphne_server.build(
                application=get_default_application(), host=host, port=port, verbosity=options["verbosity"]
            )
        layer = "redis pub/sub" if settings.REDIS_URL else settings.CHANNEL_LAYERS["default"]["BACKEND"]
        logger.info("serving on http://%s:%s with %s (channel layer: %s)", host, port, server_name, layer)
        server.run()
