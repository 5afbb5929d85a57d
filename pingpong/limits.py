"""Per-connection limits: a token bucket for message rate."""

import time


class TokenBucket:
    """Allows `burst` messages at once, refilled at `rate` per second; rate 0 disables it."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def text_too_big(text: str, limit: int) -> bool:
    """True when `text` encodes to more than `limit` UTF-8 bytes, without encoding short texts."""
    if len(text) * 4 <= limit:
        return False
    if len(text) > limit:
        return True
    return len(text.encode("utf-8", "surrogatepass")) > limit


# Measured on a fresh `manage.py serve` (RSS right after start) and by the benchmark's W2
# (RSS per idle connection on daphne, 29.3 KB); see "Memory budget" in the README.
BASE_MEMORY_BYTES = 80 * 1024 * 1024
CONNECTION_OVERHEAD_BYTES = 30 * 1024
# The supervisor of `serve --workers N` (Django's settings, no server): 57 MB measured.
SUPERVISOR_MEMORY_BYTES = 64 * 1024 * 1024


def memory_budget(*, connections: int, max_message_bytes: int, max_pending_bytes: int) -> int:
    """Worst-case RSS of a node: every connection at once holding a message coming in, one past
    its pending cap going out, and the cap itself (kernel socket buffers come on top)."""
    per_connection = CONNECTION_OVERHEAD_BYTES + 2 * max_message_bytes + max_pending_bytes
    return BASE_MEMORY_BYTES + connections * per_connection
