"""One log line per connection open and close; JSON lines with PINGPONG_LOG_FORMAT=json."""

import json
import logging

import pytest

from pingpong.logs import JsonFormatter, log_event
from tests.processes import SERVERS, wait_until
from tests.wsclient import ping_pong, ws_connect


def test_json_formatter_puts_each_field_under_its_own_key():
    logger = logging.getLogger("test.logs")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        log_event(logger, "close", id="abc", code=1000, duration=0.5)
    finally:
        logger.removeHandler(handler)
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["message"] == "close id=abc code=1000 duration=0.5"
    assert (line["event"], line["id"], line["code"], line["duration"]) == ("close", "abc", 1000, 0.5)


@pytest.mark.parametrize("server", SERVERS)
async def test_a_connection_logs_one_json_line_when_it_opens_and_one_when_it_closes(daphne_nodes):
    node = daphne_nodes({"PINGPONG_LOG_FORMAT": "json"})
    async with await ws_connect(node.ws) as ws:
        assert await ping_pong(ws) == "pong!"

    def events() -> list[dict]:
        lines = [json.loads(line) for line in node.output().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "pingpong.connections"]

    wait_until(lambda: len(events()) == 2, timeout=5, what="the close line")
    opened, closed = events()
    assert (opened["event"], opened["path"], opened["client"]) == ("open", "/ws/", "127.0.0.1")
    assert (closed["event"], closed["id"], closed["code"]) == ("close", opened["id"], 1000)
    assert closed["duration"] >= 0
