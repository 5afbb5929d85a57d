"""Settings for pingpong, read from the environment (see the README's settings table).

With no environment at all this is a working local run: debug on, localhost only,
the embedded (process-local) channel layer. Every deploy difference is one variable.
"""

import json
import os
import re
import socket
import sys
from pathlib import Path

import dj_database_url

from pingpong.conf import DEFAULTS
from project.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", True)

_DEV_SECRET = "django-insecure-local-development-only-do-not-deploy"
SECRET_KEY = env_str("DJANGO_SECRET_KEY", _DEV_SECRET if DEBUG else "")
if not DEBUG and (len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5 or SECRET_KEY.startswith("django-insecure")):
    # One sentence instead of a traceback: this is the first thing an operator sees.
    sys.exit(
        "pingpong: refusing to start with DJANGO_DEBUG off: set DJANGO_SECRET_KEY to a random "
        "string of at least 50 characters (python -c 'import secrets; print(secrets.token_urlsafe(50))')."
    )

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "channels",
    "pingpong",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]

# Users and sessions, so a browser logged in to the site is the same user on its websocket.
# Read once per connection (at connect, never per message). SQLite beside the code by default,
# so `make run` needs nothing; a deploy sets DATABASE_URL (postgres://...; compose runs PostgreSQL).
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"), conn_max_age=60, conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # libpq waits forever for a host that drops packets; a handshake (and `serve --migrate`'s retry) may not.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "index"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
# Set where `collectstatic` runs (the Docker image); unset, WhiteNoise serves from the app directories.
STATIC_ROOT = env_str("DJANGO_STATIC_ROOT") or None
# WhiteNoise serves app static files straight from the finders, so no collectstatic
# step is needed for `make run`; the Docker image still collects them once.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Security headers that apply with or without TLS in front.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# DJANGO_HTTPS=1 when clients reach the service over https (TLS ends at the load balancer).
HTTPS = env_bool("DJANGO_HTTPS", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    CSRF_COOKIE_SECURE = True
    SESSION_COOKIE_SECURE = True
    # /healthz and /readyz are probed over plain http inside the deployment.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# Channel layer: embedded by default, Redis pub/sub when REDIS_URL is set.
# Why the pub/sub layer and these connection options: see "Channel layer" in the README.
REDIS_URL = env_str("REDIS_URL")
PINGPONG_REDIS_PREFIX = env_str("PINGPONG_REDIS_PREFIX", "pingpong")  # channels and presence keys
PINGPONG_NODE_ID = env_str("PINGPONG_NODE_ID")  # empty: <hostname>-<pid>
PINGPONG_LAYER_TIMEOUT = env_float("PINGPONG_LAYER_TIMEOUT", DEFAULTS["PINGPONG_LAYER_TIMEOUT"], minimum=0.1)
PINGPONG_PUBLISH_TIMEOUT = env_float("PINGPONG_PUBLISH_TIMEOUT", DEFAULTS["PINGPONG_PUBLISH_TIMEOUT"], minimum=0.1)
# Every Redis connection of a node counts here: the layer's subscriber, its publishers and
# presence's one. Ten is plenty (a PUBLISH holds a connection for well under a millisecond, and
# one process cannot keep more busy) and lets two nodes share a 20-client Redis plan.
PINGPONG_REDIS_MAX_CONNECTIONS = env_int("PINGPONG_REDIS_MAX_CONNECTIONS", 10, minimum=3)
PINGPONG_REDIS_IDLE_SECONDS = env_float("PINGPONG_REDIS_IDLE_SECONDS", 30.0, minimum=0.1)
# Each connection is named after its node, so Redis' CLIENT LIST shows which node holds which.
REDIS_CLIENT_NAME = re.sub(
    r"[^!-~]", "_", f"{PINGPONG_REDIS_PREFIX}:{PINGPONG_NODE_ID or f'{socket.gethostname()}-{os.getpid()}'}"
)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "pingpong.layers.PingpongPubSubChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_connect_timeout": 2,
                        "socket_timeout": 5,
                        "health_check_interval": 10,
                        "client_name": REDIS_CLIENT_NAME,
                    }
                ],
                "prefix": PINGPONG_REDIS_PREFIX,
                # One connection of the cap is presence's (pingpong/presence.py).
                "max_connections": PINGPONG_REDIS_MAX_CONNECTIONS - 1,
                # A caller waits for a free connection, and gives up a little before its layer
                # call's deadline so that the error says the pool, not Redis, was the problem.
                "pool_timeout": 0.75 * PINGPONG_LAYER_TIMEOUT,
                "idle_seconds": PINGPONG_REDIS_IDLE_SECONDS,
                # A first group_add waits this long for Redis to confirm its SUBSCRIBE (pingpong/layers.py).
                "subscribe_timeout": PINGPONG_LAYER_TIMEOUT,
            },
        }
    }
else:
    # Process-local, O(1) per connection and per message (Channels' InMemoryChannelLayer scans every
    # channel on each receive). No group expiry: like the Redis pub/sub layer, a connection open for
    # more than a day keeps receiving broadcasts.
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "pingpong.local_layer.LocalChannelLayer", "CONFIG": {"group_expiry": None}}
    }

# pingpong's own settings; names, defaults and meaning are listed in the README.
# The bearer token of /api/broadcast and /api/publish; PINGPONG_BROADCAST_TOKEN is its old name,
# read when PINGPONG_API_TOKEN is unset (PINGPONG_API_TOKEN wins when both are).
PINGPONG_API_TOKEN = env_str("PINGPONG_API_TOKEN")
PINGPONG_BROADCAST_TOKEN = env_str("PINGPONG_BROADCAST_TOKEN")
# Signs connection tokens (pingpong.tokens); unset, none is issued or accepted.
PINGPONG_TOKEN_SECRET = env_str("PINGPONG_TOKEN_SECRET")
if PINGPONG_TOKEN_SECRET and len(PINGPONG_TOKEN_SECRET.encode()) < 32:
    # RFC 7518 wants an HS256 key at least as long as the hash; a short one can be brute-forced.
    sys.exit(
        "pingpong: PINGPONG_TOKEN_SECRET must be at least 32 bytes (python -c 'import secrets; print(secrets.token_urlsafe(32))')."
    )
try:
    PINGPONG_NAMESPACES = json.loads(env_str("PINGPONG_NAMESPACES", "null"))
except ValueError:
    sys.exit('pingpong: PINGPONG_NAMESPACES must be JSON: {"name": {"subscribe": ..., "publish": ...}, ...}.')
PINGPONG_AUTHORIZE = env_str("PINGPONG_AUTHORIZE")
PINGPONG_MAX_SUBSCRIPTIONS = env_int("PINGPONG_MAX_SUBSCRIPTIONS", DEFAULTS["PINGPONG_MAX_SUBSCRIPTIONS"], minimum=1)
PINGPONG_MAX_RECOVER = env_int("PINGPONG_MAX_RECOVER", DEFAULTS["PINGPONG_MAX_RECOVER"], minimum=1)
PINGPONG_MAX_MESSAGE_BYTES = env_int("PINGPONG_MAX_MESSAGE_BYTES", DEFAULTS["PINGPONG_MAX_MESSAGE_BYTES"], minimum=16)
# The largest broadcast text, and the largest publication `data` as JSON.
PINGPONG_MAX_BROADCAST_BYTES = env_int(
    "PINGPONG_MAX_BROADCAST_BYTES", DEFAULTS["PINGPONG_MAX_BROADCAST_BYTES"], minimum=1
)
PINGPONG_RATE_PER_SECOND = env_float("PINGPONG_RATE_PER_SECOND", DEFAULTS["PINGPONG_RATE_PER_SECOND"])
PINGPONG_RATE_BURST = env_int("PINGPONG_RATE_BURST", DEFAULTS["PINGPONG_RATE_BURST"])
PINGPONG_MAX_CONNECTIONS = env_int("PINGPONG_MAX_CONNECTIONS", DEFAULTS["PINGPONG_MAX_CONNECTIONS"])
# Bytes the server may hold for one client that has not read them (beyond what the kernel took).
PINGPONG_MAX_PENDING_BYTES = env_int("PINGPONG_MAX_PENDING_BYTES", DEFAULTS["PINGPONG_MAX_PENDING_BYTES"], minimum=1024)
PINGPONG_MAX_CONNECTIONS_PER_IP = env_int(
    "PINGPONG_MAX_CONNECTIONS_PER_IP", DEFAULTS["PINGPONG_MAX_CONNECTIONS_PER_IP"]
)
PINGPONG_DRAIN_SECONDS = env_float("PINGPONG_DRAIN_SECONDS", 10.0)
PINGPONG_PING_INTERVAL = env_float("PINGPONG_PING_INTERVAL", 20.0, minimum=1.0)
PINGPONG_PING_TIMEOUT = env_float("PINGPONG_PING_TIMEOUT", 20.0, minimum=1.0)
PINGPONG_PROXY_HEADER = env_str("PINGPONG_PROXY_HEADER")
# Seconds an HTTP connection may sit idle or mid-request (a stalled handshake); above the load
# balancer's keep-alive idle timeout (60 s on most) so it never closes a connection the LB reuses.
# Seconds from a websocket upgrade request to the application's accept. daphne's own 5 s dropped
# clients mid-handshake in a burst of thousands on a busy node; the request is complete by then,
# so a slow client cannot hold a connection here.
PINGPONG_HANDSHAKE_TIMEOUT = env_float("PINGPONG_HANDSHAKE_TIMEOUT", 30.0, minimum=0.01)
PINGPONG_HTTP_IDLE_TIMEOUT = env_float("PINGPONG_HTTP_IDLE_TIMEOUT", 75.0, minimum=1.0)
# Seconds a node's presence count lives in Redis; it is rewritten every (TTL - 2) / 2 s, so two
# writes may fail before a live node blinks out of /api/stats (12: every 5 s).
PINGPONG_PRESENCE_TTL = env_int("PINGPONG_PRESENCE_TTL", 12, minimum=3)

LOG_FORMAT = env_str("PINGPONG_LOG_FORMAT", "text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "pingpong.logs.JsonFormatter"},
    },
    "filters": {"brief_connection_errors": {"()": "pingpong.logs.BriefConnectionErrors"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "text",
        },
        "brief": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "text",
            "filters": ["brief_connection_errors"],
        },
    },
    "root": {"handlers": ["console"], "level": env_str("PINGPONG_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "channels_redis": {"handlers": ["brief"], "propagate": False},
    },
}

# The broadcast API's largest request body; larger ones get 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
