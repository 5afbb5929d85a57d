"""Prometheus metrics for this node, served at /metrics (scrape every replica on its own).

Per-message counts and the handler histogram are plain numbers updated by the event
loop's one thread and read by a collector at scrape time: prometheus_client's own
metrics take a lock per update, which costs more than the rest of a ping's handling.
"""

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CONNECTIONS_OPEN = Gauge("pingpong_connections_open", "Websocket connections open on this node.")
CONNECTIONS_OPENED = Counter("pingpong_connections_opened_total", "Websocket connections accepted.", ["path"])
CONNECTIONS_CLOSED = Counter(
    "pingpong_connections_closed_total", "Websocket connections closed, by close code.", ["code"]
)
LIMIT_HITS = Counter("pingpong_limit_hits_total", "Connections closed or refused by a limit.", ["limit"])
BROADCASTS_SENT = Counter("pingpong_broadcasts_sent_total", "Broadcasts this node published to the channel layer.")
LAYER_FAILURES = Counter(
    "pingpong_channel_layer_errors_total", "Channel-layer calls that failed or timed out.", ["operation"]
)
LAYER_DROPPED = Counter(
    "pingpong_channel_layer_dropped_total",
    "Messages the embedded layer dropped: a group member's queue was full, or a message expired unread.",
    ["reason"],
)


class LoopCounter:
    """A counter for code that runs on the event loop's thread only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class LoopHistogram:
    """A histogram for code that runs on the event loop's thread only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


RECEIVED = {kind: LoopCounter() for kind in ("ping", "json_ping", "other", "binary")}
SENT = {kind: LoopCounter() for kind in ("pong", "error", "broadcast", "echo")}
HANDLER_SECONDS = LoopHistogram((0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25))

RECEIVED_PING, RECEIVED_JSON_PING = RECEIVED["ping"], RECEIVED["json_ping"]
RECEIVED_OTHER, RECEIVED_BINARY = RECEIVED["other"], RECEIVED["binary"]
SENT_PONG, SENT_ERROR, SENT_BROADCAST, SENT_ECHO = SENT["pong"], SENT["error"], SENT["broadcast"], SENT["echo"]


class LoopMetricsCollector(Collector):
    """Exports the loop-local counters and histogram at scrape time."""

    def collect(self) -> Iterator[Metric]:
        for name, doc, counters in (
            ("pingpong_messages_received", "Client messages received, by kind.", RECEIVED),
            ("pingpong_messages_sent", "Messages sent to clients, by kind.", SENT),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, counter in counters.items():
                family.add_metric([kind], counter.value)
            yield family
        cumulative, buckets = 0, []
        for bound, count in zip((*HANDLER_SECONDS.bounds, float("inf")), HANDLER_SECONDS.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "pingpong_handler_seconds",
            "Time to handle one client message, from receipt to the answer being handed to the server.",
            buckets=buckets,
            sum_value=HANDLER_SECONDS.total,
        )


REGISTRY.register(LoopMetricsCollector())
