"""Project settings plus a sync Django view that calls `pingpong.publish` (tests.urls_publish_view)."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "tests.urls_publish_view"
