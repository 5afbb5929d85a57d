"""The project's settings with pingpong.layers.PingpongPubSubChannelLayer (app "project-layer")."""

from project.settings import *  # noqa: F403
from project.settings import CHANNEL_LAYERS, REDIS_URL

if REDIS_URL:
    CHANNEL_LAYERS["default"]["BACKEND"] = "pingpong.layers.PingpongPubSubChannelLayer"
