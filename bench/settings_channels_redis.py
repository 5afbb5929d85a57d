"""The project's settings with channels_redis' own RedisPubSubChannelLayer (app "project-channels-redis").

The project ships pingpong.layers.PingpongPubSubChannelLayer; this variant shows what it buys.
"""

from project.settings import *  # noqa: F403
from project.settings import CHANNEL_LAYERS, REDIS_URL

if REDIS_URL:
    CHANNEL_LAYERS["default"]["BACKEND"] = "channels_redis.pubsub.RedisPubSubChannelLayer"
