"""abort: abort-to-serving-again through the real daemon, for on_abort = "reinstantiate"
(the keyed counter guest) and "respawn" (workers = 1, then with a standby worker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from bench import report as tables
from bench.systems import COUNTER, ECHO, BenchError, Context, Corral


def run(opts, ctx: Context, report: tables.Report) -> None:
    procs, endpoints = ctx.procs, ctx.endpoints
    from corral.client import Client
    reps = opts.reps
    # Deliberate traps, repeated: keep the circuit closed (intensity) and the
    # trapping body out of quarantine (3 aborts within period_s), so that every
    # repetition walks the same path. Repetitions are spaced well over period_s.
    restart = {"intensity": 1_000_000, "period_s": 0.01}
    gap_s = 0.05
    out: dict[str, dict] = {}

    # on_abort = "reinstantiate": the keyed counter guest (its default), opts.workers workers.
    daemon = Corral(procs, endpoints, opts, name="abort-reinstantiate", restart=restart,
                    apps={"counter": {"module": str(COUNTER), "instances": "keyed"}})
    daemon.start()
    try:
        context = zmq.Context()
        try:
            with Client(daemon.endpoint, context) as client:
                trap_ms, plain_ms = [], []
                for i in range(reps):
                    key = f"k{i}"
                    assert client.call("counter", b"", key=key).body == b"1"
                    assert client.call("counter", b"", key=key).body == b"2"
                    # Reference: two ordinary requests on the key, sent together.
                    start = time.perf_counter_ns()
                    first = client.send("counter", b"", key=key)
                    second = client.send("counter", b"", key=key)
                    got = client.gather([first, second], timeout=10)
                    plain_ms.append((time.perf_counter_ns() - start) / 1e6)
                    assert got[second].body == b"4", got
                    # The trap, and the next request on the same key sent right behind it.
                    start = time.perf_counter_ns()
                    trap = client.send("counter", b"trap", key=key)
                    after = client.send("counter", b"", key=key)
                    got = client.gather([trap, after], timeout=10)
                    trap_ms.append((time.perf_counter_ns() - start) / 1e6)
                    if got[trap].status != 502 or got[after].status != 200 or got[after].body != b"1":
                        raise BenchError(f"reinstantiate: expected 502 then a fresh count of 1, got "
                                         f"{got[trap]} and {got[after]}")
                    time.sleep(gap_s)
        finally:
            context.destroy(linger=0)
    finally:
        daemon.stop()
    out["reinstantiate"] = {"trap_to_next_answered_ms": trap_ms, "two_plain_requests_ms": plain_ms}

    # on_abort = "respawn": one worker, so the service is served by that worker alone;
    # then again with a standby worker waiting to be promoted into its slot.
    respawn_ms, ready_ms = _measure_respawn(procs, endpoints, opts, restart, reps, gap_s, standby=0)
    standby_ms, _ = _measure_respawn(procs, endpoints, opts, restart, reps, gap_s, standby=1)
    out["respawn"] = {"trap_reply_to_new_worker_answered_ms": respawn_ms, "worker_startup_ms": ready_ms,
                      "with_standby_ms": standby_ms}

    tables.abort(report, opts, out)


def _measure_respawn(procs, endpoints, opts, restart: dict, reps: int, gap_s: float,
                     standby: int) -> tuple[list[float], list[float]]:
    """Trap reply -> a request answered by another worker, `reps` times (and startup times)."""
    from corral.client import Client
    daemon = Corral(procs, endpoints, opts, name=f"abort-respawn-{standby}", workers=1, restart=restart,
                    apps={"counter": {"module": str(COUNTER), "instances": "keyed", "on_abort": "respawn"},
                          "echo": {"module": str(ECHO)}}, standby=standby)
    daemon.start()
    respawn_ms, ready_ms = [], []
    try:
        context = zmq.Context()
        try:
            with Client(daemon.endpoint, context) as client:
                for i in range(reps):
                    if standby:
                        daemon.wait_for_standby()
                    before = daemon.ready_pids()
                    assert client.call("echo", b"x").status == 200
                    trap = client.call("counter", b"trap", key=f"r{i}", timeout=10)
                    replied = time.perf_counter_ns()
                    if trap.status != 502:
                        raise BenchError(f"respawn: the trap got {trap.status} {trap.body!r}, not 502")
                    # A request of a service only that worker serves: it waits in the
                    # broker's queue until the new worker is ready, then is answered.
                    poll = client.call("echo", b"again", timeout=30)
                    answered = time.perf_counter_ns()
                    if poll.status != 200:
                        raise BenchError(f"respawn: the request after the trap got {poll.status} {poll.body!r}")
                    respawn_ms.append((answered - replied) / 1e6)
                    after = daemon.ready_pids()
                    if not after or set(after) & set(before):
                        raise BenchError(f"respawn: the worker was not replaced ({before} -> {after})")
                    time.sleep(gap_s)
        finally:
            context.destroy(linger=0)
        # The pool logs each worker's spawn-to-ready time: the respawned ones are generation > 1.
        for event in _events(daemon.log, "worker.ready"):
            if "startup_ms" in event and not str(event.get("worker", "")).endswith(".1"):
                ready_ms.append(event["startup_ms"])
    finally:
        daemon.stop()
    return respawn_ms, ready_ms



def _events(log: Path, name: str) -> list[dict]:
    events = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return events
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            events.append(event)
    return events
