"""Topics: names, namespaces and who may subscribe or publish, and publishing to them.

A topic is 1-128 characters from `A-Z a-z 0-9 _ . : @ = -`; its namespace is the part before
the first `:` (all of it when there is none). Namespaces come from PINGPONG_NAMESPACES, and a
topic in any other namespace is refused. The rules of a namespace decide first; the project's
PINGPONG_AUTHORIZE hook, when set, may then still say no.
"""

import hashlib
import inspect
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

from channels.db import database_sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from pingpong import metrics, protocol
from pingpong.conf import setting

TOPIC_PATTERN: Final = r"[A-Za-z0-9_.:@=-]{1,128}"
_TOPIC = re.compile(TOPIC_PATTERN)

# Who may subscribe to a topic of a namespace.
SUBSCRIBE_RULES: Final = ("anyone", "authenticated", "owner", "token")
# Who may publish to it from a websocket ("server": only the API and pingpong.publish).
PUBLISH_RULES: Final = ("server", "authenticated", "anyone")

# A namespace's history: at most this many publications kept per topic, for at most this many seconds.
HISTORY_MAX_SIZE: Final = 100_000
HISTORY_MAX_TTL: Final = 30 * 86400

# Presence (who is subscribed) and join/leave events are off by default: on a public topic
# they would show every reader to every other; a namespace config turns them on.
DEFAULT_NAMESPACES: Final[dict[str, dict[str, Any]]] = {
    # The last 100 publications of each topic for 5 minutes: a client that reconnects recovers what it missed.
    "public": {"subscribe": "anyone", "publish": "server", "history_size": 100, "history_ttl": 300},
    "user": {"subscribe": "owner", "publish": "server", "history_size": 100, "history_ttl": 300},
}
# The namespace fields a PINGPONG_NAMESPACES entry may set.
NAMESPACE_RULES: Final = frozenset({"subscribe", "publish"})
NAMESPACE_FLAGS: Final = frozenset({"presence", "join_leave"})
NAMESPACE_HISTORY: Final = frozenset({"history_size", "history_ttl"})


class TopicRefused(ValueError):
    """A topic request the connection may not make: `error` is the protocol's code, the message a sentence."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error


@dataclass(frozen=True)
class Namespace:
    """A namespace's rules; `history_size` 0 (the default) keeps no history: no offsets, no recovery."""

    name: str
    subscribe: str = "anyone"
    publish: str = "server"
    presence: bool = False  # who is subscribed: GET /api/presence/<topic> and the "presence" request
    join_leave: bool = False  # subscribers get "join" and "leave" events
    history_size: int = 0  # publications kept per topic
    history_ttl: int = 0  # seconds a topic's history is kept after its last publication

    @property
    def tracked(self) -> bool:
        """Whether this namespace's subscriptions are recorded (pingpong.topic_presence)."""
        return self.presence or self.join_leave

    @property
    def has_history(self) -> bool:
        return self.history_size > 0


@dataclass(frozen=True)
class Identity:
    """Who is on a connection: anonymous, a Django session's user, or a token's subject."""

    user_id: str | None = None
    via: str = "anonymous"  # "anonymous", "session" or "token"
    topics: frozenset[str] = frozenset()  # a token's extra topics
    expires_at: float | None = None  # a token's exp
    user: Any = field(default=None, compare=False)  # the Django user, for a session

    @property
    def is_authenticated(self) -> bool:
        return self.user_id is not None


ANONYMOUS: Final = Identity()


def namespaces_from(config: Mapping[str, Any] | None) -> dict[str, Namespace]:
    """The namespaces: the defaults, updated by `config` (a name mapped to null removes one)."""
    merged: dict[str, Any] = {**DEFAULT_NAMESPACES, **(config or {})}
    found: dict[str, Namespace] = {}
    for name, rules in merged.items():
        if rules is None:
            continue
        if not isinstance(rules, dict) or set(rules) - NAMESPACE_RULES - NAMESPACE_FLAGS - NAMESPACE_HISTORY:
            raise ImproperlyConfigured(
                f'PINGPONG_NAMESPACES["{name}"] must be an object with "subscribe" and "publish" rules, '
                'optionally "presence" and "join_leave" (true or false), and for history "history_size" '
                'and "history_ttl".'
            )
        if any(not isinstance(rules[flag], bool) for flag in NAMESPACE_FLAGS & set(rules)):
            raise ImproperlyConfigured(f'PINGPONG_NAMESPACES["{name}"]: "presence" and "join_leave" are true or false.')
        namespace = Namespace(name=name, **rules)
        if namespace.subscribe not in SUBSCRIBE_RULES or namespace.publish not in PUBLISH_RULES:
            raise ImproperlyConfigured(
                f'PINGPONG_NAMESPACES["{name}"]: "subscribe" is one of {", ".join(SUBSCRIBE_RULES)} and '
                f'"publish" one of {", ".join(PUBLISH_RULES)}.'
            )
        history_check(namespace)
        found[name] = namespace
    return found


def history_check(namespace: Namespace) -> None:
    """ImproperlyConfigured unless the history fields are both 0 (none) or both in range."""
    size, ttl = namespace.history_size, namespace.history_ttl
    whole = all(isinstance(value, int) and not isinstance(value, bool) for value in (size, ttl))
    if whole and size == ttl == 0:
        return
    if not (whole and 1 <= size <= HISTORY_MAX_SIZE and 1 <= ttl <= HISTORY_MAX_TTL):
        raise ImproperlyConfigured(
            f'PINGPONG_NAMESPACES["{namespace.name}"]: "history_size" (1-{HISTORY_MAX_SIZE} publications) and '
            f'"history_ttl" (1-{HISTORY_MAX_TTL} seconds) are whole numbers, given together; both 0 or '
            "absent: no history."
        )


@cache
def namespaces() -> dict[str, Namespace]:
    """The configured namespaces, read once per process."""
    return namespaces_from(setting("PINGPONG_NAMESPACES"))


def valid_topic(topic: Any) -> str:
    """`topic` when it is a valid topic name, else TopicRefused (bad_topic)."""
    if not (isinstance(topic, str) and _TOPIC.fullmatch(topic)):
        raise TopicRefused(
            protocol.ERROR_BAD_TOPIC, "A topic is 1 to 128 characters from A-Z, a-z, 0-9 and _ . : @ = -"
        )
    return topic


def namespace_for(topic: Any) -> Namespace:
    """The namespace of a valid topic name, or TopicRefused (bad_topic, unknown_namespace)."""
    name = valid_topic(topic).partition(":")[0]
    try:
        return namespaces()[name]
    except KeyError:
        raise TopicRefused(protocol.ERROR_UNKNOWN_NAMESPACE, f'There is no namespace "{name}".') from None


def may_subscribe(identity: Identity, namespace: Namespace, topic: str) -> bool:
    """The namespace's rule; a token's `topics` claim adds topics to any namespace."""
    if topic in identity.topics:
        return True
    rule = namespace.subscribe
    if rule == "anyone":
        return True
    if rule == "authenticated":
        return identity.is_authenticated
    if rule == "owner":
        return identity.is_authenticated and topic.partition(":")[2] == identity.user_id
    return False  # "token": only the topics a token lists


def may_publish(identity: Identity, namespace: Namespace) -> bool:
    rule = namespace.publish
    return rule == "anyone" or (rule == "authenticated" and identity.is_authenticated)


@cache
def authorize_hook() -> Callable[[Identity, str, str], Any] | None:
    """PINGPONG_AUTHORIZE, imported once; a sync hook runs in a thread (it may query the database)."""
    path = setting("PINGPONG_AUTHORIZE")
    if not path:
        return None
    hook = import_string(path)
    if inspect.iscoroutinefunction(hook):
        return hook  # type: ignore[no-any-return]
    return database_sync_to_async(hook)  # type: ignore[no-any-return]


async def authorize(identity: Identity, action: str, topic: str) -> Namespace:
    """The topic's namespace when `identity` may `action` ("subscribe" or "publish") it, else TopicRefused."""
    namespace = namespace_for(topic)
    allowed = may_subscribe(identity, namespace, topic) if action == "subscribe" else may_publish(identity, namespace)
    hook = authorize_hook()
    if allowed and hook is not None:
        allowed = bool(await hook(identity, action, topic))
    if not allowed:
        who = f"user {identity.user_id}" if identity.is_authenticated else "an anonymous connection"
        raise TopicRefused(protocol.ERROR_FORBIDDEN, f"{who.capitalize()} may not {action} to {topic}.")
    return namespace


def group_for(topic: str) -> str:
    """The channel-layer group of a topic: Channels' group names allow neither `:` nor `@` nor 128 characters."""
    return "topic." + hashlib.sha256(topic.encode()).hexdigest()[:40]


def data_text(data: Any) -> str:
    """`data` as compact JSON, or TopicRefused (bad_request) when it is not JSON or too large."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError):
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, '"data" must be JSON (valid Unicode, no NaN).') from None
    limit = setting("PINGPONG_MAX_BROADCAST_BYTES")
    if size > limit:
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, f'"data" is limited to {limit} bytes as JSON.')
    return text


async def apublish(topic: str, data: Any, *, publication_id: str | None = None) -> dict[str, Any]:
    """Send `data` to every subscriber of `topic` on every node; the server may publish to any valid topic.

    Returns the publication's `{"topic", "id"}`, plus `"offset"` and `"epoch"` when the topic's
    namespace keeps history. Raises TopicRefused for a bad topic or data, ChannelLayerUnavailable
    when nothing was sent and BroadcastOutcomeUnknown when the outcome is unknown (retry with the
    same id: each node delivers an id once per topic, and a topic with history gives a retried id
    its first offset without publishing it again).
    """
    from pingpong import broadcast, history, layer_calls  # broadcast's retry-safe send, shared with publications

    namespace = namespace_for(topic)
    text = data_text(data)
    publication_id = publication_id or uuid.uuid4().hex
    head = (
        f'{{"type":"{protocol.EVENT_PUBLICATION}","topic":"{topic}","id":{json.dumps(publication_id)},'
        f'"sent_at":{time.time()}'
    )
    fields = {
        "type": protocol.PUBLICATION_MESSAGE,
        "topic": topic,
        "id": f"{topic} {publication_id}",
        "attempt": uuid.uuid4().hex,
    }
    layer = layer_calls.get_layer()
    if namespace.has_history and history.supported(layer):
        parts = history.PublicationParts(
            topic=topic,
            group=group_for(topic),
            publication_id=publication_id,
            fields=fields,
            event_head=f'{head},"offset":',
            event_tail=f',"data":{text}}}',
        )
        published = await broadcast.send_call(
            history.publish(layer, parts, size=namespace.history_size, ttl=namespace.history_ttl),
            layer=layer,
            operation="publish_history",
        )
        metrics.PUBLICATIONS_SENT.inc()
        return {"topic": topic, "id": publication_id, "offset": published.offset, "epoch": published.epoch}
    message = {**fields, "event": f'{head},"data":{text}}}'}
    await broadcast.send_message(group_for(topic), message)
    metrics.PUBLICATIONS_SENT.inc()
    return {"topic": topic, "id": publication_id}
