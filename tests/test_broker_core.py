"""The broker's core on its own: no sockets, no clock, no sleep.

A Transport records what the core sends (and can say a client's pipe is
full, a client gone, a worker unreachable); the time is whatever the test
passes as `now`. What the real sockets add is held in test_broker.py and
through the whole daemon elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral import config as config_module
from corral.broker_core import (DEFAULT_DEADLINE_S, FULL, GONE, GOODBYE_WAIT_S, SENT, BrokerCore)
from corral.broker_ledger import Event, LocalFence
from corral.wire.protocol import (MDPC, MDP_REQUEST, NATIVE, REDELIVERED, W_DISCONNECT, W_HEARTBEAT, W_READY,
                                  W_REPLY, W_REQUEST, Dialect, iter_request_records, reply_record,
                                  retiring_message)

REPO = Path(__file__).resolve().parent.parent


class NullLog:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def _record(self, event, **fields):
        self.events.append((event, fields))

    info = warning = error = debug = _record


class Transport:
    """Records replies and worker messages; `full` clients get FULL, `gone` ones GONE."""

    def __init__(self):
        self.replies: list[list[bytes]] = []
        self.sent: list[tuple[bytes, bytes]] = []
        self.full: set[bytes] = set()
        self.gone: set[bytes] = set()
        self.unreachable: set[bytes] = set()

    def to_client(self, frames: list[bytes]) -> int:
        if frames[0] in self.gone:
            return GONE
        if frames[0] in self.full:
            return FULL
        self.replies.append(frames)
        return SENT

    def to_worker(self, identity: bytes, payload: bytes) -> bool:
        if identity in self.unreachable:
            return False
        self.sent.append((identity, payload))
        return True

    def requests(self, identity: bytes) -> list[tuple]:
        """(ticket, left_ms, service, key, body, token, flags) of every request sent to `identity`."""
        return [r for who, payload in self.sent if who == identity and payload[:1] == W_REQUEST
                for r in iter_request_records(payload)]

    def statuses(self) -> list[tuple[bytes, int]]:
        """(request id, status) of every native reply, in order."""
        return [(frames[2], int(frames[3])) for frames in self.replies]


def make_core(tmp_path, apps=None, fence=None, **supervisor) -> tuple[BrokerCore, Transport, NullLog]:
    module = tmp_path / "empty.wat"
    module.write_text("(module)")
    doc = {"supervisor": {"frontend": f"ipc://{tmp_path}/f.sock", "control": f"ipc://{tmp_path}/c.sock",
                          "heartbeat_ms": 100, "liveness": 3, **supervisor},
           "apps": {name: {"module": str(module), **settings}
                    for name, settings in (apps or {"echo": {}}).items()}}
    config = config_module.parse(doc, tmp_path / "corral.toml")
    transport, log = Transport(), NullLog()
    return BrokerCore(config, log, transport, fence=fence), transport, log


def ready(core: BrokerCore, identity: bytes, now: float, capacity: int = 4, services=("echo",),
          standby: bool = False) -> None:
    core.on_worker(identity, W_READY + json.dumps({"pid": 100, "capacity": capacity, "services": list(services),
                                                   "standby": standby}).encode(), now)


def native(request_id: bytes, service: bytes = b"echo", body: bytes = b"hi", meta: bytes = b"",
           client: bytes = b"c1") -> list[bytes]:
    return [client, NATIVE, request_id, service, meta, body]


def reply(core: BrokerCore, identity: bytes, ticket: int, now: float, status: int = 200,
          body: bytes = b"ok") -> None:
    core.on_worker(identity, W_REPLY + b"".join(reply_record(ticket, status, b"", body)), now)


def test_a_request_goes_to_a_worker_and_its_reply_to_the_client(tmp_path):
    core, transport, _ = make_core(tmp_path)
    ready(core, b"w0.1", 0.0)
    assert [e[0] for e in core.events] == [Event.READY]
    core.on_client(native(b"r1"), 1.0)
    core.dispatch(1.0)
    [(ticket, left_ms, service, key, body, token, flags)] = transport.requests(b"w0.1")
    assert (service, key, body, token, flags) == (b"echo", None, b"hi", 0, 0)
    assert left_ms == DEFAULT_DEADLINE_S * 1000
    reply(core, b"w0.1", ticket, 1.5)
    assert transport.statuses() == [(b"r1", 200)] and transport.replies[0][-1] == b"ok"
    assert not core.ledger and core.accounts[b"c1"].inflight == 0
    assert core.services[b"echo"].latency.count == 1 and core.services[b"echo"].latency.sum == 0.5


@pytest.mark.parametrize("meta", [b"", b'{"deadline_ms": 5000}'], ids=["fast path", "parsed"])
def test_admission_answers_the_same_with_or_without_a_parse(tmp_path, meta):
    """The common case skips the parse, not the admission: both reach BrokerCore.admit."""
    core, transport, _ = make_core(tmp_path, max_message_kib=1, max_queue=2)
    core.on_client(native(b"big", body=b"x" * 1025, meta=meta), 0.0)
    core.on_client(native(b"none", service=b"nope", meta=meta), 0.0)
    core.on_client(native(b"mmi", service=b"mmi.service", body=b"echo", meta=meta), 0.0)
    for i in range(3):   # no worker: the third is over max_queue
        core.on_client(native(b"q%d" % i, meta=meta), 0.0)
    core.drain()
    core.on_client(native(b"late", meta=meta), 0.0)
    assert transport.statuses() == [(b"big", 413), (b"none", 404), (b"mmi", 200), (b"q2", 503), (b"late", 503)]
    assert core.rejected == {413: 1, 404: 1, 503: 2}   # mmi's answer is not a refusal
    assert len(core.ledger) == 2


def test_mdp_and_keyed_requests_are_admitted_by_the_same_rules(tmp_path):
    core, transport, _ = make_core(tmp_path, {"counter": {"instances": "keyed"}})
    core.on_client([b"c1", MDPC, MDP_REQUEST, b"counter", b"alice", b"incr"], 0.0)
    core.on_client(native(b"nokey", service=b"counter"), 0.0)
    assert transport.statuses()[-1:] == [(b"nokey", 400)]
    [request] = core.ledger.values()
    assert (request.dialect, request.key, request.body) == (Dialect.MDP, b"alice", b"incr")


def test_a_queued_request_expires_at_its_deadline_passed_in(tmp_path):
    core, transport, _ = make_core(tmp_path)
    core.on_client(native(b"r1", meta=b'{"deadline_ms": 100}'), 10.0)
    core.tick(10.05)
    assert transport.replies == []
    core.tick(10.1)
    assert transport.statuses() == [(b"r1", 504)] and b"queued" in transport.replies[0][-1]


def test_a_silent_worker_is_reported_and_what_it_held_answered_or_fenced(tmp_path):
    """Heartbeat lost: its non-idempotent request is answered 502 at once; its idempotent one
    goes to another worker only once the old process is reaped (LocalFence)."""
    core, transport, _ = make_core(tmp_path)
    ready(core, b"w0.1", 0.0)
    core.on_client(native(b"once"), 0.0)
    core.on_client(native(b"again", meta=b'{"idempotent": true}'), 0.0)
    core.dispatch(0.0)
    assert len(transport.requests(b"w0.1")) == 2
    core.events.clear()
    core.tick(0.1)
    assert (b"w0.1", W_HEARTBEAT) in transport.sent
    # budget: the longest call it holds may run (timeout_ms); liveness_s on top of that
    limit = 0.3 + core.services[b"echo"].app.timeout_ms / 1000
    core.tick(limit)
    assert core.events == []
    core.tick(limit + 0.01)
    assert [(e[0], e[2]) for e in core.events] == [(Event.SILENT, "heartbeat lost")]
    assert transport.statuses() == [(b"once", 502)]
    ready(core, b"w1.1", limit)
    core.dispatch(limit)
    assert transport.requests(b"w1.1") == [], "re-dispatched while the old process may still commit"
    core.worker_gone(b"w0.1", "killed by signal 9", limit + 1, reaped=True)
    core.dispatch(limit + 1)
    [(ticket, *_, token, flags)] = transport.requests(b"w1.1")
    assert token == ticket and flags == REDELIVERED and not core.fenced


class Gate(LocalFence):
    """A fence that says "not yet" until opened (issue 18's remote workers)."""

    def __init__(self):
        self.open = False

    def requests_free(self, link) -> bool:
        return self.open

    def keys_free(self, link) -> bool:
        return self.open


def test_a_fence_that_says_not_yet_holds_requests_and_keys_until_it_clears(tmp_path):
    gate = Gate()
    core, transport, _ = make_core(tmp_path, {"kv": {"instances": "keyed"}}, fence=gate)
    ready(core, b"w0.1", 0.0, services=("kv",))
    core.on_client(native(b"r1", service=b"kv", meta=b'{"key": "a", "idempotent": true}'), 0.0)
    core.dispatch(0.0)
    ready(core, b"w1.1", 0.0, services=("kv",))
    core.worker_gone(b"w0.1", "host h1 lost", 0.1, reaped=True)
    core.on_client(native(b"r2", service=b"kv", meta=b'{"key": "a"}'), 0.2)
    core.dispatch(0.2)
    core.tick(0.2)
    assert transport.requests(b"w1.1") == [] and transport.replies == []   # key a still lives on w0.1
    gate.open = True
    core.tick(0.3)
    core.dispatch(0.3)
    assert [(r[3], r[6]) for r in transport.requests(b"w1.1")] == [(b"a", REDELIVERED), (b"a", 0)]
    assert not core.fenced


def test_host_lost_takes_every_worker_of_that_host_and_no_other(tmp_path):
    core, transport, _ = make_core(tmp_path)
    for identity in (b"a", b"b", b"c"):
        ready(core, identity, 0.0)
    core.links[b"a"].host = core.links[b"b"].host = "h1"
    core.host_lost("h1", 1.0)
    assert list(core.links) == [b"c"]


class Owner:
    def __init__(self):
        self.settled: list[tuple] = []

    def settle(self, request, status, body, now):
        self.settled.append((request.ticket, int(status), body))


def test_a_request_with_an_owner_settles_with_it_and_counts_against_no_client(tmp_path):
    """Issue 19's entry point: the broker's own requests (alarms) have no client socket."""
    core, transport, _ = make_core(tmp_path, max_inflight_per_client=1)
    owner = Owner()
    ready(core, b"w0.1", 0.0)
    request = core.enqueue(b"", Dialect.NATIVE, b"alarm", core.services[b"echo"], None, b"tick", 30.0, False,
                           0.0, False, owner=owner)
    core.dispatch(0.0)
    reply(core, b"w0.1", request.ticket, 0.1)
    assert owner.settled == [(request.ticket, 200, b"ok")] and transport.replies == [] and not core.accounts


def test_a_client_that_does_not_read_has_its_replies_held_then_dropped_then_refused(tmp_path):
    core, transport, _ = make_core(tmp_path, max_client_backlog_mib=1)
    ready(core, b"w0.1", 0.0, capacity=8)
    transport.full.add(b"c1")
    for i in range(3):
        core.on_client(native(b"r%d" % i), 0.0)
    core.dispatch(0.0)
    tickets = [r[0] for r in transport.requests(b"w0.1")]
    reply(core, b"w0.1", tickets[0], 0.1)                       # held: its pipe is full
    reply(core, b"w0.1", tickets[1], 0.1, body=b"x" * 1048576)  # over the budget: dropped
    account = core.accounts[b"c1"]
    assert len(account.outbox) == 1 and account.over and account.dropped == 1
    core.on_client(native(b"r9"), 0.2)
    core.dispatch(0.2)
    assert transport.replies == [] and account.refused == 1     # the 429 waits behind the held reply
    transport.full.clear()
    core.dispatch(0.3)                                          # flushes: it reads again
    assert transport.statuses() == [(b"r0", 200), (b"r9", 429)] and not account.over
    transport.gone.add(b"c1")
    reply(core, b"w0.1", tickets[2], 0.4)
    assert core.dropped_replies == 2 and core.services[b"echo"].dropped == 2


def test_an_unreachable_worker_has_its_batch_put_back_and_is_reported(tmp_path):
    core, transport, _ = make_core(tmp_path)
    ready(core, b"w0.1", 0.0)
    transport.unreachable.add(b"w0.1")
    core.events.clear()
    core.on_client(native(b"r1"), 0.0)
    core.dispatch(0.0)
    assert [(e[0], e[2]) for e in core.events] == [(Event.SILENT, "unreachable")]
    ready(core, b"w1.1", 0.1)
    core.dispatch(0.1)
    assert len(transport.requests(b"w1.1")) == 1 and transport.replies == []


def test_a_clean_exit_waits_for_the_goodbye_then_for_the_hand_back(tmp_path):
    core, transport, _ = make_core(tmp_path)
    ready(core, b"w0.1", 0.0)
    for i in range(2):
        core.on_client(native(b"r%d" % i), 0.0)
    core.dispatch(0.0)
    first, second = [r[0] for r in transport.requests(b"w0.1")]
    core.worker_gone(b"w0.1", "retired", 0.1, reaped=True, clean=True)
    core.tick(0.1 + GOODBYE_WAIT_S / 2)
    assert len(core.ledger) == 2                      # its last messages may be on the way
    reply(core, b"w0.1", first, 0.2)
    core.on_worker(b"w0.1", retiring_message("abort", [second]), 0.2)
    core.on_worker(b"w0.1", W_DISCONNECT, 0.2)
    assert b"w0.1" not in core.links and transport.statuses() == [(b"r0", 200)]
    ready(core, b"w1.1", 0.3)
    core.dispatch(0.3)
    assert [r[0] for r in transport.requests(b"w1.1")] == [second]   # handed back: never answered 502


def test_the_core_imports_no_zeromq_and_reads_no_clock():
    """In a child: the core's modules import with zmq unimportable; then a whole scenario runs
    with every clock raising. (The config parser reaches zmq through corral.security, so zmq
    is let in again for make_core.)"""
    script = textwrap.dedent(f"""
        import pathlib, sys, tempfile, time
        sys.modules["zmq"] = None
        import corral.broker_core, corral.broker_ledger
        assert [m for m in sys.modules if m.startswith("zmq") and sys.modules[m] is not None] == []
        del sys.modules["zmq"]
        sys.path.insert(0, {str(REPO / "tests")!r})
        import test_broker_core as t
        def no_clock():
            raise AssertionError("the core read the clock")
        with tempfile.TemporaryDirectory() as d:
            time.monotonic = time.time = time.perf_counter = no_clock
            t.test_a_silent_worker_is_reported_and_what_it_held_answered_or_fenced(pathlib.Path(d))
            t.test_a_client_that_does_not_read_has_its_replies_held_then_dropped_then_refused(pathlib.Path(d))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
