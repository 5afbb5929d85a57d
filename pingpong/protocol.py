"""The websocket protocol in one place: messages, error codes, close codes, group names.

Close codes follow the 4000 + RFC 6455 convention (4003 for 1003, ...): daphne's
websocket core accepts only 1000 and 3000-4999 from an application, so the RFC codes
themselves would reach clients as 1011. The README's protocol table lists the same.
"""

import enum
import json
from typing import Any, Final

PING: Final = "ping"
PONG: Final = "pong!"


class CloseCode(enum.IntEnum):
    """Close codes the application sends: 4000 + the RFC 6455 code they stand for."""

    NORMAL = 1000
    UNSUPPORTED_DATA = 4003  # 1003: a binary frame on /ws/
    POLICY_VIOLATION = 4008  # 1008: over the per-connection rate limit
    MESSAGE_TOO_BIG = 4009  # 1009: over PINGPONG_MAX_MESSAGE_BYTES
    SERVICE_RESTART = 4012  # 1012: the node is draining (SIGTERM)
    TRY_AGAIN_LATER = 4013  # 1013: node full, address at its cap, or channel layer unreachable
    # No RFC 6455 code means "you read too slowly", so this one sits outside the 4000 + RFC range.
    SLOW_CONSUMER = 4100  # more than PINGPONG_MAX_PENDING_BYTES waited for the client


# Codes after which a client should not reconnect by itself.
TERMINAL_CLOSE_CODES: Final = frozenset(
    {CloseCode.UNSUPPORTED_DATA, CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG}
)

# Error codes carried by {"type": "error", "error": <code>, "detail": <sentence>}.
ERROR_UNKNOWN_MESSAGE: Final = "unknown_message"
ERROR_SLOW_CONSUMER: Final = "slow_consumer"
ERROR_MESSAGE_TOO_BIG: Final = "message_too_big"
ERROR_RATE_LIMITED: Final = "rate_limited"
ERROR_UNSUPPORTED_DATA: Final = "unsupported_data"
# At the handshake: the node holds PINGPONG_MAX_CONNECTIONS, or is draining (SIGTERM).
ERROR_FULL: Final = "full"
ERROR_DRAINING: Final = "draining"
# HTTP API errors, in {"error": <code>, "detail": <sentence>} bodies.
ERROR_BAD_REQUEST: Final = "bad_request"
ERROR_METHOD_NOT_ALLOWED: Final = "method_not_allowed"
ERROR_DISABLED: Final = "disabled"
ERROR_UNAUTHORIZED: Final = "unauthorized"
ERROR_TOO_LARGE: Final = "too_large"
# Broadcast API errors: "unavailable" means nothing was sent; "outcome_unknown" means the
# PUBLISH was written and its answer never came, so retry with the same id.
ERROR_UNAVAILABLE: Final = "unavailable"
ERROR_OUTCOME_UNKNOWN: Final = "outcome_unknown"
# This client address holds PINGPONG_MAX_CONNECTIONS_PER_IP connections on the node already.
ERROR_TOO_MANY_CONNECTIONS: Final = "too_many_connections"

# Every /ws/ client joins this group; a broadcast goes to it.
BROADCAST_GROUP: Final = "broadcast"
# Channel-layer message type for a broadcast; handled by `broadcast_message`.
BROADCAST_MESSAGE: Final = "broadcast.message"

# A broadcast id names one broadcast across retries: short, and safe in logs and URLs.
BROADCAST_ID_MAX_CHARS: Final = 64
BROADCAST_ID_PATTERN: Final = r"[A-Za-z0-9._:-]{1,64}"
# Each node remembers the first attempt of every broadcast id for this long, so a retry
# within the window is not delivered twice ...
BROADCAST_DEDUP_SECONDS: Final = 300.0
# ... and at most this many ids (3.4 MB with 64-character ids); past it the oldest id is forgotten early, so
# the window holds for up to BROADCAST_DEDUP_MAX_IDS / BROADCAST_DEDUP_SECONDS (33) broadcasts/s.
BROADCAST_DEDUP_MAX_IDS: Final = 10_000


# Event types of the JSON text events the server pushes (`pong!` stays plain text).
EVENT_BROADCAST: Final = "broadcast"
EVENT_ERROR: Final = "error"
EVENT_PONG: Final = "pong"


def event_type(frame: str | bytes) -> str | None:
    """The `type` of a server event, or None for a frame that is not one (`pong!`, binary, other text).

    Clients tell events apart through this one helper, not by string prefix: the server's
    JSON is compact today, but nothing promises the key order or spacing.
    """
    if not isinstance(frame, str) or not frame.startswith("{"):
        return None
    try:
        event = json.loads(frame)
    except ValueError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else None


def encode_event(event: dict[str, Any]) -> str:
    """Serialise a server event as compact JSON text."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def error_event(code: str, detail: str) -> str:
    """The JSON text of an error event; the connection stays open after it."""
    return encode_event({"type": "error", "error": code, "detail": detail})
