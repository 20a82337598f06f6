"""fairness: a light client's p99 (open loop) beside a client flooding the same service,
and another service on the same workers, against its p99 alone."""

from __future__ import annotations

import signal
import sys
import time

import zmq

from corral.client import loadgen

from bench import report as tables
from bench.systems import ECHO, REPO, BenchError, Context, Corral

FLOOD_WINDOW = 1000   # requests a flooding client keeps in flight: the default max_inflight_per_client


def flood(endpoint: str, service: str, window: int) -> None:
    """A flooding client (a process of its own, killed when done): `window` requests always
    in flight, each reply read and replaced at once."""
    from corral.wire.frames import NOBLOCK, drain, send_frames
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(endpoint)
    request = [b"CORRAL1", b"0", service.encode(), b"", b"flood"]
    for _ in range(window):
        send_frames(socket, request, 0)
    while True:
        socket.poll(1000)
        for _ in drain(socket, 1000):
            send_frames(socket, request, NOBLOCK)


def run(opts, ctx: Context, report: tables.Report) -> None:
    """A light client's latency beside a flood, same service and another, against it alone."""
    apps = {"echo": {"module": str(ECHO)}, "echo2": {"module": str(ECHO)}}
    procs = ctx.procs
    daemon = Corral(procs, ctx.endpoints, opts, name="fairness", apps=apps)
    requests, rate = (300, 300.0) if opts.quick else (3000, 500.0)
    daemon.start()
    results: dict[str, list[loadgen.Result]] = {"alone": [], "echo": [], "echo2": []}
    try:
        for _ in range(opts.rounds):
            for flooded in results:
                flooder = None
                if flooded != "alone":
                    flooder = procs.start([sys.executable, "-c",
                                           f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                           f"from bench.sections.fairness import flood; "
                                           f"flood({daemon.endpoint!r}, {flooded!r}, {FLOOD_WINDOW})"])
                    end = time.monotonic() + 30
                    while not any(s["name"] == flooded and s["queued"] > FLOOD_WINDOW // 2
                                  for s in daemon.status()["services"]):
                        if time.monotonic() > end or flooder.poll() is not None:
                            raise BenchError(f"fairness: the flood on {flooded} did not build a queue")
                        time.sleep(0.05)
                try:
                    results[flooded].append(loadgen.run(daemon.endpoint, b"echo", opts.body.encode(),
                                                        requests=requests, concurrency=1, rate=rate,
                                                        warmup=20))
                finally:
                    if flooder is not None:
                        procs.stop(flooder, sig=signal.SIGKILL)
                end = time.monotonic() + 30
                while daemon.status()["in_flight"]:   # the flood's leftovers, before the next run
                    if time.monotonic() > end:
                        raise BenchError("fairness: the flood's requests were not all answered")
                    time.sleep(0.05)
    finally:
        daemon.stop()
    tables.fairness(report, opts, requests, rate, FLOOD_WINDOW, results)
