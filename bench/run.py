"""`python -m bench.run` (`make bench`): every app side by side in one run; table, JSON, PNG.

Servers are pinned to all cores but the last, this load generator to the last one (where
there are two or more); results go to bench/results/ (latest.json, latest.png, logs/).
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import loadgen, report
from bench.servers import STARTING_CORES, cpu_split, open_files_raise, redis_start
from bench.workloads import w1_pingpong, w2_capacity, w3_fanout, w4_capacity, w5_topics, w6_delivery
from tests.processes import RedisServer

RESULTS = Path(__file__).resolve().parent / "results"


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def options_parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run of a minute or so)")
    parser.add_argument("--only", default="w1,w2,w3,w5,w6", help="workloads to run (default w1,w2,w3,w5,w6)")
    parser.add_argument("--servers", default="daphne,uvicorn", help="servers for W1 and W2")
    parser.add_argument("--apps", default="project,project-channels-redis,baseline,stock", help="apps for W1 and W2")
    parser.add_argument("--w3-apps", default="project,project-channels-redis,rawfanout,stock", help="apps for W3")
    parser.add_argument("--w3-servers", default="daphne,uvicorn", help="servers for W3")
    parser.add_argument("--connections", default="50,1000", help="W1 connection counts")
    parser.add_argument("--duration", type=float, default=10.0, help="W1 seconds of load per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="W1 seconds of load before measuring")
    parser.add_argument("--processes", default="1", help="W1 client processes (default 1; auto: one per client core)")
    parser.add_argument(
        "--source-addresses", type=int, default=1, help="W1 client source addresses 127.0.0.1 ... 127.0.0.N"
    )
    parser.add_argument(
        "--client", default="picows", choices=loadgen.CLIENTS, help="W1 client library (default picows)"
    )
    parser.add_argument("--w2-connections", type=int, default=10_000)
    parser.add_argument("--w2-servers", default="daphne", help="servers for W2 (default daphne)")
    parser.add_argument(
        "--w4-connections", type=int, default=100_000, help="W4 idle connections (not in the default --only)"
    )
    parser.add_argument("--w4-servers", default="daphne,uvicorn", help="servers for W4 (the project with --workers)")
    parser.add_argument(
        "--w4-workers",
        type=int,
        default=None,
        help="W4 server workers (default ceil(connections / floor(0.8 x RLIMIT_NOFILE)): 7 for 100,000 at 20,000)",
    )
    parser.add_argument(
        "--w4-client-processes", type=int, default=None, help="W4 client processes (default: as --w4-workers)"
    )
    parser.add_argument(
        "--w4-source-addresses",
        type=int,
        default=None,
        help="W4 loopback source addresses (default ceil(connections / 20,000))",
    )
    parser.add_argument("--w4-concurrency", type=int, default=50, help="W4 handshakes in flight per client process")
    parser.add_argument("--w4-answer-seconds", type=float, default=60.0, help="W4 bound on every ping's answer")
    parser.add_argument(
        "--w4-connect-seconds", type=float, default=900.0, help="W4: a client process stops opening after this long"
    )
    parser.add_argument("--w3-clients", type=int, default=4_000)
    parser.add_argument("--w3-nodes", type=int, default=2)
    parser.add_argument("--w3-rate", type=float, default=20.0, help="broadcasts per second")
    parser.add_argument("--w3-seconds", type=float, default=5.0, help="seconds of broadcasting")
    parser.add_argument("--w3-drain", type=float, default=15.0, help="seconds to wait for late deliveries")
    parser.add_argument("--w5-servers", default="daphne,uvicorn", help="servers for W5 (the project only)")
    parser.add_argument("--w5-clients", type=int, default=1_000)
    parser.add_argument("--w5-nodes", type=int, default=2)
    parser.add_argument("--w5-rate", type=float, default=100.0, help="publications to random users per second")
    parser.add_argument("--w5-public-rate", type=float, default=2.0, help="publications to public:all per second")
    parser.add_argument("--w5-seconds", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--w5-drain", type=float, default=15.0, help="seconds to wait for late deliveries")
    parser.add_argument("--w6-servers", default="daphne,uvicorn", help="servers for W6 (the project only)")
    parser.add_argument("--w6-clients", type=int, default=200)
    parser.add_argument("--w6-nodes", type=int, default=2)
    parser.add_argument("--w6-rate", type=float, default=50.0, help="publications per second to the one topic")
    parser.add_argument("--w6-seconds", type=float, default=30.0, help="seconds of publishing (and of drops)")
    parser.add_argument("--w6-publishers", type=int, default=4, help="concurrent publishers (alternating nodes)")
    parser.add_argument("--w6-node-kills", type=int, default=2, help="node SIGKILLs, spread over the run")
    parser.add_argument("--w6-drain", type=float, default=15.0, help="seconds for every client to catch up")
    parser.add_argument(
        "--w6-redis-restart",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill Redis this many seconds into W6's publishing and start it again 1.5 s later (history lost)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every case N times, interleaved; report the median run"
    )
    parser.add_argument("--no-redis", action="store_true", help="serve W1/W2 on the in-memory layer")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json/latest.png/logs")
    parser.add_argument("--render", type=Path, help="print the table of a saved latest.json and redraw its chart")
    options = parser.parse_args(argv)
    if options.quick:
        options.connections, options.duration, options.warmup = "20,200", 3.0, 1.0
        options.w2_connections, options.w3_clients, options.w3_seconds, options.w3_drain = 1000, 400, 2.0, 5.0
        options.w5_clients, options.w5_seconds, options.w5_drain = 100, 2.0, 5.0
        options.w6_clients, options.w6_rate, options.w6_seconds, options.w6_node_kills = 40, 20.0, 6.0, 1
        options.w4_connections = 2_000
        options.w4_workers, options.w4_client_processes = options.w4_workers or 2, options.w4_client_processes or 2
        options.w4_source_addresses = options.w4_source_addresses or 2
    return options


class Progress:
    """`[step/steps] label  detail` on stderr: rewritten in place on a terminal, every 2 s otherwise."""

    def __init__(self, steps: int) -> None:
        self.steps, self.step, self.label = steps, 0, ""
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def begin(self, label: str) -> None:
        self.step += 1
        self.label = label
        self.last = 0.0
        self.say("starting")

    def say(self, detail: str) -> None:
        line = f"[{self.step}/{self.steps}] {self.label}: {detail}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        elif time.monotonic() - self.last >= 2.0:
            sys.stderr.write(line + "\n")
            self.last = time.monotonic()
        sys.stderr.flush()

    def end(self, summary: str) -> None:
        line = f"[{self.step}/{self.steps}] {self.label}: {summary}"
        sys.stderr.write(("\r\033[K" if self.tty else "") + line + "\n")
        sys.stderr.flush()


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("daphne", "uvicorn", "channels", "channels-redis", "django", "websockets", "uvloop", "twisted"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def steps_plan(
    options: argparse.Namespace,
    *,
    redis_url: str | None,
    redis: RedisServer | None = None,
    every_core: set[int] | None = None,
) -> list[tuple[str, Callable[..., dict]]]:
    """Every (label, call) of this run, in order; `redis` is the run's redis-server (W6 may restart it);
    `every_core` is where W4's server group runs (all the cores the benchmark started with)."""
    only = set(csv(options.only))
    plan: list[tuple[str, Callable[..., dict]]] = []
    apps = csv(options.apps)
    w1_redis = None if options.no_redis else redis_url
    if "w1" in only:
        for server in csv(options.servers):
            for connections in [int(c) for c in csv(options.connections)]:
                for app in apps:
                    plan.append(
                        (
                            f"W1 {server} {app} {connections} conns",
                            lambda say, cores, logs, a=app, s=server, c=connections: w1_pingpong(
                                app=a, server=s, connections=c, duration=options.duration, warmup=options.warmup,
                                redis_url=w1_redis, cores=cores, log_dir=logs, say=say,
                                processes=options.processes, source_addresses=options.source_addresses,
                                client=options.client,
                            ),
                        )
                    )  # fmt: skip
    if "w2" in only:
        for server in csv(options.w2_servers):
            for app in apps:
                plan.append(
                    (
                        f"W2 {server} {app} {options.w2_connections:,} conns",
                        lambda say, cores, logs, a=app, s=server: w2_capacity(
                            app=a, server=s, connections=options.w2_connections,
                            redis_url=w1_redis, cores=cores, log_dir=logs, say=say,
                        ),
                    )
                )  # fmt: skip
    if "w3" in only:
        if redis_url is None:
            print("W3 skipped: redis-server is not installed", file=sys.stderr)
        else:
            for server in csv(options.w3_servers):
                for app in csv(options.w3_apps):
                    plan.append(
                        (
                            f"W3 {server} {app} {options.w3_nodes} nodes {options.w3_clients:,} clients",
                            lambda say, cores, logs, a=app, s=server: w3_fanout(
                                app=a, server=s, clients=options.w3_clients, nodes=options.w3_nodes,
                                rate=options.w3_rate, seconds=options.w3_seconds, drain=options.w3_drain,
                                redis_url=redis_url, cores=cores, log_dir=logs, say=say,
                            ),
                        )
                    )  # fmt: skip
    if "w4" in only:
        if redis_url is None:
            print("W4 skipped: redis-server is not installed (--workers needs REDIS_URL)", file=sys.stderr)
        else:
            for server in csv(options.w4_servers):
                plan.append(
                    (
                        f"W4 {server} project --workers {options.w4_connections:,} conns",
                        lambda say, cores, logs, s=server: w4_capacity(
                            server=s, connections=options.w4_connections, redis_url=redis_url, cores=every_core,
                            log_dir=logs, say=say, workers=options.w4_workers,
                            client_processes=options.w4_client_processes,
                            source_addresses=options.w4_source_addresses, concurrency=options.w4_concurrency,
                            answer_within=options.w4_answer_seconds, connect_within=options.w4_connect_seconds,
                        ),
                    )
                )  # fmt: skip
    if "w5" in only:
        if redis_url is None:
            print("W5 skipped: redis-server is not installed", file=sys.stderr)
        else:
            for server in csv(options.w5_servers):
                plan.append(
                    (
                        f"W5 {server} project {options.w5_nodes} nodes {options.w5_clients:,} clients",
                        lambda say, cores, logs, s=server: w5_topics(
                            server=s, clients=options.w5_clients, nodes=options.w5_nodes, rate=options.w5_rate,
                            public_rate=options.w5_public_rate, seconds=options.w5_seconds, drain=options.w5_drain,
                            redis_url=redis_url, cores=cores, log_dir=logs, say=say,
                        ),
                    )
                )  # fmt: skip
    if "w6" in only:
        if redis_url is None:
            print("W6 skipped: redis-server is not installed", file=sys.stderr)
        else:
            for server in csv(options.w6_servers):
                plan.append(
                    (
                        f"W6 {server} delivery {options.w6_nodes} nodes {options.w6_clients:,} clients",
                        lambda say, cores, logs, s=server: w6_delivery(
                            server=s, clients=options.w6_clients, nodes=options.w6_nodes, rate=options.w6_rate,
                            seconds=options.w6_seconds, publishers=options.w6_publishers,
                            node_kills=options.w6_node_kills, drain=options.w6_drain,
                            redis=redis if options.w6_redis_restart is not None else None,
                            redis_restart_at=options.w6_redis_restart,
                            redis_url=redis_url, cores=cores, log_dir=logs, say=say,
                        ),
                    )
                )  # fmt: skip
    return plan


def summary(row: dict) -> str:
    if row["workload"] == "w1":
        rtt = row["rtt_ms"]
        return (
            f"{row['messages_per_second']:,.0f} msg/s, p50 {rtt['p50']:.2f} ms, p99 {rtt['p99']:.2f} ms, "
            f"errors {row['errors']}, client CPU {report.client_cpu(row)}"
            + (", cut short by a server limit" if row.get("cut_short") else "")
        )
    if row["workload"] == "w4":
        return (
            f"{row['held']:,}/{row['connections']:,} held on {row['workers']} workers "
            f"({row['worker_connections_min']}-{row['worker_connections_max']} each), "
            f"{row['connect_rate']:,.0f} conn/s, {row['rss_per_connection_kb']:.1f} KB/conn, "
            f"{row['answered']:,}/{row['pinged']:,} answered, errors {row['errors']}, client CPU {report.client_cpu(row)}"
        )
    if row["workload"] == "w2":
        return (
            f"{row['opened']:,} held, {row['connect_rate']:,.0f} conn/s, {row['rss_per_connection_kb']:.1f} KB/conn, "
            f"{row['answered']:,} answered, errors {row['errors']}"
        )
    lat = row["latency_ms"]
    if row["workload"] == "w6":
        return (
            f"{row['accepted']}/{row['sent']} accepted {row['statuses']}, {row['deliveries']:,} deliveries, "
            f"recovered {row['recovered_true']} true / {row['recovered_false']} false, "
            f"violations {row['violations']}, caught up {row['caught_up']}/{row['clients']}, drops {row['drops']}, "
            f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, recovery p99 {row['recovery_ms']['p99']:.0f} ms, "
            f"client CPU {report.client_cpu(row)}"
        )
    if row["workload"] == "w5":
        return (
            f"{row['subscribed']:,}/{row['clients']:,} subscribed (retries {row['subscribe_retries'] or 0}), "
            f"{row['accepted']}/{row['sent']} accepted {row['statuses']}, {row['delivered']:,}/{row['expected']:,} "
            f"delivered ({row['delivered_percent']}%), duplicates {row['duplicates']}, misrouted {row['misrouted']}, "
            f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, client CPU {report.client_cpu(row)}"
        )
    return (
        f"{row['accepted']}/{row['broadcasts']} accepted, {row['delivered']:,}/{row['expected']:,} delivered "
        f"({row['delivered_percent']}%), "
        f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms"
    )


def key_metric(row: dict) -> float:
    """What the median run of a case is chosen by."""
    if row["workload"] == "w1":
        return row["messages_per_second"]
    if row["workload"] == "w2":
        return row["connect_rate"]
    if row["workload"] == "w4":
        return row["rss_per_connection_kb"]
    return row["latency_ms"]["p99"]


def median_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """For each case, the run with the median key metric; every run's key metric under "runs"."""
    chosen = []
    for case in runs.values():
        ordered = sorted(case, key=key_metric)
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["runs"] = [key_metric(r) for r in case]
        chosen.append(row)
    return chosen


def render(path: Path) -> int:
    """Table, verdicts and chart of a saved run, with the current report code."""
    saved = json.loads(path.read_text())
    rows = saved["rows"]
    report.ratios_add(rows)
    report.chart_write(path.with_suffix(".png"), rows)
    print(f"{saved['meta']['command']}  ({saved['meta'].get('seconds', '?')} s)\n")
    print(report.table(rows))
    for line in report.verdicts(rows):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    options = options_parse(argv)
    if options.render:
        return render(options.render)
    options.out.mkdir(parents=True, exist_ok=True)
    logs = options.out / "logs"
    server_cores, client_cores = cpu_split()
    if client_cores:
        os.sched_setaffinity(0, client_cores)
    meta = {
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "server_cores": sorted(server_cores) if server_cores else None,
        "client_cores": sorted(client_cores) if client_cores else None,
        "open_files_limit": open_files_raise(),
    }
    redis = redis_start(cores=server_cores, log_dir=logs)
    redis_url = f"redis://127.0.0.1:{redis.port}/0" if redis else None
    runs: dict[str, list[dict]] = {}
    failures: list[str] = []
    began = time.monotonic()
    try:
        every_core = set(STARTING_CORES) if server_cores else None
        plan = steps_plan(options, redis_url=redis_url, redis=redis, every_core=every_core)
        progress = Progress(len(plan) * options.repeat)
        for _ in range(options.repeat):
            for label, call in plan:
                progress.begin(label)
                try:
                    row = call(progress.say, server_cores, logs)
                except Exception as error:  # one failed case must not lose the others
                    progress.end(f"FAILED: {type(error).__name__}: {error}")
                    failures.append(f"{label}: {type(error).__name__}: {error}")
                    continue
                uses_redis = (redis_url and not options.no_redis) or row["workload"] in ("w3", "w4", "w5", "w6")
                row["channel_layer"] = "redis pub/sub" if uses_redis else "in-memory"
                runs.setdefault(label, []).append(row)
                progress.end(summary(row))
                report.json_write(options.out / "latest.json", rows=median_rows(runs), meta=meta)
    finally:
        if redis is not None:
            redis.stop()
    good = median_rows(runs)
    meta["failures"] = failures
    report.ratios_add(good)
    meta["seconds"] = round(time.monotonic() - began, 1)
    report.json_write(options.out / "latest.json", rows=good, meta=meta)
    charted = report.chart_write(options.out / "latest.png", good)
    print(report.table(good))
    for line in report.verdicts(good):
        print(line)
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"\n{len(good)} cases ({options.repeat} run(s) each), {len(failures)} failed runs, in {meta['seconds']:.0f}s; "
          f"wrote {options.out / 'latest.json'}" + (f" and {options.out / 'latest.png'}" if charted else ""))  # fmt: skip
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
