"""Security with real processes: origins, the broadcast token, production settings, client IPs, Redis auth and TLS."""

import json
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.processes import (
    LOOPBACK,
    ORIGIN,
    SERVERS,
    DaphneNode,
    RedisServer,
    api_broadcast,
    free_port,
    http_request,
    manage,
    port_open,
    redis_binary,
    scaled,
    wait_until,
)
from tests.rawws import RawClient, handshake_request
from tests.wsclient import ping_pong_sync, ws_connect_sync

TOKEN = "security-broadcast-token-5b1e0d47c2"


@pytest.fixture(scope="module")
def node(module_daphne_nodes) -> DaphneNode:
    """A node with the broadcast token set and every logger at DEBUG, so a leak would show."""
    return module_daphne_nodes(env={"PINGPONG_BROADCAST_TOKEN": TOKEN, "PINGPONG_LOG_LEVEL": "DEBUG"})


def handshake_status(node: DaphneNode, *, origin: str | None, extra: dict[str, str] | None = None) -> int:
    with RawClient(node.port) as client:
        return client.handshake(handshake_request(port=node.port, origin=origin, extra=extra))


def broadcast_reaches_a_client(node: DaphneNode, *, token: str) -> bool:
    """Connect a client, broadcast through the HTTP API, and see the event arrive."""
    text = f"through redis {secrets.token_hex(4)}"
    with ws_connect_sync(node.ws) as ws:
        assert ping_pong_sync(ws) == "pong!"  # connected and in the broadcast group
        assert api_broadcast(node, text, token=token) == 202
        event = json.loads(ws.recv(timeout=scaled(5)))
    return event.get("type") == "broadcast" and event.get("text") == text


def readyz_status(node: DaphneNode) -> int:
    status, _ = http_request(f"{node.http}/readyz")
    return status


# --- Origin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [None, "null", "http://evil.example", "http://127.0.0.1.evil.example", "http://localhost.evil.example"],
    ids=["missing", "null", "foreign", "allowed host as a prefix", "allowed host as a subdomain"],
)
def test_handshake_without_an_allowed_origin_is_refused_with_403(node, origin):
    assert handshake_status(node, origin=origin) == 403


@pytest.mark.parametrize("origin", [ORIGIN, "http://localhost:3000", "https://127.0.0.1"])
def test_handshake_from_an_allowed_origin_is_accepted(node, origin):
    assert handshake_status(node, origin=origin) == 101


# --- the broadcast token --------------------------------------------------------------------


def test_broadcast_token_never_appears_in_the_log(node):
    attempts = [
        f"Bearer {TOKEN}x",  # wrong, but carries the real token
        f"Bearer {TOKEN.upper()}",
        f"Basic {TOKEN}",
        f"bearer  {TOKEN[:-1]}",
        f"Bearer {TOKEN}",  # the one that succeeds
    ]
    statuses = [api_broadcast(node, "token check", authorization=header) for header in attempts]
    assert statuses == [401, 401, 401, 401, 202]
    assert TOKEN not in node.output()
    assert TOKEN[:-1] not in node.output()


# --- production settings --------------------------------------------------------------------

PRODUCTION_ENV = {
    "DJANGO_DEBUG": "0",
    "DJANGO_ALLOWED_HOSTS": "pingpong.example.com",
    "DJANGO_HTTPS": "1",
}


def test_production_settings_pass_the_deploy_check_with_no_warnings():
    env = {**PRODUCTION_ENV, "DJANGO_SECRET_KEY": secrets.token_urlsafe(50)}
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_without_a_secret_stops_with_one_sentence_and_no_traceback():
    result = manage("check", env={**PRODUCTION_ENV, "DJANGO_SECRET_KEY": ""})
    stderr = result.stderr.strip()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and "DJANGO_SECRET_KEY" in stderr, stderr


# --- client IP behind a proxy ---------------------------------------------------------------

SPOOFED_HEADERS = {"X-Real-IP": "203.0.113.7", "X-Forwarded-For": "198.51.100.9, 203.0.113.7"}


def open_lines(node: DaphneNode) -> list[str]:
    return [line for line in node.output().splitlines() if "pingpong.connections open" in line]


def connect_and_log(node: DaphneNode) -> str:
    """Open one connection with proxy headers and return its `open` log line."""
    before = len(open_lines(node))
    with ws_connect_sync(node.ws, additional_headers=SPOOFED_HEADERS) as ws:
        assert ping_pong_sync(ws) == "pong!"
    wait_until(lambda: len(open_lines(node)) > before, timeout=5, what="the open log line")
    return open_lines(node)[before]


@pytest.mark.parametrize("server", SERVERS)
def test_client_ip_comes_from_x_real_ip_not_the_left_most_x_forwarded_for(daphne_nodes):
    proxied = daphne_nodes(env={"PINGPONG_PROXY_HEADER": "X-Real-IP"})
    line = connect_and_log(proxied)
    assert "client=203.0.113.7" in line and "198.51.100.9" not in line, line


@pytest.mark.parametrize("server", SERVERS)
def test_proxy_headers_are_ignored_unless_the_proxy_header_is_set(daphne_nodes):
    """uvicorn would trust X-Forwarded-For from loopback by default; neither server may."""
    line = connect_and_log(daphne_nodes())
    assert f"client={LOOPBACK}" in line, line


# --- Redis with a password ------------------------------------------------------------------

REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_node(daphne_nodes) -> Callable[[str], DaphneNode]:
    """A node whose channel layer is the Redis at `url`."""
    return lambda url: daphne_nodes(env={"REDIS_URL": url, "PINGPONG_BROADCAST_TOKEN": TOKEN})


def test_redis_with_a_password_carries_pings_broadcasts_and_readiness(password_redis, redis_node):
    node = redis_node(password_redis.url)
    assert readyz_status(node) == 200
    assert broadcast_reaches_a_client(node, token=TOKEN)


def test_redis_with_a_wrong_password_makes_the_node_unready_without_revealing_it(password_redis, redis_node):
    wrong = password_redis.url.replace(REDIS_PASSWORD, "not-the-password")
    node = redis_node(wrong)
    status, body = http_request(f"{node.http}/readyz")
    assert status == 503
    assert b"not-the-password" not in body and "not-the-password" not in node.output()


# --- Redis over TLS -------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=scaled(60))


# Extensions a strict verifier (Python 3.13's default VERIFY_X509_STRICT, RFC 5280) expects.
CA_CONFIG = """\
[req]
distinguished_name = subject
prompt = no
x509_extensions = ca
[subject]
CN = {name}
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
SERVER_EXTENSIONS = f"""\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:{LOOPBACK}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def ca_make(directory: Path, name: str, stem: str) -> None:
    """A self-signed CA certificate and key: `{stem}.crt`, `{stem}.key`."""
    (directory / f"{stem}.cnf").write_text(CA_CONFIG.format(name=name))
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", f"{stem}.key", "-out", f"{stem}.crt", "-config", f"{stem}.cnf",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    directory = tmp_path_factory.mktemp("tls")
    ca_make(directory, "pingpong test CA", "ca")
    ca_make(directory, "some other CA", "other-ca")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={LOOPBACK}",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "1",
        "-days", "1", "-out", "server.crt", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def tls_redis(tls_certs) -> Iterator[int]:
    """redis-server answering only TLS on a free port; skips when redis-server was built without TLS."""
    port = free_port()
    args = [
        redis_binary(),
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    args += ["--tls-cert-file", str(tls_certs / "server.crt"), "--tls-key-file", str(tls_certs / "server.key")]
    args += ["--tls-ca-cert-file", str(tls_certs / "ca.crt"), "--tls-auth-clients", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, timeout=10, what="redis-server with TLS")
        if proc.poll() is not None:
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.skip(f"redis-server does not support TLS here (it exited with {proc.returncode}): {output[-300:]}")
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=scaled(10))
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.parametrize(
    "verify",
    [
        pytest.param("ssl_cert_reqs=none", id="unverified", marks=pytest.mark.slow),
        pytest.param("ssl_ca_certs", id="verified with the CA"),  # the one a strict verifier (3.13) checks: fast
    ],
)
def test_redis_over_tls_carries_broadcasts(tls_redis, tls_certs, redis_node, verify):
    query = f"ssl_ca_certs={tls_certs / 'ca.crt'}" if verify == "ssl_ca_certs" else verify
    node = redis_node(f"rediss://{LOOPBACK}:{tls_redis}/0?{query}")
    assert readyz_status(node) == 200
    assert broadcast_reaches_a_client(node, token=TOKEN)


def test_a_certificate_the_ca_file_does_not_vouch_for_is_named_in_readyz_and_the_log(tls_redis, tls_certs, redis_node):
    """A Redis certificate that fails verification makes /readyz 503 with a reason that says so, logged once."""
    node = redis_node(f"rediss://{LOOPBACK}:{tls_redis}/0?ssl_ca_certs={tls_certs / 'other-ca.crt'}")
    status, body = http_request(f"{node.http}/readyz")
    assert status == 503
    assert "TLS certificate verification failed" in json.loads(body)["reason"]
    wait_until(lambda: "TLS certificate verification failed" in node.output(), timeout=5, what="the log line")
