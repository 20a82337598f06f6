"""Fair and bounded under abuse (issue 13), with the real daemon, real workers, real sockets.

- One flooded service does not starve another sharing its workers.
- A client that never reads its replies cannot grow the daemon past its
  budget, and the other clients are served meanwhile.
- A client over max_inflight_per_client is answered 429; another client is not.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
import zmq

from harness import FAULTS, GUESTS
from corral.wire.protocol import NATIVE

MiB = 1024 * 1024


class Flood(threading.Thread):
    """A client that keeps `window` requests to one service outstanding, reading its replies."""

    def __init__(self, endpoint: str, service: bytes, window: int = 1500, body: bytes = b"x"):
        super().__init__(daemon=True)
        self.endpoint, self.service, self.window, self.body = endpoint, service, window, body
        self.stop = threading.Event()
        self.replies: dict[bytes, int] = {}

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.connect(self.endpoint)
        sent = outstanding = 0
        try:
            while not self.stop.is_set():
                while outstanding < self.window:
                    socket.send_multipart([NATIVE, b"%d" % sent, self.service, b"", self.body])
                    sent += 1
                    outstanding += 1
                if socket.poll(20):
                    while socket.poll(0):
                        status = socket.recv_multipart()[2]
                        self.replies[status] = self.replies.get(status, 0) + 1
                        outstanding -= 1
        finally:
            socket.close()
            context.term()

    def __enter__(self) -> "Flood":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_status(daemon, name: str) -> dict:
    return next(s for s in daemon.status()["services"] if s["name"] == name)


@pytest.mark.timeout(240)
def test_a_flooded_service_does_not_starve_another_on_the_same_workers(start_daemon):
    """Issue 13's stall. The old dispatch starved whichever service came second in an order
    fixed for the daemon's life, so the flood alternates between the two services: with that
    dispatch about half the rounds stall, whichever the order."""
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}, "echo2": {"module": GUESTS / "echo.wat"}},
                          supervisor={"max_queue": 1000})
    client = daemon.client()
    for round_ in range(10):
        flooded, quiet = ("echo2", "echo") if round_ % 2 == 0 else ("echo", "echo2")
        # three connections: one alone stays under max_inflight_per_client (1000), and its
        # queue could drain while it reads its replies
        with Flood(daemon.frontend, flooded.encode()) as flood, Flood(daemon.frontend, flooded.encode()), \
                Flood(daemon.frontend, flooded.encode()):
            daemon.wait_for(lambda: service_status(daemon, flooded)["queued"] > 500, timeout=30,
                            what=f"{flooded} flooded")
            ids = [client.send(quiet, b"q%d" % i, deadline_ms=5000) for i in range(20)]
            replies = client.gather(ids, timeout=30)
            statuses = sorted(r.status for r in replies.values())
            # the flood went on throughout: its service still had a queue
            assert service_status(daemon, flooded)["queued"] > 0, f"round {round_}: the flood stopped early"
            assert flood.is_alive()
        assert statuses == [200] * 20, f"round {round_}: {quiet} beside a flooded {flooded}: {statuses}"
        daemon.wait_for(lambda: service_status(daemon, flooded)["queued"] == 0, timeout=60,
                        what=f"the flood on {flooded} served")   # else the next round finds it full
        assert all(replies[i].body == b"q%d" % n for n, i in enumerate(ids))
    assert service_status(daemon, "echo")["statuses"].get("504", 0) == 0
    assert service_status(daemon, "echo2")["statuses"].get("504", 0) == 0


@pytest.mark.timeout(120)
def test_the_clients_of_one_service_take_turns_in_its_queue(start_daemon):
    """A light client's requests wait for a turn among the flooding clients, not behind the
    whole queue: counted in the service's replies while they wait, not in time."""
    # four connections at max_inflight_per_client (1000) each: echo's queue deep, not full
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}})
    client = daemon.client()
    floods = [Flood(daemon.frontend, b"echo", window=1000) for _ in range(4)]
    try:
        for flood in floods:
            flood.start()
        daemon.wait_for(lambda: service_status(daemon, "echo")["queued"] > 3000, timeout=30, what="echo flooded")
        for round_ in range(3):
            before = service_status(daemon, "echo")
            ids = [client.send("echo", b"light %d" % i) for i in range(20)]
            replies = client.gather(ids, timeout=60)
            after = service_status(daemon, "echo")
            assert sorted(r.status for r in replies.values()) == [200] * 20
            served = after["statuses"]["200"] - before["statuses"]["200"]
            # first come, first served, they would wait for the whole queue ahead of them
            assert served < before["queued"] / 2, f"round {round_}: {served} served while the light client " \
                                                   f"waited, with {before['queued']} queued ahead of it"
    finally:
        for flood in floods:
            flood.stop.set()
        for flood in floods:
            flood.join(10)


@pytest.mark.timeout(240)
def test_a_client_that_never_reads_cannot_grow_the_daemon_and_others_are_served(start_daemon):
    body = b"r" * (8 * 1024)
    backlog_mib, inflight = 4, 100
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}},
                          supervisor={"max_client_backlog_mib": backlog_mib, "max_inflight_per_client": inflight})
    arbiter = psutil.Process(daemon.process.pid)
    for _ in range(200):   # warm: the allocator's own pools, the first connections
        assert daemon.call("echo", body).status == 200
    rss_before = arbiter.memory_info().rss
    # README, "Memory": per client, the budget plus a pipe of max_inflight_per_client
    # replies and as many requests read ahead, each with REPLY_OVERHEAD; the rest is
    # slack for the allocator.
    bound = backlog_mib * MiB + 2 * inflight * (len(body) + 200) + 24 * MiB

    context = zmq.Context()
    sink = context.socket(zmq.DEALER)   # sends and never reads
    sink.setsockopt(zmq.LINGER, 0)
    sink.setsockopt(zmq.SNDHWM, 0)
    sink.setsockopt(zmq.RCVHWM, 1)
    sink.setsockopt(zmq.RCVBUF, 4096)
    sink.connect(daemon.frontend)
    try:
        reader = daemon.client()
        served = 0
        peak = rss_before
        # 40,000 replies of 8 KiB: 320 MiB held for the sink without a bound.
        for batch in range(40):
            for i in range(1000):
                sink.send_multipart([NATIVE, b"%d.%d" % (batch, i), b"echo", b"", body])
            for i in range(5):
                reply = reader.call("echo", b"mine %d.%d" % (batch, i), timeout=20)
                assert (reply.status, reply.body) == (200, b"mine %d.%d" % (batch, i))
                served += 1
            peak = max(peak, arbiter.memory_info().rss)
        answered = 200 + served + 40 * 1000   # the warm-up, the reader's, the sink's

        def all_answered():
            peak_now = arbiter.memory_info().rss
            status = daemon.status()
            return sum(status["statuses"].values()) >= answered and (status, peak_now)
        status, last = daemon.wait_for(all_answered, timeout=60, what="every request answered")
        peak = max(peak, last)
        assert peak - rss_before < bound, f"the daemon grew {(peak - rss_before) / MiB:.0f} MiB"
        sink_row = max(status["clients"], key=lambda c: c["dropped"])
        assert sink_row["over_budget"] and sink_row["unread_bytes"] <= backlog_mib * MiB
        assert 0 < status["services"][0]["dropped"] <= sink_row["dropped"]  # the rest: its 429s
        assert status["statuses"].get("429", 0) == sink_row["refused"]
        assert served == 200
        # once it reads, it is served again
        drained = 0
        while sink.poll(500):
            sink.recv_multipart()
            drained += 1
        daemon.wait_for(lambda: not any(c["over_budget"] for c in daemon.status()["clients"]),
                        timeout=30, what="the sink back under its budget")
        sink.send_multipart([NATIVE, b"again", b"echo", b"", b"hi"])
        while True:
            assert sink.poll(10_000), "no reply once the sink reads"
            frames = sink.recv_multipart()
            if frames[1] == b"again":
                break
        assert frames[2:] == [b"200", b"hi"]
    finally:
        sink.close()
        context.destroy(linger=0)


@pytest.mark.timeout(120)
def test_over_max_inflight_per_client_a_client_is_answered_429_and_another_is_not(start_daemon):
    port = free_port()
    daemon = start_daemon({"faults": {"module": FAULTS}}, supervisor={"max_inflight_per_client": 5},
                          extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
    greedy, other = daemon.client(), daemon.client()
    ids = [greedy.send("faults", b"slow") for _ in range(20)]   # a quarter second each
    mine = [other.send("faults", b"slow") for _ in range(5)]
    last = greedy.wait(ids[-1], timeout=30)
    assert last.status == 429                                   # at once, while its five run
    # who is doing what, while it is going on: status, `corral status`, metrics
    rows = daemon.wait_for(lambda: [c for c in daemon.status()["clients"] if c["refused"] == 15],
                           what="the greedy client's refusals in status")
    assert rows[0]["queued"] + rows[0]["running"] == 5 and not rows[0]["over_budget"]
    shown = subprocess.run([sys.executable, "-m", "corral", "status", "-c", str(daemon.config_path)],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^  {rows[0]['client']}\s+\d+\s+\d+\s+0\s+0\s+15$", shown.stdout, re.M), shown.stdout
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'corral_client_refused_total{{client="{rows[0]["client"]}"}} 15' in metrics.splitlines(), metrics
    replies = {**greedy.gather(ids[:-1], timeout=60), ids[-1]: last}
    statuses = [replies[i].status for i in ids]
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 15
    assert b"max_inflight_per_client" in replies[ids[5]].body
    assert [r.status for r in other.gather(mine, timeout=60).values()] == [200] * 5
    # the limit counts requests open, not a rate: answered, they make room
    assert greedy.call("faults", b"ok", timeout=30).status == 200
    status = daemon.status()
    assert status["statuses"]["429"] == 15
