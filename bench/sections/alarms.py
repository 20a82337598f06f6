"""alarms: 10,000 alarms due in the same second (docs/alarms.md), through the real daemon.

Sets N alarms on N keys of a keyed alarm guest (guests/alarm.wat), all due at
the same wall-clock second; measures the time from that second until the
last one has fired (its run committed), and the p99 of ordinary requests to
an echo service on the same workers while they fire, beside the same load
run earlier in the same run without alarms."""

from __future__ import annotations

import threading
import time

from corral.client import Client, loadgen

from bench import report as tables
from bench.measure import check, median_result
from bench.systems import ECHO, GUESTS, BenchError, Context, Corral

ALARM = GUESTS / "alarm.wat"
WINDOW = 256   # alarm_set requests in flight while setting them


def set_alarms(endpoint: str, keys: list[str], at_ms: int) -> None:
    client = Client(endpoint)
    try:
        pending = []
        for key in keys:
            pending.append(client.send("alarms", b"s%d" % at_ms, key=key))
            if len(pending) >= WINDOW:
                reply = client.wait(pending.pop(0), timeout=30)
                if reply.status != 200:
                    raise BenchError(f"alarm_set answered {reply.status}: {reply.body[:200]!r}")
        for request in pending:
            client.wait(request, timeout=30)
    finally:
        client.close()


def alarm_counts(daemon: Corral) -> dict:
    return next(s for s in daemon.status()["services"] if s["name"] == "alarms").get("alarms", {})


def run(opts, ctx: Context, report: tables.Report) -> None:
    count = 1000 if opts.quick else 10_000
    # max_keys stays at its default (1024 per worker): most keys are evicted before their alarm
    # fires, so their runs make fresh instances, as they would in a real deployment.
    apps = {"alarms": {"module": str(ALARM), "instances": "keyed"},
            "echo": {"module": str(ECHO)}}
    daemon = Corral(ctx.procs, ctx.endpoints, opts, name="alarms", apps=apps)
    daemon.start()
    # Short loads, repeated: while the alarms fire, one after another until the last has fired;
    # without them, as many times before (the median run of each is shown).
    load = dict(requests=1000, concurrency=4, clients=1, key=None, progress=False, framing_name="native",
                spawn="thread", warmup=0)
    try:
        check(loadgen.run(daemon.endpoint, b"echo", b"hello", requests=500, concurrency=4, clients=1, key=None,
                          progress=False, framing_name="native"), "alarms warm-up")
        quiet = [loadgen.run(daemon.endpoint, b"echo", opts.body.encode(), **load) for _ in range(5)]
        for result in quiet:
            check(result, "echo without alarms")
        # How long setting them takes, from the first 500: the due second comes after the rest.
        keys = [f"k{i}" for i in range(count)]
        started = time.time()
        set_alarms(daemon.endpoint, keys[:500], int(started * 1000) + 3_600_000)
        per_alarm = (time.time() - started) / 500
        due_ms = (int((time.time() + per_alarm * count * 1.5 + 1.0) * 1000) // 1000 + 1) * 1000   # a whole second
        set_alarms(daemon.endpoint, keys, due_ms)
        if time.time() * 1000 >= due_ms:
            raise BenchError("setting the alarms took longer than planned: they were due before all were set")
        time.sleep(max(0.0, due_ms / 1000 - time.time()))
        busy: list[loadgen.Result] = []
        firing = threading.Event()
        firing.set()

        def meanwhile() -> None:
            while firing.is_set():
                busy.append(loadgen.run(daemon.endpoint, b"echo", opts.body.encode(), **load))

        thread = threading.Thread(target=meanwhile)
        thread.start()
        while alarm_counts(daemon).get("fired", 0) < count:
            if time.time() * 1000 - due_ms > 300_000:
                raise BenchError(f"alarms not all fired after 300 s: {alarm_counts(daemon)}")
            time.sleep(0.02)
        last_s = time.time() - due_ms / 1000
        firing.clear()
        thread.join()
        counts = alarm_counts(daemon)
    finally:
        daemon.stop()
    for result in busy:
        check(result, "echo while alarms fire")
    tables.alarms(report, opts, count, last_s, median_result(quiet, by=lambda r: r.pct(99)),
                  median_result(busy, by=lambda r: r.pct(99)), counts, len(busy))
