"""Project settings with channels-redis' group expiry cut to 1 s, to prove it cannot bite."""

from project.settings import *  # noqa: F403
from project.settings import CHANNEL_LAYERS

CHANNEL_LAYERS["default"].setdefault("CONFIG", {})["group_expiry"] = 1
