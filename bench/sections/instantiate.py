"""instantiate: the time to make a fresh instance of the echo guest (Guest.instantiate),
and a trap plus the next call on a fresh instance against two ordinary calls."""

from __future__ import annotations

import statistics
import time

from bench import report as tables
from bench.measure import timed
from bench.systems import Context, make_host


def run(opts, ctx: Context, report: tables.Report) -> None:
    host = make_host(ctx.root / "cache")
    guest, counter = host.guests[b"echo"], host.guests[b"counter"]
    n, reps = opts.instantiate_iterations, opts.reps
    made = guest.instantiate(1000)
    assert made.handle_request(b"x", 1000).body == b"x"
    timed(lambda: guest.instantiate(1000), min(n, 50), 1)   # warm up
    times = timed(lambda: guest.instantiate(1000), n, reps)

    # In-process, what the worker does on an abort with on_abort = "reinstantiate":
    # the trapping call (the instance is dropped), then the next call on the key
    # makes a fresh instance. Against: two ordinary calls on a live instance.
    keys = iter(range(10**9))

    def trap_then_next() -> None:
        key = b"%d" % next(keys)
        counter.run(key, b"", 1000)          # the key's instance exists (not timed apart)
        start = time.perf_counter_ns()
        trapped = counter.run(key, b"trap", 1000)
        fresh = counter.run(key, b"", 1000)
        elapsed.append((time.perf_counter_ns() - start) / 1000)
        assert trapped.status == 502 and fresh.body == b"1", (trapped, fresh)
        del counter.instances[key]

    def two_plain() -> None:
        key = b"%d" % next(keys)
        counter.run(key, b"", 1000)
        start = time.perf_counter_ns()
        counter.run(key, b"", 1000)
        counter.run(key, b"", 1000)
        elapsed.append((time.perf_counter_ns() - start) / 1000)
        del counter.instances[key]

    rounds = max(50, n // 5)
    elapsed: list[float] = []
    for _ in range(rounds):
        trap_then_next()
    trap_us = statistics.median(elapsed)
    elapsed = []
    for _ in range(rounds):
        two_plain()
    plain_us = statistics.median(elapsed)
    tables.instantiate(report, opts, times, trap_us, plain_us, rounds)
