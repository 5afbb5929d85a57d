"""Prometheus metrics for this node, served at /metrics (scrape every replica on its own)."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPEN = Gauge("pingpong_connections_open", "Websocket connections open on this node.")
CONNECTIONS_OPENED = Counter("pingpong_connections_opened_total", "Websocket connections accepted.", ["path"])
CONNECTIONS_CLOSED = Counter(
    "pingpong_connections_closed_total", "Websocket connections closed, by close code.", ["code"]
)
MESSAGES_RECEIVED = Counter("pingpong_messages_received_total", "Client messages received, by kind.", ["kind"])
MESSAGES_SENT = Counter("pingpong_messages_sent_total", "Messages sent to clients, by kind.", ["kind"])
LIMIT_HITS = Counter("pingpong_limit_hits_total", "Connections closed or refused by a limit.", ["limit"])
BROADCASTS_SENT = Counter("pingpong_broadcasts_sent_total", "Broadcasts this node published to the channel layer.")
LAYER_ERRORS = Counter(
    "pingpong_channel_layer_errors_total", "Channel-layer calls that failed or timed out.", ["operation"]
)
HANDLER_SECONDS = Histogram(
    "pingpong_handler_seconds",
    "Time to handle one client message, from receipt to the answer being handed to the server.",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)

# Children bound once: label lookups stay off the per-message path.
RECEIVED_PING = MESSAGES_RECEIVED.labels("ping")
RECEIVED_JSON_PING = MESSAGES_RECEIVED.labels("json_ping")
RECEIVED_OTHER = MESSAGES_RECEIVED.labels("other")
RECEIVED_BINARY = MESSAGES_RECEIVED.labels("binary")
SENT_PONG = MESSAGES_SENT.labels("pong")
SENT_ERROR = MESSAGES_SENT.labels("error")
SENT_BROADCAST = MESSAGES_SENT.labels("broadcast")
SENT_ECHO = MESSAGES_SENT.labels("echo")
