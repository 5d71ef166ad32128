#!/usr/bin/env python3
"""The part-3 targets table, computed from one run's JSON files.

usage: tools/perf-targets.py BENCH.json APPS.json

BENCH.json is `ssock-bench --json-out`, APPS.json `tools/apps-bench.py
--json-out`, both from the same run (tools/perf-report.sh makes them).
Prints a Markdown table: each target, the kernel's figure, ssock's, the
ratio, and whether the target is met. Nothing here is typed in by hand but
the targets themselves."""

import json
import statistics
import sys


def bench_cell(bench, test, transport="direct"):
    for r in bench["results"]:
        if r["test"] == test and r["family"] != "cpu":
            by = {t["transport"]: t for t in r["transports"]}
            return by["kernel"]["median"], by[transport]["median"]
    raise SystemExit(f"{test} is not in the ssock-bench JSON")


def apps_cell(apps, key):
    by = apps["results"][key]
    return statistics.median(by["kernel"]), statistics.median(by["ssock"])


def apps_row(apps, key):
    """The kernel's and ssock's medians, and the ratio cell: ssock/kernel
    of the medians, then the range of each round's own ratio (kernel and
    ssock ran one after the other in a round, so a pair shares the
    machine's state at that moment), e.g. `0.98x (rounds 0.91-1.05)`."""
    k, s = apps_cell(apps, key)
    by = apps["results"][key]
    pairs = [b / a for a, b in zip(by["kernel"], by["ssock"]) if a and b]
    if len(pairs) < 2:
        return k, s, f"{s / k:.2f}x"
    return k, s, f"{s / k:.2f}x (rounds {min(pairs):.2f}-{max(pairs):.2f})"


def main():
    bench = json.load(open(sys.argv[1]))
    apps = json.load(open(sys.argv[2]))
    rows = []

    def add(what, target, unit, kernel, ssock, ratio, met):
        rows.append((what, target, f"{kernel:,.2f} {unit}", f"{ssock:,.2f} {unit}", ratio,
                     "yes" if met else "**no**"))

    k, s = apps_cell(apps, "sockperf ping-pong 14 B (us)")
    add("sockperf TCP ping-pong 14 B, half round trip", "at least 20x lower", "us", k, s,
        f"{k / s:.1f}x lower", k / s >= 20)
    # The claim must survive a faster kernel: against the kernel's best
    # case here (both sides busy-polling), ssock as it runs by default.
    k, _ = apps_cell(apps, "sockperf 14 B, both busy-polling (us)")
    _, s = apps_cell(apps, "sockperf ping-pong 14 B (us)")
    add("the same against the kernel busy-polling (both sides, --nonblocked --timeout 0)",
        "at least 5x lower", "us", k, s, f"{k / s:.1f}x lower", k / s >= 5)
    k, s, r = apps_row(apps, "sockperf 14 B, SSOCK_SPIN_US=0 (us)")
    add("the same with SSOCK_SPIN_US=0 on both sides", "at most 0.7x kernel", "us", k, s,
        r, s / k <= 0.7)
    k, s, r = apps_row(apps, "iperf3 -t 3 (Gbit/s)")
    add("iperf3 -t 3 throughput", "at least 2.5x", "Gbit/s", k, s, r, s / k >= 2.5)
    k, s = bench_cell(bench, "stream 64 KiB writes")
    add("ssock-bench streaming, 64 KiB writes", "at least 2.5x", "GB/s", k, s, f"{s / k:.2f}x",
        s / k >= 2.5)
    k, s, r = apps_row(apps, "redis GET -c 1 (req/s)")
    add("redis-benchmark GET -c 1", "at least 2x", "req/s", k, s, r, s / k >= 2)
    k, s, r = apps_row(apps, "redis GET -c 50 -P 16 (req/s)")
    add("redis-benchmark GET -c 50 -P 16", "at least 1.3x", "req/s", k, s, r,
        s / k >= 1.3)
    k, s = apps_cell(apps, "idle pair, CPU ms in 2 s")
    # "No CPU at all": under 1% of one core over the 2 s (20 ms), which is
    # what process start-up noise and the spin budget can leave.
    add("idle connected pair (CPU of both processes over 2 s)", "no busy loop (< 20 ms)", "ms",
        k, s, "-", s < 20)
    # A connection per request, as users measure web servers: devd's
    # default short_lived policy keeps such connections on kernel TCP.
    k, s, r = apps_row(apps, "ab -c 20 without keep-alive, nginx (req/s)")
    add("ab -c 20 without keep-alive against nginx (short_lived policy on, devd's default)",
        "at least 1.0x", "req/s", k, s, r, s / k >= 1.0)
    for server in ("apache2 prefork", "gunicorn -w 2", "node"):
        k, s, r = apps_row(apps, f"ab -c 20 without keep-alive, {server} (req/s)")
        add(f"ab -c 20 without keep-alive against {server} (short_lived policy on)",
            "at least 1.0x", "req/s", k, s, r, s / k >= 1.0)
    k, s, r = apps_row(apps, "pgbench -C -S -c 4, a connection per transaction (tps)")
    add("pgbench -C -S -c 4 against PostgreSQL (a connection per transaction)",
        "at least 1.0x", "tps", k, s, r, s / k >= 1.0)
    k, s, r = apps_row(apps, "pgbench -S -c 4 (tps)")
    add("pgbench -S -c 4 against PostgreSQL (persistent connections)", "at least 1.0x", "tps",
        k, s, r, s / k >= 1.0)
    k, s, r = apps_row(apps, "memaslap -T 2 -c 16, memcached (ops/s)")
    add("memaslap -T 2 -c 16 against memcached", "at least 1.0x", "ops/s", k, s,
        r, s / k >= 1.0)
    k, s, r = apps_row(apps, "OpenMPI TCP 1 MiB messages (MB/s)")
    add("OpenMPI TCP (2 ranks, no shared memory), 1 MiB messages", "at least 1.0x", "MB/s", k,
        s, r, s / k >= 1.0)
    k, s, r = apps_row(apps, "OpenMPI TCP 1 B half round trip (us)")
    add("OpenMPI TCP, 1 B half round trip", "not worse (at most 1.0x)", "us", k, s,
        r, s / k <= 1.0)
    k, s, r = apps_row(apps, "ab -k -c 20, nginx (req/s)")
    add("ab -k -c 20 against nginx (keep-alive)", "at least 1.0x", "req/s", k, s,
        r, s / k >= 1.0)
    k, s, r = apps_row(apps, "wrk -t 2 -c 50 keep-alive, nginx (req/s)")
    add("wrk -t 2 -c 50 against nginx (keep-alive, no socket errors)", "at least 1.5x", "req/s",
        k, s, r, s / k >= 1.5)
    k, s, r = apps_row(apps, "wrk -t 2 -c 500 keep-alive, nginx (req/s)")
    add("wrk -t 2 -c 500 against nginx (keep-alive, no socket errors)", "at least 1.0x",
        "req/s", k, s, r, s / k >= 1.0)
    k, s, r = apps_row(apps, "fds per connection (512 more fds / connections more held)")
    add("fds per accelerated connection (a client limited to 512, then 1024 fds)",
        "at most 2 (the socket included)", "fds", k, s, r, s <= 2)
    k, s = bench_cell(bench, "setup: connect, 1 B each way, close")
    add("ssock-bench setup, Direct forced (policy off): connect, 1 B exchange, close",
        "at least 1.0x", "k conn/s", k, s, f"{s / k:.2f}x", s / k >= 1.0)
    print("| what | target | kernel TCP | ssock | ratio | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
