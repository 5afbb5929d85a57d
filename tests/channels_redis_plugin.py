"""A pytest plugin for channels-redis' own pub/sub tests: every layer they build is ours, on our Redis.

Loaded (`-p tests.channels_redis_plugin`) into the pytest run that `tests/test_channels_redis_upstream.py`
starts in channels-redis' unpacked sdist. The upstream modules name the layer class and the Redis
addresses as module globals, `RedisPubSubChannelLayer` and `TEST_HOSTS` (localhost:6379, or a Sentinel
on localhost:26379), which their fixtures and tests read when each test runs. Once the tests are
collected we rebind both in every upstream module: the class to `PingpongPubSubChannelLayer`, the
hosts to the caller's redis-server (PINGPONG_UPSTREAM_REDIS_URL) or Sentinel
(PINGPONG_UPSTREAM_SENTINEL, `host:port`; the master name and password stay as upstream has them).
A module whose globals are not there any more fails the run, rather than testing the stock class or
a Redis on localhost.

Proof, independent of the substitution: channels_redis' own base classes record the class of every
layer and per-event-loop layer built; after every upstream test, a fixture fails the test unless it
built a layer and every layer was a `PingpongPubSubChannelLayer`, every per-loop layer a
`PingpongPubSubLoopLayer`. With PINGPONG_UPSTREAM_STOCK=1 the class is left as upstream's (the
hosts are still ours), and the checks must fail.
"""

import os
from collections.abc import Iterator
from typing import Any

import pytest
from channels_redis import pubsub

from pingpong.layers import PingpongPubSubChannelLayer, PingpongPubSubLoopLayer

SUMMARY_PREFIX = "pingpong layers:"

# Class names of the layers and per-loop layers built in this run, in order.
built: list[str] = []
built_loop_layers: list[str] = []


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


OURS = class_name(PingpongPubSubChannelLayer)
OURS_LOOP = class_name(PingpongPubSubLoopLayer)


def record_what_is_built() -> None:
    """Wrap the stock base classes' constructors, which ours call too, to record each instance's class."""
    layer_init = pubsub.RedisPubSubChannelLayer.__init__
    loop_layer_init = pubsub.RedisPubSubLoopLayer.__init__

    def layer_init_and_record(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(class_name(type(self)))
        layer_init(self, *args, **kwargs)

    def loop_layer_init_and_record(self: Any, *args: Any, **kwargs: Any) -> None:
        built_loop_layers.append(class_name(type(self)))
        loop_layer_init(self, *args, **kwargs)

    pubsub.RedisPubSubChannelLayer.__init__ = layer_init_and_record  # type: ignore[method-assign]
    pubsub.RedisPubSubLoopLayer.__init__ = loop_layer_init_and_record  # type: ignore[method-assign]


def our_hosts(upstream_hosts: list[Any]) -> list[Any]:
    """The upstream module's TEST_HOSTS pointed at the caller's redis-server or Sentinel."""
    (upstream,) = upstream_hosts
    if isinstance(upstream, dict) and "master_name" in upstream:
        host, _, port = os.environ["PINGPONG_UPSTREAM_SENTINEL"].rpartition(":")
        return [{**upstream, "sentinels": [(host, int(port))]}]
    return [os.environ["PINGPONG_UPSTREAM_REDIS_URL"]]


def pytest_configure() -> None:
    record_what_is_built()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Rebind each upstream module's layer class (unless PINGPONG_UPSTREAM_STOCK) and hosts."""
    modules = {item.module for item in items if isinstance(item, pytest.Function) and item.module is not None}
    for module in modules:
        missing = [name for name in ("RedisPubSubChannelLayer", "TEST_HOSTS") if not hasattr(module, name)]
        if missing:
            raise pytest.UsageError(f"{module.__name__} has no {missing}: the plugin no longer fits upstream")
        module.TEST_HOSTS = our_hosts(module.TEST_HOSTS)
        if not os.environ.get("PINGPONG_UPSTREAM_STOCK"):
            module.RedisPubSubChannelLayer = PingpongPubSubChannelLayer


@pytest.fixture(autouse=True)
def every_layer_is_pingpong() -> Iterator[None]:
    """Fail the upstream test unless it built a layer, and every layer and per-loop layer was ours."""
    layers_before, loop_layers_before = len(built), len(built_loop_layers)
    yield
    layers, loop_layers = built[layers_before:], built_loop_layers[loop_layers_before:]
    assert layers, "the test built no channel layer"
    assert all(name == OURS for name in layers), f"not our layer: {layers}"
    assert all(name == OURS_LOOP for name in loop_layers), f"not our loop layer: {loop_layers}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"{SUMMARY_PREFIX} {built.count(OURS)}/{len(built)} PingpongPubSubChannelLayer, "
        f"{built_loop_layers.count(OURS_LOOP)}/{len(built_loop_layers)} PingpongPubSubLoopLayer"
    )
