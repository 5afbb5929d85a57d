"""What the sending commands (`broadcast`, `publish`) say when a send fails or reaches only this process."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pingpong.broadcast import BroadcastOutcomeUnknown
from pingpong.layer_calls import ChannelLayerUnavailable


def send_failure(error: ChannelLayerUnavailable, *, what: str, sent_id: str) -> CommandError:
    """ "May or may not have been sent: retry with --id" after a written PUBLISH, else "nothing was sent"."""
    if isinstance(error, BroadcastOutcomeUnknown):
        return CommandError(f"{what} {sent_id} may or may not have been sent ({error}); retry with --id {sent_id}")
    return CommandError(f"the channel layer is unreachable ({error}); nothing was sent")


def note_when_local(command: BaseCommand) -> None:
    """Without Redis the command's own process is the only one its send reaches: say so."""
    if not settings.REDIS_URL:
        command.stderr.write("note: REDIS_URL is not set, so this reached no other process.")
