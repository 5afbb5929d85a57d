"""`manage.py loadtest ws://HOST:PORT/ws/`: closed-loop ping/pong load against any deployment."""

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong.loadtest import LoadtestError, Progress, loadtest_sync, progress_bar, result_text


class Command(BaseCommand):
    help = (
        "Open N websocket connections and ping/pong on each in a closed loop for S seconds; "
        "report connections, messages/s, RTT percentiles and close codes."
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
            default=0.0,
            help="pings per second per connection (default 0: as fast as answers come; "
            "a deployment's PINGPONG_RATE_PER_SECOND closes faster clients with 4008)",
        )
        parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        show = sys.stderr.isatty() and not options["json"]

        def progress(snapshot: Progress) -> None:
            if show:
                sys.stderr.write("\r" + progress_bar(snapshot))
                sys.stderr.flush()

        try:
            result = loadtest_sync(
                options["url"],
                connections=options["connections"],
                duration=options["duration"],
                ramp_up=options["ramp_up"],
                origin=options["origin"],
                rate=options["rate"],
                warmup=options["warmup"],
                progress=progress,
            )
        except LoadtestError as error:
            raise CommandError(str(error)) from None
        finally:
            if show:
                sys.stderr.write("\n")
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(), indent=2))
        else:
            self.stdout.write(result_text(result))
