"""A receive-mostly websocket client on asyncio.Protocol, for the fan-out workloads.

W3 delivers 80,000 frames a second to one client process; a full client library spends
more CPU per frame than the servers under test, so this one only does what W3 and W5 need:
the handshake, unmasked frames in, masked pong/close out, one timestamp per read, and a
masked text frame out for W5's subscribe requests.
"""

import asyncio
import struct
import time

from tests.rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, close_payload, frame_encode, handshake_request


class FanoutClient(asyncio.Protocol):
    """One connection; `frames` collects (arrival time, text payload) for every text frame."""

    def __init__(self, *, host: str, port: int, path: str, origin: str) -> None:
        self.request = handshake_request(host=host, port=port, path=path, origin=origin)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.frames: list[tuple[float, bytes]] = []
        self.close_code: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.close_code is None:
            self.close_code = 1006

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status:
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.upgraded = True
            if not self.opened.done():  # the opener may have given up (its timeout cancels the future)
                self.opened.set_result(None)
        offset, size = 0, len(buffer)
        while size - offset >= 2:
            opcode, length = buffer[offset] & 0x0F, buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = struct.unpack_from("!H", buffer, offset + 2)[0]
                start = offset + 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = struct.unpack_from("!Q", buffer, offset + 2)[0]
                start = offset + 10
            if size < start + length:
                break
            payload = bytes(buffer[start : start + length])
            offset = start + length
            if opcode == OP_TEXT:
                self.text_received(now, payload)
            elif opcode == OP_PING:
                self.transport.write(frame_encode(opcode=OP_PONG, payload=payload))
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.transport.write(frame_encode(opcode=OP_CLOSE, payload=payload[:2]))
                self.transport.close()
        if offset:
            del buffer[:offset]

    def text_received(self, arrived: float, payload: bytes) -> None:
        """A text frame arrived (time.time() of the read that carried it); kept in `frames` unless overridden."""
        self.frames.append((arrived, payload))

    def send_text(self, text: str) -> None:
        """One masked text frame (a request such as subscribe); the transport buffers it."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame_encode(opcode=OP_TEXT, payload=text.encode()))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame_encode(opcode=OP_CLOSE, payload=close_payload(1000)))
            self.transport.close()


async def fanout_client_open(*, host: str, port: int, path: str, origin: str, within: float = 10.0) -> FanoutClient:
    """Connect and complete the handshake; raises on refusal, a non-101 answer or timeout."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: FanoutClient(host=host, port=port, path=path, origin=origin), host, port),
        within,
    )
    await asyncio.wait_for(client.opened, within)
    return client
