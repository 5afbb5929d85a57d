"""Channel-layer calls with a deadline, and the readiness round trip.

Every call that can reach Redis goes through `layer_call`, so an unreachable or hung
Redis becomes one exception, `ChannelLayerUnavailable`, within a bounded time.
"""

import asyncio
import logging
import ssl
import uuid
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from redis.exceptions import RedisError

from pingpong import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

LAYER_ERRORS: tuple[type[BaseException], ...] = (OSError, RedisError, asyncio.TimeoutError)


class ChannelLayerUnavailable(Exception):
    """The channel layer could not be reached in time."""


def layer_get() -> BaseChannelLayer:
    """The default channel layer; settings always configure one."""
    layer = get_channel_layer()
    if layer is None:
        raise ChannelLayerUnavailable("no channel layer is configured")
    return layer


async def layer_call(awaitable: Awaitable[T], *, operation: str, timeout: float | None = None) -> T:
    """Await a channel-layer call, turning errors and timeouts into ChannelLayerUnavailable."""
    limit = settings.PINGPONG_LAYER_TIMEOUT if timeout is None else timeout
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with completion, leaving a consumer running after its connection is gone.
        async with asyncio.timeout(limit):
            return await awaitable
    except LAYER_ERRORS as error:
        metrics.LAYER_ERRORS.labels(operation).inc()
        raise ChannelLayerUnavailable(tls_verify_failure(error) or str(error) or type(error).__name__) from error


def tls_verify_failure(error: BaseException) -> str | None:
    """A plain sentence when `error` was caused by a Redis certificate that failed verification, else None.

    redis-py wraps the SSL error in a ConnectionError whose text does not say "certificate";
    an operator should not have to guess that a CA file or a certificate is at fault.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # the chain is short; `seen` stops a cycle
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"TLS certificate verification failed: {cause.verify_message or cause}"
            if reason not in _tls_failures_logged and len(_tls_failures_logged) < 16:
                # Logged once per reason: a readiness probe every few seconds would repeat it forever.
                _tls_failures_logged.add(reason)
                logger.error("channel layer: %s (check the Redis certificate and ssl_ca_certs)", reason)
            return reason
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


_tls_failures_logged: set[str] = set()


# One probe channel per event loop, reused, so readiness checks leave no subscriptions behind.
_probes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, asyncio.Lock]]" = weakref.WeakKeyDictionary()


async def layer_roundtrip(*, timeout: float = 1.0) -> None:
    """Send a message to ourselves through the layer and receive it within `timeout` seconds."""
    layer = layer_get()
    loop = asyncio.get_running_loop()

    async def roundtrip() -> None:
        if loop not in _probes:
            _probes[loop] = (await layer.new_channel("readyz."), asyncio.Lock())
        channel, lock = _probes[loop]
        nonce = uuid.uuid4().hex
        async with lock:
            await layer.send(channel, {"type": "readyz.probe", "nonce": nonce})
            message: dict[str, Any] = {}
            while message.get("nonce") != nonce:  # skip answers to earlier, timed-out probes
                message = await layer.receive(channel)

    try:
        await layer_call(roundtrip(), operation="roundtrip", timeout=timeout)
    except ChannelLayerUnavailable:
        # A cancelled receive may have dropped the channel's subscription: start afresh next time.
        _probes.pop(loop, None)
        raise
