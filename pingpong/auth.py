"""The session's user at the handshake: Channels' AuthMiddlewareStack, minus a thread hop for anonymous clients.

`channels.auth.get_user` runs in the database thread (one thread, shared by every
connection) even when the handshake carries no session cookie, so a burst of anonymous
clients would queue there. Without the cookie the user is anonymous, and nothing is read.
"""

from typing import Any

from channels.auth import AuthMiddleware
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser


class SessionUserMiddleware(AuthMiddleware):
    """AuthMiddleware that asks the database only when the handshake carries a session cookie."""

    async def resolve_scope(self, scope: dict[str, Any]) -> None:
        if settings.SESSION_COOKIE_NAME in scope.get("cookies", {}):
            await super().resolve_scope(scope)
        else:
            scope["user"]._wrapped = AnonymousUser()


# Named like Channels' AuthMiddlewareStack, which it replaces.
def SessionAuthStack(inner: Any) -> Any:
    """Cookies, the session and its user, as AuthMiddlewareStack, around `inner`."""
    return CookieMiddleware(SessionMiddleware(SessionUserMiddleware(inner)))
