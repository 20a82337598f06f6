"""cluster: durable state on PostgreSQL (docs/cluster.md) beside SQLite, in the same run.

The durable counter (one kv_get and one kv_put per request, each request its
own commit unless the worker groups them) on three stores: SQLite with
state_durability "os" and "fsync" (one daemon, two services) and PostgreSQL
15 started from its binaries in a temp dir with fsync on (tests/pgserver.py;
a second daemon with [state] backend = "postgresql", over its unix socket).
Printed as ratios against SQLite "fsync". Rounds are interleaved.

Not measured yet: remote workers over tcp+CURVE and the broker's CPU per
request (the host side of issue 18 is not built).
"""

from __future__ import annotations

import sys
from pathlib import Path

from corral.client import loadgen

from bench import report as tables
from bench.measure import check, median_result
from bench.systems import COUNTER_DURABLE, Context, Corral


TESTS = Path(__file__).resolve().parents[2] / "tests"   # tests/pgserver.py: the fixture's server


def run(opts, ctx: Context, report: tables.Report) -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from pgserver import PgServer
    server = PgServer(durable=True)
    daemons = []
    try:
        server.start()
        dsn = server.dsn(server.create_database("bench"))
        sqlite = Corral(ctx.procs, ctx.endpoints, opts, name="cluster-sqlite",
                        apps={"fsync": {"module": str(COUNTER_DURABLE), "state_durability": "fsync"},
                              "os": {"module": str(COUNTER_DURABLE), "state_durability": "os"}})
        pg = Corral(ctx.procs, ctx.endpoints, opts, name="cluster-pg",
                    apps={"postgresql": {"module": str(COUNTER_DURABLE)}},
                    extra={"state": {"backend": "postgresql", "dsn": dsn}})
        daemons = [sqlite, pg]
        for daemon in daemons:
            daemon.start()
        where = {"os": sqlite, "fsync": sqlite, "postgresql": pg}
        requests = max(opts.requests // 4, 1000)

        def load(name: str, n: int, progress: bool) -> loadgen.Result:
            return loadgen.run(where[name].endpoint, name.encode(), b"incr", requests=n,
                               concurrency=opts.concurrency, clients=opts.clients, key=None,
                               progress=progress, framing_name="native")

        for name in where:   # warm: instances made, databases open
            check(load(name, 200, False), name)
        results: dict[str, list[loadgen.Result]] = {name: [] for name in where}
        for _ in range(opts.rounds):
            for name in where:
                result = load(name, requests, opts.progress)
                check(result, f"cluster {name}")
                results[name].append(result)
        commits = {name: {s["name"]: s.get("state", {}) for s in where[name].status()["services"]}
                   .get(name, {}).get("commits", "-") for name in where}
    finally:
        for daemon in daemons:
            daemon.stop()
        server.destroy()
    medians = {name: median_result(runs) for name, runs in results.items()}
    base = medians["fsync"].throughput
    report.out(f"== Cluster: durable state on PostgreSQL beside SQLite, the durable counter, {opts.workers} "
               f"workers ({opts.rounds} rounds of {requests} requests, median; {opts.concurrency} in flight)")
    report.out(f"{'store':<44} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8} {'commits':>9}")
    labels = {"fsync": "SQLite, state_durability = fsync", "os": "SQLite, state_durability = os",
              "postgresql": "PostgreSQL (fsync on, unix socket)"}
    for name in ("fsync", "os", "postgresql"):
        result = medians[name]
        report.out(f"{labels[name]:<44} {result.throughput:>9.0f} {result.throughput / base:>6.2f}x "
                   f"{result.pct(50):>8.2f} {result.pct(99):>8.2f} {commits[name]:>9}")
    report.out("(remote workers over tcp+CURVE and the broker's CPU per request: not measured yet)")
    report.data["cluster"] = {name: tables.summary(result) for name, result in medians.items()}
