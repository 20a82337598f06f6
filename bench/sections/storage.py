"""storage: durable state (docs/state.md), a counter that does one kv_get and one kv_put per
request, committed with fsync and with os durability, beside the same counter in memory."""

from __future__ import annotations

from corral.client import loadgen

from bench import report as tables
from bench.measure import check
from bench.systems import COUNTER, COUNTER_DURABLE, Context, Corral


def run(opts, ctx: Context, report: tables.Report) -> None:
    procs, endpoints = ctx.procs, ctx.endpoints
    services = {"memory": {"module": str(COUNTER)},
                "fsync": {"module": str(COUNTER_DURABLE), "state_durability": "fsync"},
                "os": {"module": str(COUNTER_DURABLE), "state_durability": "os"}}
    daemon = Corral(procs, endpoints, opts, name="storage", apps=services)
    daemon.start()
    requests = max(opts.requests // 4, 1000)
    results: dict[str, list[loadgen.Result]] = {name: [] for name in services}
    try:
        for name in services:   # warm: instances made, databases open
            check(loadgen.run(daemon.endpoint, name.encode(), b"incr", requests=200, concurrency=opts.concurrency,
                              clients=1, key=None, progress=False, framing_name="native"), name)
        for _ in range(opts.rounds):
            for name in services:
                result = loadgen.run(daemon.endpoint, name.encode(), b"incr", requests=requests,
                                     concurrency=opts.concurrency, clients=opts.clients, key=None,
                                     progress=opts.progress, framing_name="native")
                check(result, f"storage {name}")
                results[name].append(result)
        state = {s["name"]: s.get("state", {}) for s in daemon.status()["services"]}
    finally:
        daemon.stop()
    tables.storage(report, opts, requests, results, state)
