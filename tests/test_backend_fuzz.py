"""The worker side of the backend under fuzz, at the process level.

A real daemon serves a real client's load through its real workers, while a
rogue DEALER connects to the daemon's backend socket (workers.sock in its run
directory) and says anything: random bytes and frames, a READY and then
garbage, a READY with a live worker's identity, replies for tickets it never
got (small integers around the real workers' tickets), huge frames, floods.
Throughout, every client request gets exactly its own reply (its own body,
200), the daemon keeps serving, and the real workers are never dropped
because of the rogue (docs/worker-protocol.md, "Protocol violations").

The default run is short and deterministic; a long random one:

    CORRAL_FUZZ=long .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_backend_fuzz.py
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.client import Client
from corral.client.native import NoReply
from corral.wire.protocol import (W_ALARMS, W_DISCONNECT, W_EVICT, W_HEARTBEAT, W_READY, W_REPLY, W_REQUEST,
                                  W_RETIRING, alarms_message, reply_record, retiring_message)

from harness import GUESTS, Daemon

LONG = os.environ.get("CORRAL_FUZZ") == "long"
pytestmark = pytest.mark.timeout(3600 if LONG else 300)

COMMANDS = [W_READY, W_REPLY, W_HEARTBEAT, W_DISCONNECT, W_RETIRING, W_EVICT, W_ALARMS, W_REQUEST, b"\x00", b"\xff"]


class Load:
    """Clients calling echo in windows of WINDOW requests, each body unique, each reply
    checked against its own request; anything else is written down in `bad`."""

    WINDOW = 4

    def __init__(self, daemon: Daemon, clients: int = 3):
        self.daemon = daemon
        self.stopping = threading.Event()
        self.ok = Counter()
        self.bad: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    @property
    def served(self) -> int:
        return sum(self.ok.values())

    def run(self, n: int) -> None:
        client = Client(self.daemon.frontend, self.daemon.context)
        try:
            seq = 0
            while not self.stopping.is_set():
                bodies = {}
                for _ in range(self.WINDOW):
                    seq += 1
                    body = b"%d:%d:%s" % (n, seq, os.urandom(6).hex().encode())
                    bodies[client.send("echo", body)] = body
                try:
                    replies = client.gather(list(bodies), timeout=10)
                except NoReply as exc:
                    self.bad.append(f"client {n}: {exc}")
                    return
                for request_id, reply in replies.items():
                    if reply.status != 200 or reply.body != bodies[request_id]:
                        self.bad.append(f"client {n}: {bodies[request_id]!r} answered {reply.status} "
                                        f"{reply.body[:80]!r}")
                    else:
                        self.ok[n] += 1
            # Exactly one reply each: nothing more may come.
            strays = list(client._arrived.values())
            while client.socket.poll(300):
                strays.append(client.socket.recv_multipart())
            if strays:
                self.bad.append(f"client {n}: replies it did not ask for: {strays[:3]!r}")
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), "a load client hangs"


class Rogue:
    """DEALERs on the backend, one per connection, each named (or not) as told."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.count = 0
        self.identities: set[bytes] = set()

    def send(self, messages: list[list[bytes]], identity: bytes | None = None) -> bytes | None:
        """Connect, send `messages` (each a list of frames), close once they have left."""
        socket = self.daemon.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, 0)
        if identity is None:
            self.count += 1
            identity = b"rogue-%d" % self.count
        if identity:   # b"": let the ROUTER name it
            socket.setsockopt(zmq.IDENTITY, identity)
            self.identities.add(identity)
        socket.connect(self.daemon.backend)
        try:
            for frames in messages:
                socket.send_multipart(frames)
        finally:
            socket.close(linger=5000)   # the bytes leave before the socket goes
        return identity


def guessed_replies(base: int, offsets: list[int], status: int, body: bytes) -> bytes:
    """Replies for tickets near `base` (the load's requests so far: the real workers' tickets)."""
    return W_REPLY + b"".join(b"".join(reply_record(max(0, base + o), status, b"", body)) for o in offsets)


ready_info = st.fixed_dictionaries({"pid": st.integers(-1, 2**22) | st.text(max_size=4),
                                    "capacity": st.integers(-1, 64),
                                    "services": st.lists(st.sampled_from(["echo", "nope", ""]), max_size=2)},
                                   optional={"standby": st.booleans(), "heartbeat_ms": st.integers(-5, 1000)})
payloads = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from(COMMANDS), st.binary(max_size=48)).map(lambda t: t[0] + t[1]),
    ready_info.map(lambda info: W_READY + json.dumps(info).encode()),
    st.builds(lambda reason, tickets, cut: retiring_message(reason, tickets)[:cut],
              st.text(max_size=8), st.lists(st.integers(0, 5000), max_size=3), st.integers(0, 64)),
    st.builds(lambda changes: alarms_message(changes),
              st.lists(st.tuples(st.sampled_from([b"echo", b"x"]), st.binary(max_size=4),
                                 st.none() | st.integers(0, 2**40)), max_size=2)),
)
# ("guess", offsets, status, body): replies for the real workers' tickets, built when sent.
guesses = st.tuples(st.just("guess"), st.lists(st.integers(-60, 10), min_size=1, max_size=4),
                    st.sampled_from([200, 500, 999]), st.binary(max_size=16))
messages = st.lists(st.one_of(payloads.map(lambda p: [p]), guesses,
                              st.lists(st.binary(max_size=16), min_size=2, max_size=4)),   # several frames
                    min_size=1, max_size=6)
who = st.sampled_from(["fresh", "fresh", "fresh", "unnamed", "live"])
ready_first = st.booleans()


@pytest.fixture
def served(cache_dir):
    """A daemon with two workers serving echo, and three clients calling it all along."""
    daemon = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir,
                    supervisor={"workers": 2, "heartbeat_ms": 200})
    load = None
    try:
        daemon.start()
        load = Load(daemon)
        load.start()
        yield daemon, load
    finally:
        if load is not None and not load.stopping.is_set():
            load.stopping.set()
            for thread in load.threads:
                thread.join(30)
        killed = daemon.cleanup()
        assert not killed, f"processes left behind: {killed}"


def workers(daemon: Daemon) -> list[tuple[str, int, str]]:
    return sorted((w["identity"], w["pid"], w["state"]) for w in daemon.status()["workers"])


def test_a_rogue_on_the_backend_changes_nothing_for_clients_or_workers(served):
    daemon, load = served
    before = workers(daemon)
    assert [state for *_, state in before] == ["ready", "ready"]
    live = [identity.encode() for identity, *_ in before]
    rogue = Rogue(daemon)
    daemon.wait_for(lambda: load.served > 50, what="the load running")
    served_before = load.served

    # The cases named, once each.
    fake_ready = W_READY + json.dumps({"pid": os.getpid(), "capacity": 8, "services": ["echo"]}).encode()
    rogue.send([[fake_ready], [b"\x00garbage"], [guessed_replies(load.served, list(range(-40, 5)), 200, b"x")]])
    for identity in live:   # a live worker's name: the ROUTER refuses the second connection
        rogue.send([[fake_ready], [guessed_replies(load.served, list(range(-40, 5)), 200, b"x")]], identity)
    rogue.send([[guessed_replies(load.served, list(range(-60, 10)), 200, b"forged")]])   # never READY
    rogue.send([[W_REPLY + b"\x01" * (16 << 20)]])                                      # a huge frame
    rogue.send([[W_HEARTBEAT + b"%d" % i] for i in range(5000)])                       # a flood
    rogue.send([[fake_ready]] + [[b"\x03" + os.urandom(40)] for _ in range(200)], b"")  # unnamed

    # Then whatever hypothesis makes of it.
    @settings(max_examples=20_000 if LONG else 150, derandomize=not LONG, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages, who, ready_first)
    def fuzz(sent, name, ready):
        built = [guessed_replies(load.served, m[1], m[2], m[3]) if m[0] == "guess" else m for m in sent]
        built = [[m] if isinstance(m, bytes) else m for m in built]
        if ready:
            built.insert(0, [fake_ready])
        identity = {"fresh": None, "unnamed": b"", "live": live[len(sent) % 2]}[name]
        rogue.send(built, identity)
        assert daemon.process.poll() is None, daemon.log_tail()
        assert not load.bad, load.bad[:5]

    fuzz()
    daemon.wait_for(lambda: load.served > served_before + 200, timeout=20, what="the load still served")
    load.stop()

    assert not load.bad, load.bad[:5]
    assert all(load.ok[n] > 0 for n in range(len(load.threads))), load.ok
    assert workers(daemon) == before, "a real worker was dropped"
    assert not daemon.events("worker.killed") and not daemon.events("worker.exited"), daemon.log_tail()
    violations = daemon.events("worker.protocol_violation")
    assert violations, "the rogue never reached the broker"
    named = Counter(v["worker"] for v in violations)
    assert not set(named) & {identity.decode() for identity in live}, named
    assert max(count for name, count in named.items() if name.startswith("rogue-")) == 1, named   # once each
    assert daemon.call("echo", b"after").body == b"after"
