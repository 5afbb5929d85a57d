"""`manage.py broadcast "text" [--id ID]`: send one broadcast to every client on every node."""

from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong import broadcast
from pingpong.broadcast import BroadcastInvalid
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.management import sending


class Command(BaseCommand):
    help = "Send a broadcast to every websocket client on every node (needs REDIS_URL across processes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("text", help="the text every client receives")
        parser.add_argument(
            "--id",
            help="the broadcast's id (1-64 of A-Z a-z 0-9 . _ : -); give the same id to retry: "
            "each node delivers an id at most once. Default: a new id",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        payload = {"text": options["text"]}
        if options["id"] is not None:
            payload["id"] = options["id"]
        try:
            wanted = broadcast.request_from(payload)
        except BroadcastInvalid as error:
            raise CommandError(str(error)) from error
        try:
            event = async_to_sync(broadcast.send)(text=wanted.text, broadcast_id=wanted.id)
        except ChannelLayerUnavailable as error:
            raise sending.send_failure(error, what="broadcast", sent_id=wanted.id) from error
        sending.note_when_local(self)
        self.stdout.write(f"broadcast {event['id']} sent")
