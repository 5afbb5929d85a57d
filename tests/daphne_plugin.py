"""A pytest plugin for daphne's own test suite: every server it starts is ours.

Loaded (`-p tests.daphne_plugin`) into the pytest run that `tests/test_daphne_upstream.py` starts
in daphne's unpacked sdist. daphne's tests start servers through `daphne.testing.DaphneProcess`,
which forks, reinstalls the Twisted reactor (dropping `daphne.server` from `sys.modules`) and then
does `from .server import Server`. We wrap that reinstall: after it, `pingpong.daphne_server` is imported
afresh (so it and its `daphne.server` base bind to the new reactor) and `daphne.server.Server`
becomes `PingpongServer`, whose `run()` installs `ExactWebSocketProtocol`.

Proof, independent of the substitution: each child records the class of the server that is
listening and the class of every websocket protocol it handles; after every upstream test, a
fixture fails that test unless it started as many servers as it asked for, each a
`PingpongServer` speaking `ExactWebSocketProtocol`. With PINGPONG_UPSTREAM_STOCK=1 the
substitution is skipped (and the checks must fail: `tests/test_daphne_upstream.py` runs that too).
"""

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OURS_SERVER = "pingpong.daphne_server.PingpongServer"
OURS_PROTOCOL = "pingpong.daphne_server.ExactWebSocketProtocol"
SUMMARY_PREFIX = "pingpong servers:"
STARTUP_TIMEOUT_SECONDS = 10

# daphne instances entered in this (the parent) process; compared with the children's records.
entered = 0


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def record_path() -> Path:
    """The file the server processes append to: PINGPONG_UPSTREAM_RECORD, set by the caller."""
    return Path(os.environ["PINGPONG_UPSTREAM_RECORD"])


def record(kind: str, name: str) -> None:
    """Append one line from a server process (one small O_APPEND write: lines never interleave)."""
    fd = os.open(record_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{kind} {name}\n".encode())
    finally:
        os.close(fd)


def records() -> list[tuple[str, str]]:
    if not record_path().exists():
        return []
    return [tuple(line.split(" ", 1)) for line in record_path().read_text().splitlines()]


def substitute_pingpong_server() -> None:
    """Make the Server that `DaphneProcess.run` imports after its reactor reinstall our PingpongServer."""
    import daphne.testing

    reinstall = daphne.testing._reinstall_reactor

    def reinstall_then_substitute() -> None:
        reinstall()
        sys.modules.pop("pingpong.daphne_server", None)  # its `reactor` and base class belong to the old reactor
        import daphne.server

        import pingpong.daphne_server

        daphne.server.Server = pingpong.daphne_server.PingpongServer

    daphne.testing._reinstall_reactor = reinstall_then_substitute


def record_what_ran() -> None:
    """In each server process, record the listening server's class and each websocket protocol's class."""
    import daphne.testing
    import daphne.ws_protocol

    resolve_port = daphne.testing.DaphneProcess.resolve_port

    def resolve_port_and_record(self: Any) -> None:
        resolve_port(self)
        if self.server.listening_addresses:
            record("server", f"{class_name(type(self.server))} {class_name(self.server.ws_factory.protocol)}")

    on_connect = daphne.ws_protocol.WebSocketProtocol.onConnect

    def on_connect_and_record(self: Any, request: Any) -> Any:
        record("websocket", class_name(type(self)))
        return on_connect(self, request)

    daphne.testing.DaphneProcess.resolve_port = resolve_port_and_record
    daphne.ws_protocol.WebSocketProtocol.onConnect = on_connect_and_record

    enter = daphne.testing.BaseDaphneTestingInstance.__enter__

    def enter_and_count(self: Any) -> Any:
        global entered
        entered += 1
        return enter(self)

    daphne.testing.BaseDaphneTestingInstance.__enter__ = enter_and_count


def pytest_configure() -> None:
    """Set Django up, then install the recorders and (unless PINGPONG_UPSTREAM_STOCK) the substitution."""
    import django

    django.setup()  # PingpongServer reads settings.PINGPONG_*; DJANGO_SETTINGS_MODULE is set by the caller
    import daphne.testing

    import pingpong.daphne_server  # noqa: F401  # its imports, done once here, keep each forked start fast

    # daphne waits 2 s for a child to listen; each of ours re-imports pingpong.daphne_server first, and CI
    # shares two cores. Only the wait grows: a server that never listens still fails the test.
    daphne.testing.BaseDaphneTestingInstance.startup_timeout = STARTUP_TIMEOUT_SECONDS
    record_path().unlink(missing_ok=True)
    record_what_ran()
    if not os.environ.get("PINGPONG_UPSTREAM_STOCK"):
        substitute_pingpong_server()


@pytest.fixture(autouse=True)
def every_server_is_pingpong() -> Iterator[None]:
    """Fail the upstream test unless every server it started was a PingpongServer with ExactWebSocketProtocol."""
    entered_before, seen_before = entered, len(records())
    yield
    seen = records()[seen_before:]
    servers = [name for kind, name in seen if kind == "server"]
    websockets = [name for kind, name in seen if kind == "websocket"]
    assert len(servers) == entered - entered_before, f"started {entered - entered_before} servers, saw {servers}"
    assert all(name == f"{OURS_SERVER} {OURS_PROTOCOL}" for name in servers), f"not our server: {servers}"
    assert all(name == OURS_PROTOCOL for name in websockets), f"not our protocol: {websockets}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    seen = records()
    servers = [name for kind, name in seen if kind == "server"]
    websockets = [name for kind, name in seen if kind == "websocket"]
    ours_servers = sum(name == f"{OURS_SERVER} {OURS_PROTOCOL}" for name in servers)
    ours_websockets = sum(name == OURS_PROTOCOL for name in websockets)
    terminalreporter.write_line(
        f"{SUMMARY_PREFIX} {ours_servers}/{len(servers)} PingpongServer, "
        f"{ours_websockets}/{len(websockets)} websockets on ExactWebSocketProtocol"
    )
