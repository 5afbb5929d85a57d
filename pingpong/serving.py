"""What both servers share: the transport's frame limit, the listen backlog and the slow-consumer close.

`pingpong.daphne_server` runs daphne and `pingpong.uvicorn_server` runs uvicorn; neither imports the
other (importing daphne's server installs Twisted's asyncio reactor).
"""

import gc
import logging
from typing import Final

from django.conf import settings

from pingpong import metrics, protocol

logger = logging.getLogger("pingpong.server")

# The websocket layer closes a frame over its own limit with 1009 before the application sees it;
# this headroom lets the application's PINGPONG_MAX_MESSAGE_BYTES answer (4009) first.
TRANSPORT_HEADROOM_BYTES: Final = 4096
# How long a slow consumer has to read up to its close frame before TCP is aborted; nothing more
# is written for it meanwhile, so memory stays bounded.
SLOW_CONSUMER_CLOSE_SECONDS: Final = 5.0
# Twisted listens with a backlog of 50 (uvicorn 2048): in a burst of connections the kernel then
# drops SYNs and clients wait a 1 s retransmit or more. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG: Final = 1024

#: The ASGI scope extension uvicorn's protocol adds to a websocket's scope: `send_nowait(message)`, the
#: `websocket.send` of an accepted connection as a plain call, for a consumer that delivers a channel
#: layer message without waking its task (`pingpong.websocket`).
SEND_NOWAIT: Final = "pingpong.send_nowait"


def frame_limit() -> int:
    """The websocket layer's own message and frame limit: the app's limit plus the headroom."""
    return int(settings.PINGPONG_MAX_MESSAGE_BYTES) + TRANSPORT_HEADROOM_BYTES


def slow_consumer_report(*, client: str | None, pending: int, limit: int) -> str:
    """Count and log one slow consumer; the error event to queue ahead of its 4100 close frame."""
    metrics.LIMIT_HITS.labels("slow_consumer").inc()
    logger.warning(
        "slow consumer: %s had %d bytes waiting (limit %d); closing with %d",
        client or "-",
        pending,
        limit,
        protocol.CloseCode.SLOW_CONSUMER,
    )
    detail = f"More than {limit} bytes were waiting for this client to read them."
    return protocol.error_event(protocol.ERROR_SLOW_CONSUMER, detail)


def startup_objects_frozen() -> int:
    """Move every object alive now (Django, the apps, the server) out of the cyclic GC's reach; their count.

    They live as long as the process, yet each full collection walked all of them: with a
    thousand busy connections the pauses showed in the p99 of W1. Objects made later
    (connections, messages) are collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
