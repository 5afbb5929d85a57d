"""`manage.py broadcast "text"`: send one broadcast to every client on every node."""

from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pingpong.broadcast import BroadcastInvalid, broadcast_send, broadcast_text_from
from pingpong.layer import ChannelLayerUnavailable


class Command(BaseCommand):
    help = "Send a broadcast to every websocket client on every node (needs REDIS_URL across processes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("text", help="the text every client receives")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            text = broadcast_text_from({"text": options["text"]})
            event = async_to_sync(broadcast_send)(text=text)
        except BroadcastInvalid as error:
            raise CommandError(str(error)) from error
        except ChannelLayerUnavailable as error:
            raise CommandError(f"the channel layer is unreachable ({error}); nothing was sent") from error
        if not settings.REDIS_URL:
            self.stderr.write("note: REDIS_URL is not set, so this reached no other process.")
        self.stdout.write(f"broadcast {event['id']} sent")
