"""The `loadtest` command and its generator (bench/loadgen.py) against real daphne nodes: results, JSON,
runs cut short by a server limit, several processes and source addresses, and one-line errors."""

import asyncio
import json
import re
import sys

import pytest
from django.core.management import CommandError, call_command

import bench
from bench import loadgen
from bench.loadgen import LoadgenError, check_url, client_load, origin_for, percentiles
from tests.processes import free_port, manage
from tests.wsclient import ws_connect

# The node under load must not rate-limit the closed loop.
UNLIMITED = {"PINGPONG_RATE_PER_SECOND": "0"}


@pytest.fixture(scope="module")
def node(module_daphne_nodes):
    """One node for the module's tests that leave it as they found it."""
    return module_daphne_nodes(env=UNLIMITED)


def loadtest(*args: str):
    return manage("loadtest", *args, env={})


@pytest.mark.slow
@pytest.mark.parametrize("client", loadgen.CLIENTS)
def test_json_result_counts_every_connection_and_the_messages(node, client):
    run = loadtest(node.ws, "--connections", "2", "--duration", "1", "--client", client, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["client"] == client
    assert (result["opened"], result["failed"], result["connections"]) == (2, 0, 2)
    assert result["messages"] > 0
    assert set(result["rtt_ms"]) == {"p50", "p90", "p99", "max"}
    assert result["close_codes"] == {} and result["errors"] == {}


@pytest.mark.slow
def test_text_result_names_connections_rate_percentiles_and_close_codes(node):
    run = loadtest(node.ws, "--connections", "2", "--duration", "1", "--ramp-up", "0.2")
    assert run.returncode == 0, run.stderr
    for label in ("2 opened, 0 failed", "msg/s", "p50", "p90", "p99", "max", "close codes"):
        assert label in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("client", loadgen.CLIENTS)
def test_a_run_cut_short_by_the_rate_limit_is_marked_in_the_json_and_exits_1(daphne_nodes, client):
    limited = daphne_nodes(env={"PINGPONG_RATE_PER_SECOND": "1", "PINGPONG_RATE_BURST": "2"})
    run = loadtest(limited.ws, "--connections", "2", "--duration", "1", "--client", client, "--json")
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert result["close_codes"] == {"4008": 2}
    assert result["errors"] == {"error:rate_limited": 2}
    assert "4008" in result["cut_short"] and result["messages_per_second"] is None


@pytest.mark.slow
def test_an_unpaced_run_against_a_default_node_says_it_was_cut_short_and_what_to_do(daphne_nodes):
    default = daphne_nodes()
    run = loadtest(default.ws, "--connections", "5", "--duration", "2", "--rate", "0")
    assert run.returncode == 1
    assert "msg/s" not in run.stdout and "no throughput figure" in run.stdout
    [line] = run.stderr.strip().splitlines()
    assert "4008" in line and "--rate 10" in line and "PINGPONG_RATE_PER_SECOND" in line


@pytest.mark.slow
def test_the_default_rate_runs_to_the_end_against_a_default_node(daphne_nodes):
    default = daphne_nodes()
    run = loadtest(default.ws, "--connections", "5", "--duration", "1", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["cut_short"] is None and result["close_codes"] == {}
    assert result["messages"] > 0 and result["messages_per_second"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("client", loadgen.CLIENTS)
def test_two_processes_from_two_source_addresses_add_up_to_one_result(daphne_nodes, client):
    fresh = daphne_nodes(env=UNLIMITED)
    run = loadtest(
        fresh.ws, "--connections", "4", "--duration", "1", "--rate", "0", "--processes", "2",
        "--source-addresses", "2", "--client", client, "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["processes"], result["source_addresses"], result["opened"], result["failed"]) == (2, 2, 4, 0)
    opened_from = re.findall(r"\bopen\b.*client=(127\.0\.0\.\d+)", fresh.output())
    # Two connections from each address, and the probe (one connection, the kernel's choice: 127.0.0.1).
    assert sorted(opened_from) == ["127.0.0.1"] * 3 + ["127.0.0.2"] * 2
    # The server answered every ping the merged result counts (and the warm-up's and the probe's).
    assert 0 < result["messages"] <= fresh.metric("pingpong_messages_received_total", 'kind="ping"')


def test_several_source_addresses_need_a_loopback_target():
    run = loadtest("ws://192.0.2.1:8000/ws/", "--source-addresses", "2", "--duration", "1")
    assert run.returncode == 1
    assert "needs a loopback target" in run.stderr and "Traceback" not in run.stderr


def test_without_the_generator_the_command_says_how_to_get_it(monkeypatch):
    monkeypatch.delattr(bench, "loadgen")
    monkeypatch.setitem(sys.modules, "bench.loadgen", None)
    with pytest.raises(CommandError, match=r"pip install -e '\.\[load\]'"):
        call_command("loadtest", "ws://127.0.0.1:8000/ws/")


def test_a_client_above_80_percent_of_its_cores_is_client_bound():
    assert client_load(cpu_seconds=[0.85], seconds=1.0, cpus=2, machine_cpus=2) == (85.0, 42.5, 1, True)
    assert client_load(cpu_seconds=[0.75], seconds=1.0, cpus=2, machine_cpus=2) == (75.0, 37.5, 1, False)


def test_two_processes_are_client_bound_when_the_busiest_one_is():
    # 70% of the two cores in all, but one process spent 95% of its core: it limited its share.
    assert client_load(cpu_seconds=[0.95, 0.45], seconds=1.0, cpus=2, machine_cpus=4)[3] is True
    assert client_load(cpu_seconds=[0.6, 0.6], seconds=1.0, cpus=2, machine_cpus=4)[3] is False


def test_more_processes_than_cpus_share_the_cpus_they_have():
    assert client_load(cpu_seconds=[0.45, 0.45, 0.45, 0.45], seconds=1.0, cpus=2, machine_cpus=2) == (
        90.0, 90.0, 2, True,
    )  # fmt: skip


def test_the_text_result_marks_a_client_bound_figure():
    result = loadgen.Result(
        url="ws://127.0.0.1:1/ws/", connections=1, duration=1.0, opened=1, failed=0, messages=10,
        messages_per_second=10.0, rtt_ms=percentiles([]), close_codes={}, errors={}, connect_seconds=0.1,
        client_cpu_percent=97.0, client_cpu_machine_percent=48.5, client_cores=1, client_bound=True,
    )  # fmt: skip
    assert "10 msg/s (client-bound)" in loadgen.result_text(result)
    assert "CLIENT-BOUND" in loadgen.result_text(result)


def test_a_server_that_answers_something_else_is_one_line_error(node):
    run = loadtest(node.ws.replace("/ws/", "/ws/echo/"), "--connections", "1", "--duration", "1")
    assert run.returncode != 0
    assert "instead of 'pong!'" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("client", loadgen.CLIENTS)
def test_a_wrong_answer_under_load_ends_the_run_with_one_line_error(node, client):
    echo = node.ws.replace("/ws/", "/ws/echo/")
    with pytest.raises(LoadgenError, match="instead of 'pong!'"):
        loadgen.run(echo, connections=2, duration=1, rate=0, client=client, probe_first=False)


def test_an_unknown_client_is_one_line_error():
    with pytest.raises(LoadgenError, match="--client must be one of websockets, picows"):
        loadgen.plans_for(
            "ws://127.0.0.1:1/ws/", connections=1, duration=1, ramp_up=0, warmup=0, origin=None, rate=0,
            processes=1, source_addresses=1, client="curl",
        )  # fmt: skip


@pytest.mark.slow
async def test_a_full_node_is_reported_with_its_own_explanation(daphne_nodes):
    full = daphne_nodes(env={"PINGPONG_MAX_CONNECTIONS": "1"})
    async with await ws_connect(full.ws):  # takes the only place
        run = await asyncio.to_thread(loadtest, full.ws, "--duration", "1")
    assert run.returncode != 0
    # Either the error event or the close frame arrives first; both name the reason.
    assert "refused the first connection" in run.stderr or "code 4013" in run.stderr
    assert "full" in run.stderr


def test_a_refused_connection_is_one_line_error():
    run = loadtest(f"ws://127.0.0.1:{free_port()}/ws/", "--duration", "1")
    assert run.returncode != 0
    assert "connection refused" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_url_that_is_not_a_websocket_url_is_one_line_error():
    run = loadtest("http://127.0.0.1:8000/ws/")
    assert run.returncode != 0
    assert "not a websocket URL" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_disallowed_origin_is_explained(node):
    run = loadtest(node.ws, "--origin", "http://elsewhere.example", "--duration", "1")
    assert "HTTP 403" in run.stderr and "--origin" in run.stderr


@pytest.mark.parametrize("url", ["ws://:80/ws/", "ws://host:notaport/", "ftp://host/"])
def test_check_url_refuses_unusable_urls(url):
    with pytest.raises(LoadgenError):
        check_url(url)


def test_default_origin_is_the_same_site_over_http():
    assert origin_for("ws://127.0.0.1:8000/ws/") == "http://127.0.0.1:8000"
    assert origin_for("wss://example.com/ws/") == "https://example.com"


def test_percentiles_use_the_nearest_rank():
    assert percentiles([float(n) for n in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
