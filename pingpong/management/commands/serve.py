"""`manage.py serve`: run daphne with the project's limits, timeouts and graceful drain."""

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger("pingpong.server")


class Command(BaseCommand):
    help = "Serve HTTP and websockets with daphne (the way `make run` and compose do)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")

    def handle(self, *args: Any, **options: Any) -> None:
        from channels.routing import get_default_application
        from django.conf import settings

        from pingpong.server import server_build  # installs the asyncio reactor first

        server = server_build(
            application=get_default_application(),
            host=options["host"],
            port=options["port"],
            verbosity=options["verbosity"],
        )
        layer = "redis pub/sub" if settings.REDIS_URL else settings.CHANNEL_LAYERS["default"]["BACKEND"]
        logger.info("serving on http://%s:%s (channel layer: %s)", options["host"], options["port"], layer)
        server.run()
