"""Issue 11's proof with real processes: the delivery checker (`bench/delivery.py`) on two nodes and a
real redis-server while clients drop every way and a node is SIGKILLed, and Redis restarted mid-run;
and the checker itself, fed sequences that break the promise."""

import json

import pytest

from bench.delivery import SequenceCheck, delivery_run
from tests.processes import SERVERS, scaled

TOKEN = "delivery-api-token"
# Room for every publication of a run: a client away longer than the history is told "recovered: false"
# legitimately, and these runs expect none while Redis keeps its data.
on_both_servers = pytest.mark.parametrize("server", SERVERS)
NAMESPACES = {"public": {"subscribe": "anyone", "publish": "server", "history_size": 10_000, "history_ttl": 600}}


@pytest.fixture
def two_nodes(redis_server, daphne_nodes):
    env = {
        "REDIS_URL": redis_server.url,
        "PINGPONG_API_TOKEN": TOKEN,
        "PINGPONG_NAMESPACES": json.dumps(NAMESPACES),
        # A generous layer deadline: the runs prove delivery, not speed, on a shared machine.
        "PINGPONG_LAYER_TIMEOUT": "5",
    }
    return [daphne_nodes(env), daphne_nodes(env)]


def violations_of(report: dict) -> str:
    return json.dumps({key: report[key] for key in ("violations", "violation_examples", "drops", "statuses")})


# The checker itself


def test_the_checker_passes_an_exact_sequence_across_a_recovery():
    """1, 2, a reconnect recovered from 2, then 3, 4: no violation."""
    check = SequenceCheck()
    check.subscribed(offset=0, epoch="e1", recovered=None)
    for offset in (1, 2):
        check.publication(offset=offset, epoch="e1")
    check.subscribed(offset=4, epoch="e1", recovered=True, since_epoch="e1")
    for offset in (3, 4):
        check.publication(offset=offset, epoch="e1")
    assert check.violations == [] and check.last == 4 and check.recovered["true"] == 1


def test_the_checker_reports_a_gap():
    """An offset skipped after a recovery is a gap."""
    check = SequenceCheck()
    check.subscribed(offset=0, epoch="e1", recovered=None)
    check.publication(offset=1, epoch="e1")
    check.subscribed(offset=3, epoch="e1", recovered=True, since_epoch="e1")
    check.publication(offset=3, epoch="e1")
    assert [(v.kind, v.expected, v.received) for v in check.violations] == [("gap", 2, 3)]


def test_the_checker_reports_a_duplicate_and_an_offset_going_back():
    """An offset seen again (the join between history and live) is a duplicate."""
    check = SequenceCheck()
    check.subscribed(offset=0, epoch="e1", recovered=None)
    for offset in (1, 2, 2, 1):
        check.publication(offset=offset, epoch="e1")
    assert [(v.kind, v.received) for v in check.violations] == [("duplicate", 2), ("duplicate", 1)]


def test_the_checker_reports_recovered_true_in_another_epoch_and_an_old_epoch_coming_back():
    """`recovered: true` must keep the epoch; a publication of an epoch left behind is out of order."""
    check = SequenceCheck()
    check.subscribed(offset=0, epoch="e1", recovered=None)
    check.publication(offset=1, epoch="e1")
    check.subscribed(offset=5, epoch="e2", recovered=True, since_epoch="e1")
    check.publication(offset=2, epoch="e1")
    assert [v.kind for v in check.violations] == ["epoch", "epoch"]


def test_the_checker_accepts_recovered_false_and_a_new_epoch_as_told_and_counts_them():
    """`recovered: false` and a publication in a new epoch start over where they say: not a silent gap."""
    check = SequenceCheck()
    check.subscribed(offset=0, epoch="e1", recovered=None)
    check.publication(offset=1, epoch="e1")
    check.subscribed(offset=7, epoch="e1", recovered=False, since_epoch="e1")
    check.publication(offset=8, epoch="e1")
    check.publication(offset=3, epoch="e2")
    check.publication(offset=4, epoch="e2")
    assert check.violations == []
    assert (check.recovered["false"], check.recovered_false_same_epoch, check.epoch_changes_live) == (1, 1, 1)


# Real processes


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_every_client_gets_every_publication_exactly_once_through_drops_and_a_node_sigkill(two_nodes):
    """30 clients, 20 publications/s for 8 s from 4 publishers, clean closes, aborts and a SIGKILLed node:
    no gap, no duplicate, no `recovered: false`, and every client ends at the last offset."""
    report = await delivery_run(
        nodes=two_nodes,
        token=TOKEN,
        clients=30,
        rate=20,
        seconds=8,
        publishers=4,
        node_kills=1,
        hold_seconds=(0.5, 3.0),
        drain=scaled(15),
    )
    print(json.dumps(report))  # the figures, with -s
    assert report["subscribed"] == 30
    assert report["accepted"] == report["sent"] == 160, violations_of(report)
    assert report["violations"] == 0, violations_of(report)
    assert report["drops"]["clean"] > 0 and report["drops"]["abort"] > 0, report["drops"]
    assert report["drops"].get("node_killed", 0) > 0, report["drops"]
    assert report["recovered_true"] > 0
    assert report["recovered_false"] == 0, violations_of(report)
    assert report["caught_up"] == 30 and report["final_offset"] == 160, violations_of(report)


@pytest.mark.redis
@pytest.mark.slow
@on_both_servers
async def test_after_a_redis_restart_clients_are_told_recovered_false_and_publishing_resumes(redis_server, two_nodes):
    """Redis restarted mid-run (history lost): every subscribe with a `since` from before is answered
    `recovered: false` in a new epoch, no client sees a gap or a duplicate within an epoch, and a
    publication is accepted (202) again within 5 s of Redis being back."""
    report = await delivery_run(
        nodes=two_nodes,
        token=TOKEN,
        clients=20,
        rate=20,
        seconds=9,
        publishers=4,
        node_kills=0,
        hold_seconds=(0.5, 2.5),
        redis=redis_server,
        redis_restart_at=3.0,
        redis_down_seconds=1.5,
        drain=scaled(15),
    )
    print(json.dumps(report))  # the figures, with -s
    restart = report["redis_restart"]
    assert report["violations"] == 0, violations_of(report)
    assert report["epochs"] == 2, report
    assert restart["old_since_answers"] > 0, restart
    assert restart["old_since_recovered_true"] == 0, restart
    assert report["recovered_false_same_epoch"] == 0, report
    assert restart["first_202_after_back_s"] is not None and restart["first_202_after_back_s"] <= scaled(5), restart
    assert report["caught_up"] == 20, violations_of(report)
