"""hops: one request at a time through (a), (b) and corral with one worker each, and
corral's round trip cut into its 4 ZeroMQ hops and the time inside the broker and the
worker, from the stamps bench/tracer/sitecustomize.py writes in both processes."""

from __future__ import annotations

import argparse
import bisect
import os
import time
from pathlib import Path

import zmq

from corral.client import loadgen

from bench import report as tables
from bench.systems import TRACER, BenchError, Context, Corral, EchoServer, ProxyServer

HOP_PARTS = (("client -> broker", True), ("broker: request in -> out to the worker", False),
             ("broker -> worker", True), ("worker: request in -> reply out (Wasm call included)", False),
             ("worker -> broker", True), ("broker: reply in -> out to the client", False),
             ("broker -> client", True))


def one_at_a_time(endpoint: str, framing: str, requests: int, rate: float) -> list[tuple[int, int]]:
    """(sent, answered) CLOCK_MONOTONIC ns of `requests` echo requests, never two in flight."""
    context = zmq.Context()
    client = loadgen.Client(context, endpoint, loadgen.framing(framing, b"echo", b"hello"), timeout_s=10.0)
    try:
        send, receive = client._sender(), client._receiver()

        def call(i: int) -> None:
            send(b"%d" % i)
            receive(True)

        for i in range(200):   # warm-up: connections, caches, the guest's first calls
            call(i)
        clock, interval, out = time.monotonic_ns, 1e9 / rate, []
        start = clock()
        for i in range(requests):
            sent = clock()
            call(i)
            out.append((sent, clock()))
            wait = (start + (i + 1) * interval - clock()) / 1e9
            if wait > 0:
                time.sleep(wait)
        return out
    except zmq.Again:
        raise BenchError(f"hops: no reply from {endpoint} within 10 s") from None
    finally:
        client.close()
        context.destroy(linger=0)


def _trace(path: Path) -> tuple[list[int], list[tuple[str, str]]]:
    times, what = [], []
    for line in path.read_text().splitlines():
        stamp, direction, kind = line.split()
        times.append(int(stamp))
        what.append((direction, kind))
    return times, what


def _within(trace, start: int, end: int, direction: str, kind: str) -> list[int]:
    times, what = trace
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    return [times[i] for i in range(lo, hi) if what[i] == (direction, kind)]


def hop_parts(calls: list[tuple[int, int]], broker, worker) -> list[list[float]]:
    """Per part of HOP_PARTS, the microseconds of every request the traces saw whole."""
    parts: list[list[float]] = [[] for _ in HOP_PARTS]
    request, reply = "02", "03"   # worker protocol: W_REQUEST, W_REPLY
    for sent, answered in calls:
        stamps = [_within(broker, sent, answered, "in", "c")[:1],
                  _within(broker, sent, answered, "out", request)[:1],
                  _within(worker, sent, answered, "in", request)[:1],
                  _within(worker, sent, answered, "out", reply)[-1:],
                  _within(broker, sent, answered, "in", reply)[-1:],
                  _within(broker, sent, answered, "out", "c")[-1:]]
        if not all(stamps):
            continue  # a heartbeat or a retry in the window: not one straight walk
        points = [sent] + [s[0] for s in stamps] + [answered]
        for i, part in enumerate(parts):
            part.append((points[i + 1] - points[i]) / 1000)
    return parts


def run(opts, ctx: Context, report: tables.Report) -> None:
    procs, endpoints = ctx.procs, ctx.endpoints
    one_worker = argparse.Namespace(**{**vars(opts), "workers": 1})
    trace_dir = procs.root / "hops-trace"
    trace_dir.mkdir()
    env = {"CORRAL_HOPS_TRACE": str(trace_dir),
           "PYTHONPATH": os.pathsep.join([str(TRACER), procs.env["PYTHONPATH"]])}
    a, b = EchoServer(procs, endpoints, one_worker), ProxyServer(procs, endpoints, one_worker)
    c = Corral(procs, endpoints, one_worker, name="hops", env=env)
    totals: dict[str, list[float]] = {}
    corral_calls: list[tuple[int, int]] = []
    for system in (a, b, c):
        try:
            system.start()
            calls = one_at_a_time(system.endpoint, system.framing, opts.hops_requests, opts.hops_rate)
            totals[system.label] = sorted((end - start) / 1000 for start, end in calls)
            if system is c:
                corral_calls = calls
        finally:
            daemon_pid = system.process.pid if system is c and system.process else None
            system.stop()
    # Processes that moved no message (the daemon's module-check child) leave empty traces.
    traces = {int(p.stem): _trace(p) for p in trace_dir.glob("*.txt") if p.stat().st_size}
    broker = traces.pop(daemon_pid, None)
    if broker is None or len(traces) != 1:
        raise BenchError(f"hops: expected the traces of the daemon and one worker, found {sorted(traces)}")
    parts = hop_parts(corral_calls, broker, traces.popitem()[1])

    tables.hops(report, opts, totals, {a.label: 2, b.label: 4, c.label: 4}, HOP_PARTS, parts, len(corral_calls))
