"""Publishing from the server: `/api/publish`'s request, and `pingpong.publish` / `pingpong.apublish` for Django code.

The server may publish to any valid topic in a known namespace (the namespaces' `publish`
rules and the authorize hook are for websockets). A publication is retry-safe like a
broadcast: give the same id again after `BroadcastOutcomeUnknown` and each node delivers it once.

The sync `publish` runs `apublish` on an event loop that outlives the call. Channels' Redis
layers bind their connections to the event loop that opened them; `async_to_sync` outside a
server makes a new loop per call, so each call would open (and, on our layer, close) its own
Redis connection, and a layer kept across calls would find its loop closed ("Event loop is
closed"). So: inside a Django sync view under ASGI the call runs on the server's own loop
(its layer and its connection cap), and anywhere else (a management command, a script, a
worker process) on one loop per process in a daemon thread, started on first use and again
after a fork, whose layer keeps one pool for every call.
"""

import asyncio
import atexit
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import SyncToAsync, async_to_sync

from pingpong import broadcast, protocol, topics
from pingpong.broadcast import BroadcastInvalid, BroadcastOutcomeUnknown
from pingpong.conf import setting
from pingpong.topics import TopicRefused

T = TypeVar("T")

# Past the layer's own deadline (PINGPONG_LAYER_TIMEOUT), how long a sync caller waits for the
# publisher loop before it gives up on a publication whose outcome is then unknown.
LOOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class PublishRequest:
    """A publication asked for through the API: its topic, its data (any JSON) and its id."""

    topic: str
    data: Any
    id: str


def request_from(payload: Any) -> PublishRequest:
    """The request in a body `{"topic": T, "data": <JSON>, "id": "..."}` (id optional), or TopicRefused.

    The topic's name and namespace and the data's size are checked by `apublish`.
    """
    if not isinstance(payload, dict):
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, 'The body must be a JSON object: {"topic": ..., "data": ...}.')
    if "topic" not in payload:
        raise TopicRefused(protocol.ERROR_BAD_TOPIC, '"topic" is required.')
    if "data" not in payload:
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, '"data" is required (any JSON, null included).')
    return PublishRequest(topic=payload["topic"], data=payload["data"], id=id_from(payload))


def id_from(payload: dict[str, Any]) -> str:
    """A broadcast id's rules for a publication id, refused as TopicRefused(bad_request)."""
    try:
        return broadcast.id_from(payload)
    except BroadcastInvalid as error:
        raise TopicRefused(protocol.ERROR_BAD_REQUEST, str(error)) from None


async def apublish(topic: str, data: Any, *, id: str | None = None) -> dict[str, Any]:
    """Send `data` (any JSON) to every subscriber of `topic` on every node; returns `{"topic", "id"}`.

    Raises TopicRefused (a bad topic, namespace, id, or data that is not JSON or too large),
    ChannelLayerUnavailable when nothing was sent, and BroadcastOutcomeUnknown when it may have
    been: retry with the same `id`.
    """
    publication_id = id_from({} if id is None else {"id": id})
    return await topics.apublish(topic, data, publication_id=publication_id)


def publish(topic: str, data: Any, *, id: str | None = None) -> dict[str, Any]:
    """`apublish` for sync code: a sync view, a management command, a script, a worker process.

    Not from inside a running event loop (it would block the loop): there, `await apublish(...)`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "pingpong.publish() was called from a running event loop, which it would block; "
            "use `await pingpong.apublish(...)` there."
        )
    if server_loop() is not None:
        return async_to_sync(apublish)(topic, data, id=id)
    return publisher_loop().run(apublish(topic, data, id=id))


def server_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the server this sync code was called from (a sync view under ASGI), if any.

    asgiref marks the threads of `sync_to_async` with it, and `async_to_sync` then runs there.
    """
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if loop is None or getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None  # not in a server's thread, or a copy of one in a forked child
    return loop if loop.is_running() else None


class PublisherLoop:
    """An event loop in a daemon thread for this process's sync publishers: one channel layer, one pool.

    Stopped at exit; closing the loop flushes the Redis layer (channels-redis' `_wrap_close`),
    so its connections are closed, not dropped.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="pingpong-publisher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive() and not self.loop.is_closed()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for it, at most the layer deadline plus a grace.

        Past that the publication may or may not have been sent: BroadcastOutcomeUnknown.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout=float(setting("PINGPONG_LAYER_TIMEOUT")) + LOOP_GRACE_SECONDS)
        except TimeoutError:
            future.cancel()
            raise BroadcastOutcomeUnknown("the publisher loop did not finish in time") from None

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread, which closes the loop (and its Redis connections)."""
        if self.pid != os.getpid() or not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


_lock = threading.Lock()
_publisher: PublisherLoop | None = None


def publisher_loop() -> PublisherLoop:
    """This process's publisher loop, started on first use (and anew in a forked child)."""
    global _publisher
    with _lock:
        if _publisher is None or not _publisher.alive():
            _publisher = PublisherLoop()
            atexit.register(_publisher.stop)
        return _publisher


def _forget_after_fork() -> None:
    """A forked child has neither the parent's thread nor, perhaps, a free lock: start afresh."""
    global _lock, _publisher
    _lock, _publisher = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_after_fork)
