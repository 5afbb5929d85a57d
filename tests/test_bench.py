"""The benchmark's own logic at tiny sizes: real servers, real clients, rows with every key."""

import json
from types import SimpleNamespace

import pytest

from bench import capacity, report
from bench.run import main
from bench.servers import cpu_split
from bench.workloads import W5Deliveries, w1_pingpong, w2_capacity, w3_fanout, w4_capacity, w5_topics, w6_delivery
from tests.processes import scaled


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
def test_w4_holds_every_connection_on_a_worker_group_and_each_answers_ping(redis_server, logs):
    """W4 at a tiny size: 2 workers, 2 client processes, 2 source addresses; all held, all answered, both workers used."""
    row = w4_capacity(
        server="daphne", connections=300, workers=2, client_processes=2, source_addresses=2,
        redis_url=redis_server.url, cores=None, log_dir=logs, say=quiet, settle=0.5,
    )  # fmt: skip
    assert (row["workload"], row["workers"], row["client_processes"], row["source_addresses"]) == ("w4", 2, 2, 2)
    assert (row["opened"], row["held"], row["answered"], row["errors"]) == (300, 300, 300, 0)
    assert sum(worker["connections"] for worker in row["worker_detail"]) == 300
    assert row["worker_connections_min"] > 0 and not row["worker_restarted"]
    assert row["rss_after_mb"] > row["rss_before_mb"] > 0
    assert "| daphne | 2 | 2 | 2 | 300/300 | " in report.table([row])


def test_w4_plans_workers_clients_and_source_addresses_from_the_open_file_limit():
    """100,000 connections at a 20,000 open-file limit: 16,000 a process, so 7 workers, 7 clients, 5 addresses."""
    plan = capacity.plan_make(connections=100_000, open_files=20_000)
    assert (plan.per_process_limit, plan.workers, plan.client_processes, plan.source_addresses) == (16_000, 7, 7, 5)
    with pytest.raises(capacity.PlanError, match="at least 7"):
        capacity.plan_make(connections=100_000, open_files=20_000, workers=5)
    with pytest.raises(capacity.PlanError, match="ip_local_port_range"):
        capacity.plan_make(connections=100_000, open_files=20_000, source_addresses=3)


@pytest.mark.redis
@pytest.mark.slow
def test_w3_on_the_raw_fanout_delivers_every_broadcast(redis_server, logs):
    row = w3_fanout(
        app="rawfanout", clients=4, nodes=2, rate=10, seconds=0.3, drain=5,
        redis_url=redis_server.url, cores=None, log_dir=logs, say=quiet,
    )  # fmt: skip
    assert row["expected"] == 4 * 3
    assert row["delivered"] == row["expected"]


@pytest.mark.redis
def test_w5_delivers_every_publication_exactly_once_to_exactly_its_subscribers(redis_server, logs):
    row = w5_topics(
        clients=20, nodes=2, rate=10, public_rate=2, seconds=2, drain=scaled(10),
        redis_url=redis_server.url, cores=None, log_dir=logs, say=quiet,
    )  # fmt: skip
    assert (row["workload"], row["server"], row["nodes"]) == ("w5", "daphne", 2)
    assert (row["opened"], row["subscribed"], row["subscribe_failures"]) == (20, 20, {})
    assert (row["sent"], row["sent_user"], row["sent_public"]) == (24, 20, 4)
    assert row["statuses"] == {"202": 24}
    assert row["expected"] == 20 + 4 * 20  # a user publication reaches one client, a public:all one all 20
    assert row["delivered"] == row["expected"]
    assert (row["duplicates"], row["misrouted"], row["delivered_unaccepted"], row["delivered_unsubscribed"]) == (
        0,
        0,
        0,
        0,
    )
    assert isinstance(row["subscribe_retries"], dict)
    for key in ("latency_ms", "latency_user_ms", "latency_public_ms"):
        assert set(row[key]) == {"p50", "p90", "p99", "max"}
    assert {"client_cpu_percent", "client_bound", "server_cpu_percent", "connect_seconds"} <= set(row)
    assert report.w5_delivery_verdict(row).endswith(" met")
    assert "| daphne | 2 | 20/20 | " in report.table([row])


@pytest.mark.redis
@pytest.mark.slow
def test_w6_checks_every_client_through_drops_and_a_node_kill_and_reports_a_row(redis_server, logs):
    """W6 at a tiny size: the checker's row (publications, recoveries, violations, drops) and its verdict."""
    row = w6_delivery(
        clients=10, nodes=2, rate=10, seconds=4, publishers=4, node_kills=1, drain=scaled(10),
        redis_url=redis_server.url, cores=None, log_dir=logs, say=quiet,
    )  # fmt: skip
    assert (row["workload"], row["server"], row["nodes"]) == ("w6", "daphne", 2)
    assert (row["sent"], row["accepted"], row["violations"], row["recovered_false"]) == (40, 40, 0, 0)
    assert row["caught_up"] == 10 and len(row["node_kills"]) == 1
    assert {"latency_ms", "recovery_ms", "drops", "client_cpu_percent", "server_cpu_percent"} <= set(row)
    assert report.w6_delivery_verdict(row).endswith(" met")
    assert "| daphne | 2 | 10/10 | 4 | 40/40 | " in report.table([row])


def test_w5_counts_a_repeated_publication_as_a_duplicate_and_another_users_as_misrouted():
    def publication(topic, publication_id):
        event = {"type": "publication", "topic": topic, "id": publication_id, "sent_at": 100.0, "data": 1}
        return (100.25, json.dumps(event).encode())

    frames = [
        (99.0, b'{"type":"subscribed","topic":"user:0","id":"user:0"}'),
        (99.0, b'{"type":"subscribed","topic":"public:all","id":"public:all"}'),
        publication("user:0", "a"),
        publication("user:0", "a"),
        publication("public:all", "b"),
        publication("user:1", "c"),
    ]
    deliveries = W5Deliveries({0: SimpleNamespace(frames=frames)})
    deliveries.update()
    assert deliveries.subscribed[0] == {"user:0", "public:all"}
    assert (deliveries.duplicates, deliveries.misrouted) == (1, 1)
    assert deliveries.first[0] == {"user:0 a": 0.25, "public:all b": 0.25}
    assert deliveries.delivered({"user:0 a", "user:1 c"}, [0]) == 1


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


def w1_row(app: str, server: str, runs: list[float]) -> dict:
    """A W1 row as median_rows makes it: the median run's figures, every run's throughput in order."""
    rate = sorted(runs)[(len(runs) - 1) // 2]
    rtt = {"p50": 1.0, "p90": 1.0, "p99": 2.0, "max": 2.0}
    return {"workload": "w1", "app": app, "server": server, "connections": 50, "messages_per_second": rate,
            "rtt_ms": rtt, "runs": runs}  # fmt: skip


def test_w1_throughput_is_judged_by_the_median_of_the_paired_runs_ratios():
    """A machine that slowed down between rounds: the ratio of medians says 0.85x, the pairs 1.0x."""
    rows = [w1_row("project", "daphne", [1000.0, 500.0, 510.0]), w1_row("baseline", "daphne", [1000.0, 600.0, 510.0])]
    report.ratios_add(rows)
    assert rows[0]["vs_baseline"]["throughput"] == 0.85
    assert rows[0]["vs_baseline"]["throughput_paired"] == 1.0
    assert report.verdicts(rows)[0] == (
        "W1 daphne 50 conns throughput (medians 0.85x; paired runs): 1.00x (target >= 0.9x) met"
    )


def test_w1_uvicorn_is_held_to_its_speedup_over_daphne():
    rows = [
        w1_row("project", "daphne", [1000.0]),
        w1_row("baseline", "daphne", [1000.0]),
        w1_row("project", "uvicorn", [2400.0]),
        w1_row("baseline", "uvicorn", [2400.0]),
    ]
    report.ratios_add(rows)
    assert "W1 50 conns project on uvicorn vs on daphne: 2.40x (target >= 2.5x) MISSED" in report.verdicts(rows)


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
