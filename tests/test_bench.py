"""The benchmark's own logic at tiny sizes: real servers, real clients, rows with every key."""

import pytest

from bench import report
from bench.run import main
from bench.servers import cpu_split
from bench.workloads import w1_pingpong, w2_capacity, w3_fanout


def quiet(detail: str) -> None:
    pass


@pytest.fixture
def logs(tmp_path):
    return tmp_path / "logs"


def test_w1_on_the_baseline_counts_messages_and_percentiles(logs):
    row = w1_pingpong(
        app="baseline",
        server="daphne",
        connections=2,
        duration=1,
        warmup=0,
        redis_url=None,
        cores=cpu_split()[0],
        log_dir=logs,
        say=quiet,
    )
    assert (row["opened"], row["errors"]) == (2, 0)
    assert row["messages"] > 0
    assert set(row["rtt_ms"]) == {"p50", "p90", "p99", "max"}


@pytest.mark.slow
def test_w2_on_the_project_holds_every_connection_and_each_answers(logs):
    row = w2_capacity(
        app="project", server="daphne", connections=20, redis_url=None, cores=None, log_dir=logs, say=quiet
    )
    assert (row["opened"], row["answered"], row["errors"]) == (20, 20, 0)
    assert row["rss_after_mb"] > 0


@pytest.mark.redis
@pytest.mark.slow
def test_w3_on_the_raw_fanout_delivers_every_broadcast(redis_server, logs):
    row = w3_fanout(
        app="rawfanout", clients=4, nodes=2, rate=10, seconds=0.3, drain=5,
        redis_url=redis_server.url, cores=None, log_dir=logs, say=quiet,
    )  # fmt: skip
    assert row["expected"] == 4 * 3
    assert row["delivered"] == row["expected"]


def test_ratios_and_verdicts_compare_the_project_with_the_baseline_of_the_same_run():
    def w1(app, rate, p99):
        rtt = {"p50": 1.0, "p90": 1.0, "p99": p99, "max": p99}
        return {
            "workload": "w1",
            "app": app,
            "server": "daphne",
            "connections": 50,
            "messages_per_second": rate,
            "rtt_ms": rtt,
        }

    rows = [w1("project", 900.0, 2.5), w1("baseline", 1000.0, 2.0)]
    report.ratios_add(rows)
    assert rows[0]["vs_baseline"] == {"throughput": 0.9, "p99": 1.25}
    assert [line.endswith("met") for line in report.verdicts(rows)] == [True, True]


@pytest.mark.slow
def test_a_quick_w1_run_writes_the_json_and_the_chart(tmp_path):
    code = main(
        ["--only", "w1", "--servers", "daphne", "--apps", "baseline", "--connections", "2", "--duration", "1",
         "--warmup", "0", "--no-redis", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "latest.json").exists()
    assert (tmp_path / "latest.png").exists()


async def test_connect_cost_accepts_a_few_connections_through_every_layer_of_the_stack():
    from bench.connect_cost import APPS, connect_cost

    for app in APPS.values():
        assert await connect_cost(app, 3) > 0  # connect_cost asserts each connection was accepted
