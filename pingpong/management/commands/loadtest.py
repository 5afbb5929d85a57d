"""`manage.py loadtest ws://HOST:PORT/ws/`: closed-loop ping/pong load against any deployment.

The load generator is client code and lives in `bench/loadgen.py`, outside the service
package; it is imported only when the command runs, so the server image need not carry it.
"""

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

#: Pings per second per connection by default: half a default server's PINGPONG_RATE_PER_SECOND (20).
DEFAULT_RATE = 10.0
MISSING = (
    "the load generator is not installed here (the server image carries only the service): "
    "run this command from a checkout with `pip install -e '.[load]'` (or `make .venv/.installed-dev`)."
)


def processes_option(text: str) -> int | str:
    """`--processes`: a number, or "auto" (the CPUs this client may use)."""
    return text if text == "auto" else int(text)


class Command(BaseCommand):
    help = (
        "Open N websocket connections and ping/pong on each in a closed loop for S seconds; "
        "report connections, messages/s, RTT percentiles, close codes and client CPU."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("url", help="the websocket URL, e.g. ws://127.0.0.1:8000/ws/")
        parser.add_argument("--connections", type=int, default=10, help="connections to open (default 10)")
        parser.add_argument("--duration", type=float, default=10.0, help="seconds of load after ramp-up (default 10)")
        parser.add_argument("--ramp-up", type=float, default=0.0, help="seconds over which to open the connections")
        parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load before measuring starts")
        parser.add_argument("--origin", help="Origin header (default http://HOST:PORT from the URL)")
        parser.add_argument(
            "--rate",
            type=float,
            default=DEFAULT_RATE,
            help=f"pings per second per connection (default {DEFAULT_RATE:g}, under a default server's limit "
            "of 20; 0: as fast as answers come, for a server with PINGPONG_RATE_PER_SECOND=0)",
        )
        parser.add_argument(
            "--processes",
            type=processes_option,
            default=1,
            help="client processes to spread the connections over (default 1; auto: one per CPU available)",
        )
        parser.add_argument(
            "--source-addresses",
            type=int,
            default=1,
            help="connect from 127.0.0.1 ... 127.0.0.N (loopback targets only; each address has about "
            "28,000 ephemeral ports and its own PINGPONG_MAX_CONNECTIONS_PER_IP)",
        )
        parser.add_argument(
            "--client",
            choices=("websockets", "picows"),
            default="websockets",
            help="client library (default websockets; picows costs about half the client CPU per message, "
            "for servers that would otherwise outrun the client)",
        )
        parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            from bench import loadgen
        except ModuleNotFoundError as error:
            if error.name not in ("bench", "bench.loadgen", "websockets"):
                raise
            raise CommandError(MISSING) from None
        show = sys.stderr.isatty() and not options["json"]

        def progress(snapshot: loadgen.Progress) -> None:
            if show:
                sys.stderr.write("\r" + loadgen.progress_bar(snapshot))
                sys.stderr.flush()

        try:
            result = loadgen.run(
                options["url"],
                connections=options["connections"],
                duration=options["duration"],
                ramp_up=options["ramp_up"],
                origin=options["origin"],
                rate=options["rate"],
                warmup=options["warmup"],
                processes=options["processes"],
                source_addresses=options["source_addresses"],
                client=options["client"],
                progress=progress,
            )
        except loadgen.LoadgenError as error:
            raise CommandError(str(error)) from None
        finally:
            if show:
                sys.stderr.write("\n")
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(), indent=2))
        else:
            self.stdout.write(loadgen.result_text(result))
        if result.cut_short is not None:
            raise CommandError(result.cut_short)
