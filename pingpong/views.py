"""HTTP views: the page, health and readiness probes, the broadcast and history APIs."""

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

from pingpong import broadcast, history, layer_calls, presence, protocol, topics
from pingpong.broadcast import BroadcastInvalid, BroadcastOutcomeUnknown
from pingpong.conf import setting
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


def api_token() -> str:
    """The bearer token of the HTTP API: PINGPONG_API_TOKEN, or its older name PINGPONG_BROADCAST_TOKEN."""
    return getattr(settings, "PINGPONG_API_TOKEN", "") or getattr(settings, "PINGPONG_BROADCAST_TOKEN", "")


def api_refusal(request: HttpRequest, *, what: str) -> JsonResponse | None:
    """The 403 (no token configured) or 401 (wrong token) for an API request, or None when it may go on."""
    token = api_token()
    if not token:
        return error_response(403, protocol.ERROR_DISABLED, f"{what} is disabled: PINGPONG_API_TOKEN is not set.")
    if not bearer_token_matches(request, token):
        return error_response(
            401, protocol.ERROR_UNAUTHORIZED, "Send Authorization: Bearer <token>.", WWW_Authenticate="Bearer"
        )
    return None


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


@never_cache
async def api_history(request: HttpRequest, topic: str) -> HttpResponse:
    """GET /api/history/<topic>?since=N&limit=L[&epoch=E] with the API token: publications after offset N.

    The body is `{"topic", "epoch", "offset", "since", "complete", "publications": [...]}`:
    up to `limit` retained publications after `since` (each exactly its websocket event), the
    topic's current offset and epoch, and `complete`, true when they start at `since + 1`
    (and `epoch`, if given, is still the topic's): nothing between `since` and them was lost.
    """
    if request.method not in ("GET", "HEAD"):
        return error_response(405, protocol.ERROR_METHOD_NOT_ALLOWED, "Use GET.", Allow="GET, HEAD")
    refusal = api_refusal(request, what="The history API")
    if refusal is not None:
        return refusal
    max_limit = setting("PINGPONG_MAX_RECOVER")
    try:
        namespace = topics.namespace_for(topic)
        since = query_int(request, "since", default=0, maximum=protocol.SINCE_MAX_OFFSET)
        limit = query_int(request, "limit", default=100, maximum=max_limit, minimum=1)
        epoch = request.GET.get("epoch") or None
    except TopicRefused as refused:
        status = 404 if refused.error == protocol.ERROR_UNKNOWN_NAMESPACE else 400
        return error_response(status, refused.error, str(refused))
    layer = layer_calls.get_layer()
    if not (namespace.has_history and history.supported(layer)):
        return error_response(404, protocol.ERROR_NO_HISTORY, f'The namespace "{namespace.name}" keeps no history.')
    try:
        read = await layer_calls.call(
            history.read(
                layer,
                topic,
                topics.group_for(topic),
                ttl=namespace.history_ttl,
                since=since,
                want_epoch=epoch,
                limit=limit,
                strict=False,
            ),
            operation="history_read",
        )
    except ChannelLayerUnavailable as error:
        return error_response(503, protocol.ERROR_UNAVAILABLE, f"The channel layer is unavailable ({error}).")
    epoch_kept = epoch is None or epoch == read.epoch
    events = read.events if epoch_kept else []
    complete = epoch_kept and (since == read.offset or read.first == since + 1)
    head = protocol.encode_event(
        {"topic": topic, "epoch": read.epoch, "offset": read.offset, "since": since, "complete": complete}
    )
    # The events are JSON text already: joined, not parsed and serialised again.
    body = f'{head[:-1]},"publications":[{",".join(events)}]}}'
    return HttpResponse(body, content_type="application/json")


def query_int(request: HttpRequest, name: str, *, default: int, maximum: int, minimum: int = 0) -> int:
    """A whole-number query parameter within bounds, or TopicRefused (bad_request)."""
    raw = request.GET.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and minimum <= int(raw) <= maximum):
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, f'"{name}" is a whole number from {minimum} to {maximum}.')
    return int(raw)
