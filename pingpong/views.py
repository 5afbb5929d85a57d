"""HTTP views: the page, health and readiness probes, the broadcast API."""

import hmac
import json
from typing import Any

import prometheus_client
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render, resolve_url
from django.urls import NoReverseMatch
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from pingpong import broadcast, layer_calls, presence, protocol
from pingpong.broadcast import BroadcastInvalid, BroadcastOutcomeUnknown
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.metrics import exposition
from pingpong.node import node
from pingpong.presence import PresenceUnavailable


def error_response(status: int, error: str, detail: str, **headers: str) -> JsonResponse:
    """A JSON error body shaped like the websocket error event."""
    response = JsonResponse({"error": error, "detail": detail}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def login_path() -> str:
    """Where the page sends anonymous visitors to sign in: settings.LOGIN_URL (a URL name or a path)."""
    try:
        return resolve_url(settings.LOGIN_URL)
    except NoReverseMatch:  # a project without a view of that name: Django's default path
        return "/accounts/login/"


def index(request: HttpRequest) -> HttpResponse:
    """The live page: round-trip time, connection state, broadcasts, the user and their topics."""
    user = request.user  # the session's user: the same the websocket gets through AuthMiddlewareStack
    config: dict[str, Any] = {
        "ws_path": "/ws/",
        "stats_url": "/api/stats",
        "login_url": f"{login_path()}?next=/",
        "terminal_codes": sorted(int(code) for code in protocol.TERMINAL_CLOSE_CODES),  # plain numbers
        "user": {"id": str(user.pk), "name": user.get_username()} if user.is_authenticated else None,
    }
    return render(request, "pingpong/index.html", {"config": config})


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers HTTP. Never touches Redis."""
    return JsonResponse({"status": "ok"})


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this server (every worker); the load balancer does not expose this path."""
    return HttpResponse(exposition(), content_type=prometheus_client.CONTENT_TYPE_LATEST)


async def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: a round trip through the channel layer within 1 s, and not draining."""
    if node.draining:
        return JsonResponse({"status": "unavailable", "reason": "draining"}, status=503)
    try:
        await layer_calls.roundtrip(timeout=1.0)
    except ChannelLayerUnavailable as error:
        return JsonResponse({"status": "unavailable", "reason": f"channel layer: {error}"}, status=503)
    return JsonResponse({"status": "ready"})


def bearer_token_matches(request: HttpRequest, expected: str) -> bool:
    """Constant-time check of `Authorization: Bearer <token>`."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@csrf_exempt
async def api_broadcast(request: HttpRequest) -> JsonResponse:
    """POST /api/broadcast {"text": "...", "id": "..."} with a bearer token: send it to every client.

    503 means nothing was sent; 504 means the outcome is unknown, and a retry with the same
    id is safe: each node delivers an id at most once (see pingpong.broadcast).
    """
    if request.method != "POST":
        return error_response(405, protocol.ERROR_METHOD_NOT_ALLOWED, "Use POST.", Allow="POST")
    token = settings.PINGPONG_BROADCAST_TOKEN
    if not token:
        return error_response(
            403, protocol.ERROR_DISABLED, "Broadcasting is disabled: PINGPONG_BROADCAST_TOKEN is not set."
        )
    if not bearer_token_matches(request, token):
        return error_response(
            401, protocol.ERROR_UNAUTHORIZED, "Send Authorization: Bearer <token>.", WWW_Authenticate="Bearer"
        )
    try:
        body = request.body
    except RequestDataTooBig:
        return error_response(413, protocol.ERROR_TOO_LARGE, "The request body is too large.")
    try:
        wanted = broadcast.request_from(json.loads(body))
    except (ValueError, RecursionError) as error:  # JSON errors and BroadcastInvalid
        detail = str(error) if isinstance(error, BroadcastInvalid) else "The body is not valid JSON."
        return error_response(400, protocol.ERROR_BAD_REQUEST, detail)
    try:
        event = await broadcast.send(text=wanted.text, broadcast_id=wanted.id)
    except BroadcastOutcomeUnknown as error:
        detail = f"The broadcast may or may not have been sent ({error}); retry with the same id."
        return JsonResponse({"error": protocol.ERROR_OUTCOME_UNKNOWN, "detail": detail, "id": wanted.id}, status=504)
    except ChannelLayerUnavailable as error:
        detail = f"The channel layer is unavailable ({error}); nothing was sent."
        return JsonResponse({"error": protocol.ERROR_UNAVAILABLE, "detail": detail, "id": wanted.id}, status=503)
    return JsonResponse({"status": "accepted", "id": event["id"]}, status=202)


@never_cache
async def api_stats(request: HttpRequest) -> JsonResponse:
    """GET /api/stats: open connections in the cluster and per node (see pingpong.presence)."""
    if request.method not in ("GET", "HEAD"):
        return error_response(405, protocol.ERROR_METHOD_NOT_ALLOWED, "Use GET.", Allow="GET, HEAD")
    presence.start()
    try:
        return JsonResponse(await presence.stats())
    except PresenceUnavailable as error:  # unreachable, or this node's count cannot be written (PresenceStale)
        return error_response(503, protocol.ERROR_UNAVAILABLE, str(error))
