"""Channel-layer calls with a deadline, and the readiness round trip.

Every call that can reach Redis goes through `call`, so an unreachable or hung
Redis becomes one exception, `ChannelLayerUnavailable`, within a bounded time. Its text
names the cause, because the cures differ: "Redis unreachable" (fix Redis), "connection
pool exhausted" (Redis is fine; this node is sending more than its connections carry) or
"no answer within N s" (Redis hung, or this node too busy to hear it: the text says which
when the node's event loop was running late).
"""

import asyncio
import logging
import ssl
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pingpong import metrics
from pingpong.pool import PoolExhausted

#: A consumer's way to take a channel-layer message without its task waking (both layers offer
#: `direct_receiver_set(channel, receiver)`). Called only while the consumer's receive waits with
#: nothing queued, so the channel's order holds; True means taken, False queues it as usual. It must
#: not block and must not raise.
DirectReceiver = Callable[[dict[str, Any]], bool]

logger = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_FAILURES: tuple[type[BaseException], ...] = (OSError, RedisError, asyncio.TimeoutError)

# A deadline that fires this late shows an event loop too busy to run it on time.
BUSY_LOOP_LAG_SECONDS = 0.1


class ChannelLayerUnavailable(Exception):
    """The channel layer could not be reached in time."""


def get_layer() -> BaseChannelLayer:
    """The default channel layer; settings always configure one."""
    layer = get_channel_layer()
    if layer is None:
        raise ChannelLayerUnavailable("no channel layer is configured")
    return layer


async def call(awaitable: Awaitable[T], *, operation: str, timeout: float | None = None) -> T:
    """Await a channel-layer call, turning errors and timeouts into ChannelLayerUnavailable."""
    limit = settings.PINGPONG_LAYER_TIMEOUT if timeout is None else timeout
    loop = asyncio.get_running_loop()
    deadline = asyncio.timeout(limit)
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with completion, leaving a consumer running after its connection is gone.
        async with deadline:
            return await awaitable
    except REDIS_FAILURES as error:
        metrics.LAYER_FAILURES.labels(operation).inc()
        late = loop.time() - (deadline.when() or loop.time()) if deadline.expired() else None
        raise ChannelLayerUnavailable(error_text(error, limit=limit, late=late)) from error


def error_text(error: BaseException, *, limit: float, late: float | None = None) -> str:
    """Say what failed: Redis unreachable, the pool exhausted, or no answer in time (and whether the node was busy).

    `late` is how long after the call's deadline the caller ran again, None if the deadline did not expire.
    """
    tls = tls_verify_failure(error)
    if tls is not None:
        return tls
    detail = str(error) or type(error).__name__
    if isinstance(error, PoolExhausted):
        return detail
    if late is not None:
        text = f"no answer within {limit:g} s"
        if late >= BUSY_LOOP_LAG_SECONDS:
            return f"{text}: this node is busy (its event loop ran {late:.2f} s late); Redis may be healthy"
        return f"{text} (Redis slow or hung, or this node busy)"
    if isinstance(error, RedisTimeoutError):
        return f"Redis did not answer in time: {detail}"
    if isinstance(error, RedisConnectionError | OSError):
        return f"Redis unreachable: {detail}"
    return f"Redis error: {detail}"


async def warm_up(*, groups: list[str]) -> None:
    """Connect the channel layer and subscribe `groups` before clients arrive; a no-op for layers
    without `warm_up` (in-memory). A failure is logged: connections then subscribe on demand."""
    layer = get_layer()
    warm_up = getattr(layer, "warm_up", None)
    if warm_up is None:
        return
    try:
        await call(warm_up(groups), operation="warm_up")
    except ChannelLayerUnavailable as error:
        logger.warning("channel layer not warmed up at start (%s); connections will subscribe on demand", error)


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


async def roundtrip(*, timeout: float = 1.0) -> None:
    """Send a message to ourselves through the layer and receive it within `timeout` seconds."""
    layer = get_layer()
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
        await call(roundtrip(), operation="roundtrip", timeout=timeout)
    except ChannelLayerUnavailable:
        # A cancelled receive may have dropped the channel's subscription: start afresh next time.
        _probes.pop(loop, None)
        raise
