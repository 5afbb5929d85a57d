"""`manage.py publish TOPIC '<json>' [--id ID]`: publish to a topic's subscribers on every node."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong import publishing
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.management import sending
from pingpong.topics import TopicRefused


class Command(BaseCommand):
    help = "Publish JSON data to every subscriber of a topic on every node (needs REDIS_URL across processes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("topic", help="the topic, e.g. user:42 or public:news")
        parser.add_argument("data", help="the publication's data, as JSON (a string needs its quotes: '\"hi\"')")
        parser.add_argument(
            "--id",
            help="the publication's id (1-64 of A-Z a-z 0-9 . _ : -); give the same id to retry: "
            "each node delivers an id once per topic. Default: a new id",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = json.loads(options["data"])
        except (ValueError, RecursionError) as error:
            raise CommandError(f"the data is not JSON ({error})") from error
        try:
            wanted = publishing.request_from({"topic": options["topic"], "data": data} | _id(options["id"]))
            sent = publishing.publish(wanted.topic, wanted.data, id=wanted.id)
        except TopicRefused as error:
            raise CommandError(f"{error} ({error.error})") from error
        except ChannelLayerUnavailable as error:
            raise sending.send_failure(error, what="publication", sent_id=wanted.id) from error
        sending.note_when_local(self)
        self.stdout.write(f"publication {sent['id']} sent to {sent['topic']}")


def _id(given: str | None) -> dict[str, str]:
    return {} if given is None else {"id": given}
