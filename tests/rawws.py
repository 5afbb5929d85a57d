"""Hand-built websocket frames over a plain socket, for inputs a real client library refuses to send.

Everything here talks to loopback only and every read is bounded by a socket timeout (scaled by
PINGPONG_TEST_TIMEOUT_FACTOR). `handshake_request` is the one hand-built upgrade request: the
benchmark's receive-only client sends it too.
"""

import base64
import os
import socket
import struct
import time
from dataclasses import dataclass

from tests.processes import LOOPBACK, ORIGIN, scaled

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def key_new() -> str:
    """A valid Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode()


def handshake_request(
    *,
    port: int,
    host: str = LOOPBACK,
    path: str = "/ws/",
    key: str | None = None,
    version: str = "13",
    origin: str | None = ORIGIN,
    extra: dict[str, str] | None = None,
) -> bytes:
    """The bytes of an HTTP/1.1 upgrade request; `origin=None` leaves the Origin header out."""
    headers = {
        "Host": f"{host}:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key if key is not None else key_new(),
        "Sec-WebSocket-Version": version,
    }
    if origin is not None:
        headers["Origin"] = origin
    headers.update(extra or {})
    lines = [f"GET {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame_encode(
    *, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None
) -> bytes:
    """One frame; `rsv` is the 3 reserved bits (0-7), `length` overrides the declared length."""
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    if declared < 126:
        head += bytes([mask_bit | declared])
    elif declared < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", declared)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE:
            return None
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else 1005


class RawClient:
    """A TCP connection to a daphne node that speaks websocket framing by hand."""

    def __init__(self, port: int, *, timeout: float = 5.0, receive_buffer: int | None = None) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(scaled(timeout))
        if receive_buffer is not None:  # before connect, so the TCP window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect((LOOPBACK, port))
        self.buffer = b""
        self.status: int | None = None
        self.response_head = b""

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """End the connection with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read more bytes into the buffer; False when the server closed the connection."""
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def handshake(self, request: bytes) -> int:
        """Send an upgrade request and read the response head; returns the HTTP status (0 if none)."""
        self.send(request)
        return self.response_read()

    def response_read(self) -> int:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                self.status = 0
                return 0
        self.response_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(self.response_head.split(b" ", 2)[1])
        return self.status

    def open(self, *, path: str = "/ws/") -> "RawClient":
        """Complete a valid handshake; fail unless the server answers 101."""
        status = self.handshake(handshake_request(port=self.port, path=path))
        assert status == 101, f"handshake answered {status}: {self.response_head!r}"
        return self

    def frame_read(self) -> Frame | None:
        """The next frame from the server, or None when the server closed the connection."""
        while True:
            if len(self.buffer) >= 2:
                first, second = self.buffer[0], self.buffer[1]
                length, offset = second & 0x7F, 2
                if length == 126 and len(self.buffer) >= 4:
                    length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
                elif length == 127 and len(self.buffer) >= 10:
                    length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
                if (second & 0x7F) < 126 or offset > 2:
                    if len(self.buffer) >= offset + length:
                        payload = self.buffer[offset : offset + length]
                        self.buffer = self.buffer[offset + length :]
                        return Frame(fin=bool(first & 0x80), opcode=first & 0xF, payload=payload)
            if not self._fill():
                return None

    def data_frame_read(self) -> "Frame":
        """The next text, binary or close frame; pongs and pings in between are skipped."""
        for _ in range(100):
            frame = self.frame_read()
            if frame is None:
                raise AssertionError("the server closed the connection before answering")
            if frame.opcode in (OP_TEXT, OP_BINARY, OP_CLOSE):
                return frame
        raise AssertionError("no data frame within 100 frames")

    def close_code_read(self, *, timeout: float = 5.0) -> int | None:
        """Read frames until a close frame (its code) or the end of the connection (None)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.frame_read()
            if frame is None:
                return None
            if frame.opcode == OP_CLOSE:
                return frame.close_code
        raise AssertionError(f"no close frame within {timeout}s")

    def frames_until_close(self, *, limit: int = 1000) -> list[Frame]:
        """Every frame up to and including the close frame (or the end of the connection)."""
        frames: list[Frame] = []
        for _ in range(limit):
            frame = self.frame_read()
            if frame is None:
                return frames
            frames.append(frame)
            if frame.opcode == OP_CLOSE:
                return frames
        raise AssertionError(f"no close frame within {limit} frames")

    def server_closed(self, *, timeout: float) -> bool:
        """True when the server ends the TCP connection within `timeout` s (scaled); frames are read and dropped."""
        deadline = time.monotonic() + scaled(timeout)
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self._fill():
                    return True
            except TimeoutError:
                return False
            self.buffer = b""
        return False
