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
from corral.wire.protocol import (MDPC, MDP_REQUEST, NATIVE, REDELIVERED, W_DISCONNECT, W_HEARTBEAT, W_READY, W_RETIRING,
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


def test_a_second_ready_from_a_linked_worker_is_a_protocol_violation(tmp_path):
    """It would overwrite the link and strand what the first one held: the worker is dropped
    instead, what it held answered as a dead worker's, and no new link is made."""
    core, transport, log = make_core(tmp_path)
    ready(core, b"w0.1", 0.0)
    core.on_client(native(b"r1"), 0.0)
    core.dispatch(0.0)
    core.events.clear()
    ready(core, b"w0.1", 0.1, capacity=8)
    assert [(e[0], e[2]) for e in core.events] == [(Event.SILENT, "protocol violation")]
    assert b"w0.1" not in core.links and not core.ledger
    assert transport.statuses() == [(b"r1", 502)] and b"protocol violation" in transport.replies[0][-1]
    assert [e for e, _ in log.events if e == "worker.protocol_violation"]


# --- protocol violations: every message from a worker is untrusted ---------------------------

def two_workers(tmp_path, apps=None, services=("echo",)):
    """w0.1 and w1.1, each holding one request (a's and b's, from clients c-a and c-b)."""
    core, transport, log = make_core(tmp_path, apps)
    service = services[0].encode()
    ready(core, b"w0.1", 0.0, capacity=1, services=services)
    core.on_client(native(b"a", service=service, body=b"for a", client=b"c-a"), 0.0)
    core.dispatch(0.0)
    ready(core, b"w1.1", 0.0, capacity=1, services=services)
    core.on_client(native(b"b", service=service, body=b"for b", client=b"c-b"), 0.0)
    core.dispatch(0.0)
    [a] = [r[0] for r in transport.requests(b"w0.1")]
    [b] = [r[0] for r in transport.requests(b"w1.1")]
    core.events.clear()
    return core, transport, log, a, b


def assert_dropped(core, transport, log, identity: bytes, times: int = 1):
    """`identity` dropped as a protocol violation, logged `times`, its request answered 502 by
    the broker (never with a worker's bytes)."""
    assert [(e[0], e[1].identity, e[2]) for e in core.events] == [(Event.SILENT, identity, "protocol violation")]
    assert identity not in core.links and identity in core.gone
    violations = [fields for event, fields in log.events if event == "worker.protocol_violation"]
    assert len(violations) == times and violations[0]["worker"] == identity.decode()
    return violations[0]


def assert_untouched(core, transport, a: int):
    """w0.1 still holds a's request, and its own reply reaches a's client, once."""
    assert b"w0.1" in core.links and a in core.links[b"w0.1"].inflight
    assert [f for f in transport.replies if f[0] == b"c-a"] == []
    reply(core, b"w0.1", a, 2.0, body=b"a's own")
    assert [(f[0], f[2], f[3], f[4]) for f in transport.replies if f[0] == b"c-a"] == \
        [(b"c-a", b"a", b"200", b"a's own")]


def test_a_reply_for_another_workers_ticket_drops_the_sender_and_crosses_nothing(tmp_path):
    core, transport, log, a, b = two_workers(tmp_path)
    reply(core, b"w1.1", a, 1.0, body=b"forged")
    assert_dropped(core, transport, log, b"w1.1")
    assert [(f[0], f[2], f[3]) for f in transport.replies] == [(b"c-b", b"b", b"502")]
    assert b"forged" not in b"".join(f[-1] for f in transport.replies)
    assert_untouched(core, transport, a)


def test_a_reply_for_an_answered_or_unknown_ticket_is_a_violation(tmp_path):
    for ticket in ("answered", 10_000, "twice"):
        core, transport, log, a, b = two_workers(tmp_path)
        core.on_client(native(b"b2", client=b"c-b"), 0.5)
        core.links[b"w1.1"].capacity = 2
        core.dispatch(0.5)
        [b2] = [r[0] for r in transport.requests(b"w1.1") if r[0] != b]
        if ticket == "answered":
            reply(core, b"w1.1", b, 1.0, body=b"first")
            core.on_worker(b"w1.1", W_REPLY + b"".join(reply_record(b, 200, b"", b"again")), 1.0)
        elif ticket == "twice":   # one batch, the same ticket twice: nothing of it is used
            core.on_worker(b"w1.1", W_REPLY + b"".join(reply_record(b, 200, b"", b"first")
                                                       + reply_record(b, 200, b"", b"again")), 1.0)
        else:
            core.on_worker(b"w1.1", W_REPLY + b"".join(reply_record(ticket, 200, b"", b"again")), 1.0)
        assert_dropped(core, transport, log, b"w1.1")
        bodies = [(f[2], f[3], f[4]) for f in transport.replies]
        if ticket == "answered":
            assert bodies[0] == (b"b", b"200", b"first") and [x[:2] for x in bodies[1:]] == [(b"b2", b"502")]
        else:
            assert sorted(x[:2] for x in bodies) == [(b"b", b"502"), (b"b2", b"502")]
        assert all(x[2] != b"again" for x in bodies)
        assert_untouched(core, transport, a)


@pytest.mark.parametrize("payload", [
    W_REPLY + b"\x00" * 5,                                                         # a record cut short
    "truncated body",
    "unknown status",
    "good then bad",
], ids=["short header", "truncated body", "unknown status", "good then bad"])
def test_a_malformed_reply_record_drops_the_worker_and_no_byte_of_it_reaches_a_client(tmp_path, payload):
    core, transport, log, a, b = two_workers(tmp_path)
    if payload == "truncated body":
        payload = W_REPLY + reply_record(b, 200, b"", b"x" * 100)[0] + b"xyz"
    elif payload == "unknown status":
        payload = W_REPLY + b"".join(reply_record(b, 999, b"", b"odd"))
    elif payload == "good then bad":   # its own ticket first: the whole message is refused
        payload = W_REPLY + b"".join(reply_record(b, 200, b"", b"fine")) + b"\x01\x02"
    core.on_worker(b"w1.1", payload, 1.0)
    violation = assert_dropped(core, transport, log, b"w1.1")
    assert violation["message"] == payload[:64].hex() and violation["length"] == len(payload)
    assert [(f[2], f[3]) for f in transport.replies] == [(b"b", b"502")]
    assert_untouched(core, transport, a)


def test_alarms_for_a_service_the_worker_does_not_serve_drop_it_and_change_no_schedule(tmp_path):
    from corral.alarms import AlarmRunner
    from corral.wire.protocol import alarms_message
    core, transport, log, a, b = two_workers(tmp_path, {"echo": {}, "other": {}})
    core.alarms = AlarmRunner(log)
    core.on_worker(b"w1.1", alarms_message([(b"echo", b"k", 5), (b"other", b"k", 5)]), 1.0)
    assert_dropped(core, transport, log, b"w1.1")
    assert core.alarms.schedule.services == {} and [(f[2], f[3]) for f in transport.replies] == [(b"b", b"502")]
    assert_untouched(core, transport, a)


@pytest.mark.parametrize("payload", [
    W_RETIRING,                                   # no reason length
    W_RETIRING + b"\x09abort",                    # a reason cut short
    retiring_message("abort", []) + b"\x00\x01",  # a ticket cut short
    "another's ticket",
    b"\x07\x00\x04echokey",                       # EVICT: the broker's word, never a worker's
    W_REQUEST,
    b"\x63",
    b"",
], ids=["empty", "short reason", "short ticket", "another's ticket", "evict", "request", "unknown", "nothing"])
def test_a_retiring_that_does_not_parse_or_a_command_workers_do_not_send_is_a_violation(tmp_path, payload):
    core, transport, log, a, b = two_workers(tmp_path)
    if payload == "another's ticket":
        payload = retiring_message("abort", [a])
    core.on_worker(b"w1.1", payload, 1.0)
    assert_dropped(core, transport, log, b"w1.1")
    assert [(f[2], f[3]) for f in transport.replies] == [(b"b", b"502")]
    assert_untouched(core, transport, a)


def test_anything_but_ready_from_an_unlinked_identity_is_refused_once_and_never_linked(tmp_path):
    core, transport, log, a, b = two_workers(tmp_path)
    reply(core, b"rogue", a, 1.0, body=b"forged")        # a live worker's ticket, guessed
    [(event, stand_in, cause)] = core.events
    assert (event, stand_in.identity, cause) == (Event.SILENT, b"rogue", "protocol violation")
    assert b"rogue" not in core.links and transport.replies == []
    core.events.clear()
    ready(core, b"rogue", 1.1)                            # then a READY: never linked
    reply(core, b"rogue", a, 1.2, body=b"forged")
    assert b"rogue" not in core.links and not core.events
    assert [e for e, _ in log.events if e == "worker.protocol_violation"] == ["worker.protocol_violation"]
    assert_untouched(core, transport, a)
    reply(core, b"w1.1", b, 2.0, body=b"b's own")
    assert [(f[0], f[4]) for f in transport.replies if f[0] == b"c-b"] == [(b"c-b", b"b's own")]


@pytest.mark.parametrize("ready_json", [
    b"not json", b"[1, 2]", b'{"pid": 1, "capacity": 4}', b'{"pid": 1, "capacity": 0, "services": []}',
    b'{"pid": 1, "capacity": 4, "services": [1]}', b'{"pid": "x", "capacity": 4, "services": []}',
    b'{"pid": 1e999, "capacity": 4, "services": []}', b"[" * 100000, b"\xff\xfe",
], ids=["text", "list", "no services", "no capacity", "services not names", "pid", "pid overflow",
        "deep", "not utf-8"])
def test_a_ready_that_does_not_parse_is_a_violation_and_links_nothing(tmp_path, ready_json):
    core, transport, log, a, b = two_workers(tmp_path)
    core.on_worker(b"w2.1", W_READY + ready_json, 1.0)
    [(event, stand_in, cause)] = core.events
    assert (event, stand_in.identity, cause) == (Event.SILENT, b"w2.1", "protocol violation")
    assert b"w2.1" not in core.links and b"w2.1" in core.gone and transport.replies == []
    assert_untouched(core, transport, a)


def test_a_ready_the_daemon_does_not_expect_is_refused(tmp_path):
    """Daemon.expects: only the identities (and pids) of workers it started may link."""
    core, transport, log = make_core(tmp_path)
    core.expected = lambda identity, info: None if (identity, info["pid"]) == (b"w0.1", 100) else "not ours"
    ready(core, b"w9.9", 0.0)
    assert not core.links and [(e[0], e[1].identity) for e in core.events] == [(Event.SILENT, b"w9.9")]
    assert "not ours" in log.events[-1][1]["error"]
    ready(core, b"w0.1", 0.0)
    assert list(core.links) == [b"w0.1"]
    core.on_client(native(b"r1"), 0.1)
    core.dispatch(0.1)
    assert len(transport.requests(b"w0.1")) == 1 and not transport.requests(b"w9.9")


def test_a_gone_workers_late_messages_are_ignored_quietly_and_cross_nothing(tmp_path):
    """Declared dead (heartbeat lost), it may still be sending: its words no longer count."""
    core, transport, log, a, b = two_workers(tmp_path)
    core.worker_gone(b"w1.1", "heartbeat lost", 1.0)
    assert [(f[2], f[3]) for f in transport.replies] == [(b"b", b"502")]
    reply(core, b"w1.1", b, 1.1, body=b"late")
    reply(core, b"w1.1", a, 1.1, body=b"late")
    ready(core, b"w1.1", 1.2)
    assert b"w1.1" not in core.links and [(f[2], f[3]) for f in transport.replies] == [(b"b", b"502")]
    assert not [e for e, _ in log.events if e == "worker.protocol_violation"]
    assert_untouched(core, transport, a)
