"""HTTP views: the page, health and readiness probes, the broadcast API."""

import hmac
import json
from typing import Any

import prometheus_client
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from pingpong import broadcast, layer_calls, presence, protocol, topic_presence
from pingpong.broadcast import BroadcastInvalid, BroadcastOutcomeUnknown
from pingpong.layer_calls import ChannelLayerUnavailable
from pingpong.metrics import exposition
from pingpong.node import node
from pingpong.presence import PresenceUnavailable
from pingpong.topics import TopicRefused


def error_response(status: int, error: str, detail: str, **headers: str) -> JsonResponse:
    """A JSON error body shaped like the websocket error event."""
    response = JsonResponse({"error": error, "detail": detail}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def index(request: HttpRequest) -> HttpResponse:
    """The live page: ping/pong round-trip time, connection state, broadcasts."""
    context: dict[str, Any] = {
        "ping": protocol.PING,
        "pong": protocol.PONG,
        "terminal_codes": sorted(
            int(code) for code in protocol.TERMINAL_CLOSE_CODES
        ),  # plain numbers for the JSON config
    }
    return render(request, "pingpong/index.html", context)


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


def api_token() -> str:
    """The bearer token of the server API: PINGPONG_API_TOKEN, or its older name PINGPONG_BROADCAST_TOKEN."""
    return str(getattr(settings, "PINGPONG_API_TOKEN", "") or settings.PINGPONG_BROADCAST_TOKEN or "")


def api_refusal(request: HttpRequest) -> JsonResponse | None:
    """403 when no API token is configured, 401 when the request does not carry it; None when it does."""
    token = api_token()
    if not token:
        return error_response(403, protocol.ERROR_DISABLED, "The API is disabled: no API token is set.")
    if not bearer_token_matches(request, token):
        return error_response(
            401, protocol.ERROR_UNAUTHORIZED, "Send Authorization: Bearer <token>.", WWW_Authenticate="Bearer"
        )
    return None


# HTTP statuses of the topic refusals the presence API can meet.
_REFUSAL_STATUS = {
    protocol.ERROR_BAD_TOPIC: 400,
    protocol.ERROR_BAD_REQUEST: 400,
    protocol.ERROR_UNKNOWN_NAMESPACE: 404,
    protocol.ERROR_UNAVAILABLE: 503,
}


@csrf_exempt  # a bearer-token API: no cookie, so no CSRF; other methods get 405, not CSRF's 403
@never_cache
async def api_presence(request: HttpRequest, topic: str) -> JsonResponse:
    """GET /api/presence/<topic> with the API token: who is subscribed (see pingpong.topic_presence)."""
    if request.method not in ("GET", "HEAD"):
        return error_response(405, protocol.ERROR_METHOD_NOT_ALLOWED, "Use GET.", Allow="GET, HEAD")
    refusal = api_refusal(request)
    if refusal is not None:
        return refusal
    try:
        return JsonResponse(await topic_presence.listing(topic))
    except TopicRefused as refused:
        return error_response(_REFUSAL_STATUS.get(refused.error, 400), refused.error, str(refused))


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
