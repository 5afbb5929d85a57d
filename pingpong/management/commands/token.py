"""`manage.py token USER_ID [--ttl S] [--topic T ...]`: print a connection token (pingpong.tokens)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong import tokens, topics
from pingpong.topics import TopicRefused


class Command(BaseCommand):
    help = "Print a connection token for USER_ID, signed with PINGPONG_TOKEN_SECRET (for tests and scripts)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user_id", help="the token's subject: the user id a connection gets (str(user.pk))")
        parser.add_argument(
            "--ttl", type=float, default=tokens.DEFAULT_TTL_SECONDS, help="seconds the token is valid (default 3600)"
        )
        parser.add_argument(
            "--topic",
            action="append",
            default=[],
            dest="topics",
            help="a topic the token may also subscribe to, beyond its namespace's rule (repeatable)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not tokens.secret():
            raise CommandError("PINGPONG_TOKEN_SECRET is not set: no token can be issued.")
        if not options["ttl"] > 0:
            raise CommandError("--ttl must be a positive number of seconds.")
        try:
            for topic in options["topics"]:
                topics.valid_topic(topic)
            token = tokens.issue(options["user_id"], ttl=options["ttl"], topics=options["topics"])
        except TopicRefused as error:
            raise CommandError(f"--topic: {error}") from error
        except ValueError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(token)
