"""Prometheus metrics for this server, served at /metrics (scrape every replica on its own).

Per-message counts and the handler histogram are plain numbers updated by the event
loop's one thread and read by a collector at scrape time: prometheus_client's own
metrics take a lock per update, which costs more than the rest of a ping's handling.

With `manage.py serve --workers N` (PROMETHEUS_MULTIPROC_DIR set by the supervisor), every
worker writes prometheus_client's multiprocess files and /metrics, whichever worker answers,
reads all of them: the totals are the process group's. The loop-local numbers stay loop-local
on the hot path; a thread copies their growth into multiprocess counters every
EXPORT_SECONDS (and the worker answering a scrape copies its own first), so another
worker's messages show up within EXPORT_SECONDS.
"""

import atexit
import os
import threading
from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# prometheus_client chose its value class from this variable when it was imported.
MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
EXPORT_SECONDS: Final = 1.0

CONNECTIONS_OPEN = Gauge(
    "pingpong_connections_open",
    "Websocket connections open on this server (every worker).",
    multiprocess_mode="livesum",  # a dead worker's connections are gone: its file is dropped
)
# Set by worker_start with --workers > 1: pingpong_worker_connections_open{worker="<node id>"}.
worker_connections_open: Gauge | None = None
CONNECTIONS_OPENED = Counter("pingpong_connections_opened_total", "Websocket connections accepted.", ["path"])
CONNECTIONS_CLOSED = Counter(
    "pingpong_connections_closed_total", "Websocket connections closed, by close code.", ["code"]
)
LIMIT_HITS = Counter("pingpong_limit_hits_total", "Connections closed or refused by a limit.", ["limit"])
BROADCASTS_SENT = Counter("pingpong_broadcasts_sent_total", "Broadcasts this node published to the channel layer.")
PUBLICATIONS_SENT = Counter("pingpong_publications_sent_total", "Publications to topics this node sent to the layer.")
HISTORY_READS = Counter(
    "pingpong_history_reads_total", "Topic history reads this node made in Redis (merged reads count once)."
)
RECOVERIES = Counter(
    "pingpong_recoveries_total", "Subscribe requests with `since`, by outcome (recovered or not).", ["recovered"]
)
TOPIC_REFUSALS = Counter(
    "pingpong_topic_refusals_total", "Topic and token requests answered with an error, by error code.", ["error"]
)
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


RECEIVED = {
    kind: LoopCounter()
    for kind in (
        "ping",
        "json_ping",
        "other",
        "binary",
        "subscribe",
        "unsubscribe",
        "publish",
        "presence",
        "auth",
        "refresh",
    )
}
SENT = {kind: LoopCounter() for kind in ("pong", "error", "broadcast", "echo", "publication")}
#: Layer messages a consumer handled straight from the layer, its task not woken (`pingpong.websocket`).
DIRECT = {kind: LoopCounter() for kind in ("broadcast",)}
HANDLER_SECONDS = LoopHistogram((0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25))

RECEIVED_PING, RECEIVED_JSON_PING = RECEIVED["ping"], RECEIVED["json_ping"]
RECEIVED_OTHER, RECEIVED_BINARY = RECEIVED["other"], RECEIVED["binary"]
SENT_PONG, SENT_ERROR, SENT_BROADCAST, SENT_ECHO = SENT["pong"], SENT["error"], SENT["broadcast"], SENT["echo"]
SENT_PUBLICATION = SENT["publication"]
DIRECT_BROADCAST = DIRECT["broadcast"]
DIRECT_DOC = "Channel-layer messages consumers handled straight from the layer, without waking their task, by kind."


class LoopMetricsCollector(Collector):
    """Exports the loop-local counters and histogram at scrape time."""

    def collect(self) -> Iterator[Metric]:
        for name, doc, counters in (
            ("pingpong_messages_received", "Client messages received, by kind.", RECEIVED),
            ("pingpong_messages_sent", "Messages sent to clients, by kind.", SENT),
            ("pingpong_layer_messages_direct", DIRECT_DOC, DIRECT),
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


def connections_open_add(delta: int) -> None:
    """Count a websocket in (1) or out (-1), in the total and, under --workers, in this worker's series."""
    CONNECTIONS_OPEN.inc(delta)
    if worker_connections_open is not None:
        worker_connections_open.inc(delta)


class LoopMetricsExport:
    """Copies the loop-local counters' and histogram's growth into multiprocess-mode metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the export thread and a scrape's thread both flush
        self.received = Counter(
            "pingpong_messages_received", "Client messages received, by kind.", ["kind"], registry=None
        )
        self.sent = Counter("pingpong_messages_sent", "Messages sent to clients, by kind.", ["kind"], registry=None)
        self.direct = Counter("pingpong_layer_messages_direct", DIRECT_DOC, ["kind"], registry=None)
        self.handler = Histogram(
            "pingpong_handler_seconds",
            "Time to handle one client message, from receipt to the answer being handed to the server.",
            buckets=HANDLER_SECONDS.bounds,
            registry=None,
        )
        self.exported: dict[LoopCounter, int] = {}
        self.exported_counts = [0] * len(HANDLER_SECONDS.counts)
        self.exported_total = 0.0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="pingpong-metrics-export", daemon=True)

    def flush(self) -> None:
        """Add what the loop counted since the last flush."""
        with self.lock:
            for family, counters in ((self.received, RECEIVED), (self.sent, SENT), (self.direct, DIRECT)):
                for kind, counter in counters.items():
                    value = counter.value  # one read: the loop may count on meanwhile
                    if delta := value - self.exported.get(counter, 0):
                        family.labels(kind).inc(delta)
                        self.exported[counter] = value
            # prometheus_client has no API to add to a bucket: its per-bucket values are the way in.
            for i, count in enumerate(list(HANDLER_SECONDS.counts)):
                if delta := count - self.exported_counts[i]:
                    self.handler._buckets[i].inc(delta)
                    self.exported_counts[i] = count
            total = HANDLER_SECONDS.total
            if total != self.exported_total:
                self.handler._sum.inc(total - self.exported_total)
                self.exported_total = total

    def run(self) -> None:
        while not self.stopped.wait(EXPORT_SECONDS):
            self.flush()

    def start(self) -> None:
        self.thread.start()
        atexit.register(self.flush)


exporter: LoopMetricsExport | None = None


def worker_start(*, worker: str) -> None:
    """In a worker of `serve --workers N`: this worker's connection series, and the loop-local export."""
    global worker_connections_open, exporter
    if not MULTIPROCESS:
        return
    gauge = Gauge(
        "pingpong_worker_connections_open",
        "Websocket connections open on one worker (node id) of this server.",
        ["worker"],
        multiprocess_mode="livesum",
        registry=None,
    )
    worker_connections_open = gauge.labels(worker)
    exporter = LoopMetricsExport()
    exporter.start()


def exposition() -> bytes:
    """The /metrics body: this process's metrics, or with --workers every worker's."""
    if not MULTIPROCESS:
        return generate_latest()
    if exporter is not None:
        exporter.flush()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


if not MULTIPROCESS:
    REGISTRY.register(LoopMetricsCollector())
