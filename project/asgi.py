"""ASGI entry point: http to Django, websockets through the origin check and the session's user to the routes."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Django must be set up before anything imports models or settings-dependent code.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from pingpong.auth import SessionAuthStack  # noqa: E402
from pingpong.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Channels' AuthMiddlewareStack: the session cookie's user, read once per connection at the handshake.
        "websocket": AllowedHostsOriginValidator(SessionAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
