"""A PINGPONG_AUTHORIZE hook for the end-to-end tests: it says no to one topic, `public:vault`."""

from pingpong.topics import Identity

REFUSED_TOPIC = "public:vault"


def refuse_the_vault(identity: Identity, action: str, topic: str) -> bool:
    return topic != REFUSED_TOPIC
