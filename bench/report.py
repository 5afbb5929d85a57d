"""Ratios to the baseline, the text table, the JSON file and the PNG chart."""

import json
import statistics
from pathlib import Path
from typing import Any

Row = dict[str, Any]

#: The issue's targets, as (metric, bound) per workload: ratios of the project to its reference.
TARGETS = {
    "w1_throughput": 0.9,  # >= x baseline
    "w1_p99": 1.25,  # <= x baseline
    "w2_rss": 1.5,  # <= x baseline
    "w2_connect_rate": 0.7,  # >= x baseline
    "w3_p99": 2.0,  # <= x raw fan-out ceiling
    "w3_uvicorn_p99": 0.5,  # the project on uvicorn: <= x the project on daphne
}
#: W1: the project on uvicorn at least x the project on daphne, by connection count.
W1_UVICORN_VS_DAPHNE = {50: 2.5, 1000: 2.0}
#: W4: RSS per idle connection of the whole `serve --workers N` group, at most (Centrifugo's published figure).
W4_KB_PER_CONNECTION = 30.0


def _find(rows: list[Row], **match: Any) -> Row | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def ratios_add(rows: list[Row]) -> None:
    """Give every row its ratios to the reference of the same run (baseline; raw fan-out for W3)."""
    for row in rows:
        if row["workload"] == "w1":
            base = _find(rows, workload="w1", app="baseline", server=row["server"], connections=row["connections"])
            if base and base["messages_per_second"] and base["rtt_ms"]["p99"]:
                row["vs_baseline"] = {
                    "throughput": round(row["messages_per_second"] / base["messages_per_second"], 3),
                    "p99": round(row["rtt_ms"]["p99"] / base["rtt_ms"]["p99"], 3),
                }
                paired = paired_ratio(row, base)
                if paired is not None:
                    row["vs_baseline"]["throughput_paired"] = paired
                if base.get("server_us_per_message") and row.get("server_us_per_message"):
                    row["vs_baseline"]["cpu_per_message"] = round(
                        row["server_us_per_message"] / base["server_us_per_message"], 3
                    )
        elif row["workload"] == "w2":
            base = _find(rows, workload="w2", app="baseline", server=row["server"])
            if base and base["rss_per_connection_kb"] > 0 and base["connect_rate"]:
                row["vs_baseline"] = {
                    "rss_per_connection": round(row["rss_per_connection_kb"] / base["rss_per_connection_kb"], 3),
                    "connect_rate": round(row["connect_rate"] / base["connect_rate"], 3),
                }
        elif row["workload"] == "w3":
            base = _find(rows, workload="w3", app="rawfanout", server=row.get("server", "daphne"))
            if base and base["latency_ms"]["p99"]:
                row["vs_baseline"] = {"p99": round(row["latency_ms"]["p99"] / base["latency_ms"]["p99"], 3)}


def paired_ratio(row: Row, base: Row) -> float | None:
    """The median of run-by-run throughput ratios: run i of a case against run i of its reference, made
    in the same round minutes apart, so a machine that drifts between rounds cancels out."""
    runs, base_runs = row.get("runs") or [], base.get("runs") or []
    if len(runs) < 2 or len(runs) != len(base_runs) or not all(base_runs):
        return None
    return round(statistics.median(run / base_run for run, base_run in zip(runs, base_runs, strict=True)), 3)


def verdicts(rows: list[Row]) -> list[str]:
    """One line per target for the project on daphne: measured ratio, bound, met or missed."""
    lines = []

    def check(name: str, value: float, bound: float, at_least: bool) -> str:
        met = value >= bound if at_least else value <= bound
        sign = ">=" if at_least else "<="
        return f"{name}: {value:.2f}x (target {sign} {bound}x) {'met' if met else 'MISSED'}"

    for row in rows:
        if row["workload"] == "w1" and row.get("app") == "project" and "vs_baseline" in row:
            lines += w1_verdicts(row, rows, check)
    for row in rows:
        if row.get("app") != "project" or row.get("server") != "daphne" or "vs_baseline" not in row:
            continue
        ratio = row["vs_baseline"]
        if row["workload"] == "w1":
            continue
        elif row["workload"] == "w2":
            lines.append(check("W2 RSS/connection", ratio["rss_per_connection"], TARGETS["w2_rss"], False))
            lines.append(check("W2 connect rate", ratio["connect_rate"], TARGETS["w2_connect_rate"], True))
            held = row["opened"] == row["connections"] and row["answered"] == row["connections"] and not row["errors"]
            lines.append(f"W2 {row['connections']:,} held and answering, 0 errors: {'met' if held else 'MISSED'}")
        elif row["workload"] == "w3":
            lines.append(check("W3 p99 delivery latency vs raw ceiling", ratio["p99"], TARGETS["w3_p99"], False))
    for row in rows:
        if row.get("workload") == "w3" and row.get("app") == "project":
            lines.append(w3_delivery_verdict(row))
    on_daphne = _find(rows, workload="w3", app="project", server="daphne")
    on_uvicorn = _find(rows, workload="w3", app="project", server="uvicorn")
    if on_daphne and on_uvicorn and on_daphne["latency_ms"]["p99"]:
        ratio = on_uvicorn["latency_ms"]["p99"] / on_daphne["latency_ms"]["p99"]
        lines.append(check("W3 p99 on uvicorn vs on daphne", ratio, TARGETS["w3_uvicorn_p99"], False))
    for row in rows:
        if row.get("workload") == "w4":
            lines.append(w4_capacity_verdict(row))
    for row in rows:
        if row.get("workload") == "w5":
            lines.append(w5_delivery_verdict(row))
    for row in rows:
        if row.get("workload") == "w6":
            lines.append(w6_delivery_verdict(row))
    return lines


def w1_verdicts(row: Row, rows: list[Row], check: Any) -> list[str]:
    """Throughput against the raw app on the same server (by the paired runs where there are several),
    p99 on daphne, and uvicorn against daphne at the sizes the targets name."""
    ratio, server, connections = row["vs_baseline"], row["server"], row["connections"]
    label = f"W1 {server} {connections} conns"
    paired = ratio.get("throughput_paired")
    if paired is None:
        lines = [check(f"{label} throughput", ratio["throughput"], TARGETS["w1_throughput"], True)]
    else:
        name = f"{label} throughput (medians {ratio['throughput']:.2f}x; paired runs)"
        lines = [check(name, paired, TARGETS["w1_throughput"], True)]
    if server == "daphne":
        lines.append(check(f"{label} p99 RTT", ratio["p99"], TARGETS["w1_p99"], False))
    bound = W1_UVICORN_VS_DAPHNE.get(connections)
    on_daphne = _find(rows, workload="w1", app="project", server="daphne", connections=connections)
    if server == "uvicorn" and bound is not None and on_daphne and on_daphne["messages_per_second"]:
        speedup = row["messages_per_second"] / on_daphne["messages_per_second"]
        lines.append(check(f"W1 {connections} conns project on uvicorn vs on daphne", speedup, bound, True))
    return lines


def w3_delivery_verdict(row: Row) -> str:
    """100% means every broadcast accepted by the API (202) and delivered to every client."""
    sent, accepted = row["broadcasts"], row["accepted"]
    full = accepted == sent and row["delivered"] == row["expected"] and row["expected"] > 0
    return (
        f"W3 {row.get('server', 'daphne')}: {accepted}/{sent} broadcasts accepted, {row['delivered_percent']}% of those delivered "
        f"(target: all accepted, 100% delivered) {'met' if full else 'MISSED'}"
    )


def w4_capacity_verdict(row: Row) -> str:
    """Every connection asked for held and answering `ping`, at most W4_KB_PER_CONNECTION of RSS each."""
    full = (
        row["held"] == row["connections"]
        and row["answered"] == row["connections"]
        and not row["errors"]
        and row["rss_per_connection_kb"] <= W4_KB_PER_CONNECTION
    )
    return (
        f"W4 {row['server']}: {row['held']:,}/{row['connections']:,} held on {row['workers']} workers, "
        f"{row['answered']:,} answered ping, {row['rss_per_connection_kb']:.1f} KB/connection "
        f"(target: all held and answering, <= {W4_KB_PER_CONNECTION:g} KB) {'met' if full else 'MISSED'}"
    )


def errors_cell(counts: dict[str, int]) -> str:
    """Counts by kind (`timeout 3, EADDRNOTAVAIL 1`), or "-"."""
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())) or "-"


def w5_delivery_verdict(row: Row) -> str:
    """100% means every client subscribed, every publication accepted (202) and delivered exactly once, to
    exactly the connections subscribed to its topic."""
    full = (
        row["subscribed"] == row["clients"]
        and row["accepted"] == row["sent"]
        and row["delivered"] == row["expected"] > 0
        and not row["duplicates"]
        and not row["misrouted"]
    )
    return (
        f"W5 {row['server']}: {row['subscribed']:,}/{row['clients']:,} subscribed, {row['accepted']}/{row['sent']} "
        f"publications accepted, {row['delivered_percent']}% of those delivered, {row['duplicates']} duplicates, "
        f"{row['misrouted']} misrouted (target: all accepted, 100% delivered exactly once) {'met' if full else 'MISSED'}"
    )


#: With a Redis restart (W6 --w6-redis-restart): publishing accepted again within this many seconds of Redis being back.
W6_RESUME_SECONDS = 5.0


def w6_delivery_verdict(row: Row) -> str:
    """The delivery checker: no gap or duplicate after `recovered: true`, every client at the last offset at the
    end; with Redis up, every publication accepted and no `recovered: false`; with a Redis restart, every
    `since` from before it answered `recovered: false`, and a 202 again within W6_RESUME_SECONDS."""
    restart = row.get("redis_restart")
    common = row["violations"] == 0 and row["caught_up"] == row["clients"] and row["sent"] > 0
    if restart is None:
        full = common and row["accepted"] == row["sent"] and row["recovered_false"] == 0
        target = "0 violations, 0 recovered:false, all caught up"
    else:
        resumed = restart["first_202_after_back_s"]
        full = (
            common
            and restart["old_since_answers"] > 0
            and restart["old_since_recovered_true"] == 0
            and row["recovered_false_same_epoch"] == 0
            and resumed is not None
            and resumed <= W6_RESUME_SECONDS
        )
        target = (
            f"0 violations, every old since recovered:false ({restart['old_since_answers']} answered), "
            f"a 202 within {W6_RESUME_SECONDS:g} s of Redis back (after {resumed} s), all caught up"
        )
    return (
        f"W6 {row['server']}: {row['accepted']}/{row['sent']} publications accepted, {row['violations']} violations "
        f"(gaps, duplicates), {row['recovered_true']} recovered / {row['recovered_false']} not, "
        f"{row['caught_up']}/{row['clients']} clients at the last offset "
        f"(target: {target}) {'met' if full else 'MISSED'}"
    )


def redis_restart_cell(row: Row) -> str:
    """W6 with --w6-redis-restart: old `since`s answered and how many were wrongly recovered, and the first 202 after."""
    restart = row.get("redis_restart")
    if restart is None:
        return "-"
    return (
        f"{restart['old_since_answers']} old since, {restart['old_since_recovered_true']} recovered; "
        f"202 after {restart['first_202_after_back_s']} s"
    )


def drops_cell(row: Row) -> str:
    """W6's drops by kind: clean close, abort (no close frame), node SIGKILLed, and any other close code."""
    return ", ".join(f"{kind} {count}" for kind, count in row["drops"].items()) or "-"


def statuses_cell(row: Row) -> str:
    """Every answer of the publish API that was not 202, by status (0: no answer), or "-"."""
    refused = {code: count for code, count in row["statuses"].items() if code != "202"}
    return ", ".join(f"{code}: {count}" for code, count in refused.items()) or "-"


def _ratio(row: Row, key: str) -> str:
    value = row.get("vs_baseline", {}).get(key)
    return f"{value:.2f}x" if value is not None else "-"


def paired_mark(row: Row) -> str:
    """After the ratio of medians: the median of the paired runs' ratios, where there are several."""
    paired = row.get("vs_baseline", {}).get("throughput_paired")
    return f" ({paired:.2f}x paired)" if paired is not None and row["app"] != "baseline" else ""


def client_cpu(row: Row) -> str:
    """The client CPU cell: % of the client's cores, marked when the client limited the figure."""
    return f"{row['client_cpu_percent']:.0f}%" + (" client-bound" if row.get("client_bound") else "")


def cut_short_mark(row: Row) -> str:
    """After a W1 rate: a server limit closed connections during the run (see the errors column)."""
    return " cut short" if row.get("cut_short") else ""


def table(rows: list[Row]) -> str:
    """A Markdown table per workload."""
    out: list[str] = []
    w1 = [row for row in rows if row["workload"] == "w1"]
    if w1:
        out += [
            "W1 ping/pong (closed loop)",
            "",
            "| server | app | conns | msg/s | vs base | RTT p50 ms | p90 | p99 | vs base | max | errors | client CPU | server CPU | server µs/msg | vs base |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in w1:
            rtt = r["rtt_ms"]
            out.append(
                f"| {r['server']} | {r['app']} | {r['connections']} | {r['messages_per_second']:,.0f}{cut_short_mark(r)} | {_ratio(r, 'throughput')}{paired_mark(r)} "
                f"| {rtt['p50']:.2f} | {rtt['p90']:.2f} | {rtt['p99']:.2f} | {_ratio(r, 'p99')} | {rtt['max']:.1f} "
                f"| {r['errors']} | {client_cpu(r)} | {r['server_cpu_percent']:.0f}% "
                f"| {r['server_us_per_message']:.0f} | {_ratio(r, 'cpu_per_message')} |"
            )
        out.append("")
    w2 = [row for row in rows if row["workload"] == "w2"]
    if w2:
        out += [
            "W2 capacity (one node)",
            "",
            "| server | app | held | connect/s | vs base | RSS before MB | after MB | KB/conn | vs base | answered ping | errors | client CPU |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in w2:
            out.append(
                f"| {r['server']} | {r['app']} | {r['opened']:,}/{r['connections']:,} | {r['connect_rate']:,.0f} | {_ratio(r, 'connect_rate')} "
                f"| {r['rss_before_mb']} | {r['rss_after_mb']} | {r['rss_per_connection_kb']:.1f} | {_ratio(r, 'rss_per_connection')} "
                f"| {r['answered']:,} | {r['errors']} | {client_cpu(r)} |"
            )
        out.append("")
    w4 = [row for row in rows if row["workload"] == "w4"]
    if w4:
        out += [
            "W4 capacity (one `serve --workers N` process group, idle connections, then one ping each)",
            "",
            "| server | workers | client processes | source addresses | held/asked | connect s | connect/s | RSS before MB | after MB | KB/conn | PSS KB/conn | per worker | answered/pinged | errors | client KB/conn | client CPU | server CPU | idle server CPU | load avg |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|--:|--:|--:|--:|---|",
        ]
        for r in w4:
            errors = {**r["failures"], **{f"closed:{code}": n for code, n in r["dropped"].items()}}
            if r["unanswered"]:
                errors["unanswered"] = r["unanswered"]
            pss = r["pss_per_connection_kb"]
            spread = (
                f"{r['worker_connections_min']:,}-{r['worker_connections_max']:,}"
                if r["worker_connections_min"] is not None
                else "-"
            )
            loads = "/".join(f"{reading[0]:.1f}" for reading in r["load_average"])
            idle = f"{r['server_idle_cpu_percent']:.0f}%" if "server_idle_cpu_percent" in r else "-"
            out.append(
                f"| {r['server']} | {r['workers']} | {r['client_processes']} | {r['source_addresses']} "
                f"| {r['held']:,}/{r['connections']:,} | {r['connect_seconds']:.1f} | {r['connect_rate']:,.0f} "
                f"| {r['rss_before_mb']:,.0f} | {r['rss_after_mb']:,.0f} | {r['rss_per_connection_kb']:.1f} "
                f"| {'-' if pss is None else f'{pss:.1f}'} | {spread} | {r['answered']:,}/{r['pinged']:,} "
                f"| {errors_cell(errors)} | {r['client_rss_per_connection_kb']:.1f} | {client_cpu(r)} "
                f"| {r['server_cpu_percent']:.0f}% | {idle} | {loads} |"
            )
        out.append("")
    w3 = [row for row in rows if row["workload"] == "w3"]
    if w3:
        out += [
            "W3 fan-out (redis-server + nodes, broadcasts through the API)",
            "",
            "| server | app | nodes | clients | connect s | accepted/sent | delivered/expected | % | latency p50 ms | p99 | vs raw | max | client CPU | servers CPU |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in w3:
            lat = r["latency_ms"]
            out.append(
                f"| {r.get('server', 'daphne')} | {r['app']} | {r['nodes']} | {r['opened']:,}/{r['clients']:,} | {r['connect_seconds']:.1f} "
                f"| {r['accepted']}/{r['broadcasts']} | {r['delivered']:,}/{r['expected']:,} | {r['delivered_percent']} | {lat['p50']:.0f} | {lat['p99']:.0f} "
                f"| {_ratio(r, 'p99')} | {lat['max']:.0f} | {client_cpu(r)} | {r['server_cpu_percent']:.0f}% |"
            )
        out.append("")
    w5 = [row for row in rows if row["workload"] == "w5"]
    if w5:
        out += [
            "W5 topics fan-out (redis-server + nodes, token users on user:<i> + public:all, publications through the API)",
            "",
            "| server | nodes | subscribed/clients | subscribe retries | connect s | accepted/sent | not 202 | delivered/expected | % | duplicates | misrouted | latency p50 ms | p99 | max | user p99 | public:all p99 | client CPU | servers CPU |",
            "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in w5:
            lat = r["latency_ms"]
            out.append(
                f"| {r['server']} | {r['nodes']} | {r['subscribed']:,}/{r['clients']:,} | {sum(r['subscribe_retries'].values())} "
                f"| {r['connect_seconds']:.1f} "
                f"| {r['accepted']:,}/{r['sent']:,} | {statuses_cell(r)} | {r['delivered']:,}/{r['expected']:,} "
                f"| {r['delivered_percent']} | {r['duplicates']} | {r['misrouted']} | {lat['p50']:.0f} | {lat['p99']:.0f} "
                f"| {lat['max']:.0f} | {r['latency_user_ms']['p99']:.0f} | {r['latency_public_ms']['p99']:.0f} "
                f"| {client_cpu(r)} | {r['server_cpu_percent']:.0f}% |"
            )
        out.append("")
    w6 = [row for row in rows if row["workload"] == "w6"]
    if w6:
        out += [
            "W6 delivery checker (redis-server + nodes, one topic with history, drops and node SIGKILLs, reconnects with since)",
            "",
            "| server | nodes | clients | publishers | accepted/sent | not 202 | deliveries | caught up | drops | node kills | recovered true / false | violations | Redis restart | latency p50 ms | p99 | recovery p50 ms | p99 | client CPU | servers CPU |",
            "|---|--:|--:|--:|--:|---|--:|--:|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in w6:
            lat, rec = r["latency_ms"], r["recovery_ms"]
            out.append(
                f"| {r['server']} | {r['nodes']} | {r['subscribed']:,}/{r['clients']:,} | {r['publishers']} "
                f"| {r['accepted']:,}/{r['sent']:,} | {statuses_cell(r)} | {r['deliveries']:,} "
                f"| {r['caught_up']:,}/{r['clients']:,} | {drops_cell(r)} | {len(r['node_kills'])} "
                f"| {r['recovered_true']:,} / {r['recovered_false']:,} | {r['violations']} | {redis_restart_cell(r)} "
                f"| {lat['p50']:.0f} | {lat['p99']:.0f} | {rec['p50']:.0f} | {rec['p99']:.0f} "
                f"| {client_cpu(r)} | {r['server_cpu_percent']:.0f}% |"
            )
        out.append("")
    return "\n".join(out)


def json_write(path: Path, *, rows: list[Row], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts(rows)}, indent=2))


def chart_write(path: Path, rows: list[Row]) -> bool:
    """Throughput and latency percentiles per app; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    w1 = [row for row in rows if row["workload"] == "w1"]
    fanouts = [
        (title, [row for row in rows if row["workload"] == workload], sent_key)
        for workload, title, sent_key in (
            ("w3", "W3 broadcast fan-out", "broadcasts"),
            ("w5", "W5 topics fan-out", "sent"),
        )
    ]
    fanouts = [panel for panel in fanouts if panel[1]]
    panels = (2 if w1 else 0) + len(fanouts)
    if not panels:
        return False
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 6), squeeze=False)
    axes = list(axes[0])
    if w1:
        labels = [f"{r['server']} {r['app']} {r['connections']}c" for r in w1]
        ax = axes.pop(0)
        ax.bar(range(len(w1)), [r["messages_per_second"] for r in w1], color="#4a7fb5")
        ax.set_xticks(range(len(w1)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("messages/s")
        ax.set_title("W1 ping/pong throughput")
        ax = axes.pop(0)
        width = 0.27
        for offset, key, color in ((-width, "p50", "#8fbf6f"), (0, "p99", "#e0a030"), (width, "max", "#c04040")):
            ax.bar([i + offset for i in range(len(w1))], [r["rtt_ms"][key] for r in w1], width, label=key, color=color)
        ax.set_xticks(range(len(w1)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("RTT ms (log)")
        ax.set_title("W1 round-trip time")
        ax.legend()
    for title, fanout, sent_key in fanouts:
        ax = axes.pop(0)
        labels = [
            f"{r.get('server', 'daphne')} {r['app']}\n{r['accepted']}/{r[sent_key]} accepted\n"
            f"{r['delivered_percent']}% delivered"
            for r in fanout
        ]
        width = 0.27
        for offset, key, color in ((-width, "p50", "#8fbf6f"), (0, "p99", "#e0a030"), (width, "max", "#c04040")):
            ax.bar(
                [i + offset for i in range(len(fanout))],
                [r["latency_ms"][key] for r in fanout],
                width,
                label=key,
                color=color,
            )
        ax.set_xticks(range(len(fanout)), labels, fontsize=8)
        ax.set_ylabel("delivery latency ms")
        ax.set_title(title)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
