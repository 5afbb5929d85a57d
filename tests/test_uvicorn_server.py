"""pingpong.uvicorn_server's own frame writer: byte for byte what websockets would have sent."""

import pytest
from websockets.protocol import State
from websockets.server import ServerProtocol

from pingpong.uvicorn_server import OPCODE_BINARY, OPCODE_TEXT, frame_header


def websockets_frame(opcode: int, payload: bytes) -> bytes:
    connection = ServerProtocol()
    connection.state = State.OPEN
    (connection.send_text if opcode == OPCODE_TEXT else connection.send_binary)(payload)
    return b"".join(connection.data_to_send())


@pytest.mark.parametrize("opcode", [OPCODE_TEXT, OPCODE_BINARY])
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_a_frame_is_the_bytes_websockets_would_send(opcode, length):
    payload = b"x" * length
    assert frame_header(opcode, length) + payload == websockets_frame(opcode, payload)
