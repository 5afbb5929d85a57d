"""HTTP views: the page, health and readiness probes, the broadcast, publish and history APIs."""

import hmac
import json
from collections.abc import Awaitable
from typing import Any

import prometheus_client
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render, resolve_url
from django.urls import NoReverseMatch
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from pingpong import broadcast, history, layer_calls, presence, protocol, publishing, topic_presence, topics
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


def api_token() -> str:
    """The API's bearer token: PINGPONG_API_TOKEN, or its old name PINGPONG_BROADCAST_TOKEN when it is unset."""
    return getattr(settings, "PINGPONG_API_TOKEN", "") or getattr(settings, "PINGPONG_BROADCAST_TOKEN", "")


def api_refusal(request: HttpRequest, *, what: str = "The API") -> JsonResponse | None:
    """403 when no API token is configured, 401 when the request does not carry it; None when it does.

    `what` names the refused action in the 403's sentence ("Broadcasting").
    """
    token = api_token()
    if not token:
        detail = f"{what} is disabled: PINGPONG_API_TOKEN (or its old name PINGPONG_BROADCAST_TOKEN) is not set."
        return error_response(403, protocol.ERROR_DISABLED, detail)
    if not bearer_token_matches(request, token):
        return error_response(
            401, protocol.ERROR_UNAUTHORIZED, "Send Authorization: Bearer <token>.", WWW_Authenticate="Bearer"
        )
    return None


class ApiRefused(Exception):
    """An API request answered with an error before anything is sent; `response` is the answer."""

    def __init__(self, response: JsonResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def api_payload(request: HttpRequest, *, what: str) -> Any:
    """The JSON body of an authorized POST to the API, or ApiRefused (405, 403, 401, 413, 400).

    `what` names the refused action in the 403's sentence ("Broadcasting").
    """
    if request.method != "POST":
        raise ApiRefused(error_response(405, protocol.ERROR_METHOD_NOT_ALLOWED, "Use POST.", Allow="POST"))
    refusal = api_refusal(request, what=what)
    if refusal is not None:
        raise ApiRefused(refusal)
    try:
        body = request.body
    except RequestDataTooBig:
        raise ApiRefused(error_response(413, protocol.ERROR_TOO_LARGE, "The request body is too large.")) from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiRefused(error_response(400, protocol.ERROR_BAD_REQUEST, "The body is not valid JSON.")) from None


async def api_send(send: Awaitable[dict[str, Any]], *, sent_id: str, what: str, **accepted: str) -> JsonResponse:
    """Await a retry-safe send: 202 `{"status": "accepted", **accepted, "id"}` (with the publication's
    `offset` and `epoch` on a topic with history), or 503 / 504 with the id."""
    try:
        result = await send
    except BroadcastOutcomeUnknown as error:
        detail = f"The {what} may or may not have been sent ({error}); retry with the same id."
        return JsonResponse({"error": protocol.ERROR_OUTCOME_UNKNOWN, "detail": detail, "id": sent_id}, status=504)
    except ChannelLayerUnavailable as error:
        detail = f"The channel layer is unavailable ({error}); nothing was sent."
        return JsonResponse({"error": protocol.ERROR_UNAVAILABLE, "detail": detail, "id": sent_id}, status=503)
    position = {key: result[key] for key in ("offset", "epoch") if key in result}  # a topic with history
    return JsonResponse({"status": "accepted", **accepted, **position, "id": sent_id}, status=202)


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
    try:
        wanted = broadcast.request_from(api_payload(request, what="Broadcasting"))
    except ApiRefused as refused:
        return refused.response
    except BroadcastInvalid as error:
        return error_response(400, protocol.ERROR_BAD_REQUEST, str(error))
    return await api_send(broadcast.send(text=wanted.text, broadcast_id=wanted.id), sent_id=wanted.id, what="broadcast")


@csrf_exempt
async def api_publish(request: HttpRequest) -> JsonResponse:
    """POST /api/publish {"topic": T, "data": <JSON>, "id": "..."} with a bearer token: publish to T's subscribers.

    The server may publish to any topic in a known namespace. 503 and 504 as for broadcasts.
    """
    try:
        wanted = publishing.request_from(api_payload(request, what="Publishing"))
        topics.namespace_for(wanted.topic)
        topics.data_text(wanted.data)  # refused here, not as a failed send
    except ApiRefused as refused:
        return refused.response
    except TopicRefused as error:
        return error_response(400, error.error, str(error))
    send = publishing.apublish(wanted.topic, wanted.data, id=wanted.id)
    return await api_send(send, sent_id=wanted.id, what="publication", topic=wanted.topic)


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
