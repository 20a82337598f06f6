"""confinement: what the second wall costs (docs/confinement.md). The same closed-loop load
against two corral daemons in interleaved rounds, one with `confinement = "off"` and one
with `"require"` (seccomp filter + Landlock): req/s and p99, and the ratio (the filter runs
on every system call a worker makes); and a worker's start time (spawn to READY) with and
without, over respawns after aborts."""

from __future__ import annotations

import json
import statistics
import time

from corral.client import Client, loadgen

from bench import report as tables
from bench.measure import check, median_result
from bench.systems import ECHO, BenchError, Context, Corral

FAULTS = ECHO.parent / "faults" / "faults.wat"
# Aborts of different bodies: the same body aborting twice is quarantined (circuit.py).
ABORTS = (b"unreachable", b"oob", b"div0", b"badptr", b"badstatus", b"badlen", b"empty")


def run(opts, ctx: Context, report: tables.Report) -> None:
    apps = {"echo": {"module": str(ECHO)}, "faults": {"module": str(FAULTS), "on_abort": "respawn"}}
    systems = {}
    for mode in ("off", "require"):
        opts_mode = _with_setting(opts, confinement=mode)
        systems[mode] = Corral(ctx.procs, ctx.endpoints, opts_mode, name=f"confinement-{mode}", apps=apps,
                               label=f"c  corral, confinement = {mode}")
    runs: dict[str, list[loadgen.Result]] = {mode: [] for mode in systems}
    starts: dict[str, list[float]] = {mode: [] for mode in systems}
    try:
        for system in systems.values():
            system.start()
        for _ in range(opts.rounds):
            for mode, system in systems.items():
                result = loadgen.run(system.endpoint, b"echo", opts.body.encode(), requests=opts.requests,
                                     concurrency=opts.concurrency, clients=opts.clients, progress=opts.progress)
                check(result, system.label)
                runs[mode].append(result)
        for body in ABORTS[:max(3, min(opts.reps, len(ABORTS)))]:
            for mode, system in systems.items():
                starts[mode].append(_respawn_ms(system, body))
    finally:
        for system in systems.values():
            system.stop()
    _table(report, opts, runs, starts)


def _with_setting(opts, **settings):
    import copy
    clone = copy.copy(opts)
    clone.corral_set = {**opts.corral_set, **settings}
    return clone


def _respawn_ms(system: Corral, body: bytes, timeout: float = 30.0) -> float:
    """Abort a request (the worker retires and a new one starts): the new worker's spawn-to-READY."""
    seen = _ready_events(system)
    client = Client(system.endpoint)
    try:
        reply = client.call("faults", body, timeout=10)
        if reply.status != 502:
            raise BenchError(f"{system.name}: an abort answered {reply.status}")
    finally:
        client.close()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fresh = _ready_events(system)[len(seen):]
        if fresh:
            return float(fresh[0]["startup_ms"])
        time.sleep(0.02)
    raise BenchError(f"{system.name}: no worker ready again within {timeout:g} s:\n{system.log_tail()}")


def _ready_events(system: Corral) -> list[dict]:
    events = []
    for line in system.log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "worker.ready" and "startup_ms" in event:
            events.append(event)
    return events


def _table(report: tables.Report, opts, runs: dict, starts: dict) -> None:
    med = {mode: median_result(rs) for mode, rs in runs.items()}
    off, on = med["off"], med["require"]
    report.out(f"== Confinement: seccomp + Landlock against none, {opts.requests} requests per run, "
               f"{opts.rounds} round(s) interleaved, median shown; worker start over {len(starts['off'])} "
               f"respawns each")
    report.out(f"{'confinement':<14} {'req/s':>9} {'us/req':>8} {'p50 ms':>8} {'p99 ms':>8} {'start ms':>9}")
    for mode, result in med.items():
        report.out(f"{mode:<14} {result.throughput:>9.0f} {1e6 / result.throughput:>8.1f} "
                   f"{result.pct(50):>8.3f} {result.pct(99):>8.3f} {statistics.median(starts[mode]):>9.0f}")
    report.out(f"require / off: throughput {on.throughput / off.throughput:.3f}x, p99 "
               f"{on.pct(99) / off.pct(99):.2f}x, worker start "
               f"{statistics.median(starts['require']) - statistics.median(starts['off']):+.0f} ms")
    report.data["confinement"] = {
        "req_s": {mode: r.throughput for mode, r in med.items()},
        "p99_ms": {mode: r.pct(99) for mode, r in med.items()},
        "start_ms": {mode: statistics.median(values) for mode, values in starts.items()},
        "ratio_throughput": on.throughput / off.throughput}
