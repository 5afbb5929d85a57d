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
    TRY_AGAIN_LATER = 4013  # 1013: node full, address at its cap, channel layer or a session's database unreachable
    # No RFC 6455 code means "you read too slowly", so this one sits outside the 4000 + RFC range.
    SLOW_CONSUMER = 4100  # more than PINGPONG_MAX_PENDING_BYTES waited for the client
    # Like HTTP 401: a bad, expired or wrongly signed token. Get a new token, then reconnect.
    UNAUTHORIZED = 4401


# Codes after which a client should not reconnect by itself (after 4401, only with a new token).
TERMINAL_CLOSE_CODES: Final = frozenset(
    {CloseCode.UNSUPPORTED_DATA, CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.UNAUTHORIZED}
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
ERROR_NO_HISTORY: Final = "no_history"  # GET /api/history/<topic> of a namespace without history: 404
# Broadcast API errors: "unavailable" means nothing was sent; "outcome_unknown" means the
# PUBLISH was written and its answer never came, so retry with the same id.
ERROR_UNAVAILABLE: Final = "unavailable"
ERROR_OUTCOME_UNKNOWN: Final = "outcome_unknown"
# This client address holds PINGPONG_MAX_CONNECTIONS_PER_IP connections on the node already.
ERROR_TOO_MANY_CONNECTIONS: Final = "too_many_connections"
# Topic requests (subscribe, unsubscribe, publish): the connection stays open after each.
ERROR_FORBIDDEN: Final = "forbidden"
ERROR_UNKNOWN_NAMESPACE: Final = "unknown_namespace"
ERROR_BAD_TOPIC: Final = "bad_topic"
ERROR_TOO_MANY_SUBSCRIPTIONS: Final = "too_many_subscriptions"
ERROR_NOT_SUBSCRIBED: Final = "not_subscribed"
# ERROR_BAD_REQUEST (above) also answers a malformed topic, auth or refresh request, and
# ERROR_UNAUTHORIZED a bad token, followed by close 4401.

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


# Channel-layer message type for a publication to a topic; handled by `topic_publication`.
PUBLICATION_MESSAGE: Final = "topic.publication"

# Request types a client sends as JSON text on /ws/ (each may carry an "id" its reply repeats).
REQUEST_PING: Final = "ping"
REQUEST_AUTH: Final = "auth"  # {"type": "auth", "token": ...}: become the token's user
REQUEST_REFRESH: Final = "refresh"  # {"type": "refresh", "token": ...}: a later token for the same user
REQUEST_SUBSCRIBE: Final = "subscribe"
REQUEST_UNSUBSCRIBE: Final = "unsubscribe"
REQUEST_PUBLISH: Final = "publish"
# {"type": "presence", "topic": ...}: who is subscribed to a topic this connection subscribes to,
# in a namespace with "presence" (else ERROR_BAD_REQUEST; unsubscribed: ERROR_NOT_SUBSCRIBED).
REQUEST_PRESENCE: Final = "presence"

# Event types of the JSON text events the server pushes (`pong!` stays plain text).
EVENT_BROADCAST: Final = "broadcast"
EVENT_ERROR: Final = "error"
EVENT_PONG: Final = "pong"
EVENT_AUTHENTICATED: Final = "authenticated"  # the answer to auth and refresh: {"user", "expires_at"}
EVENT_TOKEN_EXPIRING: Final = "token_expiring"  # TOKEN_WARNING_SECONDS before the token's exp
EVENT_SUBSCRIBED: Final = "subscribed"
EVENT_UNSUBSCRIBED: Final = "unsubscribed"
EVENT_PUBLISHED: Final = "published"
EVENT_PUBLICATION: Final = "publication"
EVENT_PRESENCE: Final = "presence"  # {"topic", "connections", "users", "clients": [{"client", "user"}], "truncated"}
# In a namespace with "join_leave": {"type": "join"|"leave", "topic", "user", "client"} when another
# connection subscribes, or unsubscribes, disconnects or dies with its node (a connection's own join is not echoed).
EVENT_JOIN: Final = "join"
EVENT_LEAVE: Final = "leave"

# Channel-layer message type for a join or leave event; handled by `topic_join_leave`.
PRESENCE_MESSAGE: Final = "topic.join_leave"
# A presence answer lists at most this many connections, and at most this many bytes of their
# ids (a user id may be long); its counts are always exact, and "truncated" says a list was cut.
PRESENCE_LIST_MAX: Final = 100
PRESENCE_LIST_MAX_BYTES: Final = 32 * 1024

# Topic history (pingpong.history): a publication to a topic whose namespace keeps history carries
# "offset" (1, 2, 3, ... per topic) and "epoch" (changes when the history may have been lost);
# `subscribed` carries the topic's current ones, and a subscribe may ask to recover with
# {"since": {"offset": N, "epoch": E}}: the reply then says "recovered": true or false.
FIELD_SINCE: Final = "since"
FIELD_OFFSET: Final = "offset"
FIELD_EPOCH: Final = "epoch"
FIELD_RECOVERED: Final = "recovered"
# Largest offset a client may send in `since`: JavaScript's largest safe integer.
SINCE_MAX_OFFSET: Final = 2**53 - 1
# Longest epoch a client may send back (ours are 16 hex digits).
SINCE_MAX_EPOCH_CHARS: Final = 64
# Publications a subscribe buffers from live delivery while it reads the history; past it the
# subscribe is answered `unavailable` (nothing half-done) and may be retried.
JOIN_BUFFER_MAX: Final = 1_000

# A connection with a token is warned this many seconds before the token expires (at once when
# it has less left), and closed with 4401 at `exp` unless it sent a refresh.
TOKEN_WARNING_SECONDS: Final = 30.0
# Longer tokens are refused unread: a real one is a few hundred characters.
TOKEN_MAX_CHARS: Final = 4096


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


def error_event(code: str, detail: str, request_id: Any = None) -> str:
    """The JSON text of an error event, repeating the request's id when it had one."""
    event: dict[str, Any] = {"type": EVENT_ERROR, "error": code, "detail": detail}
    if request_id is not None:
        event["id"] = request_id
    return encode_event(event)
