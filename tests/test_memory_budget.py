"""The memory budget in the README holds for a real node, daphne or uvicorn: every client at its caps at once."""

import json
import time

import pytest

from pingpong.limits import memory_budget
from tests import rawws
from tests.processes import SERVERS, PeakRss, wait_until

CONNECTIONS = 1000


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_a_thousand_clients_each_sending_the_largest_message_at_once_stay_within_the_budget(daphne_nodes):
    """1,000 clients send a 64 KiB message at the same moment and do not read the 64 KiB answers: RSS stays in budget."""
    node = daphne_nodes({"PINGPONG_MAX_CONNECTIONS_PER_IP": "0"})
    clients = [rawws.RawClient(node.port, receive_buffer=4096).open() for _ in range(CONNECTIONS)]
    try:
        wait_until(lambda: node.metric("pingpong_connections_open") == CONNECTIONS, timeout=30, what="all open")
        text = json.dumps({"type": "ping", "id": "x" * (64 * 1024 - 100)}).encode()
        frame = rawws.frame_encode(opcode=rawws.OP_TEXT, payload=text)
        peak = PeakRss(node)
        for client in clients:
            client.send(frame)
        wait_until(
            lambda: node.metric("pingpong_messages_received_total", 'kind="json_ping"') == CONNECTIONS,
            timeout=60,
            what="every message handled",
        )
        time.sleep(1)
        highest = peak.stop()
    finally:
        for client in clients:
            client.close()
    budget = memory_budget(connections=CONNECTIONS, max_message_bytes=64 * 1024, max_pending_bytes=256 * 1024)
    print(f"{node.server}: peak RSS {highest / 2**20:.0f} MB, budget {budget / 2**20:.0f} MB")
    assert highest <= budget
    assert node.metric("pingpong_limit_hits_total", 'limit="slow_consumer"') == 0
