"""Clients that do not read cannot grow a node's memory: PINGPONG_MAX_PENDING_BYTES, over TCP.

Real server processes, daphne and uvicorn, and raw sockets with a small receive buffer that never read.
The figures the README quotes come from the RSS tests here.
"""

import asyncio
import json
import selectors
import threading
import time

import pytest

from pingpong import protocol
from tests import rawws
from tests.processes import SERVERS, DaphneNode, PeakRss, http_request, wait_until
from tests.wsclient import ping_pong, ws_connect

MIB = 1024 * 1024
TOKEN = "slow-clients-token"

on_both_servers = pytest.mark.parametrize("server", SERVERS)


def json_ping(size: int) -> bytes:
    """A masked text frame holding a JSON ping whose id makes it about `size` bytes long (built once, sent often)."""
    text = json.dumps({"type": "ping", "id": "x" * (size - 30)}).encode()
    return rawws.frame_encode(opcode=rawws.OP_TEXT, payload=text)


def non_reader(node: DaphneNode, path: str = "/ws/") -> rawws.RawClient:
    """An open websocket whose client never reads, with a 4 KiB receive buffer."""
    return rawws.RawClient(node.port, receive_buffer=4096).open(path=path)


def keep_sending(client: rawws.RawClient, frame: bytes, *, per_second: float, seconds: float) -> bool:
    """Send `frame` at a steady rate; True as soon as the server has ended the connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.send(frame)
        except OSError:  # reset or broken pipe: the server dropped us
            return True
        time.sleep(1 / per_second)
    return False


@pytest.mark.slow
@on_both_servers
def test_a_client_that_never_reads_is_closed_with_4100_and_counted(daphne_nodes):
    """Pongs that pile up unread past the cap close the connection; the hit is logged once and counted."""
    node = daphne_nodes({"PINGPONG_MAX_PENDING_BYTES": "65536", "PINGPONG_RATE_PER_SECOND": "0"})
    with non_reader(node) as client:
        assert keep_sending(client, json_ping(60_000), per_second=200, seconds=30)
    assert node.metric("pingpong_limit_hits_total", 'limit="slow_consumer"') == 1
    assert node.output().count("slow consumer") == 1
    wait_until(lambda: node.metric("pingpong_connections_open") == 0, timeout=10, what="the connection counted out")
    assert "Traceback" not in node.output()


@pytest.mark.slow
@on_both_servers
def test_a_slow_client_that_reads_late_finds_the_error_event_and_close_4100(daphne_nodes):
    """The error event and close frame queue behind what was pending, for a client that reads again in time."""
    node = daphne_nodes({"PINGPONG_MAX_PENDING_BYTES": "65536", "PINGPONG_RATE_PER_SECOND": "0"})
    with non_reader(node) as client:
        frame = json_ping(60_000)
        for _ in range(2000):
            client.send(frame)
            if "slow consumer" in node.output():
                break
            time.sleep(0.005)
        frames = client.frames_until_close(limit=10_000)
    assert frames[-1].close_code == protocol.CloseCode.SLOW_CONSUMER
    assert json.loads(frames[-2].payload)["error"] == protocol.ERROR_SLOW_CONSUMER


@pytest.mark.slow
@on_both_servers
def test_a_client_that_reads_keeps_its_connection_under_the_cap(daphne_nodes):
    """Answers that a client reads never count against it, however many it asks for."""
    node = daphne_nodes({"PINGPONG_MAX_PENDING_BYTES": "65536", "PINGPONG_RATE_PER_SECOND": "0"})
    with rawws.RawClient(node.port).open() as client:
        frame = json_ping(60_000)
        for _ in range(200):
            client.send(frame)
            assert client.data_frame_read().opcode == rawws.OP_TEXT
    assert node.metric("pingpong_limit_hits_total", 'limit="slow_consumer"') == 0


@pytest.mark.slow
@on_both_servers
# 30 s by design, on each server.
async def test_twenty_non_readers_sending_60_kib_pings_are_all_closed_within_100_mb(daphne_nodes):
    """The issue's attack: 20 non-readers (half on /ws/echo/) sending 60 KiB at 15/s for 30 s grow RSS under 100 MB."""
    node = daphne_nodes()
    async with await ws_connect(node.ws) as control:
        await ping_pong(control)
        start = node.rss_bytes()
        peak = PeakRss(node)
        frame = json_ping(60 * 1024)
        clients = [non_reader(node, "/ws/" if i % 2 else "/ws/echo/") for i in range(20)]
        dropped: list[bool] = []
        threads = [
            threading.Thread(target=lambda c=c: dropped.append(keep_sending(c, frame, per_second=15, seconds=30)))
            for c in clients
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):  # at most 30 s: keep_sending is bounded
            assert await ping_pong(control) == "pong!"
            await asyncio.sleep(0.5)
        growth = peak.stop() - start
        for client in clients:
            client.close()
    print(f"{node.server}: RSS growth with 20 non-readers: {growth / MIB:.1f} MB")
    assert dropped == [True] * 20
    assert growth <= 100 * MIB
    assert node.metric("pingpong_limit_hits_total", 'limit="slow_consumer"') == 20


def broadcast_storm(node: DaphneNode, *, count: int, size: int, per_second: float) -> None:
    """POST `count` broadcasts whose text starts with its zero-padded number, at most `per_second`."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    started = time.monotonic()
    for number in range(count):
        time.sleep(max(0.0, started + number / per_second - time.monotonic()))
        body = json.dumps({"text": f"{number:06d}".ljust(size, "b")}).encode()
        status, _ = http_request(f"{node.http}/api/broadcast", method="POST", body=body, headers=headers)
        assert status == 202


class BroadcastReaders:
    """Many clients read by one selector loop in a thread, fast enough to keep up with a storm.

    Each records the number at the start of every broadcast text it receives.
    """

    MARKER = b'"text":"'

    def __init__(self, node: DaphneNode, count: int) -> None:
        self.clients = [rawws.RawClient(node.port, timeout=10).open() for _ in range(count)]
        self.numbers: dict[int, list[int]] = {id(client): [] for client in self.clients}
        self.closed: set[int] = set()
        self.thread: threading.Thread | None = None

    def start(self, *, expected: int, seconds: float) -> None:
        self.thread = threading.Thread(target=self._run, args=(expected, seconds), daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def _run(self, expected: int, seconds: float) -> None:
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytearray] = {}
        for client in self.clients:
            client.sock.setblocking(False)
            buffers[id(client)] = bytearray(client.buffer)
            selector.register(client.sock, selectors.EVENT_READ, client)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(self.closed) < len(self.clients):
            if all(len(numbers) >= expected for numbers in self.numbers.values()):
                break
            for key, _ in selector.select(timeout=0.2):
                client = key.data
                try:
                    chunk = client.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    selector.unregister(client.sock)
                    self.closed.add(id(client))
                    continue
                buffer = buffers[id(client)]
                buffer += chunk
                for ping in self._parse(buffer, self.numbers[id(client)]):
                    client.sock.send(rawws.frame_encode(opcode=rawws.OP_PONG, payload=ping))
        selector.close()

    def _parse(self, buffer: bytearray, numbers: list[int]) -> list[bytes]:
        """Take every complete frame off the front of `buffer` (server frames are unmasked); the pings' payloads."""
        at, pings = 0, []
        while len(buffer) - at >= 2:
            opcode, length, start = buffer[at] & 0xF, buffer[at + 1] & 0x7F, at + 2
            if length == 126:
                if len(buffer) - at < 4:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 4], "big"), at + 4
            elif length == 127:
                if len(buffer) - at < 10:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 10], "big"), at + 10
            if len(buffer) < start + length:
                break
            if opcode == rawws.OP_TEXT:
                head = bytes(buffer[start : start + 40])
                text_at = head.find(self.MARKER) + len(self.MARKER)
                numbers.append(int(head[text_at : text_at + 6]))
            elif opcode == rawws.OP_PING:  # unanswered, the server would drop us as a dead peer
                pings.append(bytes(buffer[start : start + length]))
            at = start + length
        del buffer[:at]
        return pings


# Over a minute by design, on each server.
@pytest.mark.slow
@on_both_servers
def test_fifty_non_readers_in_a_broadcast_storm_cost_under_150_mb_and_normal_clients_get_everything(daphne_nodes):
    """50 non-readers + 50 readers, 2,000 x 16 KiB broadcasts: RSS under +150 MB, back within 50 MB, exactly once."""
    node = daphne_nodes({"PINGPONG_BROADCAST_TOKEN": TOKEN})
    readers = BroadcastReaders(node, 50)
    slow = [non_reader(node) for _ in range(50)]
    wait_until(lambda: node.metric("pingpong_connections_open") == 100, timeout=10, what="100 connections open")
    start = node.rss_bytes()
    peak = PeakRss(node)
    count = 2000
    readers.start(expected=count, seconds=120)
    broadcast_storm(node, count=count, size=16 * 1024, per_second=100)
    readers.join(timeout=120)
    growth = peak.stop() - start
    for client in slow:
        client.close()
    wait_until(lambda: node.metric("pingpong_connections_open") == 50, timeout=15, what="the slow clients gone")
    time.sleep(1)
    settled = node.rss_bytes() - start
    readers.close()
    print(f"{node.server}: RSS growth: peak {growth / MIB:.1f} MB, after the slow clients left {settled / MIB:.1f} MB")
    assert list(readers.numbers.values()) == [list(range(count))] * 50
    assert growth <= 150 * MIB
    assert settled <= 50 * MIB
    assert node.metric("pingpong_limit_hits_total", 'limit="slow_consumer"') == 50


def test_unread_bytes_are_capped_per_connection_by_the_setting():
    """The documented default: at most 1 MiB, and at least four of the largest client messages."""
    from django.conf import settings

    assert settings.PINGPONG_MAX_PENDING_BYTES <= MIB
    assert settings.PINGPONG_MAX_PENDING_BYTES >= 4 * settings.PINGPONG_MAX_MESSAGE_BYTES
