"""PINGPONG_AUTHORIZE hooks for the tests: each says no to one topic and records what it was asked."""

from typing import Any

ASKED: list[tuple[str | None, str, str]] = []
REFUSED_TOPIC = "public:secret"


def refuse_secret(identity: Any, action: str, topic: str) -> bool:
    """A sync hook (run in a thread: it may query the database)."""
    ASKED.append((identity.user_id, action, topic))
    return topic != REFUSED_TOPIC


async def refuse_secret_async(identity: Any, action: str, topic: str) -> bool:
    ASKED.append((identity.user_id, action, topic))
    return topic != REFUSED_TOPIC
