"""The app's settings and their defaults, so its consumers work in any Django project.

`project/settings.py` reads each from the environment with these defaults; another project
may set none of them.
"""

from typing import Any, Final

from django.conf import settings

DEFAULTS: Final[dict[str, Any]] = {
    "PINGPONG_MAX_MESSAGE_BYTES": 64 * 1024,
    "PINGPONG_RATE_PER_SECOND": 20.0,
    "PINGPONG_RATE_BURST": 40,
    "PINGPONG_MAX_CONNECTIONS": 20_000,
    # A tenth of the node per client address: ten addresses are needed to fill a node, while an
    # office or carrier-grade NAT of ~1,000 people with two tabs each still fits on one node.
    "PINGPONG_MAX_CONNECTIONS_PER_IP": 2_000,
    # Four of the largest client messages, 16 of the largest broadcasts ("Memory budget", README).
    "PINGPONG_MAX_PENDING_BYTES": 256 * 1024,
    "PINGPONG_LAYER_TIMEOUT": 2.0,
    # A publish (broadcast, publication) waits longer than a connect: its caller is a server with its
    # own timeout, and under a fan-out that saturates the node the confirmation queues behind the frames.
    "PINGPONG_PUBLISH_TIMEOUT": 5.0,
    "PINGPONG_MAX_BROADCAST_BYTES": 16 * 1024,
    # Connection tokens (pingpong.tokens): unset, no token is issued or accepted.
    "PINGPONG_TOKEN_SECRET": "",
    # Topic namespaces added to (or, mapped to None, removed from) pingpong.topics.DEFAULT_NAMESPACES.
    "PINGPONG_NAMESPACES": None,
    # A dotted path to `(identity, action, topic) -> bool`, sync or async, asked after the namespace rules.
    "PINGPONG_AUTHORIZE": "",
    "PINGPONG_MAX_SUBSCRIPTIONS": 100,
    # Most publications one recovery (subscribe with `since`) returns; more missed: "recovered": false.
    "PINGPONG_MAX_RECOVER": 1_000,
}


def setting(name: str) -> Any:
    """The project's value of a pingpong setting, or its default."""
    return getattr(settings, name, DEFAULTS[name])
