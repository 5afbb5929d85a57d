"""The project's settings with Channels' own InMemoryChannelLayer as the embedded layer.

The project ships pingpong.local_layer.LocalChannelLayer; this variant shows what it buys
(the connect figure in the README's "Channel layer" section).
"""

from project.settings import *  # noqa: F403
from project.settings import CHANNEL_LAYERS, REDIS_URL

if not REDIS_URL:
    CHANNEL_LAYERS["default"] = {"BACKEND": "channels.layers.InMemoryChannelLayer"}
